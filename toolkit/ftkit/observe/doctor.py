"""`ftkit doctor`: is this machine fit to run ftkit's plans, and does it match another host?

Each check returns findings (severity ok | info | warn | error, a message, a remediation).
The checks follow the scaling guide's list of what breaks home labs: the container runtime,
driver against the images' CUDA, a x16 card linked at x4, power limits and the PSU, disks
filling with checkpoints and merges, clocks and environments drifting between hosts, and
runs that died without cleaning up.

Everything doctor reads from outside goes through `Sources` (Docker, NVML, disks, a clock
reference), so tests plant facts there. Doctor changes nothing on the machine.

`snapshot()` is the machine's facts (Python, torch and its CUDA, driver, ftkit, images and
their lock hashes) as JSON; `compare()` diffs two snapshots: the environment-parity check to
run before a multi-host job.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import platform
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftkit.recipe.models import Machine

SEVERITIES = ("ok", "info", "warn", "error")
SNAPSHOT_FORMAT = 1
DEFAULT_TIME_URL = "https://pypi.org/simple/"
SKEW_WARN_S = 2.0
SKEW_ERROR_S = 60.0
MIN_DOCKER = (20, 10)  # --gpus (19.03) and BuildKit secrets and cache mounts (20.10)
HOT_C = 85


@dataclass
class Finding:
    check: str
    severity: str
    message: str
    remediation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorResult:
    machine: str
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="ok")

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}


# --------------------------------------------------------------------------- outside facts


class Sources:
    """What doctor reads from outside ftkit, each through its gateway and with short timeouts."""

    def __init__(self, *, docker_host: str | None = None, offline: bool = False, time_url: str = DEFAULT_TIME_URL) -> None:
        self.docker_host = docker_host
        self.offline = offline
        self.time_url = time_url

    def docker_info(self) -> dict[str, Any] | None:
        """`docker info` as a dict, plus `_local_time`: this clock when the engine read its
        SystemTime (the middle of the call); None when no engine answers within seconds."""
        from ftkit.gateways import docker as dk

        if not dk.reachable(self.docker_host):
            return None
        with dk.translated("info"):
            c = dk.client(self.docker_host, timeout=10)
            t0 = time.time()
            info = dict(c.info())
            info["_local_time"] = (t0 + time.time()) / 2
            return info

    def ftkit_images(self) -> list[dict[str, Any]]:
        from ftkit.gateways import docker as dk
        from ftkit.images.builder import LABEL_PREFIX

        return dk.images_with_label(f"{LABEL_PREFIX}.image", self.docker_host)

    def nvml(self) -> Any:
        from ftkit.gpu.nvml import open_nvml

        return open_nvml()

    def now(self) -> float:
        return time.time()

    def reference_time(self) -> tuple[float, str] | None:
        """(unix time, source) from an HTTP Date header; None offline or unreachable."""
        if self.offline or not self.time_url:
            return None
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.time_url, method="HEAD")
        t0 = time.time()
        try:
            with urllib.request.urlopen(req, timeout=3) as resp:  # noqa: S310 - a fixed https URL
                date = resp.headers.get("Date")
        except urllib.error.HTTPError as e:
            date = e.headers.get("Date") if e.headers else None
        except (urllib.error.URLError, OSError, ValueError):
            return None
        if not date:
            return None
        try:
            ref = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return None
        # the header has 1 s resolution and was sent about halfway through the round trip
        return ref + 0.5 + (time.time() - t0) / 2, self.time_url

    def disk_usage(self, path: Path) -> tuple[int, int, int] | None:
        """(free, total, device) of the filesystem holding path (or its nearest existing parent)."""
        p = path.expanduser()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            u = shutil.disk_usage(p)
            dev = p.stat().st_dev
        except OSError:
            return None
        return u.free, u.total, dev

    def which(self, name: str) -> str | None:
        return shutil.which(name)

    def power_originals(self) -> dict[str, dict[str, Any]]:
        try:
            from ftkit.gpu import power

            return power.read_originals()
        except Exception:  # noqa: BLE001 - an unreadable record is reported by `ftkit power`
            return {}


# --------------------------------------------------------------------------- helpers


def _ver(s: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", s or "")[:3])


def _parse_engine_time(s: str) -> float | None:
    """Docker's SystemTime has nanoseconds; Python's parser takes microseconds."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", s or "")
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return dt.datetime.fromisoformat(m.group(1) + frac + tz).timestamp()
    except ValueError:
        return None


def torch_build() -> dict[str, str | None]:
    """torch's version and CUDA build from its version.py, without importing torch (seconds)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return {"torch": None, "torch_cuda": None}
    cuda = None
    try:
        text = Path(str(dist.locate_file("torch/version.py"))).read_text(encoding="utf-8")
        m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]?([\w.]+)", text, re.M)
        cuda = m.group(1) if m and m.group(1) != "None" else None
    except OSError:
        pass
    return {"torch": dist.version, "torch_cuda": cuda}


DIST_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "TORCHELASTIC_", "PYTHONPATH",
                     "OMP_NUM_THREADS", "CUDA_DEVICE_ORDER", "UCX_", "FI_")


def dist_env() -> dict[str, str]:
    """The environment that changes how ranks talk to each other (NCCL/Gloo knobs, thread
    counts, a PYTHONPATH shadowing packages): it must match across the nodes of a job."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(DIST_ENV_PREFIXES)}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- checks


class Doctor:
    def __init__(self, machine: Machine, sources: Sources, *, runs_root: Path | None = None,
                 recipes: list[Any] | None = None, machine_given: bool = True) -> None:
        self.m = machine
        self.src = sources
        self.runs_root = runs_root or (Path(machine.paths.runs).expanduser() if machine.paths.runs else Path("runs"))
        self.recipes = recipes or []  # Resolved recipes, for disk estimates
        self.machine_given = machine_given
        self.findings: list[Finding] = []
        self.facts: dict[str, Any] = {}
        self.nv: Any = None
        self.inventory: list[Any] = []
        self.cuda_driver: str | None = None
        self._need_detail: dict[str, float] = {}

    def add(self, check: str, severity: str, message: str, remediation: str | None = None) -> None:
        assert severity in SEVERITIES, severity  # programming error
        self.findings.append(Finding(check, severity, message, remediation))

    def run(self) -> DoctorResult:
        self.facts.update(self._env_facts())
        info = self._docker()
        self._nvidia_runtime(info)
        self._nvml()
        try:
            self._images(info)
            self._gpus()
            self._power()
            self._psu()
        finally:
            if self.nv is not None:
                self.nv.close()
        self._disk()
        self._clock(info)
        self._lease_dir()
        self._stale_runs()
        return DoctorResult(self.m.name, self.findings, self.facts)

    # -- environment facts (the snapshot) ---------------------------------------------------

    def _env_facts(self) -> dict[str, Any]:
        import ftkit
        from ftkit.run.envinfo import package_versions

        facts: dict[str, Any] = {
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "arch": platform.machine(),
            "ftkit": ftkit.__version__,
            "packages": package_versions(),
        }
        facts.update(torch_build())
        facts["images_lock"] = self._images_lock()
        facts["dist_env"] = dist_env()
        return facts

    def _images_lock(self) -> dict[str, Any]:
        """images.lock.json of this checkout (or the profile's docker.images_lock): what
        `ftkit build` produced here, by lock and content hash."""
        path: Path | None = None
        if self.m.docker.images_lock:
            path = Path(self.m.docker.images_lock).expanduser()
        else:
            try:
                from ftkit.images import project

                path = project.find_root() / "images.lock.json"
            except Exception:  # noqa: BLE001 - not in a checkout: no lock to report
                return {}
        try:
            from ftkit.images import imagelock

            entries = imagelock.read(path)["images"]
        except Exception as e:  # noqa: BLE001
            self.add("images-lock", "warn", f"{path}: {e}")
            return {}
        keep = ("tag", "lock_sha256", "content_hash", "packages_sha256")
        return {k: {f: v.get(f) for f in keep} for k, v in sorted(entries.items())}

    # -- Docker -----------------------------------------------------------------------------

    def _docker(self) -> dict[str, Any] | None:
        from ftkit.errors import FtkitError

        needs = self.m.executor == "docker"
        try:
            info = self.src.docker_info()
        except FtkitError as e:
            info = None
            why = e.message
        else:
            why = "no Docker engine answers"
        if info is None:
            self.facts["docker"] = None
            self.add("docker", "error" if needs else "info",
                     f"{why}" + ("" if needs else " (this machine runs steps locally; only `ftkit build` needs it)"),
                     "start dockerd (systemctl start docker), or set docker.host in the machine profile / DOCKER_HOST")
            return None
        version = str(info.get("ServerVersion") or "?")
        runtimes = sorted((info.get("Runtimes") or {}).keys())
        self.facts["docker"] = {"server": version, "runtimes": runtimes, "default_runtime": info.get("DefaultRuntime")}
        if _ver(version)[:2] < MIN_DOCKER:
            self.add("docker", "warn", f"Docker engine {version} is older than {'.'.join(map(str, MIN_DOCKER))}",
                     "upgrade Docker: ftkit's builds use BuildKit secrets and cache mounts, and GPUs need --gpus")
        else:
            self.add("docker", "ok", f"Docker engine {version} answers ({self.src.docker_host or 'local socket'})")
        return info

    def _nvidia_runtime(self, info: dict[str, Any] | None) -> None:
        gpus_wanted = bool(self.m.gpus) and self.m.executor == "docker"
        if info is None:
            return
        runtimes = info.get("Runtimes") or {}
        if "nvidia" in runtimes:
            self.add("nvidia-runtime", "ok", "the NVIDIA container runtime is registered with Docker")
            return
        hook = self.src.which("nvidia-container-runtime-hook") or self.src.which("nvidia-ctk")
        if hook:
            self.add("nvidia-runtime", "ok" if gpus_wanted else "info",
                     f"NVIDIA Container Toolkit found ({hook}); `docker run --gpus` uses its hook "
                     "(no `nvidia` runtime registered, which --gpus does not need)")
            return
        if gpus_wanted:
            self.add("nvidia-runtime", "error", "containers cannot see GPUs: no NVIDIA Container Toolkit "
                     "(no `nvidia` runtime in `docker info`, no nvidia-container-runtime-hook)",
                     "install nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker` "
                     "and restart Docker")
        else:
            self.add("nvidia-runtime", "info", "no NVIDIA container runtime (not needed: "
                     + ("no GPUs in the profile)" if not self.m.gpus else "steps run locally)"))

    # -- NVML, driver, GPUs -----------------------------------------------------------------

    def _nvml(self) -> None:
        try:
            self.nv = self.src.nvml()
        except Exception as e:  # noqa: BLE001 - NVML raising is itself the finding
            self.nv = None
            self.add("nvml", "error", f"NVML failed to start: {e}", "check the NVIDIA driver (nvidia-smi)")
            return
        if self.nv is None:
            self.facts.update(nvml="unavailable", gpu_driver=None, cuda_driver=None, gpus=[])
            if self.m.gpus:
                self.add("nvml", "error", f"the profile lists {len(self.m.gpus)} GPU(s) but no NVIDIA driver answers",
                         "install the NVIDIA driver (nvidia-smi must work), or use a profile without gpus")
            else:
                self.add("nvml", "info", "no NVIDIA driver: a CPU machine")
            return
        simulated = bool(getattr(self.nv, "simulated", False))
        try:
            driver, cuda = self.nv.driver_version(), self.nv.cuda_driver_version()
            self.inventory = self.nv.inventory()
        except Exception as e:  # noqa: BLE001
            self.add("nvml", "error", f"NVML answers but fails: {e}", "check `nvidia-smi`; a reboot after a driver update")
            self.facts.update(nvml="error", gpu_driver=None, cuda_driver=None, gpus=[])
            return
        self.cuda_driver = cuda
        self.facts.update(nvml="simulated" if simulated else "real", gpu_driver=driver, cuda_driver=cuda,
                          gpus=[{k: g.as_dict()[k] for k in ("index", "name", "memory_total_mib", "power_limit_w",
                                                              "power_default_w", "compute_capability")}
                                for g in self.inventory])
        label = " (SIMULATED: FTKIT_SIMULATED_GPUS; no real readings)" if simulated else ""
        self.add("nvml", "warn" if simulated else "ok",
                 f"driver {driver} (CUDA {cuda}), {len(self.inventory)} GPU(s){label}",
                 "unset FTKIT_SIMULATED_GPUS on a real machine" if simulated else None)
        found = {g.index for g in self.inventory}
        for spec in self.m.gpus:
            if spec.index not in found:
                self.add(f"gpu{spec.index}", "error", f"the profile lists GPU {spec.index} ({spec.model}) but NVML "
                         f"sees only {sorted(found)}", "fix the profile's gpus, or check the card is seated and powered")

    def _images(self, info: dict[str, Any] | None) -> None:
        from ftkit.images.builder import LABEL_PREFIX

        images: dict[str, Any] = {}
        self.facts["images"] = images
        if info is None:
            return
        try:
            found = self.src.ftkit_images()
        except Exception as e:  # noqa: BLE001
            self.add("images", "warn", f"could not list ftkit images: {e}")
            return
        for attrs in found:
            labels = (attrs.get("Config") or {}).get("Labels") or {}
            key = f"{labels.get(f'{LABEL_PREFIX}.image')}/{labels.get(f'{LABEL_PREFIX}.variant')}"
            tags = attrs.get("RepoTags") or []
            images.setdefault(key, []).append({
                "tag": tags[0] if tags else "<untagged>", "id": str(attrs.get("Id", ""))[7:19],
                "cuda": labels.get(f"{LABEL_PREFIX}.cuda"), "torch": labels.get(f"{LABEL_PREFIX}.torch"),
                "lock_sha256": labels.get(f"{LABEL_PREFIX}.lock-sha256"),
                "content_hash": labels.get(f"{LABEL_PREFIX}.content-hash"),
            })
        for key in images:
            images[key].sort(key=lambda e: e["tag"])
        if not images:
            self.add("images", "info", "no ftkit images built yet", "`ftkit build` builds them")
            return
        for _key, entries in sorted(images.items()):
            for e in entries:
                cuda = e["cuda"]
                if not cuda or cuda == "none":
                    self.add("images", "ok", f"{e['tag']}: CPU image (torch {e['torch']})")
                elif self.cuda_driver is None:
                    self.add("images", "info" if not self.m.gpus else "error",
                             f"{e['tag']}: needs CUDA {cuda}; no NVIDIA driver here to run it")
                elif _ver(self.cuda_driver)[:2] < _ver(cuda)[:2]:
                    self.add("images", "error", f"{e['tag']}: needs CUDA {cuda}; the driver supports up to "
                             f"CUDA {self.cuda_driver}", "update the NVIDIA driver, or build an older CUDA variant")
                else:
                    self.add("images", "ok", f"{e['tag']}: CUDA {cuda} runs on the driver's CUDA {self.cuda_driver}")
        self._arch_check(images)

    def _arch_check(self, images: dict[str, Any]) -> None:
        """torch's arch list in each CUDA variant against each GPU's compute capability."""
        if not self.inventory:
            return
        try:
            from ftkit.images import compat, project
            from ftkit.images.variants import load

            variants = load(project.find_root())
        except Exception:  # noqa: BLE001 - outside a checkout the variants are unknown
            return
        for key in images:
            image, _, variant = key.partition("/")
            try:
                v = variants.get(image, variant)
            except Exception:  # noqa: BLE001
                continue
            for f in compat.check(v, "", "99.9", self.inventory):  # the driver part is checked above
                self.add("images", "error" if f.level == "error" else "warn", f"{key}: {f.message}")

    def _gpus(self) -> None:
        if self.nv is None:
            return
        from ftkit.gpu.nvml import decode_clock_events
        from ftkit.plan.figures import find_gpu

        loaded = _links_under_load(self.runs_root)
        sim = " (simulated)" if getattr(self.nv, "simulated", False) else ""
        for g in self.inventory:
            chk = f"gpu{g.index}"
            try:
                s = self.nv.sample(g.index)
            except Exception as e:  # noqa: BLE001
                self.add(chk, "warn", f"GPU {g.index} ({g.name}): cannot read telemetry: {e}")
                continue
            spec = self.m.gpu(g.index)
            if spec is not None and self.machine_given:
                cat_p, cat_n = find_gpu(spec.model), find_gpu(g.name)
                if cat_p is not None and cat_n is not None and cat_p.name != cat_n.name:
                    self.add(chk, "warn", f"GPU {g.index}: the profile says {spec.model}, NVML says {g.name}",
                             "fix the profile: power ranges, transients and memory estimates come from the model")
            self._pcie(g, s, loaded.get(g.index), sim)
            flags = decode_clock_events(s.get("clocks_event_reasons"))
            if flags.get("hw_power_brake") or flags.get("hw_slowdown"):
                which = [n for n in ("hw_power_brake", "hw_slowdown") if flags.get(n)]
                self.add(chk, "warn", f"GPU {g.index}: clocks held down by {', '.join(which)} right now{sim}",
                         "HwPowerBrake/HwSlowdown point at power delivery: check the PSU and its cables "
                         "(one cable per 8-pin/12VHPWR input), lower the power caps")
            if flags.get("hw_thermal_slowdown") or flags.get("sw_thermal_slowdown"):
                self.add(chk, "warn", f"GPU {g.index}: thermal slowdown active{sim}",
                         "improve airflow or spacing between cards; lower the power cap")
            temp = s.get("gpu_temp_c")
            if temp is not None and temp >= HOT_C:
                self.add(chk, "warn", f"GPU {g.index}: {temp} °C{sim}", "check cooling before a long run")

    def _pcie(self, g: Any, s: dict[str, Any], under_load: dict[str, Any] | None, sim: str) -> None:
        chk = f"gpu{g.index}-pcie"
        width, maxw = s.get("pcie_link_width"), s.get("pcie_max_link_width")
        gen, maxg = s.get("pcie_link_gen"), s.get("pcie_max_link_gen")
        if width is None or maxw is None:
            self.add(chk, "info", f"GPU {g.index}: PCIe link not readable{sim}")
            return
        util = s.get("gpu_util") or 0
        busy = util >= 50
        when = f"under load ({util}% busy)" if busy else "idle"
        link = f"x{width} gen{gen} (max x{maxw} gen{maxg})"
        if under_load and not busy:  # a run's telemetry saw the link working: better evidence
            width, gen = under_load["width"], under_load["gen"]
            when = f"under load in run {under_load['run']}"
            link = f"x{width} gen{gen} (max x{maxw} gen{maxg})"
            busy = True
        lane_fix = ("check the motherboard manual: the slot may be wired x4/x8 or share lanes with M.2 drives; "
                    "move the card to a CPU-attached x16 slot (unless the card itself is x8)")
        if maxw < 16:
            self.add(chk, "warn", f"GPU {g.index} ({g.name}): the link can be at most x{maxw}: {link}, {when}{sim}",
                     lane_fix)
        elif width < maxw:
            self.add(chk, "warn" if busy else "info",
                     f"GPU {g.index} ({g.name}): PCIe {link}, {when}{sim}",
                     lane_fix if busy else "read under load: run doctor during training, or look at a run's "
                     "telemetry.csv (GPUs narrow or slow their link when idle)")
        elif gen is not None and maxg is not None and gen < maxg:
            self.add(chk, "warn" if busy else "info", f"GPU {g.index} ({g.name}): PCIe {link}, {when}{sim}",
                     "a riser or the BIOS PCIe setting may hold the generation down" if busy else
                     "normal when idle (the link slows to save power); read it under load")
        else:
            self.add(chk, "ok", f"GPU {g.index} ({g.name}): PCIe {link}, {when}{sim}")

    def _power(self) -> None:
        if self.nv is None:
            return
        originals = self.src.power_originals()
        by_uuid = {k: v for k, v in originals.items()}
        for g in self.inventory:
            chk = f"gpu{g.index}-power"
            spec = self.m.gpu(g.index)
            rec = by_uuid.get(g.uuid) or by_uuid.get(f"index-{g.index}")
            if rec is not None:
                self.add(chk, "warn", f"GPU {g.index}: ftkit changed its limit to {g.power_limit_w:g} W and has not "
                         f"restored it (original {rec.get('original_w')} W)",
                         "if no run is using it: `ftkit power restore` (or `ftkit down` for a run that died)")
            elif g.power_limit_w is not None and g.power_default_w is not None and g.power_limit_w < g.power_default_w:
                self.add(chk, "info", f"GPU {g.index}: limit {g.power_limit_w:g} W, below its default "
                         f"{g.power_default_w:g} W (set outside ftkit)")
            elif g.power_limit_w is not None:
                self.add(chk, "ok", f"GPU {g.index}: power limit {g.power_limit_w:g} W "
                         f"(default {g.power_default_w if g.power_default_w is not None else '?'} W, "
                         f"range {g.power_min_w}-{g.power_max_w} W)")
            if spec is not None and spec.power is not None and self.machine_given:
                p = spec.power
                pairs = [("default_w", p.default_w, g.power_default_w), ("min_w", p.min_w, g.power_min_w),
                         ("max_w", p.max_w, g.power_max_w)]
                wrong = [f"{n} {a} W (GPU reports {b:g} W)" for n, a, b in pairs
                         if a is not None and b is not None and abs(a - b) > 1]
                if wrong:
                    self.add(chk, "warn", f"GPU {g.index}: the profile's power range differs: " + ", ".join(wrong),
                             "fix gpus[].power in the machine profile: caps and the PSU budget are checked against it")

    def _psu(self) -> None:
        if not self.m.gpus:
            return
        from ftkit.plan.power import budget

        if self.m.psu is None:
            self.add("psu", "info", "no psu in the machine profile: the worst-case draw is not checked",
                     "add psu: {watts: N} to the profile")
            return
        caps: dict[int, int] = {}
        for g in self.inventory:
            if g.power_limit_w is not None:
                caps[g.index] = int(g.power_limit_w)
        now = budget(self.m, caps) if caps else None
        default = budget(self.m, {})
        b = now or default
        word = "at the current limits" if now else "at the default limits"
        if b.verdict == "over":
            self.add("psu", "warn", f"worst-case transients {b.worst_case_w:.0f} W {word} exceed the PSU budget "
                     f"{b.budget_w:.0f} W ({b.psu_w} W x {b.safety_margin:g})",
                     "; ".join(b.notes) or "cap the GPUs before training (a power step)")
        elif b.verdict == "ok":
            extra = ""
            if now is not None and default.verdict == "over":
                extra = f"; at the default limits {default.worst_case_w:.0f} W would not be (recipes need a power step)"
            self.add("psu", "ok", f"worst case {b.worst_case_w:.0f} W {word} within {b.budget_w:.0f} W{extra}")
        else:
            self.add("psu", "info", "PSU budget unknown: " + "; ".join(b.notes))

    # -- disk -------------------------------------------------------------------------------

    def _disk(self) -> None:
        needs = self._needs()
        places = {"runs": self.runs_root}
        for name in ("models", "hf_cache", "datasets"):
            val = getattr(self.m.paths, name)
            if val:
                places[name] = Path(val)
        if "hf_cache" not in places:
            places["hf_cache"] = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        by_fs: dict[int, list[str]] = {}
        sizes: dict[int, tuple[int, int]] = {}
        for name, path in places.items():
            u = self.src.disk_usage(path)
            if u is None:
                self.add("disk", "warn", f"{name} ({path}): cannot read free space")
                continue
            by_fs.setdefault(u[2], []).append(name)
            sizes[u[2]] = (u[0], u[1])
        for dev, names in by_fs.items():
            free, total = sizes[dev]
            need = sum(needs.get(n, 0) for n in names)
            where = ", ".join(f"{n} ({places[n]})" for n in names)
            if need:
                detail = "; ".join(f"{k}: {_gib(v)}" for k, v in self._need_detail.items() if k.split(":")[0] in names)
                if free < need:
                    self.add("disk", "error", f"{_gib(free)} free for {where}; the recipes need about {_gib(need)} "
                             f"({detail})", "free space, move paths.runs / hf_cache to a larger disk, or lower "
                             "checkpoint.keep_last")
                elif free < 1.5 * need:
                    self.add("disk", "warn", f"{_gib(free)} free for {where}: tight for about {_gib(need)} ({detail})",
                             "leave room for failed runs and a second merge")
                else:
                    self.add("disk", "ok", f"{_gib(free)} free for {where} (recipes need about {_gib(need)})")
            elif free < 30 * 2**30:
                self.add("disk", "warn", f"{_gib(free)} free of {_gib(total)} for {where}",
                         "a bf16 merge of an 8B model alone writes 16 GB; pass --recipe for an estimate")
            else:
                self.add("disk", "ok", f"{_gib(free)} free of {_gib(total)} for {where}")

    def _needs(self) -> dict[str, float]:
        """Bytes each place needs for the given recipes: the base model download, checkpoints
        kept by the retention policy, final adapters and merged models."""
        from ftkit.plan.build import arch_for
        from ftkit.plan.memory import BYTES, lora_params
        from ftkit.prepare import local_model_config
        from ftkit.recipe.models import MergeStep, TrainStep

        needs: dict[str, float] = {}
        detail: dict[str, float] = {}
        for res in self.recipes:
            r = res.recipe
            arch = arch_for(r, local_model_config(res))
            if arch is None:
                self.add("disk", "info", f"{r.name}: no architecture figures for the model: no size estimate",
                         "add model.arch to the recipe")
                continue
            params = arch.params_b * 1e9
            if r.model.id:
                dl = params * 2  # hub weights are bf16/fp16
                needs["hf_cache"] = needs.get("hf_cache", 0) + dl
                detail[f"hf_cache:{r.name} base model"] = dl
            runs = 0.0
            for step in r.steps:
                if isinstance(step, TrainStep):
                    keep = step.checkpoint.keep_last + (1 if step.checkpoint.keep_best else 0)
                    if step.method == "full":
                        per = params * (BYTES[step.precision] + 8)  # weights + Adam's two fp32 states
                        final = params * BYTES[step.precision]
                    else:
                        lp = lora_params(arch, step.lora.r, step.lora.target_modules)
                        per = lp * 12  # fp32 adapter + Adam's two states
                        final = lp * 4
                    runs += per * keep + final
                elif isinstance(step, MergeStep):
                    runs += params * BYTES[step.dtype]
            needs["runs"] = needs.get("runs", 0) + runs
            detail[f"runs:{r.name} checkpoints, adapters, merges"] = runs
        self._need_detail = detail
        return needs

    # -- clocks -----------------------------------------------------------------------------

    def _clock(self, info: dict[str, Any] | None) -> None:
        refs: list[tuple[float, float, str]] = []  # (reference, local, source)
        if info is not None and info.get("SystemTime"):
            t = _parse_engine_time(str(info["SystemTime"]))
            if t is not None:
                local = float(info.get("_local_time") or self.src.now())
                refs.append((t, local, f"Docker engine ({self.src.docker_host or 'local'})"))
        ref = self.src.reference_time()
        if ref is not None:
            refs.append((ref[0], self.src.now(), ref[1]))
        if not refs:
            self.add("clock", "info", "no reference clock reachable (no Docker engine, offline)",
                     "check `timedatectl` shows the clock synchronized (NTP)")
            return
        for t, local, source in refs:
            skew = local - t
            slack = 1.5 if source.startswith("http") else 0  # HTTP Date has 1 s resolution
            if abs(skew) > SKEW_ERROR_S:
                sev = "error"
            elif abs(skew) > SKEW_WARN_S + slack:
                sev = "warn"
            else:
                sev = "ok"
            self.add("clock", sev, f"local clock {skew:+.1f} s against {source}",
                     None if sev == "ok" else "enable NTP (timedatectl set-ntp true): skewed clocks break "
                     "multi-host runs, TLS and the join of logs and telemetry")

    # -- lease directory and stale runs ---------------------------------------------------

    def _lease_dir(self) -> None:
        try:
            from ftkit.lease.paths import default_lease_dir
        except ImportError:  # the lease package has not landed: the profile's documented default
            def default_lease_dir(machine_paths_lease: str | None = None) -> Path:
                if os.environ.get("FTKIT_LEASE_DIR"):
                    return Path(os.environ["FTKIT_LEASE_DIR"]).expanduser()
                if machine_paths_lease:
                    return Path(machine_paths_lease).expanduser()
                sysdir = Path("/run/lock/ftkit")
                if (sysdir.is_dir() and os.access(sysdir, os.W_OK)) or os.access(sysdir.parent, os.W_OK):
                    return sysdir
                return Path.home() / ".cache" / "ftkit" / "lease"
        d = default_lease_dir(self.m.paths.lease)
        if d.is_dir():
            if os.access(d, os.W_OK | os.X_OK):
                self.add("lease", "ok", f"GPU lease directory {d} is writable")
            else:
                self.add("lease", "error", f"GPU lease directory {d} is not writable by uid {os.getuid()}",
                         "every user and container taking GPU leases must write there: fix its permissions "
                         "(chmod 1777 like /run/lock) or set paths.lease")
            return
        if d.exists():
            self.add("lease", "error", f"GPU lease directory {d} is not a directory", "remove it or set paths.lease")
            return
        parent = d
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if os.access(parent, os.W_OK | os.X_OK):
            self.add("lease", "ok", f"GPU lease directory {d} will be created on first use")
        else:
            self.add("lease", "error", f"GPU lease directory {d} cannot be created ({parent} is not writable)",
                     "set FTKIT_LEASE_DIR or the profile's paths.lease to a writable directory")

    def _stale_runs(self) -> None:
        runs = _stale_runs(self.runs_root)
        if runs is None:
            return
        for run, st in runs:
            caps = "; it had capped GPU power" if st.get("power") else ""
            self.add("stale-runs", "warn", f"run {run.name} says running but its ftkit (pid {st.get('pid')}) is "
                     f"gone{caps}", f"`ftkit down {run.name}` stops what it left and restores the machine")
        if not runs:
            self.add("stale-runs", "ok", f"no stale runs under {self.runs_root}")


def _stale_runs(root: Path) -> list[tuple[Path, dict[str, Any]]] | None:
    if not root.is_dir():
        return None
    try:
        from ftkit.run.stale import is_stale, runs_in, state_of
    except ImportError:  # pragma: no cover - older runner: pid only
        return _stale_runs_by_pid(root)
    return [(r, state_of(r)) for r in runs_in(root) if is_stale(r)]


def _stale_runs_by_pid(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    from ftkit.files import read_json

    out = []
    for p in sorted(root.iterdir()):
        try:
            st = read_json(p / "state.json")  # never blocks on a FIFO, never follows a link
        except (OSError, ValueError):
            continue
        if not isinstance(st, dict):
            continue
        pid = st.get("pid")
        if st.get("status") != "running" or not isinstance(pid, int):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.append((p, st))
        except PermissionError:
            pass
    return out


def _links_under_load(root: Path) -> dict[int, dict[str, Any]]:
    """The PCIe link each GPU had while busy (>= 50%) in the newest run with real telemetry."""
    from ftkit.gpu.telemetry import read_csv

    if not root.is_dir():
        return {}
    try:
        runs = sorted((p for p in root.iterdir() if (p / "telemetry.csv").is_file()), key=lambda p: p.name, reverse=True)
    except OSError:
        return {}
    for run in runs[:5]:
        out: dict[int, dict[str, Any]] = {}
        for r in read_csv(run / "telemetry.csv"):
            if r.get("source") != "nvml":
                continue
            try:
                busy = float(r.get("gpu_util") or 0) >= 50
                gpu, width, gen = int(r["gpu"]), int(r["pcie_link_width"]), int(r["pcie_link_gen"])
            except (KeyError, ValueError):
                continue
            if busy and (gpu not in out or width < out[gpu]["width"]):
                out[gpu] = {"width": width, "gen": gen, "run": run.name}
        if out:
            return out
    return {}


def diagnose(machine: Machine, sources: Sources | None = None, *, runs_root: Path | None = None,
             recipes: list[Any] | None = None, machine_given: bool = True) -> DoctorResult:
    return Doctor(machine, sources or Sources(docker_host=machine.docker.host), runs_root=runs_root,
                  recipes=recipes, machine_given=machine_given).run()


# --------------------------------------------------------------------------- snapshot and compare


def snapshot(result: DoctorResult) -> dict[str, Any]:
    return {
        "ftkit_doctor": SNAPSHOT_FORMAT,
        "taken": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": result.machine,
        **result.facts,
        "findings": [f.as_dict() for f in result.findings],
    }


@dataclass
class Drift:
    field: str
    a: Any
    b: Any
    severity: str  # info | warn | error
    why: str


# what must match for ranks on several hosts to cooperate (error), what usually should (warn)
_PACKAGE_SEVERITY = {"torch": "error", "deepspeed": "error", "accelerate": "error", "transformers": "warn",
                     "peft": "warn", "trl": "warn", "bitsandbytes": "warn", "datasets": "warn",
                     "safetensors": "info", "tokenizers": "warn", "vllm": "warn", "nvidia-ml-py": "info",
                     "pydantic": "info", "docker": "info"}


def _minor(v: Any) -> tuple[int, ...]:
    return _ver(str(v))[:2] if v else ()


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[Drift]:
    """What differs between two hosts' snapshots, with how much it matters for a run that
    spans them (error: ranks may not cooperate or it is not the same build)."""
    out: list[Drift] = []

    def diff(name: str, x: Any, y: Any, sev: str, why: str) -> None:
        if x != y:
            out.append(Drift(name, x, y, sev, why))

    pa, pb = a.get("python"), b.get("python")
    if pa != pb:
        out.append(Drift("python", pa, pb, "error" if _minor(pa) != _minor(pb) else "warn",
                         "pickled objects and compiled extensions differ across Python versions"))
    diff("ftkit", a.get("ftkit"), b.get("ftkit"), "warn", "plans and run directories may differ")
    diff("torch_cuda", a.get("torch_cuda"), b.get("torch_cuda"), "error", "NCCL and kernels differ between CUDA builds")
    da, db = a.get("gpu_driver"), b.get("gpu_driver")
    if da != db:
        out.append(Drift("gpu_driver", da, db, "warn", "drivers differ; each must support the images' CUDA"))
    diff("cuda_driver", a.get("cuda_driver"), b.get("cuda_driver"), "info", "the newest CUDA each driver supports")
    diff("nvml", a.get("nvml"), b.get("nvml"), "warn", "one host's GPU figures are not real" if
         "simulated" in (a.get("nvml"), b.get("nvml")) else "GPU access differs")
    diff("arch", a.get("arch"), b.get("arch"), "error", "different CPU architectures need different images")
    diff("docker.server", (a.get("docker") or {}).get("server"), (b.get("docker") or {}).get("server"), "info",
         "Docker engines differ")
    pka, pkb = a.get("packages") or {}, b.get("packages") or {}
    for name in sorted(set(pka) | set(pkb)):
        diff(f"packages.{name}", pka.get(name), pkb.get(name), _PACKAGE_SEVERITY.get(name, "warn"),
             "the same recipe may train differently" if name != "torch" else "ranks must run the same torch")
    for section in ("images", "images_lock"):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            ea, eb = sa.get(key), sb.get(key)
            if ea is None or eb is None:
                out.append(Drift(f"{section}.{key}", _short(ea), _short(eb), "warn", "built on one host only"))
                continue
            if section == "images":  # a list per image/variant: compare the set of builds
                ha = sorted({(e.get("lock_sha256"), e.get("content_hash")) for e in ea})
                hb = sorted({(e.get("lock_sha256"), e.get("content_hash")) for e in eb})
                if ha != hb:
                    out.append(Drift(f"{section}.{key}", _short(ea), _short(eb), "error",
                                     "not the same build (lock or content hash differs)"))
                continue
            for f in ("lock_sha256", "content_hash", "packages_sha256", "tag"):
                if ea.get(f) != eb.get(f):
                    out.append(Drift(f"{section}.{key}.{f}", _trim(ea.get(f)), _trim(eb.get(f)),
                                     "error" if f != "tag" else "warn", "not the same dependency set"))
    ea, eb = a.get("dist_env") or {}, b.get("dist_env") or {}
    for key in sorted(set(ea) | set(eb)):
        if key.endswith("_SOCKET_IFNAME"):
            continue  # interface names legitimately differ between hosts
        diff(f"dist_env.{key}", ea.get(key), eb.get(key), "warn",
             "the ranks' communication settings differ (NCCL/Gloo knobs, threads, PYTHONPATH)")
    ga = [g.get("name") for g in a.get("gpus") or []]
    gb = [g.get("name") for g in b.get("gpus") or []]
    diff("gpus", ga, gb, "info", "different GPUs (fine for sharding; for data parallelism the slowest sets the pace)")
    return out


def _trim(v: Any) -> Any:
    return v[:12] if isinstance(v, str) and len(v) > 12 else v


def _short(v: Any) -> Any:
    if isinstance(v, list):
        return ", ".join(str(e.get("tag")) for e in v)
    if isinstance(v, dict):
        return v.get("tag") or _trim(v.get("lock_sha256"))
    return v


def load_snapshot(path: Path) -> dict[str, Any]:

    from ftkit.errors import UserError
    from ftkit.files import UnreadableJson, UnsafeFile, read_json

    try:  # a file the user names: a link to it is fine, its target must be a regular file
        data = read_json(os.path.realpath(path), SNAPSHOT_MAX_BYTES)
    except UnsafeFile as e:
        raise UserError(f"{path}: cannot read: {e.reason} (save the snapshot to a file: "
                        "`ftkit doctor --json > HOST.json`)") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnreadableJson as e:
        raise UserError(e.at(path)) from e
    if not isinstance(data, dict) or data.get("ftkit_doctor") != SNAPSHOT_FORMAT:
        raise UserError(f"{path}: not an `ftkit doctor --json` snapshot (format {SNAPSHOT_FORMAT})",
                        hint="make one on each host with `ftkit doctor --json > HOST.json`")
    for key, (ok, what) in SNAPSHOT_FIELDS.items():
        if data.get(key) is not None and not ok(data[key]):
            raise UserError(f"{path}: {key} is {type(data[key]).__name__}, not {what}: not a snapshot `ftkit doctor "
                            "--json` wrote")
    return data


SNAPSHOT_MAX_BYTES = 16 << 20


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))


def _map_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(x is None or ok(x) for x in v.values())


def _list_of_objects(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


# The shape `compare` relies on, field by field (a hand-edited or hostile snapshot is refused, not a traceback).
SNAPSHOT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_scalar, "a string or number") for k in ("host", "python", "ftkit", "torch_cuda", "nvml", "arch")},
    **{k: (lambda v: _scalar(v) or isinstance(v, dict), "a string or an object") for k in ("gpu_driver", "cuda_driver")},
    "docker": (lambda v: isinstance(v, dict), "an object"),
    "packages": (_map_of(_scalar), "an object of versions"),
    "images": (_map_of(_list_of_objects), "an object of lists of builds"),
    "images_lock": (_map_of(lambda v: isinstance(v, dict)), "an object of lock records"),
    "dist_env": (_map_of(_scalar), "an object of strings"),
    "gpus": (_list_of_objects, "a list of objects"),
}
