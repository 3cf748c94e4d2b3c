"""Memory-fit estimates and PSU budgets against the guides' figures."""

from __future__ import annotations

import pytest

from ftkit.plan import memory, power
from ftkit.plan.catalog import find_arch, find_gpu
from ftkit.recipe.models import Machine, TrainStep

MISTRAL = find_arch("mistralai/Mistral-Small-24B-Instruct-2501")


def step(**kw) -> TrainStep:  # type: ignore[no-untyped-def]
    base = {"type": "train", "name": "train", "gpus": [0], "seq_len": 1024, "batch_size": 1}
    return TrainStep.model_validate({**base, **kw})


def test_rule_of_thumb_follows_the_guides() -> None:
    assert MISTRAL is not None
    fp16 = MISTRAL.params_b * 2  # GB at fp16
    full, _ = memory.rule_of_thumb(step(method="full"), MISTRAL)
    lora, _ = memory.rule_of_thumb(step(method="lora"), MISTRAL)
    qlora, _ = memory.rule_of_thumb(step(method="qlora"), MISTRAL)
    gib = 1e9 / 2**30
    assert full == pytest.approx(4 * fp16 * gib, rel=1e-3)
    assert lora == pytest.approx(1.2 * fp16 * gib, rel=1e-3)
    assert qlora == pytest.approx(lora / 2, rel=1e-3)


def test_component_estimate_orders_methods_sensibly() -> None:
    assert MISTRAL is not None
    totals = {m: sum(memory.estimate(step(method=m), MISTRAL, n_gpus=1).values()) for m in ("full", "lora", "qlora")}
    assert totals["full"] > totals["lora"] > totals["qlora"]
    # full fine-tuning of 24B needs far more than two 24 GB cards (the guide: ~96 GB+)
    assert totals["full"] / 2**30 > 96


def test_qlora_24b_fits_one_24gb_card_and_full_does_not() -> None:
    assert MISTRAL is not None
    vram = {0: 24.0}
    assert memory.fit(step(method="qlora", gradient_checkpointing=True), MISTRAL, vram)[0].verdict in ("fits", "tight")
    full = memory.fit(step(method="full"), MISTRAL, vram)[0]
    assert full.verdict == "does not fit"


def test_suggestions_follow_the_guides_order() -> None:
    assert MISTRAL is not None
    s = step(method="lora", gradient_checkpointing=False, seq_len=4096, gpus=[0, 1], distribution="ddp")
    est = memory.fit(s, MISTRAL, {0: 24.0, 1: 24.0})[0]
    assert est.verdict == "does not fit"
    order = [sug.split(":")[0] for sug in est.suggestions]
    assert order == ["method", "gradient_checkpointing", "seq_len", "distribution", "more GPUs"]


def test_zero3_shards_weights_and_zero2_does_not() -> None:
    assert MISTRAL is not None
    z2 = memory.estimate(step(method="qlora", gpus=[0, 1], distribution="deepspeed-zero2"), MISTRAL, n_gpus=2)
    z3 = memory.estimate(step(method="qlora", gpus=[0, 1], distribution="deepspeed-zero3"), MISTRAL, n_gpus=2)
    ddp = memory.estimate(step(method="qlora", gpus=[0, 1], distribution="ddp"), MISTRAL, n_gpus=2)
    assert z3["weights"] == pytest.approx(z2["weights"] / 2)
    assert z2["weights"] == ddp["weights"]
    assert z2["optimizer"] == pytest.approx(ddp["optimizer"] / 2)


def machine(psu: int, caps_default: list[str]) -> Machine:
    return Machine.model_validate({
        "ftkit": 1, "kind": "machine", "name": "m", "psu": {"watts": psu},
        "gpus": [{"index": i, "model": m} for i, m in enumerate(caps_default)],
    })


def test_catalog_matches_long_names_first() -> None:
    g = find_gpu("NVIDIA GeForce RTX 3090 Ti")
    assert g is not None and g.name == "RTX 3090 Ti"
    g = find_gpu("NVIDIA GeForce RTX 3090")
    assert g is not None and g.name == "RTX 3090"


def test_psu_guides_pairs() -> None:
    # Guide: single 4090 (600 W transient + 200 W) is fine on 1000 W.
    assert power.budget(machine(1000, ["RTX 4090"]), {}).verdict == "ok"
    # 3090 Ti + 4090 uncapped on 1500 W: 1450 W worst case, over the 90% budget.
    b = power.budget(machine(1500, ["RTX 3090 Ti", "RTX 4090"]), {})
    assert b.worst_case_w == pytest.approx(1450) and b.verdict == "over"
    assert "cap every GPU at" in b.notes[-1]
    # Caps from the note bring it within budget.
    cap = int(b.notes[-1].split("at ")[1].split(" W")[0])
    assert power.budget(machine(1500, ["RTX 3090 Ti", "RTX 4090"]), {0: cap, 1: cap}).verdict == "ok"


def test_profile_overrides_transients() -> None:
    m = Machine.model_validate({"ftkit": 1, "kind": "machine", "name": "m", "psu": {"watts": 1000},
                                "gpus": [{"index": 0, "model": "RTX 4090", "transient_w": 900,
                                          "power": {"min_w": 150, "max_w": 600, "default_w": 450}}]})
    assert power.budget(m, {}).worst_case_w == pytest.approx(900 + 200)
    assert power.budget(m, {0: 300}).worst_case_w == pytest.approx(300 * 2 + 200)


def test_unknown_gpu_uses_default_factor_and_says_so() -> None:
    m = Machine.model_validate({"ftkit": 1, "kind": "machine", "name": "m", "psu": {"watts": 1000},
                                "gpus": [{"index": 0, "model": "Mystery GPU", "power": {"min_w": 100, "max_w": 300, "default_w": 300}}]})
    b = power.budget(m, {})
    assert b.worst_case_w == pytest.approx(300 * 1.5 + 200)
    assert any("no transient figure" in n for n in b.notes)
