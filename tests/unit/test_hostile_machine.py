"""Issue #24: hostile machine profiles are refused, located (GPU model, PSU, lease directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.unit.test_bad_input_config import refused

HEAD = "ftkit: 1\nkind: machine\nname: m\n"


@pytest.mark.parametrize("model", ["../../etc/passwd", "RTX 4090/../x", "RTX\\n4090", "RTX 4090\\u001b[2J",
                                   "-rf", "", "RTX 4090\\u202e"])
def test_a_gpu_model_with_a_path_or_control_characters_is_refused(tmp_path: Path, model: str) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(HEAD + f'gpus:\n  - {{index: 0, model: "{model}"}}\n')
    err = refused(run_cli("validate", str(m)), "gpus[0].model")
    assert "\x1b" not in err and "\u202e" not in err


@pytest.mark.parametrize("model", ["RTX 4090", "A100-SXM4-80GB", "H100 (PCIe)", "GeForce RTX 3090 Ti"])
def test_ordinary_gpu_models_pass(tmp_path: Path, model: str) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(HEAD + f'gpus:\n  - {{index: 0, model: "{model}"}}\n')
    assert run_cli("validate", str(m)).code == 0


@pytest.mark.parametrize("psu, system", [(200, 500), (500, 450), (1000, 900)])
def test_a_psu_no_larger_than_the_system_is_refused(tmp_path: Path, psu: int, system: int) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(HEAD + f"psu: {{watts: {psu}}}\nsystem_watts: {system}\n")
    refused(run_cli("validate", str(m)), "nothing is left for the GPUs")


def test_a_world_writable_lease_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    lease.mkdir()
    os.chmod(lease, 0o777)
    m = tmp_path / "m.yaml"
    m.write_text(HEAD + f"paths: {{lease: {lease}}}\n")
    refused(run_cli("validate", str(m)), "sticky bit")
    os.chmod(lease, 0o1777)
    assert run_cli("validate", str(m)).code == 0
    os.chmod(lease, 0o755)
    assert run_cli("validate", str(m)).code == 0


def test_an_unknown_docker_host_scheme_is_refused(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text(HEAD + "docker: {host: 'gopher://engine:70'}\n")
    refused(run_cli("validate", str(m)), "unknown scheme")
