"""The telemetry sampler: one row per GPU per tick with DCGM-named columns, wall-clock
timestamps, a `source` column that never hides a simulation, and no way to take a run down
(NVML errors, a hung call, an unwritable file)."""

from __future__ import annotations

import csv
import datetime as dt
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from ftkit.gpu import nvml
from ftkit.gpu.nvml import (
    CLOCK_EVENT_FLAGS,
    SAMPLE_FIELDS,
    GpuInfo,
    RealNvml,
    SimulatedNvml,
    decode_clock_events,
)
from ftkit.gpu.telemetry import COLUMNS, Sampler, dir_size_mib, read_csv


def _sim(n: int = 2) -> SimulatedNvml:
    return SimulatedNvml(["RTX 4090"] * n)


def _run(sampler: Sampler, seconds: float) -> dict[str, Any]:
    sampler.start()
    time.sleep(seconds)
    return sampler.stop()


def test_simulated_rows_per_gpu_per_tick_with_timestamps(tmp_path: Path) -> None:
    csv_path = tmp_path / "telemetry.csv"
    (tmp_path / "blob").write_bytes(b"x" * (3 << 20))
    summary = _run(Sampler(lambda: _sim(2), [0, 1], csv_path, interval_s=0.1, step="train", run_dir=tmp_path), 0.55)
    rows = read_csv(csv_path)
    with open(csv_path, newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert summary["ticks"] >= 4 and summary["rows"] == 2 * summary["ticks"] == len(rows)
    assert summary["source"] == "simulated" and summary["notes"] == []
    assert {r["gpu"] for r in rows} == {"0", "1"}
    assert all(r["source"] == "simulated" and r["step"] == "train" for r in rows)
    walls = [float(r["wall_time"]) for r in rows[::2]]
    assert walls == sorted(walls) and abs(walls[0] - time.time()) < 30
    for r in rows:  # ISO UTC and unix time name the same instant
        iso = dt.datetime.fromisoformat(r["timestamp"])
        assert iso.tzinfo is not None and abs(iso.timestamp() - float(r["wall_time"])) < 0.01
        for f in ("gpu_util", "gpu_temp_c", "power_usage_w", "enforced_power_limit_w", "pcie_link_width",
                  "sm_clock_mhz", "total_energy_consumption_mj", "cpu_percent", "ram_used_mib", "run_dir_mib"):
            assert r[f] != "", f
        assert float(r["power_usage_w"]) <= float(r["enforced_power_limit_w"])
    assert float(rows[-1]["run_dir_mib"]) >= 3.0  # the 3 MiB file is counted
    energy = [int(r["total_energy_consumption_mj"]) for r in rows if r["gpu"] == "0"]
    assert energy == sorted(energy)


def test_simulated_sample_is_deterministic_and_follows_the_cap() -> None:
    sim = _sim(1)
    a, b = sim.sample(0, at=1.8e9), sim.sample(0, at=1.8e9)
    assert a == b and a["source"] == "simulated" and set(SAMPLE_FIELDS) <= set(a)
    sim.set_power_limit_w(0, 250)
    capped = [sim.sample(0, at=1.8e9 + k) for k in range(26)]
    assert all(s["enforced_power_limit_w"] == 250 and s["power_usage_w"] <= 250 for s in capped)
    assert any(s["clocks_event_reasons"] & CLOCK_EVENT_FLAGS["sw_power_cap"] for s in capped)
    assert not any(s["clocks_event_reasons"] & (CLOCK_EVENT_FLAGS["hw_slowdown"] | CLOCK_EVENT_FLAGS["hw_power_brake"])
                   for s in capped)
    assert capped[0]["sm_clock_mhz"] < a["sm_clock_mhz"]


def test_decode_clock_events() -> None:
    flags = decode_clock_events(0x8 | 0x80)
    assert flags["hw_slowdown"] and flags["hw_power_brake"] and not flags["sw_power_cap"]
    assert set(decode_clock_events(None).values()) == {None}


class _FakePynvml(types.SimpleNamespace):
    """Enough of pynvml for RealNvml.sample: PCIe reads unsupported, two XIDs queued."""


def _fake_pynvml() -> Any:
    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's names
        pass

    class NVMLError_NoPermission(NVMLError):  # noqa: N801
        pass

    class NVMLError_Timeout(NVMLError):  # noqa: N801
        pass

    xids = [79, 48]

    def unsupported(*a: Any) -> Any:
        raise NVMLError_NotSupported("Not Supported")

    def wait(es: Any, ms: int) -> Any:
        if not xids:
            raise NVMLError_Timeout("Timeout")
        return types.SimpleNamespace(eventData=xids.pop(0))

    return _FakePynvml(
        NVMLError=NVMLError, NVMLError_NotSupported=NVMLError_NotSupported,
        NVMLError_NoPermission=NVMLError_NoPermission, NVMLError_Timeout=NVMLError_Timeout,
        NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, nvmlEventTypeXidCriticalError=8,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=41),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=10 * 2**30, total=24 * 2**30),
        nvmlDeviceGetTemperature=lambda h, s: 81,
        nvmlDeviceGetPowerUsage=lambda h: 349_500,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 350_000,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 123_456_789,
        nvmlDeviceGetClockInfo=lambda h, which: {1: 1800, 2: 10501}[which],
        nvmlDeviceGetCurrPcieLinkGeneration=unsupported, nvmlDeviceGetCurrPcieLinkWidth=lambda h: 4,
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 4, nvmlDeviceGetMaxPcieLinkWidth=lambda h: 16,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x80 | 0x4,
        nvmlEventSetCreate=lambda: "es", nvmlDeviceRegisterEvents=lambda h, t, es: None,
        nvmlEventSetWait_v2=wait, nvmlEventSetFree=lambda es: None, nvmlShutdown=lambda: None,
    )


def test_real_backend_reads_each_field_on_its_own() -> None:
    real = object.__new__(RealNvml)  # no driver here: the gateway code runs against a fake pynvml
    real._n = _fake_pynvml()
    s = real.sample(0)
    assert s["source"] == "nvml"
    assert s["gpu_util"] == 97 and s["fb_used_mib"] == 10240.0 and s["gpu_temp_c"] == 81
    assert s["power_usage_w"] == 349.5 and s["enforced_power_limit_w"] == 350.0
    assert s["sm_clock_mhz"] == 1800 and s["pcie_link_width"] == 4 and s["pcie_max_link_width"] == 16
    assert s["pcie_link_gen"] is None and any(e.startswith("pcie_link_gen:") for e in s["errors"])
    assert decode_clock_events(s["clocks_event_reasons"])["hw_power_brake"]
    assert s["xid_errors"] == "79;48"
    assert real.sample(0)["xid_errors"] == ""  # drained: only new XIDs show
    real.close()


class _Flaky:
    """An NVML whose GPU 1 fails every read and whose GPU 0 lacks one field."""

    simulated = False

    def inventory(self) -> list[GpuInfo]:
        raise nvml.GpuError("inventory broke")

    def sample(self, index: int) -> dict[str, Any]:
        if index == 1:
            raise nvml.GpuError("GPU is lost")
        out = {f: 1 for f in SAMPLE_FIELDS}
        out.update(gpu_temp_c=None, source="nvml", errors=["gpu_temp_c: not supported"])
        return out

    def close(self) -> None:
        pass


def test_nvml_errors_become_empty_fields_and_one_note(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    summary = _run(Sampler(_Flaky, [0, 1], csv_path, interval_s=0.05, step="train", run_dir=tmp_path), 0.4)
    rows = read_csv(csv_path)
    assert summary["ticks"] >= 3
    g0 = [r for r in rows if r["gpu"] == "0"]
    g1 = [r for r in rows if r["gpu"] == "1"]
    assert all(r["gpu_temp_c"] == "" and r["gpu_util"] == "1" for r in g0)
    assert all(r["gpu_util"] == "" and r["source"] == "nvml" for r in g1)
    assert "not supported" in g0[0]["notes"] and all(r["notes"] == "" for r in g0[1:])  # once, not every row
    assert "GPU is lost" in g1[0]["notes"]
    assert any("inventory broke" in n for n in summary["notes"])
    assert len(summary["notes"]) == 3


def test_no_nvml_or_a_crashing_factory_leaves_host_rows(tmp_path: Path) -> None:
    def boom() -> Any:
        raise RuntimeError("driver exploded")

    for factory, text in ((boom, "driver exploded"), (lambda: None, "no NVML")):
        csv_path = tmp_path / f"{text[:3]}.csv"
        summary = _run(Sampler(factory, [0], csv_path, interval_s=0.05, step="train"), 0.2)
        rows = read_csv(csv_path)
        assert rows and all(r["gpu_util"] == "" and r["ram_used_mib"] != "" for r in rows)
        assert text in rows[0]["notes"] and text in summary["notes"][0]
    summary = _run(Sampler(None, [], tmp_path / "host.csv", interval_s=0.05, step="merge"), 0.2)
    rows = read_csv(tmp_path / "host.csv")
    assert summary["source"] == "host" and all(r["source"] == "host" and r["gpu"] == "" for r in rows)


def test_a_hung_nvml_call_does_not_hold_stop(tmp_path: Path) -> None:
    release = threading.Event()

    class Hung(_Flaky):
        def inventory(self) -> list[GpuInfo]:
            return []

        def sample(self, index: int) -> dict[str, Any]:
            release.wait(10)
            return {"source": "nvml", "errors": []}

    s = Sampler(Hung, [0], tmp_path / "t.csv", interval_s=0.05, step="train").start()
    time.sleep(0.1)
    t0 = time.monotonic()
    summary = s.stop(timeout_s=0.3)
    assert time.monotonic() - t0 < 2
    assert any("did not stop" in n for n in summary["notes"])
    release.set()


def test_an_unwritable_file_is_a_note_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    summary = _run(Sampler(lambda: _sim(1), [0], blocker / "telemetry.csv", interval_s=0.05, step="train"), 0.2)
    assert summary["rows"] == 0 and summary["ticks"] >= 2
    assert len(summary["notes"]) == 1 and "could not write" in summary["notes"][0]


def test_two_samplers_on_one_file_never_interleave(tmp_path: Path) -> None:
    csv_path = tmp_path / "telemetry.csv"
    a = Sampler(lambda: _sim(2), [0], csv_path, interval_s=0.01, step="serve").start()
    b = Sampler(lambda: _sim(2), [1], csv_path, interval_s=0.01, step="train").start()
    time.sleep(0.4)
    a.stop(), b.stop()
    with open(csv_path, newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(COLUMNS) and table.count(list(COLUMNS)) == 1
    assert all(len(r) == len(COLUMNS) for r in table)
    assert {r[2] for r in table[1:]} == {"serve", "train"}


def test_dir_size_counts_nested_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"\0" * (2 << 20))
    assert 1.9 <= dir_size_mib(tmp_path) <= 2.2
    assert dir_size_mib(tmp_path / "missing") == 0


@pytest.mark.parametrize("names", ["RTX 4090", "RTX 4090,RTX 3090 Ti"])
def test_open_nvml_simulated_backend_samples(monkeypatch: pytest.MonkeyPatch, names: str) -> None:
    monkeypatch.setenv(nvml.SIMULATED_ENV, names)
    nv = nvml.open_nvml()
    assert nv is not None
    for i in range(len(names.split(","))):
        assert nv.sample(i)["source"] == "simulated"


def test_simulated_sample_sees_a_cap_set_by_another_process_without_rewriting_state(tmp_path: Path) -> None:
    state = tmp_path / "gpus.json"
    setter, sampler = SimulatedNvml(["RTX 4090"] * 2, str(state)), SimulatedNvml(["RTX 4090"] * 2, str(state))
    assert sampler.sample(1)["enforced_power_limit_w"] == 450.0  # no state file yet: the default
    setter.set_power_limit_w(1, 250)
    before = state.stat().st_mtime_ns, state.read_bytes()
    assert sampler.sample(1)["enforced_power_limit_w"] == 250.0 and sampler.sample(0)["enforced_power_limit_w"] == 450.0
    assert (state.stat().st_mtime_ns, state.read_bytes()) == before  # read at 1 Hz, never rewritten
    state.write_text("{torn")
    assert sampler.sample(1)["source"] == "simulated"  # a torn file falls back to this process's view
