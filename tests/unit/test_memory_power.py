"""Memory-fit estimates and PSU budgets against the guides' figures: each guide recipe's
estimate pinned with its components, the dtypes behind them, the rule of thumb's verdict
beside it, and a PSU check for every power phase of a run."""

from __future__ import annotations

import pytest

from ftkit.plan import memory, power
from ftkit.plan.figures import find_arch, find_gpu
from ftkit.recipe.models import Machine, TrainStep
from tests import builders
from tests.builders import MACHINES, plan_of
from tests.conftest import RECIPES

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


def test_dora_adds_its_magnitudes_and_a_layers_temporaries() -> None:
    """DoRA: one trainable magnitude per output feature of each targeted layer, and peft's
    forward materialises B @ A and the updated weight of one layer at a time (in the adapter's
    dtype); Mistral's largest targeted layer is an MLP projection (5120 x 32768)."""
    assert MISTRAL is not None
    lora = memory.estimate(step(method="qlora"), MISTRAL, n_gpus=1)
    dora = memory.estimate(step(method="qlora", lora={"use_dora": True}), MISTRAL, n_gpus=1)
    outs = sum(o for _, o in memory._target_shapes(MISTRAL, "all-linear")) * MISTRAL.layers
    size = memory.dtype_bytes(step(method="qlora"))["trainable"]  # the trainable dtype (trl's rule)
    assert dora["adapters"] - lora["adapters"] == pytest.approx(outs * size)
    assert dora["dora_temporaries"] == 2 * MISTRAL.hidden_size * MISTRAL.intermediate_size * size
    assert "dora_temporaries" not in lora


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
    lora = memory.lora_params(MISTRAL, 16, "all-linear")
    assert z3["weights"] == pytest.approx(z2["weights"] / 2)
    assert z2["weights"] == ddp["weights"]
    # ZeRO: an fp32 master copy and AdamW's two fp32 states per trainable parameter, sharded
    assert z2["optimizer"] == pytest.approx(lora * 12 / 2)
    # the Trainer's AdamW keeps its states in the (bf16) adapters' dtype, unsharded
    assert ddp["optimizer"] == pytest.approx(lora * 2 * 2)
    # ZeRO-3 gathers whole modules to use them: the embedding/lm_head at least
    assert z3["zero3_gathered"] == pytest.approx(MISTRAL.vocab_size * MISTRAL.hidden_size * 2)
    assert "zero3_gathered" not in z2


# Each guide recipe's estimate per GPU (GiB), with its components, on its machine profile.
PINNED = {
    ("mistral-small-24b-qlora-2x24gb.yaml", "zorac.yaml"): (19.47, "fits", 26.3, "does not fit", {
        "weights": 13.18, "adapters": 0.18, "gradients": 0.35, "optimizer": 0.18, "activations": 1.22,
        "logits": 2.0, "cuda_context_and_slack": 2.37}),
    ("gemma2-27b-qlora-zero3-2x4090.yaml", "dual-4090.yaml"): (17.84, "fits", 15.2, "fits", {
        "weights": 7.36, "adapters": 0.11, "gradients": 0.11, "optimizer": 0.64, "activations": 1.27,
        "logits": 3.91, "zero3_gathered": 2.2, "cuda_context_and_slack": 2.25}),
    ("llama31-8b-lora-1gpu.yaml", "dual-4090.yaml"): (20.83, "fits", 17.9, "fits", {
        "weights": 14.96, "adapters": 0.16, "gradients": 0.16, "optimizer": 0.31, "activations": 0.75,
        "logits": 1.96, "autocast_copies": 0.08, "cuda_context_and_slack": 2.47}),
    ("llama31-8b-lora-2gpu.yaml", "dual-4090.yaml"): (21.0, "fits", 17.9, "fits", {
        "weights": 14.96, "adapters": 0.16, "gradients": 0.31, "optimizer": 0.31, "activations": 0.75,
        "logits": 1.96, "autocast_copies": 0.08, "cuda_context_and_slack": 2.48}),
}


@pytest.mark.parametrize("pair", sorted(PINNED), ids=lambda p: p[0].split("-")[0] + "-" + p[0].split("-")[-1])
def test_guide_recipe_estimates_are_pinned(pair: tuple[str, str]) -> None:
    total, verdict, rot, rot_verdict, parts = PINNED[pair]
    plan = plan_of(RECIPES / pair[0], MACHINES / pair[1])
    for est in plan.fit["train"]:
        assert est.components_gib == parts
        assert est.total_gib == total and est.verdict == verdict
        assert est.rule_of_thumb_gib == rot and est.rule_of_thumb_verdict == rot_verdict
        assert (est.disagreement is not None) == ((verdict == "fits") != (rot_verdict == "fits"))
    warned = [w for w in plan.warnings if "rule of thumb" in w]
    assert bool(warned) == (verdict != rot_verdict)


def test_mistral_components_by_hand() -> None:
    """The Mistral recipe's figures from the dtypes the engine really allocates: NF4 linear
    weights, bf16 embeddings and lm_head (no fp32 upcast in bf16), bf16 adapters (trl's
    cast), DDP's gradient bucket copy, paged 8-bit AdamW at 2 bytes per parameter."""
    assert MISTRAL is not None
    s = step(method="qlora", gpus=[0, 1], distribution="ddp", seq_len=2048, optimizer="paged_adamw_8bit",
             gradient_checkpointing=True)
    parts = memory.estimate(s, MISTRAL, n_gpus=2)
    emb = MISTRAL.vocab_size * MISTRAL.hidden_size * 2
    norms = (2 * MISTRAL.layers + 1) * MISTRAL.hidden_size
    linear = MISTRAL.params_b * 1e9 - emb - norms
    lora = memory.lora_params(MISTRAL, 16, "all-linear")
    assert parts["weights"] == pytest.approx(linear * memory.NF4_BYTES + (emb + norms) * 2)
    assert parts["adapters"] == pytest.approx(lora * 2)
    assert parts["gradients"] == pytest.approx(lora * 2 * 2)
    assert parts["optimizer"] == pytest.approx(lora * 2)
    assert parts["logits"] == pytest.approx(2048 * MISTRAL.vocab_size * 8)
    # fp16 QLoRA off ZeRO-3 keeps peft's fp32 embeddings/lm_head, and autocast copies the lm_head
    fp16 = memory.estimate(s.model_copy(update={"precision": "fp16"}), MISTRAL, n_gpus=2)
    assert fp16["weights"] - parts["weights"] == pytest.approx((emb + norms) * 2)
    assert fp16["autocast_copies"] == pytest.approx(MISTRAL.vocab_size * MISTRAL.hidden_size * 2)


def test_dtype_rule_follows_trl() -> None:
    qlora = step(method="qlora", precision="bf16")
    assert memory.dtype_bytes(qlora) == {"embeddings": 2, "trainable": 2}
    assert memory.kbit_upcast(step(method="qlora", precision="fp16"))
    sharded = step(method="qlora", precision="fp16", gpus=[0, 1], distribution="deepspeed-zero3")
    assert memory.sharded_qlora(sharded) and not memory.kbit_upcast(sharded)
    assert memory.dtype_bytes(sharded) == {"embeddings": 2, "trainable": 2}  # DeepSpeed casts to fp16
    assert memory.dtype_bytes(step(method="lora", precision="bf16")) == {"embeddings": 2, "trainable": 4}
    assert memory.dtype_bytes(step(method="lora", precision="fp32")) == {"embeddings": 4, "trainable": 4}


def test_disagreement_is_a_warning_both_ways() -> None:
    assert MISTRAL is not None
    s = step(method="qlora", gpus=[0, 1], distribution="ddp", seq_len=2048, optimizer="paged_adamw_8bit")
    est = memory.fit(s, MISTRAL, {0: 24.0, 1: 24.0})[0]
    assert est.verdict == "fits" and est.rule_of_thumb_verdict == "does not fit"
    assert est.disagreement and "rule of thumb says does not fit" in est.disagreement
    # the other way: the rule of thumb fits but the estimate (long sequences) does not
    long = s.model_copy(update={"seq_len": 16384, "gradient_checkpointing": False})
    est = memory.fit(long, MISTRAL, {0: 40.0, 1: 40.0})[0]
    assert est.rule_of_thumb_verdict == "fits" and est.verdict != "fits" and est.disagreement
    # agreement: no warning
    assert memory.fit(s, MISTRAL, {0: 80.0, 1: 80.0})[0].disagreement is None


def machine(psu: int, caps_default: list[str]) -> Machine:
    return builders.machine(name="m", psu={"watts": psu}, gpus=builders.gpus(*caps_default))


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
    assert "cap every GPU at work at" in b.notes[-1]
    # Caps from the note bring it within budget.
    cap = int(b.notes[-1].split("caps_w: ")[1].split(")")[0])
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


def test_a_psu_too_small_for_the_minimum_caps_says_so() -> None:
    """No negative or below-minimum cap: the note says the PSU cannot carry the GPUs."""
    m = machine(600, ["RTX 4090", "RTX 4090"])  # minimum 150 W each: 2 x 150 x 1.33 + 200 = 600 W > 540 W
    b = power.budget(m, {0: 150, 1: 150})
    assert b.verdict == "over"
    assert "cannot carry these GPUs" in b.notes[-1] and "caps_w" not in b.notes[-1]
    assert "-" not in b.notes[-1].split("W:")[0]


def test_caps_respect_each_gpus_minimum() -> None:
    """A single cap below one GPU's minimum is not settable: that GPU stays at its minimum
    and the others share the rest."""
    m = Machine.model_validate({"ftkit": 1, "kind": "machine", "name": "m", "psu": {"watts": 1000},
                                "gpus": [{"index": 0, "model": "RTX 4090", "power": {"min_w": 300, "max_w": 600}},
                                         {"index": 1, "model": "RTX 3090", "power": {"min_w": 100, "max_w": 400}}]})
    b = power.budget(m, {})
    assert b.verdict == "over"
    note = b.notes[-1]
    assert "caps_w: {0: 300, 1: " in note
    cap1 = int(note.split("1: ")[1].split("}")[0])
    assert 100 <= cap1 < 300
    assert power.budget(m, {0: 300, 1: cap1}).verdict == "ok"


def test_every_power_phase_is_checked() -> None:
    """Caps, then a restore: the phase after the restore runs at the default limits and is
    checked on its own; a server outlives the run's final restore."""
    from types import SimpleNamespace as S

    m = machine(1500, ["RTX 3090 Ti", "RTX 4090"])
    steps = [
        S(kind="power", id="cap", recipe_step="cap", gpus=[0, 1], power_caps_w={0: 300, 1: 300}, background=False,
          keep_running=False, always=False),
        S(kind="train", id="train", recipe_step="train", gpus=[0, 1], power_caps_w={}, background=False,
          keep_running=False, always=False),
        S(kind="power-restore", id="restore", recipe_step="restore", gpus=[0, 1], power_caps_w={}, background=False,
          keep_running=False, always=False),
        S(kind="serve", id="serve", recipe_step="serve", gpus=[0, 1], power_caps_w={}, background=True,
          keep_running=True, always=False),
        S(kind="power-restore", id="power-restore-final", recipe_step=None, gpus=[0, 1], power_caps_w={},
          background=False, keep_running=False, always=True),
    ]
    phases = power.run_budgets(m, steps)
    assert [p.phase for p in phases] == ["after cap (caps GPU 0 300 W, GPU 1 300 W)", "after restore (default limits)",
                                         "after the run (default limits)"]
    assert [p.verdict for p in phases] == ["ok", "over", "over"]
    assert phases[1].steps == ["serve"] and phases[2].steps == ["serve (still serving)"]
    assert phases[0].uncapped_worst_case_w == pytest.approx(1450)
    binding, uncapped = power.plan_budgets(m, steps)
    assert binding is not None and binding.phase == phases[1].phase  # the first phase over the budget
    assert [p.phase for p in power.phase_budgets(binding)] == [p.phase for p in phases]
    assert uncapped is None  # that phase has no caps to take away
    # serving on GPU 1 only after the restore: GPU 0 idles and the phase fits
    steps[3].gpus = [1]
    phases = power.run_budgets(m, steps)
    assert [p.verdict for p in phases] == ["ok", "ok", "ok"]
    assert phases[1].worst_case_w == pytest.approx(600 + power.IDLE_GPU_W + 200)


def test_a_phase_over_budget_is_a_finding_at_its_power_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A recipe that restores the defaults and then serves on both GPUs of a PSU that only
    holds them capped is refused (once, though the server also outlives the run), pointing
    at the restore step."""
    from tests.conftest import run_cli

    recipe = (RECIPES / "gemma2-27b-qlora-zero3-2x4090.yaml").read_text()
    builders.shipped(tmp_path, "gemma2-27b-qlora-zero3-2x4090.yaml", data=False, file="r.yaml")
    builders.shipped_machine(tmp_path, "dual-4090.yaml", file="m.yaml", psu={"watts": 1500})
    plan = run_cli("plan", str(tmp_path / "r.yaml"), "--machine", str(tmp_path / "m.yaml"))
    assert "worst case 1400 W against 1350 W (1500 W PSU x 0.9) -> over" in plan.out
    result = run_cli("validate", str(tmp_path / "r.yaml"), "--machine", str(tmp_path / "m.yaml"))
    assert result.code == 2
    lines = [ln for ln in result.err.splitlines() if "PSU budget exceeded" in ln]
    assert len(lines) == 1, result.err
    restore_line = next(i for i, ln in enumerate(recipe.splitlines(), 1) if "name: power-restore" in ln)
    assert f"r.yaml:{restore_line - 1}:" in lines[0] or f"r.yaml:{restore_line}:" in lines[0]
    assert "after power-restore (default limits)" in lines[0] and "serve" in lines[0]


# --------------------------------------------------------------------------- model.arch without kv_heads

ARCH_8B = {"params_b": 8.03, "layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "heads": 32,
           "vocab_size": 128256}


def _arch_recipe(tmp_path, model: dict):  # type: ignore[no-untyped-def]
    import yaml

    doc = yaml.safe_load((RECIPES / "llama31-8b-lora-sharded.yaml").read_text())
    doc["model"] = model
    for s in doc["steps"]:
        if s["type"] == "serve":
            s["args"]["max_model_len"] = 24576
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_model_arch_without_kv_heads_takes_the_known_models(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The sharded recipe with model.arch stating no kv_heads: the catalog knows Llama-3.1-8B's
    8 KV heads; taking 32 (one per head) made the KV cache 4x and refused a server that fits."""
    import json

    from ftkit.plan.build import arch_for
    from ftkit.recipe.models import Recipe
    from tests.conftest import run_cli

    model = {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f249a16976918f6564b8830bc894c89659",
             "dtype": "bf16", "arch": ARCH_8B}
    path = _arch_recipe(tmp_path, model)
    machine = str(RECIPES / "machines" / "dual-4090.yaml")
    result = run_cli("validate", str(path), "--machine", machine)
    assert result.code == 0, result.err
    fit = json.loads(run_cli("plan", str(path), "--machine", machine, "--json").out)["fit"]["serve-new"][0]
    assert fit["verdict"] == "fits" and not any("assumes" in n for n in fit["notes"])
    import yaml

    recipe = Recipe.model_validate(yaml.safe_load(path.read_text()))
    arch = arch_for(recipe)
    assert arch is not None and (arch.kv_heads, arch.kv_heads_assumed) == (8, False)
    # a local model's config.json knows them too
    local = recipe.model_copy(update={"model": recipe.model.model_copy(update={"id": None, "revision": None})})
    assert arch_for(local, {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                            "num_key_value_heads": 8, "vocab_size": 128256}).kv_heads == 8  # type: ignore[union-attr]
    unknown = arch_for(local)
    assert unknown is not None and (unknown.kv_heads, unknown.kv_heads_assumed) == (32, True)


def test_an_unknown_models_kv_heads_are_an_assumption_not_a_refusal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No id, no config.json: kv_heads = heads is an upper bound. Where only that bound is
    over the budget the plan says so (tight, with how to give the figure) instead of refusing."""
    import json

    from tests.conftest import run_cli

    (tmp_path / "weights").mkdir()
    path = _arch_recipe(tmp_path, {"path": "weights", "dtype": "bf16", "arch": ARCH_8B})
    machine = str(RECIPES / "machines" / "dual-4090.yaml")
    result = run_cli("validate", str(path), "--machine", machine)
    assert result.code == 0, result.err
    fit = json.loads(run_cli("plan", str(path), "--machine", machine, "--json").out)["fit"]["serve-new"][0]
    assert fit["verdict"] == "tight", fit
    assert any("assumes 32 KV heads, one per attention head" in n for n in fit["notes"])
    assert any(n.startswith("may not fit: ") for n in fit["notes"])
    assert fit["suggestions"][0].startswith("model.arch.kv_heads: ")


def test_a_config_head_dim_sizes_the_attention_weights() -> None:
    """Mistral-Small's config.json: 32 heads of 128 (not 5120 / 32 = 160): its parameters come
    to the published 23.57 B, not ~24.9 B."""
    from ftkit.plan.build import config_arch

    config = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 32768, "vocab_size": 131072, "max_position_embeddings": 32768}
    arch = config_arch(config)
    assert arch is not None and arch.params_b == pytest.approx(23.57, abs=0.01) and arch.kv_dim == 128
    assert config_arch({**config, "num_attention_heads": 0}) is None  # no ZeroDivisionError from a broken config
