"""Plain-text rendering of plans: readable in a terminal and in a log, no colour codes."""

from __future__ import annotations

import shlex
from typing import Any

from ftkit.plan.container import lease_argv, step_command
from ftkit.plan.spec import Plan
from ftkit.recipe.yamlpos import printable


def esc(text: str) -> str:
    """Control and invisible characters escaped (one implementation: the recipe layer's), so
    a recipe string cannot hide a flag or rewrite the line from the person reading the plan."""
    return printable(text)


def _q(argv: list[str]) -> str:
    return " ".join(esc(shlex.quote(a)) for a in argv)


def _file_summary(path: str, content: str) -> str:
    """One line for a generated config: what a person checks in it (the distribution, ZeRO
    stage and offload, the training settings), and its size; `--configs` shows the text."""
    import json

    lines = len(content.rstrip().splitlines())
    size = f"{lines} line{'s' if lines != 1 else ''}" if lines else "empty"
    try:
        if path.endswith(".json"):
            data = json.loads(content)
        elif path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(content)
        else:
            return size
    except ValueError:
        return size
    except Exception:  # noqa: BLE001 - a summary is never worth a failed plan
        return size
    if not isinstance(data, dict):
        return size
    name = path.rsplit("/", 1)[-1]
    said: list[str] = []
    if name.startswith("deepspeed-"):
        zero = data.get("zero_optimization") or {}
        said.append(f"ZeRO stage {zero.get('stage', 0)}")
        for what in ("optimizer", "param"):
            dev = (zero.get(f"offload_{what}") or {}).get("device")
            if dev and dev != "none":
                said.append(f"{what} offloaded to {dev}")
    elif name.startswith("accelerate-"):
        kind = data.get("distributed_type", "?")
        said.append("one process, no distribution" if kind == "NO" else f"{kind}, {data.get('num_processes', '?')} processes")
        if int(data.get("num_machines") or 1) > 1:
            said.append(f"{data['num_machines']} machines")
        if data.get("mixed_precision") not in (None, "no"):
            said.append(f"mixed precision {data['mixed_precision']}")
    elif name.startswith("train-") and isinstance(data.get("train"), dict):
        t = data["train"]
        said.append(str(t.get("method", "?")))
        lora = t.get("lora") if isinstance(t.get("lora"), dict) else None
        if lora and t.get("method") in ("lora", "qlora"):
            kinds = [k for k, on in (("DoRA", lora.get("use_dora")), ("rsLoRA", lora.get("use_rslora"))) if on]
            said.append(f"r {lora.get('r')}, alpha {lora.get('alpha')}{''.join(', ' + k for k in kinds)}")
        said.append(f"{t['max_steps']} steps" if t.get("max_steps") else f"{t.get('epochs')} epoch(s)")
        said.append(f"batch {t.get('batch_size')} x {t.get('grad_accum', 1)} accumulated")
        said.append(f"seq_len {t.get('seq_len')}, lr {t.get('learning_rate')}, {t.get('precision')}")
        if isinstance(data.get("dataset"), dict):
            said.append(_data_summary(data["dataset"]))
    elif name.startswith("preference-") and isinstance(data.get("train"), dict):
        t = data["train"]
        said.append(f"{str(t.get('objective', '?')).upper()} beta {t.get('beta')}, {t.get('method')}")
        said.append(f"from {'the adapter at ' + str(data['init_adapter']) if data.get('init_adapter') else 'the base'}")
        pairs = data.get("pairs") if isinstance(data.get("pairs"), dict) else {}
        said.append(f"pairs {pairs.get('path')}" + (", held-out pairs scored before and after" if pairs.get("eval") else ""))
        said.append(f"{t['max_steps']} steps" if t.get("max_steps") else f"{t.get('epochs')} epoch(s)")
        said.append(f"batch {t.get('batch_size')} x {t.get('grad_accum', 1)} accumulated")
        said.append(f"seq_len {t.get('seq_len')}, lr {t.get('learning_rate')}, {t.get('precision')}")
    elif name.startswith("quantize-") and isinstance(data.get("quantize"), dict):
        q = data["quantize"]
        said.append(f"{str(q.get('method', '?')).upper()} {q.get('scheme')}")
        said.append(f"up to {q.get('calibration_samples')} calibration rows of {q.get('max_seq_len')} tokens")
        if q.get("ignore"):
            said.append(f"16-bit: {', '.join(map(str, q['ignore']))}")
    elif isinstance(data.get("eval"), dict):
        e = data["eval"]
        if e.get("models"):
            said.append(f"{e.get('score')} match on {', '.join(map(str, e.get('models') or []))}")
        h = data.get("harness")
        if isinstance(h, dict):
            tasks = [str(t.get("given")) for t in h.get("tasks") or [] if isinstance(t, dict)]
            said.append(f"lm-eval {h.get('lm_eval_model')} on {', '.join(tasks)}"
                        + (f", {h.get('limit')} documents each" if h.get("limit") else "")
                        + (f", {h.get('num_fewshot')}-shot" if h.get("num_fewshot") is not None else ""))
    return esc("; ".join(said) + f" ({size})" if said else size)


def _data_summary(d: dict) -> str:  # type: ignore[type-arg]
    """Where a train step's rows come from and which tokens train: `data hub org/name@<commit>
    (train), chat, template auto, loss on every assistant turn`."""
    if d.get("hub"):
        sub = f" {d['subset']}" if d.get("subset") else ""
        where = f"hub {d['hub']}@{str(d.get('revision') or '?')[:12]}{sub} ({d.get('split') or 'train'})"
    else:
        split = d.get("split") or "train"
        where = f"{d.get('path')}" + (f" ({split})" if split != "train" else "")
    said = f"data {where}, {d.get('format')}, template {d.get('template')}"
    if d.get("format") == "chat":
        every = d.get("train_on", "all_assistant_turns") == "all_assistant_turns" and d.get("template") != "alpaca"
        said += ", loss on every assistant turn" if every else ", loss on the last assistant turn"
    return said


def render_plan(plan: Plan, *, configs: bool = False) -> str:
    """The plan as text. Generated configs are one line each (what they set) unless
    `configs`: then their whole text, as `ftkit up` will write it."""
    out: list[str] = []
    w = out.append
    w(f"plan: recipe {plan.recipe} ({plan.recipe_file}) on machine {plan.machine}, executor {plan.executor}")
    w(f"run directory: {plan.run_dir}/")
    for n, s in enumerate(plan.steps, 1):
        w("")
        tag = " [always, also after a failure]" if s.always else ""
        w(f"{n}. {s.id} ({s.kind}){tag}: {esc(s.description)}")
        if s.image:
            w(f"   image: {s.image}")
        if s.gpus:
            w(f"   gpus: {','.join(map(str, s.gpus))}")
        if s.power_caps_w:
            w("   power caps: " + ", ".join(f"GPU {g} {c} W" for g, c in sorted(s.power_caps_w.items())))
        if s.lease:
            how = ("preemptible: yields to training and comes back" if s.lease.role == "serve"
                   else "waits its turn, never yields")
            caps = (", refuses GPUs whose enforced limit is above " +
                    ", ".join(f"GPU {g} {w} W" for g, w in sorted(s.lease.max_power_w.items()))) if s.lease.max_power_w else ""
            w(f"   lease: {s.lease.role} on GPU(s) {','.join(map(str, s.lease.gpus))} ({how}{caps})")
        if s.argv:
            w(f"   run: {_q(step_command(s, plan))}")
        if s.request:
            import json

            w(f"   request (sent by ftkit): {s.request.method} {esc(s.request.url)} "
              f"{esc(json.dumps(s.request.body, sort_keys=True))}")
        if s.env:
            w("   env: " + " ".join(f"{k}={esc(shlex.quote(v))}" for k, v in sorted(s.env.items())))
        for m in s.mounts:
            w(f"   mount: {esc(m.host)} -> {esc(m.container)}{' (ro)' if m.read_only else ''}")
        for port in s.ports:
            where = f"{port.host_ip}:{port.host}"
            w(f"   port: {where} -> {port.container}" if s.executor == "docker" else f"   port: {where}")
        if s.shm_size:
            w(f"   shm: {s.shm_size}")
        if s.ready:
            w(f"   ready when: {s.ready.health} and {s.ready.models} answer (timeout {s.ready.timeout_s} s)")
        for p in s.prompts:
            exp = p.get("expect") or {}
            cond = ", ".join(f"{k} {v!r}" for k, v in exp.items() if v is not None) or "any answer"
            w(f"   test prompt: '{esc(p['prompt'][:60])}' -> {esc(cond)}")
        if s.background:
            w(f"   afterwards: {'left running' if s.keep_running else 'stopped at the end of the run'}")
        for f in s.files:
            if configs:
                w(f"   writes {f.path}:")
                for line in f.content.rstrip().splitlines():
                    w(f"     | {esc(line)}")
            else:
                w(f"   writes {f.path}: {_file_summary(f.path, f.content)}")
        for note in s.notes:
            w(f"   note: {esc(note)}")
        for node in s.nodes:  # a multi-node step: what differs per node
            where = esc(node.docker_host) if node.docker_host else "this machine's engine"
            how = "started by hand (ftkit prints the command)" if node.manual else f"through {where}"
            w(f"   node {node.rank}: {esc(node.name)} at {esc(node.address)}, {how}, network {esc(node.network)}")
            w(f"     run: {_q(lease_argv(s, ['ftkit']) + node.argv)}")
            w("     env: " + " ".join(f"{k}={esc(shlex.quote(v))}" for k, v in sorted(node.env.items())))
    if plan.cluster:
        _cluster(plan, w)
    if plan.fit:
        w("")
        w("memory fit (estimate per GPU; every figure is per GPU):")
        for step, ests in plan.fit.items():
            for e in ests:
                dev = f"GPU {e.gpu}" + (f" ({e.vram_gib:g} GiB)" if e.vram_gib else "") if e.gpu is not None else "CPU"
                parts = ", ".join(f"{k} {v:g}" for k, v in e.components_gib.items())
                w(f"  {step} on {dev}: {e.total_gib:g} GiB -> {e.verdict}")
                w(f"    components (GiB per GPU): {parts}")
                rot = f" -> {e.rule_of_thumb_verdict}" if e.rule_of_thumb_verdict != "unknown" else ""
                if e.rule_of_thumb:  # training's; serving and quantizing have none
                    w(f"    rule of thumb: {e.rule_of_thumb} = {e.rule_of_thumb_gib:g} GiB per GPU{rot}")
                if e.disagreement:
                    w("    warning: the estimate and the rule of thumb disagree about fitting")
                for note in e.notes:
                    w(f"    note: {note}")
                for sug in e.suggestions:
                    w(f"    try: {sug}")
    if plan.psu is not None:
        from ftkit.plan.power import IDLE_GPU_W, phase_budgets

        w("")
        phases = phase_budgets(plan.psu)
        many = bool(plan.psu.phases)
        w("PSU budget (worst-case transients" + (f", per power phase; idle GPUs at {IDLE_GPU_W} W):" if many else "):"))
        for b in phases:
            ind = "    " if many else "  "
            if many:
                w(f"  {b.phase}: {', '.join(b.steps)}")
            for d in b.gpus:
                if not d.in_use:
                    w(f"{ind}GPU {d.gpu} {d.model}: idle = {d.worst_w:.0f} W")
                    continue
                lim = f"{d.limit_w} W {'cap' if d.capped else 'default limit'}" if d.limit_w else "limit unknown"
                worst = f"{d.worst_w:.0f} W" if d.worst_w is not None else "?"
                w(f"{ind}GPU {d.gpu} {d.model}: {lim} x {d.transient_factor:g} transient = {worst}")
            w(f"{ind}system: {b.system_w} W")
            total = f"{b.worst_case_w:.0f} W" if b.worst_case_w is not None else "unknown"
            budget = f"{b.budget_w:.0f} W ({b.psu_w} W PSU x {b.safety_margin:g})" if b.budget_w else "unknown"
            w(f"{ind}worst case {total} against {budget} -> {b.verdict}")
            if b.uncapped_worst_case_w is not None:
                w(f"{ind}without the caps: {b.uncapped_worst_case_w:.0f} W -> {b.uncapped_verdict}")
            elif not many and plan.psu_uncapped is not None and plan.psu_uncapped.worst_case_w is not None:
                u = plan.psu_uncapped
                w(f"{ind}without the caps: {u.worst_case_w:.0f} W -> {u.verdict}")
            for note in b.notes:
                w(f"{ind}note: {note}")
    if plan.warnings:
        w("")
        for warn in plan.warnings:
            w(f"warning: {esc(warn)}")
    if not configs and any(s.files for s in plan.steps):
        w("")
        w("generated configs are summarised; `ftkit plan --configs` prints their text")
    w("")
    w("run directory layout:")
    for k, v in plan.layout.items():
        w(f"  {k:<24} {v}")
    return "\n".join(out)


def _cluster(plan: Plan, w: Any) -> None:
    c = plan.cluster
    if c is None:
        return
    w("")
    w(f"cluster: {len(c.nodes)} node(s), rendezvous {esc(c.rendezvous)} (c10d), shared storage {esc(str(c.shared))}")
    measured = c.allreduce
    if not measured:
        w("  all-reduce between the nodes: not measured yet (`ftkit bench RECIPE --allreduce`); run it before a "
          "long multi-node job")
        return
    w(f"  all-reduce measured {measured.taken} ({measured.backend}, {measured.world_size} processes):")
    for row in measured.results:
        w(f"    {row['bytes']:>12} bytes: algbw {row['algbw_gbps']:g} GB/s, busbw {row['busbw_gbps']:g} GB/s")
    for sid, e in (c.expected_scaling or {}).items():
        if not e:
            continue
        w(f"  expected scaling of {sid}: {e['gradient_bytes']} bytes of gradients per optimizer step take about "
          f"{e['allreduce_s_per_step'] * 1e3:.2f} ms to all-reduce ({e['basis']}); a node must compute at least "
          f"{e['min_compute_s_per_step'] * 1e3:.2f} ms per step for {e['keep_efficiency']:.0%} scaling efficiency "
          "(no overlap assumed)")

