"""The training engine on CPU: a fixed seed gives the same loss curve twice; a run resumes
from the newest complete checkpoint, quarantines one whose save was interrupted, and a
crashed run started again in the same directory ends with the same artifacts as one that
never crashed; QLoRA's parameter dtypes are the ones the memory estimate counts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

require("trl")

from ftkit.engines import tiny, train  # noqa: E402
from ftkit.recipe.models import TrainStep  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402

DATASET = {
    "path": str(RECIPES / "data" / "quickstart-train.jsonl"), "format": "alpaca", "template": "alpaca",
    "system_prompt": None, "eval": {"path": str(RECIPES / "data" / "quickstart-eval.jsonl")},
    "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
               "role": "role", "content": "content", "text": "text"},
}
TINY = {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
        "max_position_embeddings": 128, "initializer_range": 0.1, "seed": 0}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny.generate(TINY, DATASET, out)
    return out


def config(model: Path, out: Path, **step_kw) -> dict:  # type: ignore[no-untyped-def]
    step = TrainStep.model_validate({
        "type": "train", "name": "train", "max_steps": 12, "learning_rate": 0.003, "batch_size": 8, "seq_len": 96,
        "precision": "fp32", "gradient_checkpointing": False, "seed": 7, "gpus": [],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "checkpoint": {"every_steps": 6, "keep_last": 2},
        "logging_steps": 2, **step_kw,
    })
    return {"model": {"source": "path", "path": str(model), "dtype": "fp32"}, "dataset": DATASET,
            "train": step.model_dump(mode="json"), "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"),
            "deepspeed_config": None}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_same_seed_same_loss_curve(base_model: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train.run(config(base_model, a))
    train.run(config(base_model, b))
    assert len(losses(a)) == 6
    assert losses(a) == losses(b)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "loss" in r and "tokens_per_s" in r)
    for key in ("learning_rate", "samples_per_s", "step_time_s", "tokens_per_s", "peak_rss_mib"):
        assert key in logged, key
    # every row carries a wall-clock timestamp (unix seconds) to join telemetry.csv
    stamps = [r["wall_time"] for r in rows]
    assert all(isinstance(t, float) and abs(t - time.time()) < 3600 for t in stamps) and stamps == sorted(stamps)
    assert (a / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((a / "train_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["resumed_from"] is None


def test_the_adapter_is_marked_complete_after_its_last_file_and_an_old_marker_goes_first(base_model: Path,
                                                                                          tmp_path: Path) -> None:
    """The completion marker the runner loads the adapter on comes after every file of the
    adapter (the tokenizer too) and before the summary; an earlier attempt's marker is
    removed when the engine starts, so it never stands for an adapter still being trained."""
    from ftkit.plan.jobs import complete_marker

    out = tmp_path / "out"
    out.mkdir()
    marker = Path(complete_marker(str(out / "adapter")))
    marker.write_text("{}")  # an earlier attempt's
    seen: list[bool] = []
    real = train.trainer_class

    def spying(step):  # type: ignore[no-untyped-def]
        cls = real(step)

        class Spy(cls):  # type: ignore[misc,valid-type]
            def train(self, *a, **kw):  # type: ignore[no-untyped-def]
                seen.append(marker.exists())  # while training: no marker
                return super().train(*a, **kw)

        return Spy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "trainer_class", spying)
        train.run(config(base_model, out, max_steps=2))
    assert seen == [False]
    written = json.loads(marker.read_text())
    newest = max(p.stat().st_mtime for p in (out / "adapter").iterdir())
    assert marker.stat().st_mtime >= newest and written["final"] == str(out / "adapter")
    assert (out / "train_summary.json").stat().st_mtime >= marker.stat().st_mtime


def test_resume_quarantines_an_interrupted_checkpoint(base_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.run(config(base_model, out))  # checkpoints at 6 and 12
    ckpts = out / "checkpoints"
    # a crash during the save of step 18: the directory exists but has no manifest
    partial = ckpts / "checkpoint-18"
    shutil.copytree(ckpts / "checkpoint-12", partial)
    (partial / "ftkit-complete.json").unlink()
    summary = train.run(config(base_model, out, max_steps=18))
    assert summary["resumed_from"] == "checkpoint-12"
    assert summary["global_step"] == 18
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-18"]  # keep_last 2; the partial one was replaced
    quarantined = list((ckpts / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("checkpoint-18-")
    assert (quarantined[0] / "adapter_model.safetensors").is_file()  # kept, not deleted


class Crash(Exception):
    pass


@pytest.mark.slow
def test_crashed_run_resumed_in_place_ends_like_an_uninterrupted_one(
        base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    kw = {"checkpoint": {"every_steps": 4, "keep_last": 3}}
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    train.run(config(base_model, whole, **kw))

    real = train.make_callbacks

    class Die(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            if state.global_step == 7:
                raise Crash("killed after step 7")

    monkeypatch.setattr(train, "make_callbacks", lambda *a: [*real(*a), Die()])
    with pytest.raises(Crash):
        train.run(config(base_model, crashed, **kw))
    monkeypatch.setattr(train, "make_callbacks", real)
    summary = train.run(config(base_model, crashed, **kw))  # the same step, the same directory

    assert summary["resumed_from"] == "checkpoint-4" and summary["global_step"] == 12
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same data order, same dropout masks (RNG state restored): the same weights
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    assert losses(crashed) == pytest.approx(losses(whole), abs=1e-6)
    steps = [r["step"] for r in map(json.loads, (crashed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]  # the row of step 6 from before the crash moved aside
    superseded = [json.loads(x) for x in (crashed / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == [6]
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == sorted(
        p.name for p in (whole / "checkpoints").iterdir())
    assert (crashed / "adapter" / "tokenizer.json").is_file()


def test_qlora_dtypes_are_what_the_estimate_counts(base_model: Path) -> None:
    """trl's rule for QLoRA, checked on a real 4-bit model: bf16 stays uniform bf16 (no fp32
    embeddings), fp16 off ZeRO-3 gets peft's fp32 upcast, sharded QLoRA (ZeRO-3) none;
    trl casts the LoRA weights to bf16. plan.memory's byte counts must agree."""
    require("bitsandbytes")
    import torch
    from trl import SFTTrainer

    from ftkit.plan import memory

    cases = [("bf16", "single", []), ("fp16", "single", []), ("fp16", "deepspeed-zero3", [0, 1])]
    for precision, dist, gpus in cases:
        cfg = config(base_model, base_model.parent / "unused", method="qlora", precision=precision,
                     distribution=dist, gpus=gpus, gradient_checkpointing=True)
        step = TrainStep.model_validate(cfg["train"])
        model = train.load_model(cfg["model"], step)
        plain = {n: p for n, p in model.named_parameters() if type(p).__name__ != "Params4bit"}
        assert any("embed_tokens" in n for n in plain)
        want = memory.dtype_bytes(step)["embeddings"]
        for n, p in plain.items():
            assert p.element_size() == want, (precision, dist, n, p.dtype)
    cfg = config(base_model, base_model.parent / "unused", method="qlora", precision="bf16")
    step = TrainStep.model_validate(cfg["train"])
    tok = train.load_tokenizer(cfg["model"])
    ds, _ = train.datasets_for(cfg["dataset"], tok)
    trainer = SFTTrainer(model=train.load_model(cfg["model"], step), processing_class=tok, train_dataset=ds,
                         args=train.sft_config(step, base_model.parent / "q-ckpt", False, None),
                         peft_config=train.lora_config(step))
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}
    assert memory.dtype_bytes(step)["trainable"] == 2
    lora = TrainStep.model_validate({**cfg["train"], "method": "lora", "precision": "fp32"})
    assert memory.dtype_bytes(lora)["trainable"] == 4


def test_throughput_after_a_resume_counts_from_the_restored_step(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer calls on_train_begin before it loads a checkpoint's state: the metrics
    callback takes its starting point at the first step instead."""
    from types import SimpleNamespace as S

    clock = iter([10.0, 100.0, 102.0])
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    step = TrainStep.model_validate({"type": "train", "gpus": []})
    metrics, _ = train.make_callbacks(step, tmp_path / "m.jsonl", tmp_path / "ckpt")
    args = S(world_size=1, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    restored = S(global_step=4, num_input_tokens_seen=0, log_history=[{"step": 4, "num_tokens": 400.0}],
                 is_world_process_zero=True, epoch=1.0)
    metrics.on_step_begin(args, restored, None)  # at 100.0
    metrics.on_step_begin(args, S(**{**vars(restored), "global_step": 5}), None)  # only the first counts
    now = S(**{**vars(restored), "global_step": 6})
    metrics.on_log(args, now, None, logs={"loss": 1.0, "num_tokens": 600.0})  # at 102.0
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["step_time_s"] == 1.0 and row["tokens_per_s"] == 100.0 and row["samples_per_s"] == 4.0


# --------------------------------------------------------------------------- QLoRA on the CPU (issue #18)

TINY64 = {**TINY, "hidden_size": 64, "intermediate_size": 128}  # bitsandbytes' CPU 4-bit matmul needs multiples of 64


@pytest.fixture(scope="module")
def base64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny64") / "model"
    tiny.generate(TINY64, DATASET, out)
    return out


def _lora_grads(model: Any, ids: Any) -> dict[str, Any]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_survive_an_evaluation_on_the_cpu(base64: Path) -> None:
    """bitsandbytes (0.50.2) switches a 4-bit layer that runs in eval mode without gradients on
    an AVX512-BF16 CPU, for good, to a packed inference layout whose kernel has no backward:
    after the Trainer's first evaluation every step would lose the gradient through the frozen
    base. The engine's model keeps the training layout, so an evaluation changes nothing."""
    require("bitsandbytes")
    import bitsandbytes.functional as bnbf
    import torch
    from peft import get_peft_model

    cfg = config(base64, base64.parent / "unused", method="qlora", precision="bf16",
                 lora={"r": 8, "alpha": 16, "dropout": 0.0})  # no dropout: the same forward twice
    step = TrainStep.model_validate(cfg["train"])
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))

    def peft_model(keep_layout: bool) -> Any:
        torch.manual_seed(0)
        model = train.load_model(cfg["model"], step)  # the engine's QLoRA load and preparation
        if not keep_layout:  # what bitsandbytes does by default
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = True
        model = get_peft_model(model, train.lora_config(step))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)  # peft starts B at zero: no gradient would reach A
        return model

    def before_and_after_an_evaluation(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        before = _lora_grads(model, ids)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:1, :5])
        return before, _lora_grads(model, ids)

    before, after = before_and_after_an_evaluation(peft_model(keep_layout=True))
    assert before.keys() == after.keys() and len(before) == 2 * 7 * TINY64["layers"]
    for n in before:
        assert torch.equal(before[n], after[n]), n
    if not bnbf.has_avx512bf16():
        return  # no packed layout on this CPU: nothing more to show
    before, after = before_and_after_an_evaluation(peft_model(keep_layout=False))
    first = next(n for n in before if "layers.0." in n and "lora_A" in n)
    assert not torch.allclose(before[first], after[first], atol=1e-3), \
        "bitsandbytes' packed CPU layout now keeps gradients: engines.bnb.keep_training_layout may be unneeded"


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_run_on_the_cpu(optimizer: str) -> None:
    """The Trainer's own bitsandbytes optimizers, on the CPU: 8-bit states (tensors of 4096+
    elements), 20 steps within 5% of how far torch's AdamW moved the weights (measured 2.3%);
    the paged one falls back to the same unpaged states (the same result)."""
    require("bitsandbytes")
    import torch
    from transformers import Trainer, TrainingArguments

    def trajectory(name: str) -> tuple[Any, Any]:
        args = TrainingArguments(output_dir="/nonexistent", optim=name, learning_rate=0.01, weight_decay=0.0,
                                 use_cpu=True, report_to=[])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(256, 512))
        target = torch.randn(256, 512)
        opt = cls([w], **kwargs)
        for _ in range(20):
            ((w - target) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return w.detach(), opt.state[w]

    ours, state = trajectory(optimizer)
    reference, _ = trajectory("adamw_torch")
    torch.manual_seed(0)
    moved = (reference - torch.randn(256, 512)).abs().mean()  # how far torch's AdamW moved the weights
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert (ours - reference).abs().mean() < 0.05 * moved


def test_qlora_with_a_paged_optimizer_trains_and_resumes_exactly_on_the_cpu(base64: Path, tmp_path: Path) -> None:
    """The engine's real QLoRA path on the CPU: 4-bit layers, paged_adamw_8bit (bitsandbytes'
    CPU fallback), checkpoints with the optimizer state; trained again from the first
    checkpoint, the adapter ends bit-identical (the resume keeps trl's bf16 adapter: peft's
    load would upcast it to fp32, see train.trainer_class)."""
    require("bitsandbytes")
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    kw = dict(method="qlora", precision="bf16", optimizer="paged_adamw_8bit", max_steps=4,
              checkpoint={"every_steps": 2, "keep_last": 2}, gradient_checkpointing=True)
    summary = train.run(config(base64, out, **kw))
    assert summary["method"] == "qlora" and summary["global_step"] == 4
    assert all(l == l and l < 20 for l in losses(out))  # finite  # noqa: E741
    assert (out / "checkpoints" / "checkpoint-4" / "optimizer.pt").is_file()
    first = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in first.values()} == {torch.bfloat16}
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    again = train.run(config(base64, out, **kw))
    assert again["resumed_from"] == "checkpoint-2" and again["global_step"] == 4
    second = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_weights_follow_the_umask_like_every_file_ftkit_writes(base_model: Path, tmp_path: Path) -> None:
    """safetensors writes its files 0600 whatever the umask; the tiny model, each checkpoint and
    the final adapter get 0666 less the umask (0644 under 022), as the README says of every file."""
    import os
    import stat as st

    for p in base_model.rglob("*.safetensors"):
        assert st.S_IMODE(p.stat().st_mode) == 0o666 & ~0o022, p
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        train.run(config(base_model, out, max_steps=4, checkpoint={"every_steps": 2, "keep_last": 2}))
    finally:
        os.umask(old)
    weights = list(out.rglob("*.safetensors"))
    assert any("checkpoint-" in str(p) for p in weights) and (out / "adapter" / "adapter_model.safetensors") in weights
    for p in weights:
        assert st.S_IMODE(p.stat().st_mode) == 0o644, p


def test_follow_umask_never_goes_through_a_link_or_touches_what_is_not_0600(tmp_path: Path) -> None:
    import os
    import stat as st

    from ftkit.files import follow_umask

    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    d = tmp_path / "d"
    d.mkdir()
    (d / "w.safetensors").write_text("x")
    os.chmod(d / "w.safetensors", 0o600)
    (d / "kept").write_text("x")
    os.chmod(d / "kept", 0o640)
    (d / "link").symlink_to(outside)
    old = os.umask(0o027)
    try:
        follow_umask(d)
    finally:
        os.umask(old)
    assert st.S_IMODE((d / "w.safetensors").stat().st_mode) == 0o640
    assert st.S_IMODE((d / "kept").stat().st_mode) == 0o640
    assert st.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target is not ftkit's to change


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dora_trains_and_merges_like_peft(method: str, base_model: Path, base64: Path, tmp_path: Path) -> None:
    """use_dora: the engine trains DoRA (the magnitudes move away from the base's norms) and
    ftkit's streaming merge folds it in like peft. LoRA: the merged model's logits are the
    trained model's (fp32, 1e-4). QLoRA: every merged weight is magnitude / norm x (the 4-bit
    weight as bitsandbytes dequantizes it + the update), within 1e-5."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftkit.engines import bnb, merge

    model_dir = base_model if method == "lora" else base64
    if method == "qlora":
        require("bitsandbytes")
    out = tmp_path / "run"
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True}
    precision = "fp32" if method == "lora" else "bf16"
    train.run(config(model_dir, out, method=method, max_steps=8, precision=precision, lora=lora))
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in tensors.items() if "lora_magnitude_vector" in k}
    assert magnitudes and len(magnitudes) == sum(1 for k in tensors if k.endswith("lora_A.weight"))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = next(k for k in magnitudes if "q_proj" in k)
    w = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(magnitudes[q].float(), torch.linalg.vector_norm(w, dim=1), atol=1e-4)  # trained
    merged = tmp_path / "merged"
    nf4 = {"nf4_dequantized_base": True, "nf4_dtype": "bf16"} if method == "qlora" else {}
    merge.merge(str(model_dir), str(adapter), str(merged), dtype="fp32", log=lambda s: None, **nf4)  # type: ignore[arg-type]
    if method == "lora":
        trained = PeftModel.from_pretrained(base, adapter)
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(trained(x).logits, ours(x).logits, atol=1e-4)
        return
    four_bit = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                    quantization_config=bnb.quantization_config("bf16"))
    bnb.keep_training_layout(four_bit)
    trained = PeftModel.from_pretrained(four_bit, adapter)
    ours_sd = load_file(str(merged / "model.safetensors"))
    checked = 0
    for name, module in trained.named_modules():
        if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_magnitude_vector:
            continue
        w4 = module.base_layer.weight
        weight = bnb.quiet_functional().dequantize_4bit(w4.data, w4.quant_state).float()
        weight += module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float() * module.scaling["default"]
        magnitude = module.lora_magnitude_vector["default"].weight.float()
        expected = (magnitude / torch.linalg.vector_norm(weight, dim=1)).unsqueeze(1) * weight
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(ours_sd[key], expected, rtol=0, atol=1e-5), key
        checked += 1
    assert checked == 7 * TINY64["layers"]
