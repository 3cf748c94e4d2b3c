"""A run directory read back as numbers: what `report` plots and `bench` decides from.

Everything here tolerates a run that died half way: a missing or torn file is a note in
`problems`, never an exception (a report of a failed run is the one most needed).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import UserError
from ftkit.files import UnsafeFile, parse_json, read_bounded, read_json
from ftkit.run.record import PlanStepView, PlanView, RunState, kind

THROTTLE_FLAGS = ("hw_slowdown", "hw_power_brake", "sw_power_cap", "sw_thermal_slowdown", "hw_thermal_slowdown")
BUSY_UTIL = 50.0


def _iso(s: Any) -> float | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def num(v: Any) -> float | None:
    """A telemetry or metrics value as a float; None for empty, missing or not a number."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def positive(v: Any) -> float | None:
    """A time, rate or count that only a working run records: above 0, else None (a
    training time of -60 s or 0 samples/s is a broken record, not a measurement: it must
    not become a step count or a speedup)."""
    f = num(v)
    return f if f is not None and f > 0 else None


@dataclass
class Checkpoint:
    step: int
    seconds: float | None
    mib: float | None  # None: removed by retention since (its time is in metrics.jsonl)
    approximate: bool


@dataclass
class RunData:
    path: Path
    state: RunState = field(default_factory=RunState)  # a view: what does not have its shape left out
    plan: PlanView = field(default_factory=PlanView)
    env: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # train step -> rows
    train_summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval step -> summary.json
    telemetry: list[dict[str, str]] = field(default_factory=list)
    checkpoints: dict[str, list[Checkpoint]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return str(self.state.status or "unknown")

    @property
    def started(self) -> float | None:
        return _iso(self.state.started)

    @property
    def finished(self) -> float | None:
        return _iso(self.state.finished)

    @property
    def simulated(self) -> bool:
        """True when any GPU figure in this run is synthetic (the simulated NVML backend)."""
        return any(r.get("source") == "simulated" for r in self.telemetry) or self.plan.simulated_gpus

    def t0(self) -> float | None:
        """The run's time zero for plots: its start, else its first telemetry row."""
        if self.started is not None:
            return self.started
        walls = [num(r.get("wall_time")) for r in self.telemetry]
        walls = [w for w in walls if w is not None]
        return min(walls) if walls else None

    def step_spans(self) -> list[tuple[str, float, float | None, str]]:
        """(step id, start, end, status) in unix seconds, in run order, for steps that ran."""
        out = []
        for sid in self.state.step_ids():
            e = self.state.entry(sid)
            start = _iso(e.started) if e is not None else None
            if e is not None and start is not None:
                out.append((sid, start, _iso(e.finished), str(e.status)))
        return out

    def train_steps(self) -> list[dict[str, Any]]:
        """The resolved recipe's train steps (the settings a fair comparison must hold equal)."""
        return [s for s in self.recipe.get("steps") or [] if s.get("type") == "train"]


def _read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    """A JSON object file of the run, or {} with a note: never blocks (a FIFO), never
    follows a link, never raises (binary, truncated, too deep, too large, not an object)."""
    if not os.path.lexists(path):
        return {}
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {}
    except UnsafeFile as e:
        problems.append(f"{path.name}: unreadable ({e.reason})")
        return {}
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: unreadable ({getattr(e, 'reason', None) or e})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name}: not a JSON object (left out)")
        return {}
    return data


def _read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON-object lines of a journal-like file (metrics.jsonl): bounded (a longer file
    is read from its end), each bad line noted with its number, the torn last line of a run
    killed mid-write passed over quietly."""
    rows: list[dict[str, Any]] = []
    try:
        size = os.lstat(path).st_size
        data = read_bounded(path, JSONL_MAX_BYTES, tail=True)
    except OSError as e:
        problems.append(f"{path.name}: unreadable ({getattr(e, 'reason', None) or e.strerror or e})")
        return rows
    if size > JSONL_MAX_BYTES:
        problems.append(f"{path.name}: {size} bytes; only its last {JSONL_MAX_BYTES >> 20} MiB read")
        data = data[data.find(b"\n") + 1:]  # the first line is cut
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    bad = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as e:
            if n != len(lines):  # the last line of a run killed mid-write is expected to be torn
                bad += 1
                if bad <= 5:
                    problems.append(f"{path.name} line {n}: {getattr(e, 'reason', None) or 'not JSON'}")
            continue
        if not isinstance(row, dict):
            bad += 1
            if bad <= 5:
                problems.append(f"{path.name} line {n}: not a JSON object")
            continue
        if "step" in row and not _is_int(row["step"]):
            bad += 1
            if bad <= 5:
                problems.append(f"{path.name} line {n}: step is {kind(row['step'])}, not an integer (left out)")
            continue
        rows.append(row)
    if bad > 5:
        problems.append(f"{path.name}: {bad - 5} more bad lines")
    return rows


# --------------------------------------------------------------------------- typed views
# The files of a run directory are ftkit's own, but anyone can hand `report` a directory: each
# is checked against the shape its readers rely on, and what does not fit is left out with a
# note, so a report of a damaged run still renders. state.json and plan.json are read as
# run.record's views (RunState, PlanView), the rest here.

JSONL_MAX_BYTES = 256 << 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 62) < v < (1 << 62)


def _obj(v: Any) -> bool:
    return isinstance(v, dict)


def _obj_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _obj_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


ENV_FIELDS = {"packages": (_obj, "an object"), "gpus": (_obj_list, "a list of objects")}


def _harness(v: Any) -> bool:
    return isinstance(v, dict) and _obj_list(v.get("results"))


EVAL_FIELDS = {"models": (_obj_map, "an object of per-model results"),
               "harness": (_harness, "an object with a list of lm-eval results")}


def _typed(data: dict[str, Any], fields: dict[str, tuple[Any, str]], where: str,
           problems: list[str]) -> dict[str, Any]:
    """`data` without the fields whose value is not of the shape its readers expect (null is
    as good as missing), one note for each left out."""
    for key, (ok, what) in fields.items():
        if data.get(key) is not None and not ok(data[key]):
            problems.append(f"{where}: {key} is {kind(data[key])}, not {what} (left out)")
            del data[key]
    return data


def _read_recipe(path: Path, problems: list[str]) -> dict[str, Any]:
    """recipe.resolved.yaml as the fairness check reads it: an object whose `steps` are
    objects. Read bounded and without blocking; YAML's aliases are refused (a few lines of
    them can expand to gigabytes), since ftkit writes none."""
    if not os.path.lexists(path):
        return {}
    import yaml

    try:
        text = read_bounded(path, 16 << 20).decode("utf-8")
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ValueError("it uses YAML aliases, which ftkit never writes")
        data = yaml.safe_load(text)
    except UnsafeFile as e:
        problems.append(f"{path.name}: unreadable ({e.reason})")
        return {}
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        problems.append(f"{path.name}: unreadable ({why})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name}: not a mapping (left out)")
        return {}
    return _typed(data, {"steps": (_obj_list, "a list of steps")}, path.name, problems)


def _checkpoints(root: Path, metrics: list[dict[str, Any]]) -> list[Checkpoint]:
    """Checkpoint save times: `checkpoint_s` from metrics.jsonl where the engine records it,
    else from file times (the manifest is written right after the save returns; the
    earliest file marks the save's first write: a lower bound)."""
    from ftkit.gpu.telemetry import dir_size_mib

    recorded = {int(r["step"]): positive(r.get("checkpoint_s")) for r in metrics if "checkpoint_s" in r and "step" in r}
    out = []
    dirs = sorted(root.iterdir()) if root.is_dir() else []
    for d in dirs:
        if not (d.is_dir() and d.name.startswith("checkpoint-") and d.name[11:].isdigit()):
            continue
        step = int(d.name[11:])
        marker = d / "ftkit-complete.json"
        seconds: float | None = recorded.get(step)
        approx = False
        if seconds is None and marker.is_file():
            try:
                times = [p.stat().st_mtime for p in d.rglob("*") if p.is_file() and p.name != marker.name]
                if times:
                    seconds, approx = round(max(0.0, marker.stat().st_mtime - min(times)), 3), True
            except OSError:
                pass
        out.append(Checkpoint(step, seconds, dir_size_mib(d), approx))
    on_disk = {c.step for c in out}
    out += [Checkpoint(step, secs, None, False) for step, secs in recorded.items() if step not in on_disk]
    return sorted(out, key=lambda c: c.step)


def load_run(path: Path) -> RunData:
    """Read a run directory. Raises UserError only when `path` is not a run directory."""
    path = Path(path)
    if (path / "compose.yaml").is_file() and (path / "run" / "plan.json").is_file():  # a stack: its run
        path = path / "run"
    if not path.is_dir() or not ((path / "state.json").is_file() or (path / "plan.json").is_file()):
        raise UserError(f"{path}: not a run directory (no state.json or plan.json)",
                        hint="give a directory `ftkit up` made, e.g. runs/20260101T120000Z-quickstart")
    rd = RunData(path)
    rd.state = RunState.from_dict(_read_json(path / "state.json", rd.problems), rd.problems)
    rd.plan = PlanView.from_dict(_read_json(path / "plan.json", rd.problems), rd.problems)
    rd.env = _typed(_read_json(path / "env.json", rd.problems), ENV_FIELDS, "env.json", rd.problems)
    rd.recipe = _read_recipe(path / "recipe.resolved.yaml", rd.problems)
    steps = rd.plan.steps
    trains = [s for s in steps if s.kind == "train"]
    if not trains and not steps:  # no plan: look for the files themselves
        trains = [PlanStepView(p.parent.name, "train", {"metrics": str(p.relative_to(path))})
                  for p in sorted(path.glob("steps/*/metrics.jsonl"))]
    for s in trains:
        sid = str(s.id)
        mpath = path / s.outputs.get("metrics", f"steps/{sid}/metrics.jsonl")
        rd.metrics[sid] = _read_jsonl(mpath, rd.problems) if os.path.lexists(mpath) else []
        rd.train_summaries[sid] = _read_json(path / "steps" / sid / "train_summary.json", rd.problems)
        rd.checkpoints[sid] = _checkpoints(path / "steps" / sid / "checkpoints", rd.metrics[sid])
    for s in steps:
        if s.kind == "eval":
            sid = str(s.id)
            summary = path / s.outputs.get("summary", f"steps/{sid}/summary.json")
            data = _typed(_read_json(summary, rd.problems), EVAL_FIELDS, summary.name, rd.problems)
            if data:
                rd.evals[sid] = data
    if not steps:
        for p in sorted(path.glob("steps/*/summary.json")):
            rd.evals[p.parent.name] = _typed(_read_json(p, rd.problems), EVAL_FIELDS, p.name, rd.problems)
    from ftkit.gpu.telemetry import read_csv

    try:
        rd.telemetry = read_csv(path / "telemetry.csv")
    except (OSError, ValueError) as e:
        rd.problems.append(f"telemetry.csv: unreadable ({getattr(e, 'reason', None) or e})")
    return rd


# --------------------------------------------------------------------------- summaries


def throughput(rd: RunData, step_id: str) -> dict[str, Any]:
    """Training speed of one train step: overall (the trainer's runtime, checkpoint saves
    included) and steady (median of the logged intervals after the first, which holds the
    warm-up)."""
    rows = rd.metrics.get(step_id) or []
    final = next((r for r in reversed(rows) if "train_runtime" in r), None)
    logged = [r for r in rows if "samples_per_s" in r]
    steps_done = max((int(r.get("step", 0)) for r in rows), default=0)
    out: dict[str, Any] = {"steps": steps_done, "train_runtime_s": None, "samples_per_s": None, "tokens_per_s": None,
                           "steady_samples_per_s": None, "steady_tokens_per_s": None, "num_tokens": None}
    if final is not None:
        rt = positive(final.get("train_runtime"))
        out["train_runtime_s"] = rt
        out["samples_per_s"] = positive(final.get("train_samples_per_second"))
        tokens = max((positive(r.get("num_tokens")) or 0 for r in rows), default=0) or None
        out["num_tokens"] = tokens
        if rt and tokens:
            out["tokens_per_s"] = round(tokens / rt, 1)
    steady = logged[1:] if len(logged) > 1 else logged
    s = [positive(r.get("samples_per_s")) for r in steady]
    t = [positive(r.get("tokens_per_s")) for r in steady]
    s = [x for x in s if x]
    t = [x for x in t if x]
    if s:
        out["steady_samples_per_s"] = round(statistics.median(s), 3)
    if t:
        out["steady_tokens_per_s"] = round(statistics.median(t), 1)
    entry = rd.state.entry(step_id)
    out["step_seconds"] = positive(entry.seconds) if entry is not None else None
    return out


def telemetry_rows(rd: RunData, step_id: str | None = None) -> list[dict[str, str]]:
    return [r for r in rd.telemetry if step_id is None or r.get("step") == step_id]


def gpu_summary(rows: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per GPU: samples, source, mean and peak utilization, peak temperature and power, the
    enforced limit, how often each throttle reason was set, the PCIe link while busy, XIDs."""
    out: dict[str, dict[str, Any]] = {}
    by: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r.get("gpu", "") != "":
            by.setdefault(r["gpu"], []).append(r)
    for gpu, rs in sorted(by.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        def vals(key: str, rows: list[dict[str, str]] = rs) -> list[float]:
            return [v for v in (num(r.get(key)) for r in rows) if v is not None]

        util, temp, power, limit = vals("gpu_util"), vals("gpu_temp_c"), vals("power_usage_w"), vals("enforced_power_limit_w")
        busy = [r for r in rs if (num(r.get("gpu_util")) or 0) >= BUSY_UTIL]
        widths = vals("pcie_link_width", busy)
        xids = sorted({x for r in rs for x in (r.get("xid_errors") or "").split(";") if x})
        flags = {}
        for f in THROTTLE_FLAGS:
            known = [num(r.get(f)) for r in rs if num(r.get(f)) is not None]
            flags[f] = round(sum(1 for v in known if v) / len(known), 3) if known else None
        out[gpu] = {
            "samples": len(rs), "source": rs[0].get("source") or "", "name": rs[0].get("gpu_name") or "",
            "util_mean": round(statistics.fmean(util), 1) if util else None,
            "util_max": max(util) if util else None,
            "temp_max_c": max(temp) if temp else None,
            "power_max_w": max(power) if power else None,
            "power_mean_w": round(statistics.fmean(power), 1) if power else None,
            "limit_w": min(limit) if limit else None,
            "throttle_fraction": flags,
            "pcie_width_busy_min": min(widths) if widths else None,
            "pcie_max_width": max(vals("pcie_max_link_width")) if vals("pcie_max_link_width") else None,
            "xids": xids,
        }
    return out


def host_summary(rows: list[dict[str, str]]) -> dict[str, Any]:
    cpu = [v for v in (num(r.get("cpu_percent")) for r in rows) if v is not None]
    ram = [v for v in (num(r.get("ram_used_mib")) for r in rows) if v is not None]
    disk = [v for v in (num(r.get("run_dir_mib")) for r in rows) if v is not None]
    return {"cpu_mean": round(statistics.fmean(cpu), 1) if cpu else None, "ram_max_mib": max(ram) if ram else None,
            "run_dir_start_mib": disk[0] if disk else None, "run_dir_end_mib": disk[-1] if disk else None}


def global_batch(train: dict[str, Any]) -> int:
    world = max(1, len(train.get("gpus") or []))
    return int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1)) * world
