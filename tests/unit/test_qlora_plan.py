"""QLoRA and bitsandbytes' optimizers on a machine without CUDA, at plan time (issue #18):
they plan where they run (bitsandbytes 0.50+ on the CPU) and are refused before anything
runs, located in the recipe and with the alternatives named, where they could not: no
bitsandbytes in the environment that would run the step, one too old for the CPU, or tiny
layer sizes bitsandbytes' CPU 4-bit matmul gets wrong. No torch or bitsandbytes import."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import builders as b
from tests.builders import located, plan_json, shipped, step, step_config
from tests.conftest import RECIPES, run_cli

CPU = str(b.CPU)
QLORA = RECIPES / "quickstart-qlora.yaml"


def variant(tmp_path: Path, **replace: str) -> Path:
    """The QLoRA quickstart with some lines replaced, beside a copy of its data."""
    return shipped(tmp_path, QLORA.name, **replace)


def test_the_qlora_quickstart_plans_on_a_cpu_machine() -> None:
    assert run_cli("validate", str(QLORA), "--machine", CPU).code == 0
    plan = plan_json(QLORA, CPU)
    steps = {s["id"]: s for s in plan["steps"]}
    assert steps["train"]["description"] == "qlora training on the CPU" and steps["train"]["gpus"] == []
    merge = steps["merge"]["argv"]
    assert merge[merge.index("--nf4-dequantized-base") + 1:] == ["--nf4-dtype", "bf16"]  # as the train step loaded it
    eval_cfg = step_config(steps["eval"], "configs/eval")
    assert eval_cfg["qlora"] == {"train": "bf16"}  # the adapter is scored on the 4-bit base
    assert plan["fit"]["train"][0]["verdict"] == "unknown"  # CPU: bounded by RAM


def test_fp16_qlora_merges_in_fp16(tmp_path: Path) -> None:
    plan = plan_json(variant(tmp_path, **{"precision: bf16": "precision: fp16"}), CPU)
    merge = step(plan, "merge")["argv"]
    assert merge[-2:] == ["--nf4-dtype", "fp16"]


def test_tiny_layer_sizes_must_be_multiples_of_64_for_cpu_qlora(tmp_path: Path) -> None:
    recipe = variant(tmp_path, **{"hidden_size: 64": "hidden_size: 32", "intermediate_size: 128": "intermediate_size: 96"})
    result = run_cli("validate", str(recipe), "--machine", CPU)
    assert result.code == 2
    found = located(result.err)
    assert {m["path"] for m in found} == {"model.tiny.hidden_size", "model.tiny.intermediate_size"}, result.err
    hidden = next(m for m in found if m["path"] == "model.tiny.hidden_size")
    assert hidden["line"] == "14" and "use 64" in hidden["msg"] and "method: lora" in hidden["msg"]
    assert "use 64 or 128" in next(m for m in found if m["path"] == "model.tiny.intermediate_size")["msg"]
    lora = variant(tmp_path, **{"hidden_size: 64": "hidden_size: 32", "method: qlora": "method: lora",
                                "base: nf4-dequantized": "base: original"})
    assert run_cli("validate", str(lora), "--machine", CPU).code == 0  # plain LoRA has no such limit


def test_a_paged_optimizer_on_the_cpu_is_noted(tmp_path: Path) -> None:
    plan = plan_json(variant(tmp_path, **{"optimizer: adamw_8bit": "optimizer: paged_adamw_8bit"}), CPU)
    train = step(plan, "train")
    assert any("runs as adamw_8bit" in n for n in train["notes"]), train["notes"]


@pytest.mark.parametrize("command", ["validate", "plan", "up"])
@pytest.mark.parametrize("installed,field,says", [
    (None, "method", "not installed"),
    ("0.49.0", "method", "has no CPU kernels"),
    (None, "optimizer", "not installed"),
])
def test_up_refuses_bitsandbytes_steps_it_could_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
                                                        installed: str | None, field: str, says: str) -> None:
    """At plan time (validate --machine, plan, up), before anything is written: exit 2,
    FILE:LINE:COL at the field, the alternatives named."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            if installed is None:
                raise md.PackageNotFoundError(name)
            return installed
        return real(name)

    monkeypatch.setattr(md, "version", version)
    recipe = QLORA if field == "method" else variant(
        tmp_path, **{"method: qlora": "method: lora", "precision: bf16": "precision: fp32", "base: nf4-dequantized": "base: original"})
    runs = tmp_path / "runs"
    args = ["--runs-dir", str(runs)] if command == "up" else []
    result = run_cli(command, str(recipe), "--machine", CPU, *args)
    assert result.code == 2, result.err
    assert not result.out.strip(), result.out  # no plan printed, no "ok:"
    found = located(result.err)
    assert [m["path"] for m in found] == [f"steps[0].{field}"], result.err
    msg = found[0]["msg"]
    assert says in msg and "pip install 'bitsandbytes>=0.50'" in msg and "--executor docker" in msg
    assert ("method: lora" if field == "method" else "optimizer: adamw_torch") in msg
    assert not runs.exists() or not any(runs.iterdir())  # nothing written


def test_up_takes_bitsandbytes_0_50_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself, for the versions that work: no problem reported."""
    import importlib.metadata as md

    from ftkit import prepare
    from ftkit.run import preflight

    plan = prepare.prepare(str(QLORA), CPU, run_dir="/tmp/ftkit-unused-run").plan
    real = md.version
    for good in ("0.50.0", "0.50.2", "1.0.0"):
        monkeypatch.setattr(md, "version", lambda name, v=good: v if name == "bitsandbytes" else real(name))
        assert preflight.bitsandbytes_problems(plan) == []


def test_the_images_need_no_bitsandbytes_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The docker executor runs QLoRA in the train image (bitsandbytes is in its lock): what
    this Python lacks does not matter there."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    docker = str(RECIPES / "machines" / "cpu-docker.yaml")
    assert run_cli("validate", str(QLORA), "--machine", docker).code == 0
    assert run_cli("plan", str(QLORA), "--machine", CPU, "--executor", "docker").code == 0
