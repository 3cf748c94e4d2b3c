"""ftkit doctor: each check turns planted facts into the right finding (severity, message,
remediation), the snapshot round-trips, and --compare flags a planted drift."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ftkit.gpu.nvml import SimulatedNvml
from ftkit.observe import doctor as dr
from ftkit.recipe.models import Machine
from tests.conftest import RECIPES, run_cli

GIB = 2**30


class Nv(SimulatedNvml):
    """Simulated GPUs whose samples carry planted values."""

    def __init__(self, names: list[str], planted: dict[int, dict[str, Any]] | None = None, cuda: str = "13.0") -> None:
        super().__init__(names)
        self.planted = planted or {}
        self.cuda = cuda

    def sample(self, index: int, at: float | None = None) -> dict[str, Any]:
        return {**super().sample(index, at), **self.planted.get(index, {})}

    def cuda_driver_version(self) -> str:
        return self.cuda


class Fake(dr.Sources):
    def __init__(self, *, info: dict[str, Any] | None = None, nv: Any = None, images: list[dict[str, Any]] | None = None,
                 free: int = 500 * GIB, ref_skew: float | None = None, hooks: tuple[str, ...] = (),
                 originals: dict[str, Any] | None = None) -> None:
        super().__init__(offline=True)
        self.info, self.nv, self.images, self.free = info, nv, images or [], free
        self.ref_skew, self.hooks, self.originals = ref_skew, hooks, originals or {}

    def docker_info(self) -> dict[str, Any] | None:
        return None if self.info is None else {**self.info, "_local_time": time.time()}

    def ftkit_images(self) -> list[dict[str, Any]]:
        return self.images

    def nvml(self) -> Any:
        return self.nv

    def reference_time(self) -> tuple[float, str] | None:
        return None if self.ref_skew is None else (time.time() - self.ref_skew, "https://time.example/")

    def disk_usage(self, path: Path) -> tuple[int, int, int] | None:
        return self.free, 1000 * GIB, 1

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.hooks else None

    def power_originals(self) -> dict[str, dict[str, Any]]:
        return self.originals


def _engine(version: str = "27.3.1", runtimes: tuple[str, ...] = ("runc",), skew_s: float = 0.0) -> dict[str, Any]:
    t = time.time() - skew_s
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"
    return {"ServerVersion": version, "Runtimes": {r: {} for r in runtimes}, "SystemTime": stamp}


def _machine(gpus: int = 2, executor: str = "docker", **extra: Any) -> Machine:
    data: dict[str, Any] = {"ftkit": 1, "kind": "machine", "name": "lab", "executor": executor,
                            "gpus": [{"index": i, "model": "RTX 4090",
                                      "power": {"min_w": 150, "max_w": 600, "default_w": 450}} for i in range(gpus)],
                            "psu": {"watts": 1600}, **extra}
    return Machine.model_validate(data)


def _find(result: dr.DoctorResult, check: str) -> list[dr.Finding]:
    return [f for f in result.findings if f.check == check]


def _run(machine: Machine, src: Fake, tmp_path: Path, **kw: Any) -> dr.DoctorResult:
    return dr.diagnose(machine, src, runs_root=tmp_path / "runs", **kw)


@pytest.fixture(autouse=True)
def _lease_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "lease"))


def test_a_x16_card_at_x4_under_load_is_flagged_idle_is_only_noted(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090"] * 3, {0: {"pcie_link_width": 4, "gpu_util": 97},
                                 1: {"pcie_link_width": 4, "gpu_util": 0, "pcie_link_gen": 1},
                                 2: {"pcie_max_link_width": 4, "pcie_link_width": 4}})
    r = _run(_machine(3), Fake(info=_engine(runtimes=("runc", "nvidia")), nv=nv), tmp_path)
    (f0,), (f1,), (f2,) = _find(r, "gpu0-pcie"), _find(r, "gpu1-pcie"), _find(r, "gpu2-pcie")
    assert f0.severity == "warn" and "x4" in f0.message and "under load" in f0.message and "x16" in f0.message
    assert "motherboard" in (f0.remediation or "")
    assert f1.severity == "info" and "idle" in f1.message and "under load" in (f1.remediation or "")
    assert f2.severity == "warn" and "at most x4" in f2.message


def test_the_link_under_load_is_taken_from_a_runs_telemetry(tmp_path: Path) -> None:
    from ftkit.gpu.telemetry import COLUMNS

    run = tmp_path / "runs" / "20260101T000000Z-x"
    run.mkdir(parents=True)
    row = dict.fromkeys(COLUMNS, "")
    row.update(gpu="0", source="nvml", gpu_util="95", pcie_link_width="8", pcie_link_gen="4")
    (run / "telemetry.csv").write_text(",".join(COLUMNS) + "\n" + ",".join(row[c] for c in COLUMNS) + "\n")
    nv = Nv(["RTX 4090"], {0: {"gpu_util": 0}})
    r = _run(_machine(1), Fake(info=_engine(runtimes=("nvidia",)), nv=nv), tmp_path)
    (f,) = _find(r, "gpu0-pcie")
    assert f.severity == "warn" and "x8" in f.message and run.name in f.message


def test_power_brake_and_heat_point_at_the_psu_and_cooling(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090"], {0: {"clocks_event_reasons": 0x80 | 0x8, "gpu_temp_c": 91}})
    r = _run(_machine(1), Fake(info=_engine(runtimes=("nvidia",)), nv=nv), tmp_path)
    msgs = " | ".join(f.message for f in _find(r, "gpu0"))
    assert "hw_power_brake" in msgs and "hw_slowdown" in msgs and "91 °C" in msgs
    assert any("PSU" in (f.remediation or "") for f in _find(r, "gpu0"))


def test_nvidia_runtime(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090"])
    r = _run(_machine(1), Fake(info=_engine(), nv=nv), tmp_path)
    (f,) = _find(r, "nvidia-runtime")
    assert f.severity == "error" and "nvidia-ctk" in (f.remediation or "") and r.worst() == "error"
    r = _run(_machine(1), Fake(info=_engine(), nv=Nv(["RTX 4090"]), hooks=("nvidia-container-runtime-hook",)), tmp_path)
    assert _find(r, "nvidia-runtime")[0].severity == "ok"
    r = _run(_machine(1), Fake(info=_engine(runtimes=("runc", "nvidia")), nv=Nv(["RTX 4090"])), tmp_path)
    assert _find(r, "nvidia-runtime")[0].severity == "ok"
    r = _run(_machine(0, executor="local"), Fake(info=_engine()), tmp_path)
    assert _find(r, "nvidia-runtime")[0].severity == "info"


def test_no_engine_is_an_error_only_for_docker_machines(tmp_path: Path) -> None:
    assert _find(_run(_machine(0), Fake(), tmp_path), "docker")[0].severity == "error"
    assert _find(_run(_machine(0, executor="local"), Fake(), tmp_path), "docker")[0].severity == "info"
    old = _find(_run(_machine(0), Fake(info=_engine("19.03.5")), tmp_path), "docker")[0]
    assert old.severity == "warn" and "19.03.5" in old.message


def _image(cuda: str, variant: str = "cuda13.0") -> dict[str, Any]:
    return {"Id": "sha256:" + "a" * 64, "RepoTags": [f"ftkit/train:{variant}-abc"],
            "Config": {"Labels": {"dev.ftkit.image": "train", "dev.ftkit.variant": variant, "dev.ftkit.cuda": cuda,
                                  "dev.ftkit.torch": "2.9.0", "dev.ftkit.lock-sha256": "1" * 64,
                                  "dev.ftkit.content-hash": "2" * 64}}}


def test_driver_against_each_images_cuda(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090"], cuda="12.8")
    src = Fake(info=_engine(runtimes=("nvidia",)), nv=nv, images=[_image("13.0"), _image("12.8", "cuda12.8"),
                                                                 _image("none", "cpu")])
    r = _run(_machine(1), src, tmp_path)
    by = {f.message.split(": ")[0]: f for f in _find(r, "images")}
    assert by["ftkit/train:cuda13.0-abc"].severity == "error" and "12.8" in by["ftkit/train:cuda13.0-abc"].message
    assert by["ftkit/train:cuda12.8-abc"].severity == "ok" and by["ftkit/train:cpu-abc"].severity == "ok"
    assert set(r.facts["images"]) == {"train/cuda13.0", "train/cuda12.8", "train/cpu"}


def test_profile_and_gpu_disagree(tmp_path: Path) -> None:
    nv = Nv(["RTX 3090 Ti", "RTX 4090"])  # the profile says two 4090s
    r = _run(_machine(3), Fake(info=_engine(runtimes=("nvidia",)), nv=nv), tmp_path)
    assert any("profile says RTX 4090, NVML says RTX 3090 Ti" in f.message for f in _find(r, "gpu0"))
    power0 = [f for f in _find(r, "gpu0-power") if f.severity == "warn"]
    assert power0 and "default_w 450 W (GPU reports 350 W)" in power0[0].message
    assert any(f.severity == "error" and "GPU 2" in f.message for f in _find(r, "gpu2"))


def test_a_cap_ftkit_left_behind_and_the_psu_budget(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090", "RTX 4090"])
    nv.set_power_limit_w(0, 300)
    src = Fake(info=_engine(runtimes=("nvidia",)), nv=nv, originals={"GPU-simulated-0": {"original_w": 450}})
    m = _machine(2, psu={"watts": 1000})
    r = _run(m, src, tmp_path)
    (left,) = [f for f in _find(r, "gpu0-power") if f.severity == "warn"]
    assert "has not restored" in left.message and "ftkit power restore" in (left.remediation or "")
    (psu,) = _find(r, "psu")
    assert psu.severity == "warn" and "cap every GPU" in (psu.remediation or "")


@pytest.mark.parametrize(("skew", "severity"), [(0.0, "ok"), (6.0, "warn"), (-120.0, "error")])
def test_clock_skew_against_the_engine_and_a_web_server(tmp_path: Path, skew: float, severity: str) -> None:
    r = _run(_machine(0, executor="local"), Fake(info=_engine(skew_s=skew), ref_skew=skew), tmp_path)
    clocks = _find(r, "clock")
    assert len(clocks) == 2 and {f.severity for f in clocks} == {severity}
    shown = float(clocks[0].message.split()[2])
    assert abs(shown - skew) < 0.5


def test_no_reference_clock_is_a_note(tmp_path: Path) -> None:
    (f,) = _find(_run(_machine(0, executor="local"), Fake(), tmp_path), "clock")
    assert f.severity == "info" and "NTP" in (f.remediation or "")


def test_free_disk_against_the_recipes_needs(tmp_path: Path) -> None:
    from ftkit.recipe.resolve import resolve
    from ftkit.recipe.validate import load_recipe

    m = _machine(1, executor="local", paths={"datasets": str(tmp_path), "runs": str(tmp_path / "runs")})
    recipe = resolve(load_recipe(str(RECIPES / "llama31-8b-lora-1gpu.yaml")), m)
    r = _run(m, Fake(info=_engine(), nv=Nv(["RTX 4090"]), free=10 * GIB), tmp_path, recipes=[recipe])
    (f,) = _find(r, "disk")
    assert f.severity == "error" and "8b" in f.message.lower() and "GiB" in f.message
    r = _run(m, Fake(info=_engine(), nv=Nv(["RTX 4090"]), free=900 * GIB), tmp_path, recipes=[recipe])
    assert _find(r, "disk")[0].severity == "ok"
    r = _run(m, Fake(info=_engine(), nv=Nv(["RTX 4090"]), free=5 * GIB), tmp_path)
    assert _find(r, "disk")[0].severity == "warn"  # no recipe: a generic floor


def test_stale_runs_and_the_lease_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for name, status in (("20260101T000000Z-dead", "running"), ("20260101T000001Z-done", "succeeded")):
        (runs / name).mkdir(parents=True)
        (runs / name / "state.json").write_text(json.dumps(
            {"status": status, "pid": 2**22 + 12345, "pid_start": 1, "power": {"original_w": {"0": 450}}}))
    lease_file = tmp_path / "lease-is-a-file"
    lease_file.write_text("")
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(lease_file))
    r = _run(_machine(0, executor="local"), Fake(), tmp_path)
    (stale,) = _find(r, "stale-runs")
    assert stale.severity == "warn" and "dead" in stale.message and "capped" in stale.message
    assert "ftkit down 20260101T000000Z-dead" in (stale.remediation or "")
    (lease,) = _find(r, "lease")
    assert lease.severity == "error" and "not a directory" in lease.message
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "new" / "lease"))
    assert _find(_run(_machine(0, executor="local"), Fake(), tmp_path), "lease")[0].severity == "ok"


def test_snapshot_and_compare_flag_a_planted_drift(tmp_path: Path) -> None:
    nv = Nv(["RTX 4090"])
    r = _run(_machine(1), Fake(info=_engine(runtimes=("nvidia",)), nv=nv, images=[_image("13.0")]), tmp_path)
    snap = dr.snapshot(r)
    for key in ("python", "ftkit", "packages", "torch", "torch_cuda", "gpu_driver", "cuda_driver", "images", "findings"):
        assert key in snap, key
    a = tmp_path / "a.json"
    a.write_text(json.dumps(snap))
    assert dr.compare(snap, json.loads(a.read_text())) == []
    other = json.loads(a.read_text())
    other["packages"]["torch"] = "2.0.0"
    other["python"] = "3.10.14"
    other["images"]["train/cuda13.0"][0]["lock_sha256"] = "f" * 64
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    drift = {d.field: d for d in dr.compare(snap, other)}
    assert drift["packages.torch"].severity == "error" and drift["packages.torch"].b == "2.0.0"
    assert drift["python"].severity == "error" and drift["images.train/cuda13.0"].severity == "error"
    res = run_cli("doctor", "--compare", str(a), str(b))
    assert res.code == 1 and "packages.torch" in res.out and "2.0.0" in res.out
    res = run_cli("doctor", "--compare", str(a), str(a))
    assert res.code == 0 and "no drift" in res.out


def test_compare_refuses_what_is_not_a_snapshot(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"python": "3.11",\n oops}')
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"ftkit_doctor": 1}))
    res = run_cli("doctor", "--compare", str(bad), str(good))
    assert res.code == 2 and f"{bad}:2:" in res.err and "Traceback" not in res.err
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    res = run_cli("doctor", "--compare", str(other), str(good))
    assert res.code == 2 and "doctor --json" in res.err


def test_doctor_runs_on_this_machine(tmp_path: Path) -> None:
    """The real sources: whatever this host has, doctor answers without a traceback."""
    res = run_cli("doctor", "--machine", str(RECIPES / "machines" / "cpu.yaml"), "--offline", "--json",
                  "--runs-dir", str(tmp_path / "runs"), "--recipe", str(RECIPES / "quickstart.yaml"))
    assert res.code in (0, 1), res.err
    snap = json.loads(res.out)
    assert snap["ftkit_doctor"] == 1 and snap["machine"] == "cpu" and snap["python"]
    assert {f["check"] for f in snap["findings"]} >= {"docker", "nvml", "disk", "clock", "lease"}
    human = run_cli("doctor", "--machine", str(RECIPES / "machines" / "cpu.yaml"), "--offline")
    assert human.code in (0, 1) and "error(s)" in human.out


@pytest.mark.parametrize("engine", [True, False])
def test_a_machine_without_gpus_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: bool) -> None:
    """The newcomer's first `ftkit doctor` on a laptop: no NVIDIA driver, with or without a
    Docker engine, the detected host or the CPU profile. Nothing is wrong there: exit 0,
    and the GPU checks say "a CPU machine" as a note, not an error."""
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    monkeypatch.setattr(dr.Sources, "nvml", lambda self: None)
    monkeypatch.setattr(dr.Sources, "docker_info", lambda self: _engine() if engine else None)
    monkeypatch.setattr(dr.Sources, "ftkit_images", lambda self: [])
    monkeypatch.setenv("FTKIT_STATE_DIR", str(tmp_path / "state"))
    for machine in ([], ["--machine", str(RECIPES / "machines" / "cpu.yaml"), "--recipe", str(RECIPES / "quickstart.yaml")]):
        res = run_cli("doctor", *machine, "--offline", "--runs-dir", str(tmp_path / "runs"))
        assert res.code == 0, res.out + res.err
        assert "0 error(s)" in res.out and "no NVIDIA driver: a CPU machine" in res.out
