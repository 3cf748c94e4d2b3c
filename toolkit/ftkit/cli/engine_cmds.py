"""Engines usable on their own: merge (more join them as the runner grows)."""

from __future__ import annotations

import json

import click

from ftkit.cli.params import CheckedPath, FiniteFloat


@click.command()
@click.option("--base", required=True, help="base model: a local directory or a hub id (with --revision)")
@click.option("--adapter", required=True, type=CheckedPath(file_okay=False, path_type=str), help="LoRA adapter directory")
@click.option("-o", "--output", required=True, type=CheckedPath(fills=True, system_ok=False, path_type=str),
              help="new directory for the merged model (not inside the base or the adapter)")
@click.option("--revision", default=None, help="hub commit of the base model")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="store the floating-point weights in this dtype  [default: keep the base's]")
@click.option("--nf4-dequantized-base", is_flag=True,
              help="QLoRA: merge into the base rounded through NF4, as it was during training")
@click.option("--nf4-dtype", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True,
              help="with --nf4-dequantized-base: the precision QLoRA loaded the base in before quantizing it "
              "(the train step's precision)")
@click.option("--max-shard-gb", type=FiniteFloat(0, 10_000, min_open=True), default=5.0, show_default=True)
@click.option("--force", is_flag=True, help="merge an adapter whose config says it was trained on another base, or "
              "for other modules or layers than its weights (a warning instead of a refusal)")
@click.option("--dry-run", is_flag=True, help="check the inputs, print the RAM and disk the merge needs and what it "
              "would do; write nothing")
def merge(base: str, adapter: str, output: str, revision: str | None, dtype: str | None, nf4_dequantized_base: bool,
          nf4_dtype: str, max_shard_gb: float, force: bool, dry_run: bool) -> None:
    """Merge a LoRA adapter into its base model, streaming tensor by tensor.

    Peak memory is about the largest tensor, not the model. Writes sharded safetensors with
    an index, the config and the tokenizer, into a hidden directory that is renamed into
    place when complete. Every input is checked first (headers, shapes, ranks, inf/nan);
    refuses when the disk cannot hold the output. The base model is only read.
    """
    from pathlib import Path

    from ftkit.engines import merge as engine

    engine.check_shard_size(max_shard_gb)
    if dry_run:
        base_dir = engine.resolve_base(base, revision)
        engine.check_output(Path(output), base_dir, Path(adapter))
        plan = engine.plan_merge(base_dir, Path(adapter), dtype=dtype, nf4_dequantized_base=nf4_dequantized_base,
                                 max_shard_gb=max_shard_gb, nf4_dtype=nf4_dtype, base_name=base)
        engine.check_identity(plan, force=force)
        engine.check_adapter_values(plan)
        need = engine.needs(plan, Path(output))
        nf4 = {"dtype": nf4_dtype, "bitsandbytes": plan.nf4_with_bnb()} if nf4_dequantized_base else None
        click.echo(json.dumps({
            "base": str(base_dir), "adapter": adapter, "output": output, "tensors": len(plan.tensors),
            "lora_tensors": sorted(plan.loras), "replaced": sorted(plan.replace), "untie_lm_head": plan.untie,
            "dtype": plan.dtype_label(), "dtype_from": "base" if dtype is None else "--dtype",
            "vocab_size": plan.vocab_size, "shards": len(engine.shards(plan)), "ram_bytes": need.ram_bytes,
            "disk_bytes": need.disk_bytes, "disk_free_bytes": need.disk_free, "warnings": engine.warnings_for(plan),
            "nf4": nf4,
        }, indent=2))
        return
    summary = engine.merge(base, adapter, output, revision=revision, dtype=dtype,
                           nf4_dequantized_base=nf4_dequantized_base, max_shard_gb=max_shard_gb, nf4_dtype=nf4_dtype,
                           force=force, log=lambda s: click.echo(s, err=True))
    click.echo(json.dumps(summary))


COMMANDS = [merge]
