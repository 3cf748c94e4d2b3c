"""The CLI: lists only working commands, starts without importing torch/transformers, and
turns errors into one line and an exit code."""

from __future__ import annotations

import subprocess
import sys

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
    for args in (["--help"], ["validate", str(RECIPES / "quickstart.yaml")]):
        mods = _imports_after(args)
        for heavy in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "docker", "rich"):
            assert heavy not in mods, (args, heavy)


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
