"""Power limits with a memory and with owners: a run ending never uncaps another run that is
still training; a GPU that is lost never stops the others going back; a record of a GPU
that is gone can be forgotten; `ftkit power show/set/restore` work on simulated GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.gpu import power
from ftkit.gpu.nvml import SimulatedNvml, open_nvml
from tests.conftest import limits, run_cli


def inject(sim: Path, **fields) -> None:  # type: ignore[no-untyped-def]
    SimulatedNvml([], str(sim))._sync(lambda s: s.update(fields))


def live_holder(name: str) -> tuple[power.Holder, subprocess.Popen[bytes]]:
    """A holder whose process is alive (another ftkit run, still training)."""
    from ftkit.procs import process_start

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return power.Holder(name, proc.pid, process_start(proc.pid)), proc


def test_one_run_ending_never_uncaps_another(sim: Path) -> None:
    nv = open_nvml()
    b, proc = live_holder("run-b")
    try:
        power.set_limits(nv, {0: 250}, holder=b)  # run B trains at 250 W
        a = power.Holder.this_process("run-a")
        power.set_limits(nv, {0: 300, 1: 300}, holder=a)  # run A asks 300 W: B's lower cap stays
        assert limits(sim) == [250.0, 300.0]
        report = power.release(nv, holder="run-a")  # A finishes
        assert limits(sim) == [250.0, 350.0] and 0 in report.kept and "run-b" in report.kept[0]
        assert power.restore(nv).kept  # by hand, without --force: B is still training
        assert limits(sim)[0] == 250.0
    finally:
        proc.kill()
        proc.wait()
    power.restore(nv)  # B is gone now: its GPU goes back
    assert limits(sim) == [450.0, 350.0] and power.read_originals() == {}


def test_a_lost_gpu_does_not_stop_the_others(sim: Path) -> None:
    nv = open_nvml()
    power.set_limits(nv, {0: 300, 1: 300}, holder=power.Holder("gone-run", 999999, 1))
    inject(sim, lost=[0], fail_set=[0])  # GPU 0 fell off the bus: listings and its calls fail
    report = power.restore(nv)
    assert limits(sim)[1] == 350.0 and report.changed == {1: 350.0}
    assert any("GPU 0" in who for who in report.failed)
    inject(sim, lost=[], fail_set=[])
    assert power.restore(nv).changed == {0: 450.0}


def test_a_record_of_a_removed_gpu_can_be_forgotten(sim: Path) -> None:
    nv = open_nvml()
    power.set_limits(nv, {1: 300}, holder=power.Holder("old", 999999, 1))
    with power._locked() as data:  # the record names a card that is no longer installed
        data["gpus"]["GPU-old-card"] = data["gpus"].pop("GPU-simulated-1")
    assert power.restore(nv).failed
    result = run_cli("power", "restore", "--forget")
    assert result.code == 0, result.err
    assert power.read_originals() == {}


def test_power_commands(sim: Path) -> None:
    result = run_cli("power", "set", "--gpus", "0", "--watts", "320")
    assert result.code == 0, result.err
    assert limits(sim) == [320.0, 350.0]
    shown = json.loads(run_cli("power", "show", "--json").out)["gpus"]
    assert shown[0]["original_w"] == 450.0 and shown[0]["holders"]["manual"]["cap_w"] == 320.0
    assert "SIMULATED" in run_cli("power", "show").out
    assert run_cli("power", "set", "--gpus", "0", "--watts", "9000").code == 2
    assert run_cli("power", "set", "--gpus", "x", "--watts", "300").code == 2
    result = run_cli("power", "restore", "--dry-run")
    assert result.code == 0 and "would restore GPU 0" in result.out and limits(sim)[0] == 320.0
    result = run_cli("power", "restore")
    assert result.code == 0 and "restored to 450 W" in result.out
    assert limits(sim) == [450.0, 350.0]
    calls = json.loads(sim.read_text())["calls"]
    assert [c["watts"] for c in calls if c["call"] == "set_power_limit_w"] == [320.0, 450.0]


def test_an_unreadable_simulated_state_is_an_error_not_a_reset(sim: Path) -> None:
    from ftkit.errors import GpuError

    open_nvml().set_power_limit_w(0, 300)
    sim.write_text('{"gpus": [')  # torn by something outside ftkit
    with pytest.raises(GpuError, match="unreadable"):
        open_nvml().power_limit_w(0)


@pytest.fixture
def no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine without GPUs: no NVIDIA driver answers (whatever this host has)."""
    import ftkit.gpu.nvml as nvml

    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    monkeypatch.setattr(nvml, "open_nvml", lambda: None)
    monkeypatch.setenv("FTKIT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_power_on_a_machine_without_gpus(no_gpus: Path) -> None:
    """Nothing is wrong on a CPU machine: show and restore say so and exit 0; capping GPUs
    that are not there is a mistake in the request: exit 2, one line."""
    shown = run_cli("power", "show")
    assert shown.code == 0, shown.err
    assert "no GPUs here" in shown.out and shown.err == ""
    as_json = json.loads(run_cli("power", "show", "--json").out)
    assert as_json["gpus"] == [] and as_json["nvml"] is None
    restored = run_cli("power", "restore")
    assert restored.code == 0 and "nothing to restore" in restored.out
    for args in (("--watts", "300"), ("--gpus", "0", "--watts", "300"), ("--watts", "300", "--dry-run")):
        capped = run_cli("power", "set", *args)
        assert capped.code == 2, (args, capped.out, capped.err)
        assert len(capped.err.strip().splitlines()) == 1 and "no GPUs here" in capped.err, capped.err
    assert not (no_gpus / "power-originals.json").exists()


def test_power_show_without_a_driver_but_with_recorded_originals_is_an_error(no_gpus: Path) -> None:
    """Originals recorded and no driver to put them back: that is worth exit 1."""
    no_gpus.mkdir()
    (no_gpus / "power-originals.json").write_text(json.dumps(
        {"gpus": {"GPU-1": {"index": 0, "name": "RTX 4090", "original_w": 450.0, "holders": {}}}}))
    shown = run_cli("power", "show")
    assert shown.code == 1 and "GPU 0 (RTX 4090)" in shown.err and "ftkit power restore" in shown.err


def test_power_set_names_a_gpu_that_is_not_there(sim: Path) -> None:
    res = run_cli("power", "set", "--gpus", "0,5", "--watts", "300")
    assert res.code == 2 and "GPU 5 is not on this machine" in res.err
    assert not sim.exists() or limits(sim) == [450.0, 350.0]  # nothing capped
