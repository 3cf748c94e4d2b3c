"""validate, schema, plan: everything that reads recipes without running them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ftkit.cli.params import CheckedPath
from ftkit.errors import ConfigError, ConfigIssue, UserError


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=True, path_type=str))
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str), help="check against this machine profile")
def validate(recipes: tuple[str, ...], machine_path: str | None) -> None:
    """Check recipes (and machine profiles); report every problem as FILE:LINE:COL.

    Exit 0 when all are valid, 2 otherwise. Nothing is run or written.
    """
    from ftkit.recipe.validate import LoadedMachine, load_any, load_machine

    issues: list[ConfigIssue] = []
    machine = None
    if machine_path:
        try:
            machine = load_machine(machine_path)
        except ConfigError as e:
            issues.extend(e.issues)
    ok: list[str] = []
    for path in recipes:
        try:
            loaded = load_any(path)
        except ConfigError as e:
            issues.extend(e.issues)
            continue
        if machine is not None and not isinstance(loaded, LoadedMachine):
            try:
                _check_against(loaded, machine)
            except ConfigError as e:
                issues.extend(e.issues)
                continue
        ok.append(path)
    for path in ok:
        click.echo(f"ok: {path}" + (f" (on {machine.machine.name})" if machine and machine.path != Path(path) else ""))
    if issues:
        raise ConfigError(issues)


def _check_against(loaded, machine) -> None:  # type: ignore[no-untyped-def]
    """The same checks `ftkit up` makes before it starts (one code path: prepare.Prepared)."""
    from ftkit.prepare import Prepared, plan_for
    from ftkit.recipe.resolve import resolve

    res = resolve(loaded, machine.machine)
    Prepared(loaded, res, plan_for(res, run_dir=None), str(machine.path)).check()


@click.command()
@click.option("--kind", type=click.Choice(["recipe", "machine"]), default="recipe", show_default=True)
@click.option("-o", "--output", type=CheckedPath(dir_okay=False, path_type=str), help="write to a file instead of stdout")
def schema(kind: str, output: str | None) -> None:
    """Print the JSON Schema of recipes (or machine profiles), for editors and CI."""
    from ftkit.recipe.models import json_schema

    text = json.dumps(json_schema(kind), indent=2, sort_keys=False) + "\n"  # type: ignore[arg-type]
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


@click.command()
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile (default: this host, detected)")
@click.option("--executor", type=click.Choice(["docker", "local"]), default=None,
              help="plan for this executor instead of the profile's")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--configs", "configs", is_flag=True,
              help="print the generated configs (accelerate, DeepSpeed, the engines' jobs) in full, not one line each")
def plan(recipe: str, machine_path: str | None, executor: str | None, as_json: bool, configs: bool) -> None:
    """Resolve defaults and print the ordered plan: images, commands, GPUs, power caps,
    generated configs, memory-fit estimates and the PSU budget. Runs nothing; refuses (exit 2)
    a plan whose local steps need an engine this Python environment lacks."""
    from ftkit.cli.plan_text import render_plan
    from ftkit.prepare import prepare

    prepared = prepare(recipe, machine_path, executor=executor)
    prepared.check_engines()  # its commands would start an engine this Python lacks
    loaded_plan = prepared.plan
    if as_json:
        click.echo(json.dumps(loaded_plan.to_dict(), indent=2, default=str))
    else:
        click.echo(render_plan(loaded_plan, configs=configs))


@click.command("export")
@click.argument("source", metavar="RECIPE|RUN", required=False, type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(["trainjob", "gguf"]), default="trainjob", show_default=True,
              help="trainjob: a recipe's train step as a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1); "
              "gguf: a run's merged model (or --model DIR) as one GGUF file for llama.cpp and Ollama, with a Modelfile")
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="trainjob: machine profile (default: this host, detected)")
@click.option("--step", "step_id", default=None, help="trainjob: the train step to export (default: the first)")
@click.option("--pvc", default=None, help="trainjob: the ReadWriteMany PersistentVolumeClaim for run/ and inputs/ "
              "(default: ftkit-<recipe>)")
@click.option("--namespace", default=None, help="trainjob: the namespace of the TrainJob")
@click.option("--image", default=None, help="trainjob: the image as the cluster pulls it (default: the plan's tag)")
@click.option("--model", "model_dir", type=CheckedPath(path_type=str), default=None,
              help="gguf: export this model directory instead of a run's merged model")
@click.option("--quant", default=None, help="gguf: f32, f16, bf16 or q8_0 (written by gguf-py; default q8_0); "
              "q4_k_m, q5_k_m, q6_k, q4_0 and llama.cpp's other types need llama-cpp-python (its quantizer)")
@click.option("--template", default=None, help="gguf with --model: the template the model was trained with "
              "(alpaca, chatml, llama3, gemma, mistral, text, tokenizer; default: the tokenizer's own)")
@click.option("--name", default=None, help="gguf: the model's name in the GGUF (default: the recipe's)")
@click.option("--dry-run", is_flag=True, help="gguf: check the model, print what would be written (the Modelfile in "
              "full), the RAM and disk it needs; write nothing")
@click.option("-o", "--output", type=CheckedPath(system_ok=False, path_type=str),
              help="trainjob: write to this file instead of stdout; gguf: the new directory for model.gguf and "
              "Modelfile (default: ./<recipe, or the model directory's name>-<quant>-gguf)")
def export(source: str | None, target: str, machine_path: str | None, step_id: str | None, pvc: str | None,
           namespace: str | None, image: str | None, model_dir: str | None, quant: str | None, template: str | None,
           name: str | None, dry_run: bool, output: str | None) -> None:
    """Export for another system. --to trainjob (RECIPE): the plan's (multi-node) train step
    for a cluster engine, a Kubeflow TrainJob with the same image, configs and command;
    Kubernetes gives each pod its rank; prints what the volume must hold. --to gguf (RUN, a
    run directory, its name or `latest`; or --model DIR): the merged model as GGUF with an
    Ollama Modelfile whose template is the one the model was trained with."""
    given = {"--machine": machine_path, "--step": step_id, "--pvc": pvc, "--namespace": namespace, "--image": image,
             "--model": model_dir, "--quant": quant, "--template": template, "--name": name,
             "--dry-run": dry_run or None}
    other = ("--model", "--quant", "--template", "--name", "--dry-run") if target == "trainjob" else \
        ("--machine", "--step", "--pvc", "--namespace", "--image")
    wrong = [flag for flag in other if given[flag] is not None]
    if wrong:
        raise UserError(f"{wrong[0]} is for --to {'gguf' if target == 'trainjob' else 'trainjob'}, not --to {target}")
    if target == "gguf":
        from ftkit.cli import export_gguf

        export_gguf.run(source, model_dir, quant or "q8_0", template, name, output, dry_run)
        return
    if source is None:
        raise click.UsageError("give a RECIPE (--to trainjob exports a recipe's train step)")
    if output is not None and os.path.isdir(output):
        raise UserError(f"--output {output}: a directory; --to trainjob writes one file")
    _export_trainjob(source, machine_path, step_id, pvc, namespace, image, output)


def _export_trainjob(recipe: str, machine_path: str | None, step_id: str | None, pvc: str | None,
                     namespace: str | None, image: str | None, output: str | None) -> None:
    import yaml

    from ftkit.plan import export_trainjob as tj
    from ftkit.prepare import prepare
    from ftkit.strict import dns_label, dns_subdomain

    if namespace is not None:  # before the plan: kubectl would refuse the manifest only when applied
        dns_label(namespace, "--namespace")
    if pvc is not None:
        dns_subdomain(pvc, "--pvc")
    prepared = prepare(recipe, machine_path, executor="docker", run_dir="/ftkit/run")
    prepared.check()
    try:
        data = tj.manifest(prepared.plan, step_id=step_id, pvc=pvc, namespace=namespace, image=image)
    except tj.ExportError as e:
        raise UserError(f"{recipe}: {e}") from None
    text = "# generated by `ftkit export --to trainjob`; apply with kubectl apply -f\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        sys.stdout.write(text)
    step = tj.train_step(prepared.plan, step_id)
    claim = data["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    vol = claim["template"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    click.echo(f"before applying: push {step.image} where the cluster pulls it (then --image), and fill PVC {vol}:", err=True)
    for f in [f for s in prepared.plan.steps for f in s.files if s.id == step.id or s.kind == "tiny-model"]:
        click.echo(f"  run/{f.path} (`ftkit plan --json` has its content)", err=True)
    if any(s.kind == "tiny-model" for s in prepared.plan.steps):
        click.echo("  run/model/ (the tiny model: `ftkit up` makes it in its run directory)", err=True)
    for m in step.mounts:
        if m.container.startswith("/ftkit/inputs/"):
            click.echo(f"  {m.container[len('/ftkit/'):]} <- {m.host}", err=True)


COMMANDS = [validate, schema, plan, export]
