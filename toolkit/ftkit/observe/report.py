"""`ftkit report RUN [RUN2]`: what a run did, as a self-contained HTML page, a Markdown
summary and PNG plots - loss and eval loss, tokens/s and samples/s, GPU power against its
cap, temperature and utilization over time with step boundaries, checkpoint save times,
disk growth and host load; the outcome, environment and evaluation results.

Two runs go side by side with a fairness check: a scaling comparison means nothing when
the data slice, the stopping point, the global batch or the checkpoint policy differ (the
guide's "comparing unfair experiments").

Plots whose GPU numbers come from the simulated backend say SIMULATED in the title and
across the plot. The numbers each plot shows are read back from the figure and written to
figures.json, so tests (and people) can check a plot holds the series it claims.

matplotlib (Agg backend) is imported only here, and only when a report is made.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import UserError
from ftkit.observe.rundata import (
    RunData,
    global_batch,
    gpu_summary,
    host_summary,
    load_run,
    num,
    throughput,
)

SIM_NOTE = "SIMULATED GPU telemetry (no real GPU)"
RUN_STYLES = ("-", "--")
RUN_TAGS = ("A", "B")


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    kind: str = "line"  # line | bar


@dataclass
class Figure:
    name: str
    file: str
    title: str
    simulated: bool
    series: list[Series] = field(default_factory=list)
    caption: str = ""


@dataclass
class Fairness:
    field: str
    a: Any
    b: Any
    expected: bool  # a scaling test varies this on purpose


@dataclass
class ReportResult:
    out_dir: Path
    html: Path
    markdown: Path
    figures: list[Figure]
    fairness: list[Fairness]

    @property
    def fair(self) -> bool:
        return not any(not f.expected for f in self.fairness)


# --------------------------------------------------------------------------- fairness


def _train(rd: RunData) -> dict[str, Any]:
    trains = rd.train_steps()
    return trains[0] if trains else {}


def fairness(a: RunData, b: RunData) -> list[Fairness]:
    """What differs between two runs' recipes. `expected` marks what a scaling test varies
    (GPUs, distribution, the per-device split of a kept global batch); anything else makes
    the comparison unfair."""
    ta, tb = _train(a), _train(b)
    da, db = a.recipe.get("dataset") or {}, b.recipe.get("dataset") or {}
    out: list[Fairness] = []

    def check(name: str, x: Any, y: Any, expected: bool = False) -> None:
        if x != y:
            out.append(Fairness(name, x, y, expected))

    check("model", a.recipe.get("model"), b.recipe.get("model"))
    check("dataset.path (data slice)", da.get("path"), db.get("path"))
    check("dataset.format/template", (da.get("format"), da.get("template")), (db.get("format"), db.get("template")))
    check("dataset.eval (eval split)", da.get("eval"), db.get("eval"))
    check("train.max_steps", ta.get("max_steps"), tb.get("max_steps"))
    check("train.epochs", ta.get("epochs"), tb.get("epochs"))
    check("global batch (batch_size x grad_accum x GPUs)", global_batch(ta) if ta else None,
          global_batch(tb) if tb else None)
    check("train.seq_len", ta.get("seq_len"), tb.get("seq_len"))
    check("train.packing", ta.get("packing"), tb.get("packing"))
    check("train.checkpoint (policy)", ta.get("checkpoint"), tb.get("checkpoint"))
    check("train.eval_every_steps", ta.get("eval_every_steps"), tb.get("eval_every_steps"))
    check("train.logging_steps", ta.get("logging_steps"), tb.get("logging_steps"))
    for k in ("method", "lora", "learning_rate", "lr_scheduler", "precision", "optimizer", "seed",
              "gradient_checkpointing"):
        check(f"train.{k}", ta.get(k), tb.get(k))
    check("train.gpus", ta.get("gpus"), tb.get("gpus"), expected=True)
    check("train.distribution", ta.get("distribution"), tb.get("distribution"), expected=True)
    for k in ("batch_size", "grad_accum"):
        same_global = (global_batch(ta) if ta else None) == (global_batch(tb) if tb else None)
        check(f"train.{k}", ta.get(k), tb.get(k), expected=same_global)
    caps_a = [s.get("caps_w") for s in a.recipe.get("steps") or [] if s.get("type") == "power"]
    caps_b = [s.get("caps_w") for s in b.recipe.get("steps") or [] if s.get("type") == "power"]
    check("power caps", caps_a, caps_b)
    return out


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("ftkit report needs matplotlib (the `train` and `observe` extras bring it)",
                        hint="pip install 'ftkit[observe]' (or: pip install matplotlib)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _read_back(fig: Any) -> list[Series]:
    """The series the figure really draws: lines and bars with a label, from the artists."""
    out: list[Series] = []
    for ax in fig.axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("_"):
                continue
            out.append(Series(label, [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]))
        for cont in ax.containers:
            label = str(cont.get_label())
            if label.startswith("_"):
                continue
            xs = [float(p.get_x() + p.get_width() / 2) for p in cont.patches]
            ys = [float(p.get_height()) for p in cont.patches]
            out.append(Series(label, xs, ys, "bar"))
    return out


class _Plotter:
    def __init__(self, runs: list[RunData], out_dir: Path) -> None:
        self.runs = runs
        self.out = out_dir
        self.plt = _plt()
        self.figures: list[Figure] = []
        self.tag = (lambda i: f"{RUN_TAGS[i]}: ") if len(runs) > 1 else (lambda i: "")

    def _save(self, fig: Any, name: str, title: str, simulated: bool, caption: str = "") -> None:
        if simulated:
            fig.suptitle(f"{title}\n[{SIM_NOTE}]", color="#b00000", fontsize=11)
            fig.text(0.5, 0.5, "SIMULATED", fontsize=64, color="#cc0000", alpha=0.15, ha="center", va="center",
                     rotation=20, transform=fig.transFigure)
        else:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        file = f"{name}.png"
        figure = Figure(name, file, title, simulated, _read_back(fig), caption)
        fig.savefig(self.out / file, format="png", dpi=100)
        self.plt.close(fig)
        self.figures.append(figure)

    def _boundaries(self, ax: Any, rd: RunData, i: int, labels: bool = True) -> None:
        """A vertical line where each step started, named (staggered, so close ones stay readable)."""
        t0 = rd.t0()
        if t0 is None:
            return
        for k, (sid, start, _end, _status) in enumerate(rd.step_spans()):
            x = start - t0
            ax.axvline(x, color="#777777", linestyle=":" if i else "-", linewidth=0.8, label="_step")
            if labels:
                ax.text(x, 0.99 - 0.3 * (k % 2), f" {self.tag(i)}{sid}", rotation=90, va="top", ha="left",
                        fontsize=7, color="#555555", transform=ax.get_xaxis_transform())

    def loss(self) -> None:
        if not any(rd.metrics.get(s) for rd in self.runs for s in rd.metrics):
            return
        fig, ax = self.plt.subplots(figsize=(9, 4))
        for i, rd in enumerate(self.runs):
            for sid, rows in rd.metrics.items():
                tr = [(r["step"], num(r.get("loss"))) for r in rows if num(r.get("loss")) is not None and "step" in r
                      and "train_runtime" not in r]
                ev = [(r["step"], num(r.get("eval_loss"))) for r in rows if num(r.get("eval_loss")) is not None and "step" in r]
                if tr:
                    ax.plot([p[0] for p in tr], [p[1] for p in tr], RUN_STYLES[i], color="C0",
                            label=f"{self.tag(i)}{sid} loss")
                if ev:
                    ax.plot([p[0] for p in ev], [p[1] for p in ev], RUN_STYLES[i], marker="o", color="C3",
                            label=f"{self.tag(i)}{sid} eval loss")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        self._save(fig, "loss", "Loss and eval loss", False)

    def speed(self) -> None:
        have = [(i, rd, sid, [r for r in rows if "samples_per_s" in r])
                for i, rd in enumerate(self.runs) for sid, rows in rd.metrics.items()]
        have = [h for h in have if h[3]]
        if not have:
            return
        fig, (a1, a2) = self.plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
        for i, _rd, sid, rows in have:
            tok = [(r["step"], num(r.get("tokens_per_s"))) for r in rows if num(r.get("tokens_per_s"))]
            smp = [(r["step"], num(r.get("samples_per_s"))) for r in rows if num(r.get("samples_per_s"))]
            if tok:
                a1.plot([p[0] for p in tok], [p[1] for p in tok], RUN_STYLES[i], marker=".", color="C2",
                        label=f"{self.tag(i)}{sid} tokens/s")
            if smp:
                a2.plot([p[0] for p in smp], [p[1] for p in smp], RUN_STYLES[i], marker=".", color="C4",
                        label=f"{self.tag(i)}{sid} samples/s")
        a1.set_ylabel("tokens/s")
        a2.set_ylabel("samples/s")
        a2.set_xlabel("training step")
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        self._save(fig, "throughput", "Training throughput (per logging interval)", False,
                   "intervals that hold a checkpoint save or an evaluation are slower")

    def _gpu_series(self, key: str) -> list[tuple[int, RunData, str, list[float], list[float]]]:
        out = []
        for i, rd in enumerate(self.runs):
            t0 = rd.t0()
            by: dict[str, dict[float, float]] = {}
            for r in rd.telemetry:
                w, v = num(r.get("wall_time")), num(r.get(key))
                if r.get("gpu", "") == "" or w is None or v is None or t0 is None:
                    continue
                by.setdefault(r["gpu"], {})[round(w - t0, 3)] = v  # a tick sampled by two steps counts once
            for gpu, pts in sorted(by.items()):
                xs = sorted(pts)
                out.append((i, rd, gpu, xs, [pts[x] for x in xs]))
        return out

    def gpu(self, key: str, name: str, title: str, ylabel: str, limit_key: str | None = None) -> None:
        series = self._gpu_series(key)
        if not series:
            return
        fig, ax = self.plt.subplots(figsize=(9, 4))
        for n, (i, _rd, gpu, xs, ys) in enumerate(series):
            ax.plot(xs, ys, RUN_STYLES[i], color=f"C{n % 10}", label=f"{self.tag(i)}GPU {gpu} {ylabel}")
        if limit_key:
            for n, (i, _rd, gpu, xs, ys) in enumerate(self._gpu_series(limit_key)):
                ax.plot(xs, ys, ":", color=f"C{n % 10}", drawstyle="steps-post",
                        label=f"{self.tag(i)}GPU {gpu} cap (enforced limit)")
        for i, rd in enumerate(self.runs):
            self._boundaries(ax, rd, i)
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        self._save(fig, name, title, any(rd.simulated for rd in self.runs))

    def checkpoints(self) -> None:
        data = [(i, sid, [c for c in cks if c.seconds is not None])
                for i, rd in enumerate(self.runs) for sid, cks in rd.checkpoints.items()]
        data = [d for d in data if d[2]]
        if not data:
            return
        fig, ax = self.plt.subplots(figsize=(9, 3.5))
        width = 0.8 / len(data)
        approx = False
        for n, (i, sid, cks) in enumerate(data):
            xs = list(range(len(cks)))
            ax.bar([x + n * width for x in xs], [c.seconds or 0 for c in cks], width=width, color=f"C{n}",
                   label=f"{self.tag(i)}{sid} save time (s)")
            approx = approx or any(c.approximate for c in cks)
            for x, c in zip(xs, cks, strict=True):
                size = f"\n{c.mib:.0f} MiB" if c.mib is not None else ""
                ax.text(x + n * width, c.seconds or 0, f"step {c.step}{size}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([])
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        self._save(fig, "checkpoints", "Checkpoint save times", False,
                   "from file times: a lower bound" if approx else "")

    def disk_and_host(self) -> None:
        have = [(i, rd) for i, rd in enumerate(self.runs) if rd.telemetry and rd.t0() is not None]
        if not have:
            return
        fig, (a1, a2, a3) = self.plt.subplots(3, 1, figsize=(9, 7), sharex=True)
        for i, rd in have:
            t0 = rd.t0() or 0.0
            pts: dict[float, dict[str, str]] = {}
            for r in rd.telemetry:
                w = num(r.get("wall_time"))
                if w is not None:
                    pts.setdefault(round(w - t0, 3), r)
            xs = sorted(pts)

            def col(key: str, xs: list[float] = xs, pts: dict[float, dict[str, str]] = pts) -> tuple[list[float], list[float]]:
                keep = [(x, num(pts[x].get(key))) for x in xs]
                keep2 = [(x, v) for x, v in keep if v is not None]
                return [x for x, _ in keep2], [v for _, v in keep2]

            for ax, key, label in ((a1, "run_dir_mib", "run directory (MiB)"), (a2, "cpu_percent", "host CPU (%)"),
                                   (a3, "ram_used_mib", "host RAM used (MiB)")):
                x, y = col(key)
                if x:
                    ax.plot(x, y, RUN_STYLES[i], color="C1" if key == "run_dir_mib" else "C9",
                            label=f"{self.tag(i)}{label}")
                self._boundaries(ax, rd, i, labels=ax is a1)
        for ax in (a1, a2, a3):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
        a3.set_xlabel("seconds since the run started")
        self._save(fig, "disk_host", "Disk growth and host load", False, "host figures are real even when GPUs are simulated")

    def all(self) -> list[Figure]:
        self.loss()
        self.speed()
        self.gpu("power_usage_w", "gpu_power", "GPU power against the cap", "power (W)", limit_key="enforced_power_limit_w")
        self.gpu("gpu_temp_c", "gpu_temperature", "GPU temperature", "temperature (°C)")
        self.gpu("gpu_util", "gpu_utilization", "GPU utilization", "utilization (%)")
        self.checkpoints()
        self.disk_and_host()
        return self.figures


# --------------------------------------------------------------------------- tables


def _or_dash(v: str | None) -> str:
    return "-" if v is None else v


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def _tables(runs: list[RunData], fair: list[Fairness]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for both renderers."""
    multi = len(runs) > 1
    cols = [f"{RUN_TAGS[i]}: {rd.name}" if multi else rd.name for i, rd in enumerate(runs)]
    out = []

    def dur(rd: RunData) -> str:
        return _fmt(round(rd.finished - rd.started, 1)) + " s" if rd.started and rd.finished else "-"

    out.append(("Outcome", ["", *cols], [
        ["status", *[rd.status for rd in runs]],
        ["failed step", *[_fmt(rd.state.failed_step) for rd in runs]],
        ["message", *[_fmt(rd.state.message) for rd in runs]],
        ["started", *[_fmt(rd.state.started) for rd in runs]],
        ["duration", *[dur(rd) for rd in runs]],
        ["recipe / machine", *[f"{_or_dash(rd.plan.recipe)} on {_or_dash(rd.plan.machine)}" for rd in runs]],
    ], ""))
    for i, rd in enumerate(runs):
        rows = []
        for sid in rd.state.step_ids():
            e = rd.state.entry(sid)
            why = (e.error or e.message or e.reason or "") if e is not None else ""
            rows.append([sid, str(e.status) if e is not None else "-", _fmt(num(e.seconds) if e else None),
                         str(why)[:300]])
        out.append((f"Steps ({cols[i]})" if multi else "Steps", ["step", "status", "seconds", "note"], rows, ""))
    train_rows: list[list[str]] = []
    for i, rd in enumerate(runs):
        for sid in rd.metrics:
            t = throughput(rd, sid)
            s = rd.train_summaries.get(sid) or {}
            ck = [c.seconds for c in rd.checkpoints.get(sid, []) if c.seconds is not None]
            train_rows.append([f"{RUN_TAGS[i]}: {sid}" if multi else sid, _fmt(t["steps"]), _fmt(s.get("train_loss")),
                               _fmt(s.get("eval_loss_last")), _fmt(t["samples_per_s"]), _fmt(t["tokens_per_s"]),
                               _fmt(t["steady_tokens_per_s"]), _fmt(t["train_runtime_s"]),
                               _fmt(max(ck) if ck else None)])
    if train_rows:
        out.append(("Training", ["step", "steps", "train loss", "last eval loss", "samples/s", "tokens/s",
                                 "steady tokens/s", "train runtime s", "slowest checkpoint s"], train_rows,
                    "samples/s and tokens/s over the trainer's runtime (saves included); steady: median of "
                    "logged intervals after the first"))
    pref_rows: list[list[str]] = []
    for i, rd in enumerate(runs):
        for sid, s in rd.train_summaries.items():
            pref = s.get("preference") if isinstance(s.get("preference"), dict) else None
            if pref is None:
                continue
            before = pref.get("before") if isinstance(pref.get("before"), dict) else {}
            after = pref.get("after") if isinstance(pref.get("after"), dict) else {}
            pref_rows.append([f"{RUN_TAGS[i]}: {sid}" if multi else sid, str(s.get("objective", "-")).upper(),
                              str(s.get("started_from", "-")), _fmt(num(after.get("pairs"))),
                              f"{_fmt(num(before.get('accuracy')))} -> {_fmt(num(after.get('accuracy')))}",
                              f"{_fmt(num(before.get('margin')))} -> {_fmt(num(after.get('margin')))}",
                              _fmt(num(s.get("eval_reward_accuracy_last")))])
    if pref_rows:
        out.append(("Preference", ["step", "objective", "from", "held-out pairs", "pair accuracy % (before -> after)",
                                   "mean log-prob margin (before -> after)", "last eval rewards/accuracies"], pref_rows,
                    "a pair counts when the model gives its chosen answer the higher log-probability; "
                    "rewards/accuracies is trl's (against DPO's reference)"))
    ev_rows = []
    harness_rows: list[list[str]] = []
    for i, rd in enumerate(runs):
        for sid, s in rd.evals.items():
            h = s.get("harness") or {}
            for r in h.get("results") or []:
                harness_rows.append([f"{RUN_TAGS[i]}: {sid}" if multi else sid, str(r.get("task", "-")),
                                     str(r.get("metric", "-")), str(r.get("filter", "-")), _fmt(num(r.get("value")), 4),
                                     _fmt(num(r.get("stderr")), 4), _fmt(r.get("samples")),
                                     f"{h.get('server', '-')} ({h.get('lm_eval_model', '-')})"])
            models = s.get("models") or {}
            if not models and h:
                continue  # the harness alone: its own table
            order = s.get("order") if isinstance(s.get("order"), list) else []  # as the step listed them
            names = [m for m in order if isinstance(m, str) and m in models] + [m for m in models if m not in order]
            acc = ", ".join(f"{m} {_fmt(models[m].get('accuracy'))}%" for m in names if isinstance(models[m], dict))
            ev_rows.append([f"{RUN_TAGS[i]}: {sid}" if multi else sid, str(s.get("score", "-")), _fmt(s.get("prompts")),
                            acc or "-", _fmt(s.get("improvement_points")), _fmt(s.get("passed"))])
    if ev_rows:
        out.append(("Evaluation", ["step", "score", "prompts", "accuracy by model", "improvement (points)", "passed"],
                    ev_rows, ""))
    if harness_rows:
        out.append(("Standard evaluation (lm-evaluation-harness)",
                    ["step", "task", "metric", "filter", "value", "stderr", "samples", "server (lm-eval model)"],
                    harness_rows, "lm-eval's tasks against the run's own server; stderr as lm-eval computes it "
                    "(bootstrap or analytic), - where it could not"))
    tel_rows = []
    for i, rd in enumerate(runs):
        for gpu, g in gpu_summary(rd.telemetry).items():
            thr = g["throttle_fraction"]
            seen = ", ".join(f"{k} {v:.0%}" for k, v in thr.items() if v) or "none"
            pcie = f"x{_fmt(g['pcie_width_busy_min'])} of x{_fmt(g['pcie_max_width'])}" if g["pcie_max_width"] else "-"
            tel_rows.append([f"{RUN_TAGS[i]}: GPU {gpu}" if multi else f"GPU {gpu}", g["name"],
                             g["source"] + (" (SIMULATED)" if g["source"] == "simulated" else ""),
                             _fmt(g["samples"]), _fmt(g["util_mean"]), _fmt(g["temp_max_c"]), _fmt(g["power_max_w"]),
                             _fmt(g["limit_w"]), seen, pcie, ", ".join(g["xids"]) or "none"])
    if tel_rows:
        out.append(("GPU telemetry", ["GPU", "model", "source", "samples", "mean util %", "peak °C", "peak W",
                                      "cap W", "clock events (share of samples)", "PCIe while busy", "XIDs"], tel_rows,
                    SIM_NOTE if any(rd.simulated for rd in runs) else ""))
    host_rows = []
    for i, rd in enumerate(runs):
        h = host_summary(rd.telemetry)
        if rd.telemetry:
            host_rows.append([cols[i], _fmt(h["cpu_mean"]), _fmt(h["ram_max_mib"]), _fmt(h["run_dir_start_mib"]),
                              _fmt(h["run_dir_end_mib"])])
    if host_rows:
        out.append(("Host", ["run", "mean CPU %", "peak RAM MiB", "run dir MiB (first sample)", "run dir MiB (last)"],
                    host_rows, ""))
    env_keys = [("python", lambda e: e.get("python")), ("ftkit", lambda e: e.get("ftkit")),
                ("torch", lambda e: (e.get("packages") or {}).get("torch")),
                ("transformers", lambda e: (e.get("packages") or {}).get("transformers")),
                ("peft / trl", lambda e: f"{(e.get('packages') or {}).get('peft')} / {(e.get('packages') or {}).get('trl')}"),
                ("platform", lambda e: e.get("platform")), ("docker", lambda e: e.get("docker")),
                ("GPU driver", lambda e: json.dumps(e.get("gpu_driver"), sort_keys=True) if e.get("gpu_driver") else None),
                ("GPUs", lambda e: ", ".join(f"{g.get('index')}: {g.get('name')}" for g in e.get("gpus") or []) or None)]
    out.append(("Environment", ["", *cols], [[k, *[_fmt(f(rd.env)) for rd in runs]] for k, f in env_keys], ""))
    if multi:
        rows = [[f.field, _fmt(f.a), _fmt(f.b), "expected (what a scaling test varies)" if f.expected else "DIFFERS"]
                for f in fair]
        note = ("fair: only what a scaling test varies differs" if not any(not f.expected for f in fair)
                else "UNFAIR: these runs differ in more than the GPUs; their numbers do not measure scaling")
        out.append(("Fairness check", ["setting", "A", "B", "verdict"], rows or [["(identical)", "", "", ""]], note))
    problems = [[rd.name, p] for rd in runs for p in rd.problems]
    if problems:
        out.append(("Problems reading the run", ["run", "problem"], problems, ""))
    return out


# --------------------------------------------------------------------------- renderers

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.sim{background:#fff0f0;border:2px solid #c00;color:#900;padding:8px 12px;font-weight:600}
.warn{background:#fff7e0;border:1px solid #d90;padding:8px 12px}.ok{background:#effaef;border:1px solid #3a3;
padding:8px 12px}.note{color:#666;font-size:12px}figure{margin:16px 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
"""


def _html(runs: list[RunData], figures: list[Figure], tables: list[Any], fair: list[Fairness], out_dir: Path) -> str:
    e = html.escape
    title = " vs ".join(rd.name for rd in runs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>ftkit report: {e(title)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>ftkit report: {e(title)}</h1>"]
    if any(rd.simulated for rd in runs):
        parts.append(f'<p class="sim">{e(SIM_NOTE)}: GPU power, temperature, utilization and clocks below are '
                     "synthetic (FTKIT_SIMULATED_GPUS). Training, host and disk figures are real.</p>")
    if len(runs) > 1:
        unfair = [f for f in fair if not f.expected]
        if unfair:
            parts.append('<p class="warn">Fairness check: these runs differ in '
                         + e(", ".join(f.field for f in unfair)) + ". Their difference does not measure scaling.</p>")
        else:
            parts.append('<p class="ok">Fairness check: same data slice, stopping point, global batch and '
                         "checkpoint policy; only what a scaling test varies differs.</p>")
    for t, header, rows, note in tables:
        parts.append(f"<h2>{e(t)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        if note:
            parts.append(f'<p class="note">{e(note)}</p>')
    parts.append("<h2>Plots</h2>")
    if not figures:
        parts.append('<p class="note">no metrics or telemetry to plot</p>')
    for f in figures:
        data = base64.b64encode((out_dir / f.file).read_bytes()).decode("ascii")
        cap = f.title + (f" - {SIM_NOTE}" if f.simulated else "") + (f" ({f.caption})" if f.caption else "")
        parts.append(f'<figure id="{e(f.name)}"><img alt="{e(f.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{e(cap)}</figcaption></figure>")
    parts.append('<p class="note">made by ftkit report; the plotted numbers are in figures.json</p></body></html>')
    return "\n".join(parts)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown(runs: list[RunData], figures: list[Figure], tables: list[Any], fair: list[Fairness]) -> str:
    lines = [f"# ftkit report: {' vs '.join(rd.name for rd in runs)}", ""]
    if any(rd.simulated for rd in runs):
        lines += [f"> **{SIM_NOTE}**: GPU power, temperature, utilization and clocks are synthetic.", ""]
    if len(runs) > 1:
        unfair = [f.field for f in fair if not f.expected]
        lines += [("> **Fairness check: UNFAIR** - the runs differ in " + ", ".join(unfair) + ".") if unfair
                  else "> Fairness check: fair (only what a scaling test varies differs).", ""]
    for t, header, rows, note in tables:
        lines += [f"## {t}", "", "| " + " | ".join(_md_cell(h) or " " for h in header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        if note:
            lines += ["", f"_{note}_"]
        lines.append("")
    if figures:
        lines += ["## Plots", ""]
        for f in figures:
            lines += [f"![{f.title}{' (SIMULATED)' if f.simulated else ''}]({f.file})", ""]
    return "\n".join(lines)


def default_out_dir(runs: list[Path]) -> Path:
    return runs[0] / ("report" if len(runs) == 1 else f"report-vs-{runs[1].name}")


def make_report(run_paths: list[Path], out_dir: Path | None = None) -> ReportResult:
    if not 1 <= len(run_paths) <= 2:
        raise UserError("report takes one run directory, or two to compare")
    runs = [load_run(p) for p in run_paths]
    out = out_dir or default_out_dir([Path(p) for p in run_paths])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create the report directory: {err.strerror or err}") from err
    fair = fairness(runs[0], runs[1]) if len(runs) == 2 else []
    figures = _Plotter(runs, out).all()
    tables = _tables(runs, fair)
    from ftkit.files import write_atomic, write_json

    write_json(out / "figures.json", {"figures": [asdict(f) for f in figures]})
    html_path, md_path = out / "report.html", out / "report.md"
    write_atomic(html_path, _html(runs, figures, tables, fair, out))
    write_atomic(md_path, _markdown(runs, figures, tables, fair))
    return ReportResult(out, html_path, md_path, figures, fair)
