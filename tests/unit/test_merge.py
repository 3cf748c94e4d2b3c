"""The streaming merge equals peft's merge_and_unload across adapter shapes: scaling
(alpha/r, rsLoRA, patterns), fan_in_fan_out, modules_to_save, embeddings and lm_head, tied
embeddings, bf16 output. Also: it refuses without disk, and writes nothing half-done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

from ftkit.engines import merge as engine  # noqa: E402
from ftkit.engines import nf4  # noqa: E402
from ftkit.errors import UserError  # noqa: E402


def llama(tie: bool = False):  # type: ignore[no-untyped-def]
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():  # type: ignore[no-untyped-def]
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                                                bos_token_id=0, eos_token_id=0))


def randomize_lora(model) -> None:  # type: ignore[no-untyped-def]
    """peft starts B (and embedding A) at zero: give every adapter weight values so the merge matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


SHAPES = {
    "plain": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "all-linear": (llama, dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "rslora": (llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "patterns": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2},
                             alpha_pattern={"q_proj": 32})),
    "modules_to_save": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "embedding-and-lm_head": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "tied-lm_head": (lambda: llama(tie=True), dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])),
    "fan_in_fan_out": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "dora": (llama, dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    "dora-rslora-embedding": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"],
                                          use_dora=True, use_rslora=True)),
    "dora-fan_in_fan_out": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                       use_dora=True)),
}


def build(tmp_path: Path, shape: str) -> tuple[Path, Path, object]:
    factory, lora_kw = SHAPES[shape]
    torch.manual_seed(0)
    base = factory()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    model = peft.get_peft_model(factory().__class__.from_pretrained(base_dir),
                                peft.LoraConfig(task_type="CAUSAL_LM", **lora_kw))
    randomize_lora(model)
    model.save_pretrained(adapter_dir)
    if shape == "tied-lm_head":
        return base_dir, adapter_dir, model  # merge_and_unload mis-merges tied heads: compare with the trained model
    reference = model.merge_and_unload()
    return base_dir, adapter_dir, reference


@pytest.mark.parametrize("shape", sorted(s for s in SHAPES if s != "tied-lm_head"))
def test_merge_equals_peft(shape: str, tmp_path: Path) -> None:
    base_dir, adapter_dir, reference = build(tmp_path, shape)
    out = tmp_path / "merged"
    summary = engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="fp32", log=lambda s: None)
    assert summary["lora_tensors"] > 0
    ours = reference.__class__.from_pretrained(out)
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    for name, t in ref_sd.items():
        assert torch.allclose(t.float(), our_sd[name].float(), atol=1e-5), name
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reference(x).logits, ours(x).logits, atol=1e-4)


@pytest.mark.parametrize("shape", ["all-linear", "embedding-and-lm_head", "fan_in_fan_out", "dora",
                                   "dora-rslora-embedding", "dora-fan_in_fan_out"])
def test_merge_in_many_small_blocks_equals_peft(shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge computes in cache-sized sub-blocks, hands output blocks to the writer thread and
    waits when too much is unwritten. With tiny sizes every boundary is crossed many times: sub-
    and output blocks ending mid-weight, a transposed factor's columns, the write-ahead wait."""
    from ftkit.engines import safetensors_io as st

    monkeypatch.setattr(engine, "CACHE_BLOCK_BYTES", 4 * 64 * 3)  # 3 rows of a 64-wide weight
    monkeypatch.setattr(engine, "OUT_BLOCK_BYTES", 4 * 64 * 7)
    monkeypatch.setattr(st, "WRITE_AHEAD_BYTES", 100)
    base_dir, adapter_dir, reference = build(tmp_path, shape)
    out = tmp_path / "merged"
    engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="fp32", log=lambda s: None)
    ours = reference.__class__.from_pretrained(out)
    our_sd = ours.state_dict()
    for name, t in reference.state_dict().items():
        assert torch.allclose(t.float(), our_sd[name].float(), atol=1e-5), name
    plan = engine.plan_merge(base_dir, adapter_dir)
    info = max((t for t in plan.tensors if t.name in plan.loras), key=lambda t: t.shape[0])
    parts = list(engine.merged_blocks(plan, info, engine.st.read_tensor))
    assert len(parts) > 2 and sum(p.shape[0] for p in parts) == info.shape[0]  # written in parts, never whole


def test_a_non_finite_value_in_a_later_sub_block_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit.engines.safetensors_io import TensorInfo

    monkeypatch.setattr(engine, "CACHE_BLOCK_BYTES", 4 * 16 * 2)
    monkeypatch.setattr(engine, "OUT_BLOCK_BYTES", 4 * 16 * 4)
    w = torch.randn(30, 16)
    w[27, 5] = float("inf")
    info = TensorInfo("model.layers.0.mlp.up_proj.weight", "F32", [30, 16], Path("w"), 0, w.numel() * 4)
    a, b = TensorInfo("a", "F32", [2, 16], Path("a"), 0, 0), TensorInfo("b", "F32", [30, 2], Path("a"), 0, 0)
    plan = engine.MergePlan(Path("b"), Path("a"), [info])
    plan.loras[info.name] = [engine.LoraPair(a, b, "linear", 2.0)]
    factors = {"a": torch.randn(2, 16), "b": torch.randn(30, 2)}
    blocks = engine.merged_blocks(plan, info, lambda i: w if i is info else factors[i.name])
    assert next(blocks).shape[0] == 4  # the first output block is clean and goes out
    with pytest.raises(engine.NonFinite, match="base tensor .*up_proj.* holds inf or nan"):
        list(blocks)


def test_tied_lm_head_is_untied_like_training_saw_it(tmp_path: Path) -> None:
    base_dir, adapter_dir, peft_model = build(tmp_path, "tied-lm_head")
    out = tmp_path / "merged"
    engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="fp32", log=lambda s: None)
    ours = transformers.LlamaForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    assert torch.equal(ours.model.embed_tokens.weight, base.model.embed_tokens.weight)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(peft_model(x).logits, ours(x).logits, atol=1e-4)  # the model as trained


def test_merge_leaves_autograd_on(tmp_path: Path) -> None:
    base_dir, adapter_dir, _ = build(tmp_path, "plain")
    engine.merge(str(base_dir), str(adapter_dir), str(tmp_path / "m"), dtype="fp32", log=lambda s: None)
    assert torch.is_grad_enabled()


def test_bf16_output_within_tolerance(tmp_path: Path) -> None:
    base_dir, adapter_dir, reference = build(tmp_path, "all-linear")
    out = tmp_path / "merged"
    engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="bf16", log=lambda s: None)
    ours = reference.__class__.from_pretrained(out, dtype=torch.bfloat16)
    for name, t in reference.state_dict().items():
        assert torch.allclose(t.to(torch.bfloat16).float(), ours.state_dict()[name].float(), atol=1e-2, rtol=1e-2), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


def test_sharded_output_with_index(tmp_path: Path) -> None:
    base_dir, adapter_dir, reference = build(tmp_path, "plain")
    out = tmp_path / "merged"
    summary = engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="fp32", max_shard_gb=0.00005, log=lambda s: None)
    assert summary["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference.state_dict()) - {"lm_head.weight"} | ({"lm_head.weight"} & set(index["weight_map"]))
    ours = reference.__class__.from_pretrained(out)
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(reference(x).logits, ours(x).logits, atol=1e-4)


def test_refuses_when_the_disk_is_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, adapter_dir, _ = build(tmp_path, "plain")

    class Usage:
        free = 1000

    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(UserError, match="not enough disk"):
        engine.merge(str(base_dir), str(adapter_dir), str(tmp_path / "merged"), log=lambda s: None)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_nf4_dequantized_base_is_close_but_not_equal(tmp_path: Path) -> None:
    base_dir, adapter_dir, reference = build(tmp_path, "plain")
    out = tmp_path / "merged"
    engine.merge(str(base_dir), str(adapter_dir), str(out), dtype="fp32", nf4_dequantized_base=True, log=lambda s: None)
    ours = reference.__class__.from_pretrained(out).state_dict()
    ref = reference.state_dict()
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[w], ref[w])
    assert (ours[w] - ref[w]).abs().max() < ref[w].abs().max() * 0.2
    assert torch.equal(ours["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_dora_inputs_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    """DoRA adapters are checked like the rest: a config that says DoRA without magnitudes, a
    magnitude the config does not announce, one of the wrong length, one that is not finite."""
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, _ = build(tmp_path, "plain")
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora is set, but it has no lora_magnitude_vector"):
        engine.merge(str(base_dir), str(adapter_dir), str(tmp_path / "m"), log=lambda s: None)
    tensors = load_file(str(weights))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    for magnitude, config, message in [
        (torch.ones(32), False, "a DoRA magnitude, but the config says use_dora false"),
        (torch.ones(31), True, r"DoRA magnitude for .*q_proj.* is \[31\].*needs \[32\]"),
        (torch.ones(32, 1), True, "a DoRA magnitude is a 1-D float tensor"),
        (torch.full((32,), float("inf")), True, "holds inf or nan"),
    ]:
        all_magnitudes = {k.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(v.shape[0])
                          for k, v in tensors.items() if k.endswith("lora_B.weight")}  # one per output feature
        all_magnitudes[f"{q}.lora_magnitude_vector"] = magnitude
        save_file({**tensors, **all_magnitudes}, str(weights))
        cfg_path.write_text(json.dumps({**cfg, "use_dora": config}))
        with pytest.raises(UserError, match=message):
            engine.merge(str(base_dir), str(adapter_dir), str(tmp_path / "m"), log=lambda s: None)
    assert not (tmp_path / "m").exists()


def test_cli_dry_run_reports_needs(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    base_dir, adapter_dir, _ = build(tmp_path, "plain")
    result = run_cli("merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "-o", str(tmp_path / "m"), "--dry-run")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert info["ram_bytes"] > 0 and info["disk_bytes"] > 0 and not (tmp_path / "m").exists()
    shutil.rmtree(adapter_dir)
    result = run_cli("merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "-o", str(tmp_path / "m"))
    assert result.code == 2 and "not a LoRA adapter" in result.err


# --------------------------------------------------------------------------- NF4 (issue: ~70x a weight's size)


def nf4_whole_tensor(w):  # type: ignore[no-untyped-def]
    """The former implementation, whole tensor at once (16 floats per element): the reference."""
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % 64
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    code = torch.tensor(nf4.NF4, dtype=torch.float32)
    idx = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    deq = (code[idx] * absmax).reshape(-1)
    if pad:
        deq = deq[:-pad]
    return deq.reshape(w.shape).to(w.dtype)


@pytest.mark.parametrize("shape,dtype", [((37, 33), torch.bfloat16), ((130, 7), torch.float32), ((5, 64), torch.float16),
                                         ((300, 96), torch.bfloat16)])
def test_blockwise_nf4_equals_the_whole_tensor_reference(shape, dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The torch rounding (where bitsandbytes cannot run; tests/unit/test_nf4_bnb.py checks the
    bitsandbytes one): block-wise equals the whole-tensor search, merged or not."""
    from ftkit.engines.safetensors_io import TensorInfo

    monkeypatch.setattr(nf4, "CHUNK", 128)  # many chunks and row blocks, even on small weights
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 4 * 200)
    torch.manual_seed(3)
    precision = "fp16" if dtype == torch.float16 else "bf16"
    w = (torch.randn(shape) * 0.05).to(dtype)
    expected = nf4_whole_tensor(w.to(nf4.torch_dtype(precision)))  # rounded in the training precision
    assert torch.equal(nf4.Rounder(w, precision, None).whole(w), expected)
    code = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    info = TensorInfo("model.layers.0.mlp.up_proj.weight", code, list(shape), Path("w"), 0, w.numel() * w.element_size())
    plan = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True, nf4_dtype=precision, nf4_bnb=False)
    assert torch.equal(engine.merged_tensor(plan, info, lambda i: w), expected.to(dtype))  # rounded, no LoRA
    a = TensorInfo("a", "F32", [4, shape[1]], Path("a"), 0, 0)
    b = TensorInfo("b", "F32", [shape[0], 4], Path("a"), 0, 0)
    factors = {"a": torch.randn(4, shape[1]) * 0.1, "b": torch.randn(shape[0], 4) * 0.1}
    plan.loras[info.name] = [engine.LoraPair(a, b, "linear", 2.0)]
    plan.out_dtype = "F32"
    ours = engine.merged_tensor(plan, info, lambda i: w if i is info else factors[i.name])
    reference = expected.float() + 2.0 * (factors["b"] @ factors["a"])
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


NF4_MEMORY = """
import json, resource, sys, torch
from pathlib import Path
from ftkit.engines import bnb, nf4
from ftkit.engines import merge as engine
from ftkit.engines.safetensors_io import TensorInfo
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with_bnb = sys.argv[1] == "bitsandbytes"
w = torch.randn(2048, 2048) * 0.02                      # a 16 MiB fp32 weight
small = torch.randn(64, 256)
nf4.Rounder(small, "bf16", bnb.quiet_functional() if with_bnb else None).whole(small)  # import, warm the kernels
torch.isfinite(w[:8]).all()
info = TensorInfo("model.layers.0.mlp.up_proj.weight", "F32", [2048, 2048], Path("w"), 0, w.numel() * 4)
plan = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True, nf4_bnb=with_bnb)
before = peak()
for part in engine.merged_blocks(plan, info, lambda i: w):  # as the merge does: each block written, then dropped
    pass
print(json.dumps({"growth": peak() - before, "tensor_ram": engine.tensor_ram(plan, info), "weight": w.numel() * 4}))
"""


@pytest.mark.parametrize("rounding", ["torch", "bitsandbytes"])
def test_nf4_merge_memory_is_bounded_and_counted(rounding: str) -> None:
    """Peak growth stays at about the output plus bounded blocks (the whole-tensor version grew by
    ~30x the weight), and needs() counts at least what is allocated (bitsandbytes' import, which
    needs() adds once per merge, is made before the measurement)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    if rounding == "bitsandbytes":
        require("bitsandbytes")
    proc = subprocess.run([sys.executable, "-c", NF4_MEMORY, rounding], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "toolkit")}, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["growth"] < m["weight"] + 64 * 2**20, m  # output + blocks; was ~30x the weight
    assert m["tensor_ram"] >= m["weight"] + m["growth"], m  # source as read + what merging it allocated


def test_needs_counts_the_nf4_path() -> None:
    from ftkit.engines.safetensors_io import TensorInfo

    info = TensorInfo("model.layers.0.mlp.up_proj.weight", "BF16", [4096, 4096], Path("w"), 0, 4096 * 4096 * 2)
    plain = engine.MergePlan(Path("b"), Path("a"), [info])
    in_torch = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True, nf4_bnb=False)
    assert engine.tensor_ram(in_torch, info) > engine.tensor_ram(plain, info) + nf4.CHUNK * 64
    with_bnb = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True, nf4_bnb=True)
    assert engine.tensor_ram(with_bnb, info) > engine.tensor_ram(plain, info) + 4096 * 4096 // 64 * 4
    out = Path("/nonexistent/out")
    assert engine.needs(with_bnb, out).ram_bytes >= engine.tensor_ram(with_bnb, info) + engine.BNB_IMPORT_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_finite_check_sees_every_non_finite_value(dtype: torch.dtype, bad: float, where: str) -> None:
    """The merge's one finiteness check per block (min and max, no mask) misses nothing:
    a nan or an inf anywhere, in every float dtype, also in a non-contiguous view."""
    n = 4099
    x = torch.randn(n).to(dtype)
    assert engine._finite(x) and engine._finite(x[::3]) and engine._finite(torch.empty(0, dtype=dtype))
    x[{"first": 0, "middle": n // 2, "last": n - 1}[where]] = bad
    assert not engine._finite(x)
    assert not engine._finite(x.reshape(1, n).expand(2, n).T)  # a transposed, strided view
