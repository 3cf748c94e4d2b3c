"""The tiny-model generator: a small random Llama plus a BPE tokenizer trained on the
recipe's own data, saved as an ordinary Hugging Face model directory. Tests and the CPU
quickstart use it because no model can be downloaded there.

    python -m ftkit.engines.tiny --config configs/tiny-model.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftkit.files import follow_umask

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def corpus(dataset_cfg: dict[str, Any]) -> list[str]:
    """Texts to train the tokenizer on: every training and eval row, rendered the way the
    trainer will render it (so prompts tokenize into few, meaningful pieces)."""
    from ftkit.engines import data, templates

    splits = data.load_splits(dataset_cfg)
    template = templates.choose(dataset_cfg.get("template", "auto"), dataset_cfg["format"], None)
    out = []
    for row in splits.train + splits.eval:
        if template in ("alpaca",) or dataset_cfg["format"] == "text":
            ex = data.to_example(row, dataset_cfg, "alpaca" if dataset_cfg["format"] != "text" else template, None)
            out.append(ex.text if ex.text is not None else ex.prompt + ex.completion)
        else:  # chat templates: the raw turns are enough for a tokenizer
            msgs = data.to_messages(row, dataset_cfg["format"], dataset_cfg["fields"], dataset_cfg.get("system_prompt"))
            out.append("\n".join(m["content"] for m in msgs))
    return out


def make_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=100_000,
    )


def make_model(spec: dict[str, Any], tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(spec.get("seed", 0)))
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        initializer_range=spec["initializer_range"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def generate(spec: dict[str, Any], dataset_cfg: dict[str, Any], output_dir: str | Path) -> int:
    """Write the model directory; return its parameter count."""
    out = Path(output_dir)
    tokenizer = make_tokenizer(corpus(dataset_cfg), spec["vocab_size"])
    model = make_model(spec, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    follow_umask(out)  # safetensors writes its files 0600 whatever the umask
    return sum(p.numel() for p in model.parameters())


def _generate(cfg: dict[str, Any]) -> None:
    n = generate(cfg["tiny"], cfg["dataset"], cfg["output_dir"])
    print(f"tiny model: {n:,} parameters in {cfg['output_dir']}")


def main(argv: list[str] | None = None) -> None:
    from ftkit.engines.entry import main_with_config

    main_with_config("tiny-model", "ftkit.engines.tiny", _generate, argv)


if __name__ == "__main__":
    main()
