"""Issue #20, standard evaluation: an eval step's `harness:` runs lm-evaluation-harness against a
serve step's OpenAI-compatible endpoint.

Validate: the server is a serve step before the eval, task paths exist, task files that ask for
log-probabilities are refused where the server cannot give them, `models: []` only with a
harness; every error one located line. Plan: the endpoint and model name as the server was
planned, the served model's tokenizer, task paths as the step sees them, no GPU for the harness
alone; docker and a local Python without lm-eval refused, located. The engine's result rows and
the console line. The run itself: tests/e2e/test_quickstart_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import builders as b
from tests.builders import CPU, CPU_DOCKER, recipe_file, step, step_config
from tests.conftest import RECIPES, run_cli

ALL = {"lm-eval": "0.4.13", "tenacity": "9.2.1", "aiohttp": "3.14.5"}

TRAIN_MERGE = "  - {type: train, method: lora, max_steps: 1}\n  - {type: merge}\n"
ROW = {"instruction": "a", "input": "x", "output": "b"}
SERVE = "  - {type: serve, model: merged, port: 8791, ENGINE}\n"
TASK = """\
task: cat
dataset_path: json
dataset_kwargs: {data_files: {test: /nowhere/rows.jsonl}}
test_split: test
output_type: OUTPUT
doc_to_text: "{{input}}"
doc_to_target: "{{output}}"
"""


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    from ftkit import prepare

    packages: dict[str, str | None] = dict(ALL)
    monkeypatch.setattr(prepare, "quantize_packages", lambda: packages)
    return packages


def recipe(tmp: Path, steps: str, *, engine: str = "engine: auto", output: str = "generate_until",
           template: str = "alpaca") -> Path:
    (tmp / "tasks").mkdir(parents=True, exist_ok=True)
    (tmp / "tasks" / "cat.yaml").write_text(TASK.replace("OUTPUT", output))
    return recipe_file(tmp, rows=[ROW], name="h", dataset={"template": template},
                       steps=TRAIN_MERGE + SERVE.replace("ENGINE", engine) + steps)


def plan_json(path: Path, machine: Path = CPU) -> dict:
    return b.plan_json(path, machine)


def eval_job(p: dict, sid: str = "eval") -> dict:
    return step_config(step(p, sid), f"configs/eval-{sid}.json")


def test_the_plan_names_the_servers_endpoint_model_and_tokenizer(tmp_path: Path, installed: dict) -> None:
    path = recipe(tmp_path, "  - {type: eval, models: [], harness: {tasks: [tasks/cat.yaml, gsm8k], limit: 5, "
                            "num_fewshot: 0}}\n")
    p = plan_json(path)
    step = next(s for s in p["steps"] if s["id"] == "eval")
    h = eval_job(p)["harness"]
    merged = f"{p['run_dir']}/steps/merge/model"
    assert h["server"] == "serve" and h["engine"] == "transformers" and h["api"] == "completions"
    assert h["lm_eval_model"] == "local-completions" and h["base_url"] == "http://127.0.0.1:8791/v1/completions"
    assert h["model"] == merged and h["tokenizer"] == merged  # transformers serve names the model by its path
    assert h["tasks"] == [{"given": "tasks/cat.yaml", "spec": str(tmp_path / "tasks" / "cat.yaml"), "path": True},
                          {"given": "gsm8k", "spec": "gsm8k", "path": False}]
    assert (h["limit"], h["num_fewshot"]) == (5, 0)
    assert step["gpus"] == [] and step["lease"] is None  # requests only: no model loaded here
    assert step["outputs"] == {"summary": "steps/eval/summary.json"}
    out = run_cli("plan", str(path), "--machine", str(CPU)).out
    assert ("run lm-evaluation-harness (local-completions) on tasks/cat.yaml, gsm8k against serve's endpoint "
            "http://127.0.0.1:8791/v1/completions") in out
    assert "lm-eval local-completions on tasks/cat.yaml, gsm8k, 5 documents each, 0-shot" in out


def test_chat_and_both_modes(tmp_path: Path, installed: dict) -> None:
    path = recipe(tmp_path, "  - {type: eval, models: [base, merged], prompts: [{prompt: a, expected: b}], "
                            "harness: {tasks: [tasks/], model: chat}}\n", template="chatml")
    p = plan_json(path)
    h = eval_job(p)["harness"]
    assert h["lm_eval_model"] == "local-chat-completions" and h["base_url"].endswith("/v1/chat/completions")
    assert h["tokenizer"] is None and h["tasks"][0]["spec"] == str(tmp_path / "tasks")
    step = next(s for s in p["steps"] if s["id"] == "eval")
    assert "score held-out prompts (exact) on: base, merged; then run lm-evaluation-harness" in step["description"]
    assert set(step["outputs"]) == {"results", "summary"}


H = "  - {type: eval, models: [], harness: HARNESS}\n"
BAD = {
    "server is not a serve step": ("{tasks: [gsm8k], server: train}", "steps[3].harness.server",
                                   "the harness needs serve step 'train' before this step"),
    "a missing task file": ("{tasks: [tasks/nope.yaml]}", "steps[3].harness.tasks[0]", "'tasks/nope.yaml' does not exist"),
    "a path out of the recipe's tree": ("{tasks: [../x.yaml]}", "steps[3].harness.tasks[0]", ""),
    "a task twice": ("{tasks: [gsm8k, gsm8k]}", "steps[3].harness.tasks[1]", "'gsm8k' is listed twice"),
    "no tasks": ("{tasks: []}", "steps[3].harness.tasks", ""),
    "an unknown field": ("{tasks: [gsm8k], fewshot: 2}", "steps[3].harness.fewshot", ""),
    "chat without a chat template": ("{tasks: [gsm8k], model: chat}", "steps[3].harness.model",
                                     "the served model has no chat template"),
    "a bad endpoint kind": ("{tasks: [gsm8k], model: embeddings}", "steps[3].harness.model", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_refuses_located(tmp_path: Path, case: str) -> None:
    harness, where, says = BAD[case]
    path = recipe(tmp_path, H.replace("HARNESS", harness))
    result = run_cli("validate", str(path))
    assert result.code == 2, result.out
    lines = [x for x in result.err.strip().splitlines() if x.startswith(f"{path}:")]
    assert any(f": {where}: " in x and says in x for x in lines), result.err


def test_no_server_before_the_eval(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, rows=[ROW], name="h",
                       steps=TRAIN_MERGE + "  - {type: eval, models: [], harness: {tasks: [gsm8k]}}\n")
    result = run_cli("validate", str(path))
    assert result.code == 2
    assert f"{path}:8:39: steps[2].harness: the harness needs a serve step before this step" in result.err


def test_models_empty_needs_a_harness(tmp_path: Path) -> None:
    path = recipe(tmp_path, "  - {type: eval, models: []}\n")
    result = run_cli("validate", str(path))
    assert result.code == 2 and ": steps[3].models: no models to score: name at least one, or give harness" in result.err


def test_logprob_tasks_refused_where_the_server_cannot_give_logprobs(tmp_path: Path, installed: dict) -> None:
    """transformers serve (named, or chosen by engine: auto) and a chat endpoint give no prompt
    log-probabilities: a multiple_choice task file is refused at validate or plan, located."""
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"), engine="engine: transformers",
                  output="multiple_choice")
    result = run_cli("validate", str(path))
    assert result.code == 2
    assert ": steps[3].harness.tasks[0]: cat (multiple_choice): needs the prompt's log-probabilities" in result.err
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/], model: chat}"), output="loglikelihood",
                  template="chatml")
    result = run_cli("validate", str(path))
    assert result.code == 2 and ": steps[3].harness.tasks[0]: cat (loglikelihood): a chat endpoint" in result.err
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"), output="multiple_choice")
    assert run_cli("validate", str(path)).code == 0  # auto: vLLM would give them
    result = run_cli("plan", str(path), "--machine", str(CPU))  # ... but here auto is transformers serve
    assert result.code == 2
    assert (f"{path}:9:39: steps[3].harness: tasks[0] cat: needs the prompt's log-probabilities (echo + logprobs), "
            "which step serve's server (transformers) does not give") in result.err


def test_docker_refused_located(tmp_path: Path, installed: dict) -> None:
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"))
    result = run_cli("plan", str(path), "--machine", str(CPU_DOCKER))
    assert result.code == 2
    assert (f"{path}:9:39: steps[3].harness: lm-evaluation-harness is not in ftkit's images: run this recipe with "
            "--executor local") in result.err


def test_local_without_lm_eval_refused_located(tmp_path: Path, installed: dict) -> None:
    installed["lm-eval"] = None
    installed["tenacity"] = None
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"))
    result = run_cli("plan", str(path), "--machine", str(CPU))
    assert result.code == 2
    assert (f"{path}:9:39: steps[3].harness: lm-eval, tenacity not installed in this Python environment") in result.err
    assert "pip install 'lm-eval[api]'" in result.err


def test_resume_refuses_without_lm_eval(tmp_path: Path, installed: dict) -> None:
    from ftkit import prepare
    from ftkit.errors import PlanError
    from ftkit.run import preflight

    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"))
    plan = prepare.prepare(str(path), str(CPU), run_dir=str(tmp_path / "runs" / "r")).plan
    preflight.engines_of_plan(plan)
    installed["lm-eval"] = None
    with pytest.raises(PlanError, match="step eval: lm-eval not installed"):
        preflight.engines_of_plan(plan)


def test_task_types_follow_includes(tmp_path: Path) -> None:
    from ftkit.recipe.harness import is_path, task_types

    (tmp_path / "_base.yaml").write_text("output_type: multiple_choice\ndoc_to_text: !function utils.doc\n")
    (tmp_path / "a.yaml").write_text("include: _base.yaml\ntask: a\n")
    (tmp_path / "b.yaml").write_text("task: b\n")
    (tmp_path / "group.yaml").write_text("group: g\ntask: [a, b]\n")
    assert task_types(tmp_path) == {"a": "multiple_choice", "b": "generate_until"}
    assert task_types(tmp_path / "a.yaml") == {"a": "multiple_choice"}
    assert [is_path(t) for t in ("gsm8k", "t.yaml", "./tasks", "tasks/x")] == [False, True, True, True]


def test_result_rows_and_the_console_line() -> None:
    from ftkit.engines.harness import rows_of
    from ftkit.run.display import eval_text

    rows = rows_of({"results": {"cat": {"alias": "cat", "exact_match,none": 0.875, "exact_match_stderr,none": 0.125,
                                        "f1,strip": 0.5, "f1_stderr,strip": "N/A"}},
                    "n-samples": {"cat": {"original": 60, "effective": 8}}})
    assert rows == [{"task": "cat", "metric": "exact_match", "filter": "none", "value": 0.875, "stderr": 0.125,
                     "samples": 8},
                    {"task": "cat", "metric": "f1", "filter": "strip", "value": 0.5, "stderr": None, "samples": 8}]
    harness = {"server": "serve", "results": rows}
    assert eval_text({"models": {}, "order": [], "passed": True, "harness": harness}) == \
        "lm-eval cat exact_match 0.875 ± 0.12 (8)"
    both = eval_text({"models": {"base": {"accuracy": 10.0, "correct": 6}}, "order": ["base"], "prompts": 60,
                      "score": "exact", "passed": True, "harness": harness})
    assert both == "base 10.0% (6/60) (exact match): passed; lm-eval cat exact_match 0.875 ± 0.12 (8)"


def test_scoring_models_on_the_servers_gpu_refused(tmp_path: Path, installed: dict) -> None:
    """The eval's own scoring takes the first GPU under the lease, and a server on it yields
    (stops) while the step runs: the harness in the same step would find no server."""
    path = recipe(tmp_path, "  - {type: eval, models: [merged], prompts: [{prompt: a, expected: b}], "
                            "harness: {tasks: [gsm8k]}}\n", engine="engine: auto, gpus: [0]")
    result = run_cli("plan", str(path), "--machine", str(RECIPES / "machines" / "dual-4090.yaml"))
    assert result.code == 2
    assert (f"{path}:9:26: steps[3].models: scoring models takes GPU(s) [0] from serve, which yields them (stops) "
            "while the step runs") in result.err


def test_engine_refuses_named_logprob_tasks_and_runs_in_the_tasks_directory(tmp_path: Path) -> None:
    """A named task's kind is known once lm-eval has loaded it: the engine refuses it before any
    request where the server cannot give log-probabilities; task files run in their directory."""
    from ftkit.engines.harness import model_args, refuse_logprobs, task_dir
    from ftkit.errors import EngineError

    h = {"api": "completions", "engine": "transformers", "base_url": "http://127.0.0.1:1/v1/completions", "model": "m",
         "tokenizer": "/models/m", "num_concurrent": 1, "tasks": []}
    with pytest.raises(EngineError, match=r"hellaswag \(multiple_choice\): needs the prompt's log-probabilities"):
        refuse_logprobs(h, {"hellaswag": "multiple_choice", "gsm8k": "generate_until"})
    refuse_logprobs({**h, "engine": "vllm"}, {"hellaswag": "multiple_choice"})
    with pytest.raises(EngineError, match="a chat endpoint"):
        refuse_logprobs({**h, "api": "chat", "engine": "vllm"}, {"hellaswag": "multiple_choice"})
    args = model_args(h)
    assert args["tokenized_requests"] is False and args["tokenizer_backend"] == "huggingface"
    assert model_args({**h, "tokenizer": None})["tokenizer_backend"] == "none"
    (tmp_path / "t").mkdir()
    one = [{"given": "t/a.yaml", "spec": str(tmp_path / "t" / "a.yaml"), "path": True},
           {"given": "gsm8k", "spec": "gsm8k", "path": False}]
    assert task_dir({"tasks": one}) == tmp_path / "t"
    two = one + [{"given": "u/", "spec": str(tmp_path), "path": True}]
    assert task_dir({"tasks": two}) is None


def test_task_files_that_would_hang_run_python_or_leave_the_tree_are_refused(tmp_path: Path, installed: dict) -> None:
    """From a hostile review: a FIFO named *.yaml in a task directory hung validate; a task's
    `!function` (lm-eval imports that Python) went unchecked; `include:` could reach any file;
    a task file beside the recipe made lm-eval index the recipe's whole directory."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/]}"))
    os.mkfifo(tmp_path / "tasks" / "zz.yaml")
    proc = subprocess.run([sys.executable, "-m", "ftkit.cli.main", "validate", str(path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "toolkit")})
    assert proc.returncode == 0, proc.stderr  # the FIFO is skipped, never opened for a blocking read
    (tmp_path / "tasks" / "zz.yaml").unlink()
    (tmp_path / "tasks" / "cat.yaml").write_text(TASK.replace("OUTPUT", "generate_until")
                                                 + "process_docs: !function helpers.keep\n")
    result = run_cli("validate", str(path))
    assert result.code == 2 and "!function helpers.keep imports helpers.py, which does not exist" in result.err
    (tmp_path / "tasks" / "helpers.py").write_text("def keep(docs):\n    return docs\n")
    assert run_cli("validate", str(path)).code == 0
    (tmp_path / "tasks" / "cat.yaml").write_text("include: ../../../etc/base.yaml\n" + TASK.replace("OUTPUT", "generate_until"))
    one = recipe(tmp_path / "one", H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"))
    (tmp_path / "one" / "tasks" / "cat.yaml").write_text("include: /etc/base.yaml\n" + TASK.replace("OUTPUT", "x"))
    result = run_cli("validate", str(one))
    assert result.code == 2 and "include '/etc/base.yaml' leaves the task's directory" in result.err, result.err
    root = recipe(tmp_path / "root", H.replace("HARNESS", "{tasks: [cat.yaml]}"))
    (tmp_path / "root" / "cat.yaml").write_text(TASK.replace("OUTPUT", "generate_until"))
    result = run_cli("validate", str(root))
    assert result.code == 2 and "put task files in a directory of their own" in result.err, result.err


def test_the_plan_names_the_python_a_task_file_imports(tmp_path: Path, installed: dict) -> None:
    path = recipe(tmp_path, H.replace("HARNESS", "{tasks: [tasks/cat.yaml]}"))
    (tmp_path / "tasks" / "cat.yaml").write_text(TASK.replace("OUTPUT", "generate_until")
                                                 + "process_docs: !function helpers.keep\n")
    (tmp_path / "tasks" / "helpers.py").write_text("def keep(docs):\n    return docs\n")
    out = run_cli("plan", str(path), "--machine", str(CPU))
    assert out.code == 0, out.err
    assert "lm-eval imports and runs Python named by the task files (`!function`): tasks/helpers.py" in out.out
