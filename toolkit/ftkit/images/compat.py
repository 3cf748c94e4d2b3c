"""Will a CUDA image run on this host's GPUs? Checked before building or running one.

Two things must hold: the driver supports the image's CUDA version (drivers are backward
compatible, so driver CUDA >= image CUDA), and torch in the image was built for each
GPU's compute capability (sm_XY in the variant's arch list; newer GPUs than the list may
run through PTX JIT, slowly and not always).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.gpu.nvml import GpuInfo
from ftkit.images.variants import Variant


def _ver(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(".") if x.isdigit())


@dataclass
class CompatFinding:
    level: str  # error | warning
    message: str


def check(v: Variant, driver: str, cuda_driver: str, gpus: list[GpuInfo]) -> list[CompatFinding]:
    if not v.cuda:
        return []
    out: list[CompatFinding] = []
    if _ver(cuda_driver) < _ver(v.cuda):
        need = f" (driver {v.min_driver} or newer)" if v.min_driver else ""
        out.append(CompatFinding("error", f"driver {driver} supports CUDA up to {cuda_driver}; variant {v.name} needs "
                                    f"CUDA {v.cuda}{need}: update the NVIDIA driver, or build an older CUDA variant"))
    arches = sorted((_ver(a) for a in v.arch_list), key=lambda t: t)
    for g in gpus:
        if not g.compute_capability or not arches:
            continue
        cc = _ver(g.compute_capability)
        if cc in arches:
            continue
        if cc < arches[0]:
            out.append(CompatFinding("error", f"GPU {g.index} ({g.name}, sm_{g.compute_capability.replace('.', '')}) is older "
                                        f"than variant {v.name}'s torch supports (from sm_{'.'.join(map(str, arches[0])).replace('.', '')}): "
                                        "use a variant whose arch list includes it"))
        elif cc > arches[-1]:
            out.append(CompatFinding("warning", f"GPU {g.index} ({g.name}, compute {g.compute_capability}) is newer than "
                                          f"variant {v.name}'s kernels; it relies on PTX JIT - prefer a newer CUDA variant"))
        else:
            out.append(CompatFinding("error", f"GPU {g.index} ({g.name}, compute {g.compute_capability}) is not in variant "
                                        f"{v.name}'s arch list {v.arch_list}"))
    return out
