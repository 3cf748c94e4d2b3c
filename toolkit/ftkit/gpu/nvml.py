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
    def close(self) -> None: ...


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

    def close(self) -> None:
        try:
            self._n.nvmlShutdown()
        except self._n.NVMLError:
            pass


class SimulatedNvml:
    """A fake NVML for machines with no GPU. Same interface; state lives in memory."""

    simulated = True

    def __init__(self, names: list[str]) -> None:
        from ftkit.plan.catalog import find_gpu

        self._gpus: list[GpuInfo] = []
        self.set_calls: list[tuple[int, float]] = []
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

    def inventory(self) -> list[GpuInfo]:
        return [GpuInfo(**g.as_dict()) for g in self._gpus]

    def _gpu(self, index: int) -> GpuInfo:
        if not 0 <= index < len(self._gpus):
            raise GpuError(f"NVML: no GPU {index} (simulated machine has {len(self._gpus)})")
        return self._gpus[index]

    def power_limit_w(self, index: int) -> float:
        return float(self._gpu(index).power_limit_w or 0)

    def set_power_limit_w(self, index: int, watts: float) -> None:
        gpu = self._gpu(index)
        if gpu.power_min_w is not None and gpu.power_max_w is not None and not gpu.power_min_w <= watts <= gpu.power_max_w:
            raise GpuError(f"NVML nvmlDeviceSetPowerManagementLimit: {watts} W outside {gpu.power_min_w}-{gpu.power_max_w} W")
        gpu.power_limit_w = float(watts)
        self.set_calls.append((index, float(watts)))

    def close(self) -> None:
        pass


def open_nvml() -> Nvml | None:
    """The NVML backend for this machine, or None when there is no NVIDIA driver."""
    simulated = os.environ.get(SIMULATED_ENV)
    if simulated:
        return SimulatedNvml([n.strip() for n in simulated.split(",") if n.strip()])
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
