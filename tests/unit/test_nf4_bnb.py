"""The QLoRA merge checked against bitsandbytes itself, on the CPU (bitsandbytes 0.50.2 runs
NF4 there; nothing is mocked):

- ftkit's block-wise rounding (row blocks of the merge, chunks of the scale pass) equals
  bitsandbytes' whole-tensor quantize_4bit(double quantization) + dequantize_4bit: tolerance
  0, bit for bit, across shapes, stored dtypes and training precisions;
- the torch fallback (where bitsandbytes cannot run) differs from it only by the double
  quantization of the scales (at most 1.5% of a block's absmax here) and, very rarely, a
  weight exactly on a rounding boundary;
- a real 4-bit model (transformers + bitsandbytes, as the train engine loads it): each merged
  weight is its 4-bit layer's dequantized weight plus the adapter's update (to 1e-6, fp32
  rounding), and the merged model's logits follow the adapter on the 4-bit base: tolerance
  0.15 on logits up to +-3.5 (measured 0.06, both models computing in bf16), against 1.26
  for a merge into the 16-bit original; the same next token at 99% of the positions of this
  random model (near-ties), against 72%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")
require("bitsandbytes")

from ftkit.engines import bnb, nf4  # noqa: E402
from ftkit.engines import merge as engine  # noqa: E402
from ftkit.engines.safetensors_io import TensorInfo  # noqa: E402

CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


@pytest.fixture(scope="module")
def bnbf():  # type: ignore[no-untyped-def]
    f = bnb.quiet_functional()
    if f is None:
        pytest.fail("bitsandbytes is installed but does not quantize on this CPU")
    return f


def bnb_whole(f, w, precision: str):  # type: ignore[no-untyped-def]
    """bitsandbytes' own round trip of the whole weight, as QLoRA loads it (double quantized)."""
    src = w.to(nf4.torch_dtype(precision)).reshape(-1)
    q, state = f.quantize_4bit(src, blocksize=64, quant_type="nf4", compress_statistics=True)
    return f.dequantize_4bit(q, state).reshape(w.shape)


@pytest.mark.parametrize("shape,dtype,precision", [
    ((37, 33), torch.bfloat16, "bf16"), ((130, 7), torch.float32, "bf16"), ((5, 64), torch.float16, "fp16"),
    ((300, 96), torch.bfloat16, "bf16"), ((512, 320), torch.float32, "fp16"), ((1024, 768), torch.float32, "bf16"),
])
def test_blockwise_rounding_is_bitsandbytes_own(bnbf, shape, dtype, precision, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nf4, "CHUNK", 4096)  # many scale-pass chunks and merge row blocks, even here
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 4 * 3000)
    torch.manual_seed(3)
    w = (torch.randn(shape) * 0.05).to(dtype)
    expected = bnb_whole(bnbf, w, precision)
    info = TensorInfo("model.layers.0.mlp.up_proj.weight", CODES[dtype], list(shape), Path("w"), 0, w.numel() * w.element_size())
    plan = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True, nf4_dtype=precision, out_dtype="F32")
    assert plan.nf4_with_bnb()
    ours = engine.merged_tensor(plan, info, lambda i: w)
    assert torch.equal(ours, expected.float())  # tolerance 0
    assert torch.equal(nf4.Rounder(w, precision, bnbf).whole(w), expected)


def test_torch_fallback_differs_only_by_the_double_quantized_scales(bnbf) -> None:
    torch.manual_seed(0)
    w = torch.randn(2048, 2048) * 0.02
    for precision in nf4.DTYPES:
        ref = bnb_whole(bnbf, w, precision).float().reshape(-1, 64)
        ours = nf4.Rounder(w, precision, None).whole(w).float().reshape(-1, 64)
        absmax = w.to(nf4.torch_dtype(precision)).float().reshape(-1, 64).abs().amax(1, keepdim=True)
        rel = (ours - ref).abs() / absmax
        assert rel.max() <= 0.015, (precision, rel.max())  # measured: 0.83% (bf16), 1.04% (fp16)
        # without double quantization the codes and the result are bitsandbytes' exactly
        src = w.to(nf4.torch_dtype(precision)).reshape(-1)
        q, state = bnbf.quantize_4bit(src, blocksize=64, quant_type="nf4", compress_statistics=False)
        assert torch.equal(ours.reshape(-1), bnbf.dequantize_4bit(q, state).float().reshape(-1))


def tiny_llama(path: Path) -> None:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)  # fp32, as the tiny-model step writes it


def qlora_model(base: Path):  # type: ignore[no-untyped-def]
    """The base as the train engine loads it for QLoRA (bf16), in the training layout."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16,
                                                              quantization_config=bnb.quantization_config("bf16"))
    bnb.keep_training_layout(model)
    return model


@pytest.fixture(scope="module")
def qlora(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny base and an adapter on its 4-bit form (B not zero, in bf16 as trl keeps it)."""
    root = tmp_path_factory.mktemp("qlora")
    base, adapter = root / "base", root / "adapter"
    tiny_llama(base)
    model = peft.get_peft_model(qlora_model(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                   task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(adapter)
    return base, adapter, model.eval()


def test_merged_weights_are_the_4bit_layers_plus_the_update(qlora, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, adapter, model = qlora
    out = tmp_path / "merged"
    engine.merge(str(base), str(adapter), str(out), dtype="fp32", nf4_dequantized_base=True, nf4_dtype="bf16",
                 log=lambda s: None)
    merged = load_file(str(out / "model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "base_layer") or not hasattr(module.base_layer, "quant_state"):
            continue
        w4 = module.base_layer.weight
        dequantized = bnb.quiet_functional().dequantize_4bit(w4.data, w4.quant_state).float()
        update = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float() * scale
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(merged[key], dequantized + update, rtol=0, atol=1e-6), key
        checked += 1
    assert checked == 14  # q, k, v, o, gate, up, down in both layers


def test_merged_model_answers_like_the_adapter_on_the_4bit_base(qlora, tmp_path: Path) -> None:
    base, adapter, model = qlora
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    diffs, agree = {}, {}
    for how, nf4_base in (("nf4", True), ("original", False)):
        out = tmp_path / how
        engine.merge(str(base), str(adapter), str(out), nf4_dequantized_base=nf4_base, log=lambda s: None)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = merged(input_ids=ids).logits.float()
        diffs[how] = (logits - reference).abs().max().item()
        agree[how] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert reference.abs().max() > 2  # logits worth comparing
    assert diffs["nf4"] <= 0.15, diffs  # bf16 arithmetic of both models; measured 0.06
    assert diffs["nf4"] * 5 < diffs["original"], diffs  # measured 1.26: training never saw the 16-bit original
    # the next token: the same except near-ties of this random model (measured 99% against 72%)
    assert agree["nf4"] >= 0.95 and agree["original"] < agree["nf4"], agree


def test_merge_logs_one_line_not_bitsandbytes_noise(tmp_path: Path, qlora) -> None:  # type: ignore[no-untyped-def]
    """Run by hand, `ftkit merge` says how it rounds in one line; bitsandbytes' kernel-fallback
    warning (it concerns only bitsandbytes' packed CPU inference layout) and deprecation
    noise stay out of a person's console."""
    import subprocess
    import sys

    base, adapter, _ = qlora
    proc = subprocess.run([sys.executable, "-m", "ftkit", "merge", "--base", str(base), "--adapter", str(adapter),
                           "-o", str(tmp_path / "m"), "--nf4-dequantized-base"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith("merge: ") for line in lines), lines
    assert sum("NF4" in line for line in lines) == 1
    assert "bitsandbytes 0.50" in proc.stderr and "kernels-community" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["nf4_rounding"].startswith("bitsandbytes") and summary["nf4_dtype"] == "bf16"
