"""ftkit report: built from synthetic run directories (no training), checked for what the
plots really hold (the figure's own artists, and pixels read back from the PNG), for
SIMULATED labels, for the fairness check between two runs, and for runs that died."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftkit.gpu.nvml import SimulatedNvml, decode_clock_events
from ftkit.gpu.telemetry import COLUMNS
from tests.conftest import require, run_cli

require("matplotlib")

T0 = 1_790_000_000.0  # a fixed start: every number below is reproducible


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def make_run(root: Path, name: str = "20260901T120000Z-demo", *, source: str = "simulated", gpus: tuple[int, ...] = (0,),
             max_steps: int = 100, batch_size: int = 8, grad_accum: int = 2, dataset: str = "/data/train.jsonl",
             every_steps: int = 50, status: str = "succeeded", error: str | None = None, speed: float = 1.0,
             distribution: str = "single") -> Path:
    """A run directory as the runner and engines leave it: journal, plan, recipe, env,
    metrics, checkpoints with manifests, an eval summary and telemetry.csv."""
    run = root / name
    (run / "steps" / "train" / "checkpoints").mkdir(parents=True)
    (run / "steps" / "eval").mkdir(parents=True)
    train_s, steps = 60.0 / speed, ["power", "train", "eval", "power-restore-final"]
    spans = {"power": (T0 + 1, T0 + 1.2), "train": (T0 + 2, T0 + 2 + train_s), "eval": (T0 + 3 + train_s, T0 + 10 + train_s),
             "power-restore-final": (T0 + 11 + train_s, T0 + 11.1 + train_s)}
    st: dict[str, Any] = {"status": status, "started": _iso(T0), "finished": _iso(T0 + 12 + train_s), "pid": 1,
                          "order": steps, "steps": {}}
    for sid in steps:
        a, b = spans[sid]
        st["steps"][sid] = {"status": "succeeded", "started": _iso(a), "finished": _iso(b), "seconds": round(b - a, 3)}
    if error:
        st["steps"]["eval"].update(status="failed", error=error)
        st["failed_step"], st["message"] = "eval", error
    (run / "state.json").write_text(json.dumps(st))
    plan = {"recipe": "demo", "machine": "lab", "executor": "local",
            "simulated_gpus": ["RTX 4090"] if source == "simulated" else None,
            "steps": [{"id": "power", "kind": "power"},
                      {"id": "train", "kind": "train", "outputs": {"metrics": "steps/train/metrics.jsonl"}},
                      {"id": "eval", "kind": "eval", "outputs": {"summary": "steps/eval/summary.json"}}]}
    (run / "plan.json").write_text(json.dumps(plan))
    recipe = {"ftkit": 1, "name": "demo", "model": {"tiny": {"hidden_size": 64}},
              "dataset": {"path": dataset, "format": "alpaca", "template": "alpaca", "eval": {"size": 10}},
              "steps": [{"type": "power", "name": "power", "caps_w": 300},
                        {"type": "train", "name": "train", "max_steps": max_steps, "batch_size": batch_size,
                         "grad_accum": grad_accum, "gpus": list(gpus), "distribution": distribution, "seq_len": 128,
                         "checkpoint": {"every_steps": every_steps, "keep_last": 2, "keep_best": True},
                         "logging_steps": 10, "learning_rate": 0.001, "method": "lora"},
                        {"type": "eval", "name": "eval"}]}
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run / "env.json").write_text(json.dumps({"python": "3.11.7", "ftkit": "0.1.0", "packages": {"torch": "2.13.0"},
                                              "gpus": [{"index": g, "name": "RTX 4090"} for g in gpus]}))
    rows = []
    for k, s in enumerate(range(10, max_steps + 1, 10)):
        row: dict[str, Any] = {"step": s, "loss": round(3.0 / (1 + k), 4), "samples_per_s": 40.0 * speed + k,
                               "tokens_per_s": 4000.0 * speed + 10 * k, "num_tokens": 500.0 * s, "time_s": s * 0.6}
        rows.append(row)
        if s % 50 == 0:
            rows.append({"step": s, "eval_loss": round(2.5 / (1 + k), 4)})
    rows.append({"step": max_steps, "train_runtime": train_s - 5, "train_samples_per_second": 30.0 * speed,
                 "num_tokens": 500.0 * max_steps})
    (run / "steps" / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "steps" / "train" / "train_summary.json").write_text(json.dumps({"train_loss": 0.9, "eval_loss_last": 0.5}))
    for n, s in enumerate(range(every_steps, max_steps + 1, every_steps)):
        ck = run / "steps" / "train" / "checkpoints" / f"checkpoint-{s}"
        ck.mkdir()
        (ck / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
        (ck / "ftkit-complete.json").write_text("{}")
        t = T0 + 2 + s * 0.6
        os.utime(ck / "adapter_model.safetensors", (t, t))
        os.utime(ck / "ftkit-complete.json", (t + 1.5 + n, t + 1.5 + n))  # 1.5 s, then 2.5 s
    (run / "steps" / "eval" / "summary.json").write_text(json.dumps(
        {"score": "exact", "prompts": 10, "models": {"base": {"accuracy": 10.0}, "merged": {"accuracy": 90.0}},
         "improvement_points": 80.0, "passed": True}))
    sim = SimulatedNvml(["RTX 4090"] * (max(gpus) + 1))
    sim.set_power_limit_w(0, 300)
    with open(run / "telemetry.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for k in range(int(train_s)):
            t = T0 + 2 + k
            for g in gpus:
                s = sim.sample(g, at=t)
                s["source"] = source
                row = {c: "" for c in COLUMNS}
                row.update({f: ("" if v is None else v) for f, v in s.items() if f in row})
                row.update({f: int(bool(v)) for f, v in decode_clock_events(s["clocks_event_reasons"]).items()})
                row.update(wall_time=f"{t:.3f}", timestamp=_iso(t), step="train", gpu=g, gpu_name="RTX 4090",
                           cpu_percent=50 + k % 7, ram_used_mib=4000 + k, run_dir_mib=1.0 + 0.1 * k)
                w.writerow(row)
    return run


@pytest.fixture(scope="module")
def sim_report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One report of a simulated run, shared by the tests that only read it (reports take seconds)."""
    from ftkit.observe.report import make_report

    run = make_run(tmp_path_factory.mktemp("sim"))
    return run, make_report([run])


def _figs(out: Path) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in json.loads((out / "figures.json").read_text())["figures"]}


def _series(fig: dict[str, Any], label: str) -> dict[str, Any]:
    return next(s for s in fig["series"] if s["label"] == label)


def test_one_run_every_artifact_and_the_plotted_series(sim_report: Any) -> None:
    run, res = sim_report
    out = run / "report"
    assert res.out_dir == out and res.html.is_file() and res.markdown.is_file()
    figs = _figs(out)
    assert set(figs) == {"loss", "throughput", "gpu_power", "gpu_temperature", "gpu_utilization", "checkpoints",
                         "disk_host"}
    for f in figs.values():
        assert (out / f["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(x) for x in (run / "steps" / "train" / "metrics.jsonl").read_text().splitlines()]
    loss = _series(figs["loss"], "train loss")
    assert loss["x"] == [r["step"] for r in metrics if "loss" in r] and loss["y"] == [r["loss"] for r in metrics if "loss" in r]
    assert _series(figs["loss"], "train eval loss")["y"] == [r["eval_loss"] for r in metrics if "eval_loss" in r]
    assert _series(figs["throughput"], "train tokens/s")["y"][:2] == [4000.0, 4010.0]
    tele = list(csv.DictReader(open(run / "telemetry.csv")))
    power = _series(figs["gpu_power"], "GPU 0 power (W)")
    assert power["y"] == [float(r["power_usage_w"]) for r in tele]
    assert power["x"][0] == pytest.approx(2.0) and power["x"][-1] == pytest.approx(61.0)  # seconds since the start
    assert set(_series(figs["gpu_power"], "GPU 0 cap (enforced limit)")["y"]) == {300.0}
    assert _series(figs["checkpoints"], "train save time (s)")["y"] == pytest.approx([1.5, 2.5])
    assert _series(figs["disk_host"], "run directory (MiB)")["y"][-1] == pytest.approx(1.0 + 0.1 * 59)
    html = res.html.read_text()
    md = res.markdown.read_text()
    for text in ("succeeded", "90%", "80", "RTX 4090", "3.11.7", "Evaluation", "GPU telemetry"):
        assert text in html and text in md, text
    assert md.count("](") == 7


def _color_pixels(png: Path, rgb: tuple[int, int, int], tol: int = 40) -> tuple[int, int, int]:
    """How many pixels have about this colour, and the leftmost/rightmost column holding one."""
    import matplotlib.image as mpimg
    import numpy as np

    img = (mpimg.imread(png)[..., :3] * 255).astype(int)
    mask = (np.abs(img - np.array(rgb)).sum(axis=2) < tol)
    cols = np.where(mask.any(axis=0))[0]
    return int(mask.sum()), int(cols.min()) if cols.size else -1, int(cols.max()) if cols.size else -1


def test_the_pngs_hold_the_series_read_back_from_pixels(sim_report: Any) -> None:
    out = sim_report[1].out_dir
    width = 900  # 9 in x 100 dpi
    n, left, right = _color_pixels(out / "loss.png", (31, 119, 180))  # C0: the train loss line
    assert n > 200 and right - left > width * 0.6, (n, left, right)
    n, left, right = _color_pixels(out / "gpu_power.png", (31, 119, 180))  # GPU 0's power line, same colour
    assert n > 300 and right - left > width * 0.6
    assert _color_pixels(out / "gpu_power.png", (176, 0, 0), tol=30)[0] > 50  # the red SIMULATED title
    assert _color_pixels(out / "loss.png", (176, 0, 0), tol=30)[0] == 0  # training numbers are real


def test_simulated_only_where_the_numbers_are(tmp_path: Path, sim_report: Any) -> None:
    from ftkit.observe.report import make_report

    sim = sim_report[1]
    figs = _figs(sim.out_dir)
    assert all(figs[n]["simulated"] for n in ("gpu_power", "gpu_temperature", "gpu_utilization"))
    assert not any(figs[n]["simulated"] for n in ("loss", "throughput", "checkpoints", "disk_host"))
    assert "SIMULATED GPU telemetry" in sim.html.read_text() and "SIMULATED" in sim.markdown.read_text()
    real = make_report([make_run(tmp_path / "b", source="nvml")])
    assert not any(f["simulated"] for f in _figs(real.out_dir).values())
    assert "SIMULATED" not in real.html.read_text() and "SIMULATED" not in real.markdown.read_text()


def test_two_runs_side_by_side_with_a_fair_comparison(tmp_path: Path) -> None:
    from ftkit.observe.report import make_report

    a = make_run(tmp_path, "20260901T120000Z-one")
    b = make_run(tmp_path, "20260901T130000Z-two", gpus=(0, 1), batch_size=8, grad_accum=1, distribution="ddp", speed=1.7)
    res = make_report([a, b])
    assert res.out_dir == a / f"report-vs-{b.name}" and res.fair
    assert {f.field for f in res.fairness} == {"train.gpus", "train.distribution", "train.grad_accum"}
    figs = _figs(res.out_dir)
    labels = {s["label"] for s in figs["gpu_power"]["series"]}
    assert {"A: GPU 0 power (W)", "B: GPU 0 power (W)", "B: GPU 1 power (W)"} <= labels
    assert {"A: train loss", "B: train loss"} <= {s["label"] for s in figs["loss"]["series"]}
    html = res.html.read_text()
    assert "Fairness check: same data slice" in html and a.name in html and b.name in html


def test_an_unfair_comparison_is_called_out(tmp_path: Path) -> None:
    a = make_run(tmp_path, "20260901T120000Z-one")
    b = make_run(tmp_path, "20260901T130000Z-two", gpus=(0, 1), max_steps=200, dataset="/data/other.jsonl",
                 every_steps=100, batch_size=8, grad_accum=2)
    res = run_cli("report", str(a), str(b), "-o", str(tmp_path / "cmp"))
    assert res.code == 0, res.err
    assert "not a fair comparison" in res.err
    for field in ("dataset.path", "train.max_steps", "train.checkpoint", "global batch"):
        assert field in res.err, field
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "UNFAIR" in html and "DIFFERS" in html and "Fairness check: these runs differ" in html


def test_a_run_that_died_still_gets_a_report_and_nothing_is_injected(tmp_path: Path) -> None:
    from ftkit.observe.report import make_report

    run = make_run(tmp_path, status="failed", error="<script>alert('x')</script> & boom")
    with open(run / "steps" / "train" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 999, "loss": 0.1')  # killed mid-line
    (run / "env.json").write_text("{not json")
    (run / "telemetry.csv").write_text((run / "telemetry.csv").read_text()[:-40])  # torn last row
    res = make_report([run])
    html = res.html.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; boom" in html
    assert "env.json: unreadable" in html and "failed" in html
    assert 999 not in _series(_figs(res.out_dir)["loss"], "train loss")["x"]
    assert 'src="http' not in html and "<link" not in html and "<script" not in html  # self-contained, no JS


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = run_cli("report", str(tmp_path / "empty"))
    assert res.code == 2 and "not a run directory" in res.err and "Traceback" not in res.err
    run = make_run(tmp_path)
    res = run_cli("report", str(run), str(run), str(run))
    assert res.code == 2 and "two to compare" in res.err


def test_report_of_a_run_without_telemetry_or_metrics(tmp_path: Path) -> None:
    from ftkit.observe.report import make_report

    run = make_run(tmp_path)
    (run / "telemetry.csv").unlink()
    (run / "steps" / "train" / "metrics.jsonl").unlink()
    res = make_report([run])
    assert {f.name for f in res.figures} == {"checkpoints"}
    assert "<h2>GPU telemetry</h2>" not in res.html.read_text()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_report_file_follows_the_umask_like_the_pngs(tmp_path: Path, umask: int) -> None:
    """One rule for every file a report writes: 0666 less the umask (report.md and the HTML
    were 0600 while the PNGs beside them were 0644)."""
    from ftkit.observe.report import make_report

    run = make_run(tmp_path)
    old = os.umask(umask)
    try:
        res = make_report([run])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in res.html.parent.iterdir()}
    assert any(n.endswith(".png") for n in modes) and {"report.html", "report.md", "figures.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, {n: oct(m) for n, m in modes.items()}


def test_recorded_checkpoint_times_win_and_cover_removed_checkpoints(tmp_path: Path) -> None:
    """Where the engine records `checkpoint_s`, it is used (exact), also for checkpoints that
    retention has removed since; file times are only the fallback."""
    from ftkit.observe.rundata import load_run

    run = make_run(tmp_path)
    with open(run / "steps" / "train" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 50, "checkpoint_s": 3.25}) + "\n")
        fh.write(json.dumps({"step": 25, "checkpoint_s": 1.75}) + "\n")  # removed by retention
    cks = load_run(run).checkpoints["train"]
    assert [(c.step, c.seconds, c.approximate) for c in cks] == [(25, 1.75, False), (50, 3.25, False), (100, 2.5, True)]
    assert cks[0].mib is None and cks[1].mib is not None
