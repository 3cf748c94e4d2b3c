"""CLI start-up: `ftkit --help` and `ftkit validate` must not import torch/transformers.
Targets: <= 0.3 s and <= 0.5 s wall on the CI machine size (2 cores).

    python bench/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _util import ROOT, repeat, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    sibling = Path(sys.executable).parent / "ftkit"
    exe = str(sibling) if sibling.exists() else shutil.which("ftkit") or "ftkit"
    cases = {
        "ftkit --help": [exe, "--help"],
        "ftkit validate recipes/quickstart.yaml": [exe, "validate", str(ROOT / "recipes" / "quickstart.yaml")],
        "ftkit validate (all recipes)": [exe, "validate", *map(str, sorted((ROOT / "recipes").glob("*.yaml")))],
        "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
    }
    results = {name: repeat(argv, args.runs) for name, argv in cases.items()}
    results["targets_s"] = {"ftkit --help": 0.3, "ftkit validate recipes/quickstart.yaml": 0.5}
    for name, r in results.items():
        print(f"{name:<45} {r}")
    print(f"saved to {save('cli_startup', results)}")


if __name__ == "__main__":
    main()
