"""`ftkit export --to gguf`: a run's merged model (or a model directory) as one GGUF file for
llama.cpp and Ollama, with a Modelfile whose template is the one the model was trained with.

From a run, everything comes from its plan.json (never the recipe again): the last merge
step's output is the model, and the train step whose adapter it merged says the template,
the dataset format and the system prompt. plan.json and state.json are read as files
someone else may have put there (files.read_json: bounded, no links)."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ftkit.errors import UserError
from ftkit.text import printable

TEMPLATES = ("auto", "tokenizer", "alpaca", "chatml", "llama3", "gemma", "mistral", "text")


@dataclass
class Source:
    model_dir: Path
    template: str  # the train step's template (or --template)
    fmt: str | None  # its dataset format (None: unknown, a bare model directory)
    system: str | None
    name: str
    label: str  # for people and the Modelfile's comment


def _run_dir(run: str) -> Path:
    from ftkit.cli.run_cmds import _find_run

    return _find_run(run, Path("runs"))


def from_run(run: str) -> Source:
    """The merged model of a run and how it was trained, from plan.json."""
    from ftkit import files
    from ftkit.plan.spec import Plan, PlanFormatError

    run_dir = _run_dir(run)
    plan_path = run_dir / "plan.json"
    try:
        plan = Plan.from_dict(files.read_json(plan_path))
    except FileNotFoundError:
        raise UserError(f"{run_dir}: not a run directory (no plan.json)") from None
    except files.UnreadableJson as e:
        raise UserError(e.at(plan_path)) from None
    except files.UnsafeFile as e:
        raise UserError(f"{plan_path}: {e.reason}") from None
    except PlanFormatError as e:
        raise UserError(f"{plan_path}: {e}") from None
    merges = [s for s in plan.steps if s.kind == "merge" and "model" in s.outputs]
    if not merges:
        raise UserError(f"{run_dir}: the run has no merge step; export a model directory with --model DIR")
    merge = merges[-1]
    model_dir = run_dir / merge.outputs["model"]
    if not model_dir.is_dir() or model_dir.is_symlink():
        status = _step_status(run_dir, merge.id)
        raise UserError(f"{model_dir}: the merge step {merge.id!r} has not written its model "
                        f"({'status ' + status if status else 'no state'}); run or resume the run first")
    template, fmt, system = _trained_with(plan, merge)
    return Source(model_dir, template, fmt, system, _run_name(plan.recipe, run_dir),
                  f"run {run_dir.name} (step {merge.id})")


def _run_name(recipe: str, run_dir: Path) -> str:
    """The name an export of a run goes by (its default output directory, the GGUF's name):
    the recipe's name when plan.json's is one the recipe layer accepts, else the run
    directory's name. plan.json is a file anyone may have written: a `recipe` of
    `../../x` or `/tmp/x` must not choose where the export writes."""
    import re

    from ftkit.recipe.models import NAME_PATTERN

    return recipe if re.fullmatch(NAME_PATTERN, recipe) else run_dir.name


def _step_status(run_dir: Path, step_id: str) -> str | None:
    from ftkit import files

    try:
        state = files.read_json(run_dir / "state.json")
    except (OSError, ValueError):
        return None
    entry = state.get("steps", {}).get(step_id) if isinstance(state, dict) and isinstance(state.get("steps"), dict) \
        else None
    status = entry.get("status") if isinstance(entry, dict) else None
    return status if isinstance(status, str) else None


def _trained_with(plan: Any, merge: Any) -> tuple[str, str | None, str | None]:
    """The template, dataset format and system prompt of the train step whose adapter the
    merge step merged (its job config, a generated file in the plan)."""
    adapter = next((merge.argv[i + 1] for i, a in enumerate(merge.argv[:-1]) if a == "--adapter"), None)
    trains = [s for s in plan.steps if s.kind == "train" and s.outputs.get("adapter")]
    train = next((s for s in trains if adapter is not None and (adapter == s.outputs["adapter"]
                                                                or adapter.endswith("/" + s.outputs["adapter"]))), None)
    if train is None:
        raise UserError(f"plan.json: no train step made the adapter the merge step {merge.id!r} merged "
                        f"({adapter!r}); export its model with --model DIR --template NAME")
    from ftkit import files

    for f in train.files:
        if not f.path.endswith(".json"):
            continue
        try:
            job = files.parse_json(f.content)
        except files.UnreadableJson as e:
            raise UserError(f"plan.json: the train step {train.id!r}'s file {printable(f.path)}: {e.reason}") from None
        ds = job.get("dataset") if isinstance(job, dict) else None
        if isinstance(ds, dict) and isinstance(ds.get("format"), str):
            template = ds.get("template") if isinstance(ds.get("template"), str) else "auto"
            system = ds.get("system_prompt") if isinstance(ds.get("system_prompt"), str) else None
            return template, ds["format"], system
    raise UserError(f"plan.json: the train step {train.id!r} has no job config with its dataset; "
                    "export its model with --model DIR --template NAME")


def from_model(model_dir: str, template: str | None) -> Source:
    path = Path(model_dir)
    return Source(path, template or "auto", None, None, path.resolve().name, str(path))


def default_output(source: Source, quant: str) -> Path:
    """NAME-QUANT-gguf in the working directory: always one name there, never a path."""
    name = source.name if "/" not in source.name and source.name not in ("", ".", "..") else "model"
    return Path(f"{name}-{quant}-gguf")


def run(source_arg: str | None, model_dir: str | None, quant: str, template: str | None, name: str | None,
        output: str | None, dry_run: bool) -> None:
    from ftkit.engines import gguf_export as engine

    if quant not in engine.QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(engine.QUANTS)}")
    if (source_arg is None) == (model_dir is None):
        raise UserError("--to gguf exports a RUN (its merged model) or --model DIR: give one of them")
    if source_arg is not None and template is not None:
        raise UserError("--template is for --model DIR: a run's plan says which template its model was trained with")
    if template is not None and template not in TEMPLATES:
        raise UserError(f"--template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if quant in engine.LLAMA_CPP_QUANTS and not engine.llama_cpp_available():
        raise UserError(f"--quant {quant} needs llama.cpp's quantizer: pip install llama-cpp-python (it compiles "
                        f"llama.cpp: minutes); without it: {', '.join(engine.PURE_QUANTS)}")
    source = from_run(source_arg) if source_arg is not None else from_model(model_dir, template)  # type: ignore[arg-type]
    out = Path(output) if output else default_output(source, quant)
    plan = engine.plan_export(source.model_dir, quant, template=source.template, fmt_name=source.fmt,
                              system=source.system, name=name or source.name, source_label=source.label)
    engine.check_output(out, source.model_dir)
    if dry_run:
        click.echo(json.dumps(engine.describe(plan, out), indent=2))
        return
    gib = 2**30
    need = engine.needs(plan, out)
    click.echo(f"gguf: {printable(source.label)}: {plan.arch.gguf}, {plan.params:,} parameters, {len(plan.tensors)} tensors -> "
               f"{quant} ({'llama.cpp quantizer' if plan.via_llama_cpp else 'gguf-py'}); prompt format "
               f"{plan.fmt.name}; needs ~{need.ram_bytes / gib:.2f} GiB RAM and {need.disk_bytes / gib:.2f} GiB disk",
               err=True)
    for w in plan.warnings:
        click.echo(f"gguf: warning: {printable(w)}", err=True)
    summary = engine.export(plan, out, log=lambda s: click.echo(printable(s), err=True))
    click.echo(json.dumps(summary))
    click.echo(f"next: llama-cli -m {_shown(os.path.join(out, engine.GGUF_NAME))}   or   "
               f"cd {_shown(str(out))} && ollama create {_ollama_name(plan.name)} -f Modelfile", err=True)


def _shown(path: str) -> str:
    """A path in a command line people copy: escaped (one line, no terminal control), then shell-quoted."""
    return shlex.quote(printable(path))


def _ollama_name(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"
