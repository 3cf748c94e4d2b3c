"""The CLI: lists only working commands, starts without importing torch/transformers, and
turns errors into one line and an exit code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import RECIPES, run_cli

COMMANDS = {"bench", "build", "compose", "doctor", "down", "export", "images", "lease", "lock", "logs", "merge", "plan",
            "power", "report", "schema", "status", "up", "validate"}


def test_help_lists_the_working_commands() -> None:
    result = run_cli("--help")
    assert result.code == 0
    listed = {ln.split()[0] for ln in result.out.split("Commands:")[1].splitlines() if ln.strip()}
    assert listed == COMMANDS


def _imports_after(args: list[str]) -> set[str]:
    code = (
        "import sys\nfrom ftkit.cli.main import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print(','.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.strip().splitlines()[-1].split(","))


def test_help_and_validate_do_not_import_heavy_modules() -> None:
    for args in (["--help"], ["validate", str(RECIPES / "quickstart.yaml")], ["report", "--help"],
                 ["export", "--help"]):
        mods = _imports_after(args)
        for heavy in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "docker", "rich", "matplotlib",
                      "numpy", "psutil", "gguf", "llama_cpp"):
            assert heavy not in mods, (args, heavy)


def _project() -> dict:  # type: ignore[type-arg]
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _extra_closure(extra: str) -> list[str]:
    """The requirements `pip install 'ftkit[EXTRA]'` brings, ftkit's own extras followed."""
    project = _project()
    out, todo, seen = list(project["dependencies"]), [extra], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for req in project["optional-dependencies"][name]:
            m = re.fullmatch(r"ftkit\[([a-z,]+)\]", req.replace(" ", ""))
            if m:
                todo += [e for e in m.group(1).split(",") if e not in seen]
            else:
                out.append(req)
    return out


def test_the_quickstart_install_brings_what_report_needs() -> None:
    """The README installs `.[train]` and then points at `ftkit report`: that install must
    bring matplotlib (report's plots), while the base install stays light."""
    names = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in _extra_closure("train")}
    assert {"matplotlib", "psutil", "torch"} <= names, names
    base = _project()["dependencies"]
    assert not [r for r in base if r.lower().startswith(("matplotlib", "torch"))]


def test_version() -> None:
    result = run_cli("--version")
    assert result.code == 0 and "ftkit, version" in result.out


def test_up_dry_run_prints_the_plan_and_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("up", str(RECIPES / "quickstart.yaml"), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 0, result.err
    assert "accelerate.commands.launch" in result.out and "run directory:" in result.out
    assert not (tmp_path / "runs").exists()


def test_missing_machine_path_variable_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    machine = tmp_path / "m.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: bare\nexecutor: local\n"
                       "gpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 1, model: RTX 4090}\n")
    result = run_cli("plan", str(RECIPES / "llama31-8b-lora-2gpu.yaml"), "--machine", str(machine))
    assert result.code == 2
    assert "dataset.path: ${datasets} is not set in machine profile 'bare': add paths.datasets" in result.err


def test_up_refuses_a_gpu_machine_it_is_not_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """zorac's recipe on this GPU-less host: refused before anything is written or capped."""
    from tests.conftest import RECIPES as R

    data = tmp_path / "datasets"
    data.mkdir()
    (data / "my-writing.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                           '"content": "b"}]}\n' * 40)  # enough for the eval split
    machine = tmp_path / "zorac.yaml"
    machine.write_text((R / "machines" / "zorac.yaml").read_text().replace("/srv/datasets", str(data)))
    result = run_cli("up", str(R / "mistral-small-24b-qlora-2x24gb.yaml"), "--machine", str(machine),
                     "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 2, result.err
    assert "no NVIDIA driver" in result.err and "FTKIT_SIMULATED_GPUS" in result.err
    assert not (tmp_path / "runs").exists()


def test_up_refuses_missing_inputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import RECIPES as R

    result = run_cli("up", str(R / "mistral-small-24b-qlora-2x24gb.yaml"), "--machine", str(R / "machines" / "zorac.yaml"),
                     "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 2
    assert "dataset.path: /srv/datasets/my-writing.jsonl does not exist on this machine" in result.err
    assert not (tmp_path / "runs").exists()


def test_up_refuses_a_recipe_that_does_not_fit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    machine = tmp_path / "m.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: small\nexecutor: local\npsu: {watts: 800}\n"
                       "paths: {datasets: /data}\n"
                       "gpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 1, model: RTX 4090}\n")
    result = run_cli("up", str(RECIPES / "llama31-8b-lora-2gpu.yaml"), "--machine", str(machine))
    assert result.code == 2
    assert "PSU budget exceeded" in result.err and "cap every GPU at" in result.err


def test_the_hint_for_a_gpu_recipe_on_a_host_without_gpus_names_a_profile_that_plans_it(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    result = run_cli("plan", str(RECIPES / "llama31-8b-lora-1gpu.yaml"))
    assert result.code == 2
    hint = next(ln for ln in result.err.splitlines() if "hint:" in ln)
    named = re.findall(r"\S+machines/\S+\.yaml", hint)
    assert named and "cpu" not in named[0], hint  # not the first alphabetically (cpu-docker), which fails the same way
    for profile in named:
        assert run_cli("plan", str(RECIPES / "llama31-8b-lora-1gpu.yaml"), "--machine", profile.rstrip(",)")).code == 0
    # no profile beside the recipe plans it: the hint says so instead of naming one that fails
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / "cpu.yaml").write_text((RECIPES / "machines" / "cpu.yaml").read_text())
    (tmp_path / "r.yaml").write_text((RECIPES / "llama31-8b-lora-1gpu.yaml").read_text())
    result = run_cli("plan", str(tmp_path / "r.yaml"), cwd=tmp_path)
    assert result.code == 2 and "none of the machine profiles beside the recipe plans it" in result.err


def test_error_messages_reach_the_terminal_escaped(tmp_path: Path) -> None:
    """Whatever a message quotes (a run name, a path, a server's words), the one place errors
    are printed escapes its control characters; its own line breaks (the hint) stay."""
    for args in (["status", "x\x1b]0;owned\x07\x1b[2J", "--runs-dir", str(tmp_path)],
                 ["logs", "x\x1b[2J\ry", "--runs-dir", str(tmp_path)]):
        result = run_cli(*args)
        assert result.code == 2
        assert "\x1b" not in result.err and "\x07" not in result.err and "\r" not in result.err, result.err
        assert "\\x1b" in result.err and "\n  hint: " in result.err
