"""The NVML gateway: the only module that calls nvidia-ml-py, and the one place NVML errors
become ftkit.errors.GpuError.

`open_nvml()` returns the real backend when the NVIDIA driver is present, else None.
`SimulatedNvml` is a fake for machines with no GPU: it keeps the same interface and is
used only when FTKIT_SIMULATED_GPUS names the GPUs to pretend, e.g. "RTX 4090,RTX 3090 Ti".
It never pretends silently: env.json and logs name it as simulated.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ftkit.errors import GpuError

SIMULATED_ENV = "FTKIT_SIMULATED_GPUS"
SIMULATED_STATE_ENV = "FTKIT_SIMULATED_GPUS_STATE"


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_used_mib: int
    power_limit_w: float | None
    power_default_w: float | None
    power_min_w: float | None
    power_max_w: float | None
    compute_capability: str | None
    pci_bus_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Nvml(Protocol):
    simulated: bool

    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> str: ...
    def inventory(self) -> list[GpuInfo]: ...
    def power_limit_w(self, index: int) -> float: ...
    def set_power_limit_w(self, index: int, watts: float) -> None: ...
    def uuid(self, index: int) -> str: ...
    def index_by_uuid(self, uuid: str) -> int: ...
    def compute_processes(self, index: int) -> list[tuple[int, int]]: ...
    def enforced_power_limit_w(self, index: int) -> float: ...
    def sample(self, index: int) -> dict[str, Any]: ...
    def close(self) -> None: ...


# One telemetry sample per GPU (`Nvml.sample`): keys named after DCGM's fields (DCGM_FI_DEV_GPU_UTIL ->
# gpu_util, ...), units in the name. A field the GPU or driver cannot report is None, never an exception;
# `errors` names those fields and why, `source` says whether the numbers are real.
SAMPLE_FIELDS = (
    "gpu_util", "mem_copy_util", "fb_used_mib", "fb_total_mib", "gpu_temp_c", "power_usage_w",
    "enforced_power_limit_w", "total_energy_consumption_mj", "sm_clock_mhz", "mem_clock_mhz",
    "pcie_link_gen", "pcie_link_width", "pcie_max_link_gen", "pcie_max_link_width", "clocks_event_reasons",
    "xid_errors",
)
# nvmlClocksEventReason* bits (stable in the NVML API): why the clocks are below their maximum.
# HwSlowdown and HwPowerBrake are the PSU's (or the board's external power brake's) fingerprints.
CLOCK_EVENT_FLAGS = {
    "gpu_idle": 0x1, "applications_clocks_setting": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
    "sync_boost": 0x10, "sw_thermal_slowdown": 0x20, "hw_thermal_slowdown": 0x40, "hw_power_brake": 0x80,
    "display_clock_setting": 0x100,
}


def decode_clock_events(mask: int | None) -> dict[str, bool | None]:
    """The clocks-event bitmask as named flags (all None when the mask was unreadable)."""
    return {name: (None if mask is None else bool(mask & bit)) for name, bit in CLOCK_EVENT_FLAGS.items()}


class RealNvml:
    """nvidia-ml-py. Reads need no privileges; setting a power limit needs root."""

    simulated = False

    def __init__(self) -> None:
        import pynvml

        self._n = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise GpuError(f"NVML could not start: {e}") from e

    def _call(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._n, fn)(*args)
        except self._n.NVMLError as e:
            if isinstance(e, self._n.NVMLError_NoPermission):
                raise GpuError(f"NVML {fn}: no permission (setting power limits needs root)") from e
            if isinstance(e, self._n.NVMLError_NotSupported):
                raise GpuError(f"NVML {fn}: not supported on this GPU") from e
            raise GpuError(f"NVML {fn}: {e}") from e

    def _handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def driver_version(self) -> str:
        v = self._call("nvmlSystemGetDriverVersion")
        return v.decode() if isinstance(v, bytes) else str(v)

    def cuda_driver_version(self) -> str:
        v = int(self._call("nvmlSystemGetCudaDriverVersion_v2"))
        return f"{v // 1000}.{(v % 1000) // 10}"

    def _opt(self, fn: str, *args: Any) -> Any:
        try:
            return self._call(fn, *args)
        except GpuError:
            return None

    def inventory(self) -> list[GpuInfo]:
        out = []
        for i in range(int(self._call("nvmlDeviceGetCount"))):
            h = self._handle(i)
            name = self._call("nvmlDeviceGetName", h)
            mem = self._call("nvmlDeviceGetMemoryInfo", h)
            cc = self._opt("nvmlDeviceGetCudaComputeCapability", h)
            limits = self._opt("nvmlDeviceGetPowerManagementLimitConstraints", h)
            limit = self._opt("nvmlDeviceGetPowerManagementLimit", h)
            default = self._opt("nvmlDeviceGetPowerManagementDefaultLimit", h)
            pci = self._opt("nvmlDeviceGetPciInfo", h)
            uuid = self._call("nvmlDeviceGetUUID", h)
            out.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    memory_total_mib=int(mem.total // (1 << 20)),
                    memory_used_mib=int(mem.used // (1 << 20)),
                    power_limit_w=limit / 1000 if limit is not None else None,
                    power_default_w=default / 1000 if default is not None else None,
                    power_min_w=limits[0] / 1000 if limits else None,
                    power_max_w=limits[1] / 1000 if limits else None,
                    compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
                    pci_bus_id=(pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)) if pci else None,
                )
            )
        return out

    def power_limit_w(self, index: int) -> float:
        return float(self._call("nvmlDeviceGetPowerManagementLimit", self._handle(index))) / 1000

    def set_power_limit_w(self, index: int, watts: float) -> None:
        self._call("nvmlDeviceSetPowerManagementLimit", self._handle(index), int(watts * 1000))

    def uuid(self, index: int) -> str:
        v = self._call("nvmlDeviceGetUUID", self._handle(index))
        return v.decode() if isinstance(v, bytes) else str(v)

    def index_by_uuid(self, uuid: str) -> int:
        """The index of one GPU, found by its UUID alone: a restore must reach each GPU even
        when another one has fallen off the bus (a whole inventory would fail)."""
        handle = self._call("nvmlDeviceGetHandleByUUID", uuid)
        return int(self._call("nvmlDeviceGetIndex", handle))

    def compute_processes(self, index: int) -> list[tuple[int, int]]:
        """(pid, used MiB) of every compute process on the GPU. The driver knows no PID
        namespaces: inside a container these are HOST pids (nvidia-docker#1483)."""
        out = []
        for p in self._call("nvmlDeviceGetComputeRunningProcesses", self._handle(index)):
            used = getattr(p, "usedGpuMemory", None)
            out.append((int(p.pid), int(used) // (1 << 20) if isinstance(used, int) else 0))
        return out

    def enforced_power_limit_w(self, index: int) -> float:
        """The limit the GPU enforces: the lowest of every limit set on it."""
        return float(self._call("nvmlDeviceGetEnforcedPowerLimit", self._handle(index))) / 1000

    def sample(self, index: int) -> dict[str, Any]:
        """Every telemetry field, each read on its own: an unsupported one is None (named in
        `errors`) and never costs the others. PCIe width and generation are the values now;
        GPUs lower the generation when idle, so read them under load."""
        n = self._n
        out: dict[str, Any] = dict.fromkeys(SAMPLE_FIELDS)
        errors: list[str] = []
        try:
            h = self._handle(index)
        except GpuError as e:
            return {**out, "source": "nvml", "errors": [f"handle: {e}"]}

        def read(fields: tuple[str, ...], fn: str, *args: Any, conv: Any = None) -> None:
            try:
                v = self._call(fn, h, *args)
            except GpuError as e:
                errors.append(f"{','.join(fields)}: {e}")
                return
            vals = conv(v) if conv else (v,)
            for f, x in zip(fields, vals, strict=True):
                out[f] = x

        read(("gpu_util", "mem_copy_util"), "nvmlDeviceGetUtilizationRates", conv=lambda u: (int(u.gpu), int(u.memory)))
        read(("fb_used_mib", "fb_total_mib"), "nvmlDeviceGetMemoryInfo",
             conv=lambda m: (round(m.used / 2**20, 1), round(m.total / 2**20, 1)))
        read(("gpu_temp_c",), "nvmlDeviceGetTemperature", n.NVML_TEMPERATURE_GPU, conv=lambda t: (int(t),))
        read(("power_usage_w",), "nvmlDeviceGetPowerUsage", conv=lambda mw: (round(mw / 1000, 2),))
        read(("enforced_power_limit_w",), "nvmlDeviceGetEnforcedPowerLimit", conv=lambda mw: (round(mw / 1000, 2),))
        read(("total_energy_consumption_mj",), "nvmlDeviceGetTotalEnergyConsumption", conv=lambda mj: (int(mj),))
        read(("sm_clock_mhz",), "nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM, conv=lambda c: (int(c),))
        read(("mem_clock_mhz",), "nvmlDeviceGetClockInfo", n.NVML_CLOCK_MEM, conv=lambda c: (int(c),))
        read(("pcie_link_gen",), "nvmlDeviceGetCurrPcieLinkGeneration", conv=lambda v: (int(v),))
        read(("pcie_link_width",), "nvmlDeviceGetCurrPcieLinkWidth", conv=lambda v: (int(v),))
        read(("pcie_max_link_gen",), "nvmlDeviceGetMaxPcieLinkGeneration", conv=lambda v: (int(v),))
        read(("pcie_max_link_width",), "nvmlDeviceGetMaxPcieLinkWidth", conv=lambda v: (int(v),))
        reasons = ("nvmlDeviceGetCurrentClocksEventReasons" if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons")
                   else "nvmlDeviceGetCurrentClocksThrottleReasons")  # the older name, same bits
        read(("clocks_event_reasons",), reasons, conv=lambda v: (int(v),))
        out["xid_errors"] = self._xids(index, h, errors)
        return {**out, "source": "nvml", "errors": errors}

    def _xids(self, index: int, handle: Any, errors: list[str]) -> str | None:
        """XID errors raised since the last sample ("" for none, None where the driver will not
        deliver them): an event set per GPU, drained without waiting."""
        n = self._n
        sets = self.__dict__.setdefault("_xid_sets", {})
        if index not in sets:
            try:
                es = n.nvmlEventSetCreate()
                n.nvmlDeviceRegisterEvents(handle, n.nvmlEventTypeXidCriticalError, es)
                sets[index] = es
            except (n.NVMLError, AttributeError) as e:
                sets[index] = None
                errors.append(f"xid_errors: {e}")
        es = sets[index]
        if es is None:
            return None
        seen: list[str] = []
        for _ in range(64):  # a storm of XIDs must not hold the sampler
            try:
                data = n.nvmlEventSetWait_v2(es, 0)
            except n.NVMLError_Timeout:
                break
            except n.NVMLError as e:
                errors.append(f"xid_errors: {e}")
                break
            seen.append(str(int(data.eventData)))
        return ";".join(seen)

    def close(self) -> None:
        for es in self.__dict__.get("_xid_sets", {}).values():
            if es is not None:
                try:
                    self._n.nvmlEventSetFree(es)
                except self._n.NVMLError:
                    pass
        try:
            self._n.nvmlShutdown()
        except self._n.NVMLError:
            pass


class SimulatedNvml:
    """A fake NVML for machines with no GPU. Same interface.

    State lives in memory, or - with FTKIT_SIMULATED_GPUS_STATE=FILE - in a JSON file shared
    by every process, the way a real GPU keeps its power limit after the process that set it
    dies. The file also records every power call (with pid and time) for fault tests to
    read, and takes injected faults: `"fail_set": [index, ...]` makes setting that GPU's
    limit fail, like a GPU that fell off the bus."""

    simulated = True

    def __init__(self, names: list[str], state_file: str | None = None) -> None:
        from ftkit.plan.figures import find_gpu

        self._gpus: list[GpuInfo] = []
        self.set_calls: list[tuple[int, float]] = []
        self._state_file = state_file
        for i, name in enumerate(names):
            cat = find_gpu(name)
            tdp = float(cat.tdp_w) if cat else 300.0
            self._gpus.append(
                GpuInfo(
                    index=i, name=name, uuid=f"GPU-simulated-{i}",
                    memory_total_mib=int((cat.vram_gib if cat else 24) * 1024), memory_used_mib=0,
                    power_limit_w=tdp, power_default_w=tdp,
                    power_min_w=float(cat.min_w) if cat else 100.0, power_max_w=float(cat.max_w) if cat else tdp,
                    compute_capability=cat.compute_capability if cat else None, pci_bus_id=f"00000000:0{i + 1}:00.0",
                )
            )

    def driver_version(self) -> str:
        return "simulated"

    def cuda_driver_version(self) -> str:
        return "13.0"

    # -- the shared state file (read-modify-write under an exclusive flock) --------------

    def _sync(self, change: Any = None, call: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load the state file (creating it from this process's view), apply `change(state)`,
        append `call` to the call record, and write it back atomically (temp file + rename,
        under an exclusive lock on FILE.lock): a reader never sees half a file, and an
        unreadable file is an error, never a silent reset to the defaults. Without a file:
        memory only."""
        if not self._state_file:
            state = {"gpus": [g.as_dict() for g in self._gpus], "fail_set": []}
            if change is not None:
                change(state)
            self._gpus = [GpuInfo(**g) for g in state["gpus"]]
            return state
        import fcntl
        import json

        path = self._state_file
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                raw = b""
            if raw.strip():
                try:
                    state = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise GpuError(f"simulated GPUs: state file {path} is unreadable ({e})") from None
                if not isinstance(state, dict) or not isinstance(state.get("gpus"), list):
                    raise GpuError(f"simulated GPUs: state file {path} holds no GPU list")
                dirty = False
            else:
                state = {"simulated": True, "gpus": [g.as_dict() for g in self._gpus], "fail_set": [], "calls": []}
                dirty = True
            if change is not None:
                change(state)
                dirty = True
            if call is not None:
                import datetime as dt

                call = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                        "pid": os.getpid(), **call}
                state.setdefault("calls", []).append(call)
                dirty = True
            if dirty:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(json.dumps(state, indent=1, sort_keys=True).encode())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
        finally:
            os.close(lock)  # also drops the flock
        self._gpus = [GpuInfo(**{k: v for k, v in g.items() if k in GpuInfo.__dataclass_fields__}) for g in state["gpus"]]
        return state

    def inventory(self) -> list[GpuInfo]:
        state = self._sync()
        lost = state.get("lost") or []  # injected: a GPU that fell off the bus fails a whole listing
        if lost:
            raise GpuError(f"NVML nvmlDeviceGetHandleByIndex: GPU {lost[0]} is lost (simulated fault)")
        return [GpuInfo(**g.as_dict()) for g in self._gpus]

    def _gpu(self, index: int) -> GpuInfo:
        if not 0 <= index < len(self._gpus):
            raise GpuError(f"NVML: no GPU {index} (simulated machine has {len(self._gpus)})")
        return self._gpus[index]

    def power_limit_w(self, index: int) -> float:
        self._sync(call={"call": "power_limit_w", "index": index})
        return float(self._gpu(index).power_limit_w or 0)

    def set_power_limit_w(self, index: int, watts: float) -> None:
        failure: list[str] = []

        def change(state: dict[str, Any]) -> None:
            gpus = state["gpus"]
            if not 0 <= index < len(gpus):
                failure.append(f"NVML: no GPU {index} (simulated machine has {len(gpus)})")
                return
            gpu = gpus[index]
            lo, hi = gpu.get("power_min_w"), gpu.get("power_max_w")
            if index in (state.get("fail_set") or []):
                failure.append(f"NVML nvmlDeviceSetPowerManagementLimit: GPU {index}: Unknown Error (simulated fault)")
            elif lo is not None and hi is not None and not lo <= watts <= hi:
                failure.append(f"NVML nvmlDeviceSetPowerManagementLimit: {watts} W outside {lo}-{hi} W")
            else:
                gpu["power_limit_w"] = float(watts)

        state = self._sync(change, call={"call": "set_power_limit_w", "index": index, "watts": float(watts)})
        delay = float(state.get("delay_set_s") or 0)  # injected: a slow driver call (tests of signal safety)
        if delay > 0:
            import time

            time.sleep(delay)
        if failure:
            raise GpuError(failure[0])
        self.set_calls.append((index, float(watts)))

    def _peek(self, index: int) -> GpuInfo:
        """This GPU as the state file has it, read under a shared lock and never rewritten (the
        sampler reads every second; `_sync` would rewrite and fsync the file each time)."""
        path = getattr(self, "_state_file", None)
        if path:
            import fcntl
            import json

            try:
                with open(path, "rb") as fh:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
                    gpus = json.loads(fh.read() or b"{}").get("gpus")
                if isinstance(gpus, list) and 0 <= index < len(gpus) and isinstance(gpus[index], dict):
                    known = GpuInfo.__dataclass_fields__
                    return GpuInfo(**{**self._gpu(index).as_dict(),
                                      **{k: v for k, v in gpus[index].items() if k in known}})
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # no state written yet, or torn: this process's view
        return self._gpu(index)

    def sample(self, index: int, at: float | None = None) -> dict[str, Any]:
        """Synthetic but plausible numbers of a GPU under training load, a pure function of the
        time `at` (default now), the GPU index and its current limit, and labelled `simulated`.
        At the cap it reports SwPowerCap, as a real card does; never HwSlowdown or an XID."""
        import math
        import time

        gpu = self._peek(index)  # a cap set by another process shows, as on a real GPU
        t = time.time() if at is None else at
        limit = float(gpu.power_limit_w or 300.0)
        default = float(gpu.power_default_w or limit)
        wave = math.sin(2 * math.pi * t / 13.0 + index)
        power = min(limit, 0.93 * limit + 0.06 * limit * wave)
        total = float(gpu.memory_total_mib)
        return {
            "gpu_util": int(round(min(100.0, 92 + 7 * math.sin(2 * math.pi * t / 37.0 + index)))),
            "mem_copy_util": int(round(45 + 10 * wave)),
            "fb_used_mib": round(total * (0.62 + 0.04 * math.sin(2 * math.pi * t / 61.0)), 1),
            "fb_total_mib": total,
            "gpu_temp_c": int(round(70 + 6 * math.sin(2 * math.pi * t / 300.0 + index) + index)),
            "power_usage_w": round(power, 2),
            "enforced_power_limit_w": round(limit, 2),
            # a counter only grows: integrate a constant nominal draw, not the wave
            "total_energy_consumption_mj": int((t - 1.7e9) * 0.9 * default * 1000),
            "sm_clock_mhz": int(2520 * min(1.0, limit / default) ** 0.3),
            "mem_clock_mhz": 10501,
            "pcie_link_gen": 4, "pcie_link_width": 16, "pcie_max_link_gen": 4, "pcie_max_link_width": 16,
            "clocks_event_reasons": CLOCK_EVENT_FLAGS["sw_power_cap"] if power >= 0.98 * limit else 0,
            "xid_errors": "",
            "source": "simulated",
            "errors": [],
        }

    def uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def index_by_uuid(self, uuid: str) -> int:
        self._sync()
        for g in self._gpus:
            if g.uuid == uuid:
                return g.index
        raise GpuError(f"NVML: no GPU with UUID {uuid} (simulated)")

    def compute_processes(self, index: int) -> list[tuple[int, int]]:
        """None, unless the state file lists some: `"processes": {"INDEX": [[pid, mib], ...]}`
        (tests put a foreign process on a GPU that way)."""
        state = self._sync()
        self._gpu(index)
        procs = (state.get("processes") or {}).get(str(index)) or []
        return [(int(pid), int(mib)) for pid, mib in procs]

    def enforced_power_limit_w(self, index: int) -> float:
        self._sync()
        return float(self._gpu(index).power_limit_w or 0)

    def close(self) -> None:
        pass


def open_nvml() -> Nvml | None:
    """The NVML backend for this machine, or None when there is no NVIDIA driver."""
    simulated = os.environ.get(SIMULATED_ENV)
    if simulated:
        return SimulatedNvml([n.strip() for n in simulated.split(",") if n.strip()],
                             os.environ.get(SIMULATED_STATE_ENV) or None)
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver / no GPU: a CPU machine
    pynvml.nvmlShutdown()
    return RealNvml()


def inventory_or_empty() -> tuple[list[GpuInfo], dict[str, Any]]:
    """GPU inventory and driver facts for env.json; empty lists on a CPU machine."""
    nv = open_nvml()
    if nv is None:
        return [], {"nvml": "unavailable (no NVIDIA driver)"}
    try:
        return nv.inventory(), {
            "driver": nv.driver_version(),
            "cuda_driver": nv.cuda_driver_version(),
            "simulated": nv.simulated,
        }
    except GpuError as e:
        return [], {"nvml": f"error: {e}"}
    finally:
        nv.close()
