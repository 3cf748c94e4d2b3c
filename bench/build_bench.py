"""Image builds: the no-op rebuild, a rebuild after a recipe-only change, and image sizes
per variant next to the anchors (vllm/vllm-openai about 12 GB, the oumi image about 14 GB).

Builds the cpu training and transformers serving images for real (from the local base
image, as CI does). The CUDA variants cannot be built on a machine without the registry's
CUDA wheels in reach of CI time; for those the script sums the sizes of the exact files
their locks pin (compressed wheels), a lower bound on the image.

    python bench/build_bench.py [--base-image IMG] [--wheelhouse DIR] [--ca-bundle FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

from _util import ROOT, repeat, run_measured, save

ANCHORS_GB = {"vllm/vllm-openai": 12, "oumi": 14}


def ftkit_build_argv(args: argparse.Namespace, lock: Path) -> list[str]:
    exe = str(Path(sys.executable).parent / "ftkit")
    argv = [exe, "build", "--image", "all", "--images-lock", str(lock)]
    if args.base_image:
        argv += ["--base-image", args.base_image]
    if args.wheelhouse:
        argv += ["--wheelhouse", args.wheelhouse]
    if args.ca_bundle:
        argv += ["--ca-bundle", args.ca_bundle]
    return argv


def locked_download_bytes(lock_path: Path, python: str) -> tuple[int, int]:
    """Sum of the sizes of the files the lock pins for this platform (one file per package)."""
    body = lock_path.read_text()
    total, count = 0, 0
    tag = "cp" + python.replace(".", "")
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\\;]+)[^\n]*\n((?:\s+--hash=sha256:[0-9a-f]+[^\n]*\n)+)",
                         body, re.M):
        name, hashes = m.group(1), set(re.findall(r"sha256:([0-9a-f]+)", m.group(3)))
        req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            files = json.load(urllib.request.urlopen(req, timeout=30))["files"]
        except Exception:  # noqa: BLE001 - a package from another index (torch CPU): skip
            continue
        best = None
        for f in files:
            if f.get("hashes", {}).get("sha256") not in hashes:
                continue
            fn = f["filename"]
            ok = fn.endswith(".whl") and ("x86_64" in fn or "none-any" in fn) and (tag in fn or "abi3" in fn or "py3" in fn)
            if ok and (best is None or f["size"] > best["size"]):
                best = f
        if best is None:
            best = next((f for f in files if f.get("hashes", {}).get("sha256") in hashes), None)
        if best:
            total += int(best["size"])
            count += 1
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-image", default="ftkit-test/bookworm-python:latest")
    ap.add_argument("--wheelhouse", default="/opt/wheels")
    ap.add_argument("--ca-bundle", default="/etc/ssl/certs/ca-certificates.crt")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-sizes", action="store_true")
    args = ap.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(tmp) / "images.lock.json"
        argv = ftkit_build_argv(args, lock)
        first = run_measured(argv)
        if first["rc"] != 0:
            raise SystemExit(first["output"][-3000:])
        out["first_build"] = {"wall_s": first["wall_s"], "output": first["output"].strip().splitlines()[-3:]}
        out["noop_rebuild"] = repeat(argv, args.runs)
        # A recipe-only change: recipes are not build inputs, so the tags do not move.
        recipe = ROOT / "recipes" / "quickstart.yaml"
        saved = recipe.read_text()
        try:
            recipe.write_text(saved.replace("learning_rate: 0.003", "learning_rate: 0.002"))
            changed = run_measured(argv)
        finally:
            recipe.write_text(saved)
        out["rebuild_after_recipe_change"] = {"wall_s": changed["wall_s"],
                                              "all_up_to_date": changed["output"].count("up to date") == 2}
        images = json.loads(lock.read_text())["images"]
        sizes = {k: round(v["size_bytes"] / 1e9, 2) for k, v in images.items()}
    out["image_size_gb"] = sizes
    out["anchors_gb"] = ANCHORS_GB
    if not args.skip_sizes:
        from ftkit.images.variants import load

        variants = load(ROOT)
        est = {}
        for image, variant in (("train", "cuda13.0"), ("serve", "vllm")):
            v = variants.get(image, variant)
            total, count = locked_download_bytes(ROOT / "images" / "locks" / f"{image}-{variant}.txt", v.python)
            est[f"{image}/{variant}"] = {"locked_wheels_gb": round(total / 1e9, 2), "packages_sized": count}
        out["cuda_variants_locked_download"] = est
    print(json.dumps(out, indent=2))
    print(f"saved to {save('build', out)}")


if __name__ == "__main__":
    main()
