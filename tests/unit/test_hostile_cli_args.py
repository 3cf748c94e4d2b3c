"""Issue #24: hostile command-line arguments. Each is refused with exit 2 and one line on
stderr, before anything runs or is written: non-ASCII digits in GPU lists (`int("١")` is
1), non-finite or negative numbers (`1e999`, `nan`, `inf`), a --sleep-url off loopback,
paths longer than the system allows or inside /proc, /sys and /dev, and Kubernetes names
kubectl would refuse. The readers are ftkit.strict and the click types in ftkit.cli.params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ftkit.cli.params import FiniteFloat
from ftkit.errors import UserError
from ftkit.lease.backstops import parse_power_caps
from ftkit.lease.gpus import parse_gpus
from ftkit.strict import checked_path, dns_label, dns_subdomain, finite_float, gpu_index, loopback_http_url
from tests.conftest import ROOT, run_cli

RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
LONG_NAME = "a" * 300  # one component over NAME_MAX (255)
LONG_PATH = "/tmp/" + "/".join(["b" * 200] * 25)  # 5000+ bytes, over PATH_MAX (4096)
SERVE = ["lease", "--gpus", "0", "--role", "serve", "--no-wait"]
TRAIN = ["lease", "--gpus", "0", "--no-wait"]

LEASE = {
    # GPU lists: ASCII digits only
    "gpus-arabic-indic": (["lease", "--gpus", "١", "--no-wait", "--", "true"], "--gpus"),
    "gpus-fullwidth": (["lease", "--gpus", "１", "--no-wait", "--", "true"], "--gpus"),
    "gpus-devanagari-in-list": (["lease", "--gpus", "0,२", "--no-wait", "--", "true"], "--gpus"),
    "gpus-superscript": (["lease", "--gpus", "0,²", "--no-wait", "--", "true"], "--gpus"),  # isdigit(), int() fails
    "gpus-newline": (["lease", "--gpus", "0\n1", "--no-wait", "--", "true"], "--gpus"),
    "gpus-huge": (["lease", "--gpus", "9" * 5000, "--no-wait", "--", "true"], "--gpus"),  # int() digit limit
    "gpus-plus": (["lease", "--gpus", "+1", "--no-wait", "--", "true"], "--gpus"),
    # --max-power-w
    "power-inf-overflow": ([*TRAIN, "--max-power-w", "1e999", "--", "true"], "--max-power-w"),
    "power-inf": ([*TRAIN, "--max-power-w", "inf", "--", "true"], "--max-power-w"),
    "power-nan": ([*TRAIN, "--max-power-w", "nan", "--", "true"], "--max-power-w"),
    "power-per-gpu-nan": ([*TRAIN, "--max-power-w", "0=nan", "--", "true"], "--max-power-w"),
    "power-negative": ([*TRAIN, "--max-power-w", "-350", "--", "true"], "--max-power-w"),
    "power-absurd": ([*TRAIN, "--max-power-w", "99999", "--", "true"], "--max-power-w"),
    "power-arabic-watts": ([*TRAIN, "--max-power-w", "٣٥٠", "--", "true"], "--max-power-w"),
    "power-arabic-gpu": ([*TRAIN, "--max-power-w", "٠=350", "--", "true"], "--max-power-w"),
    "power-underscore": ([*TRAIN, "--max-power-w", "3_50", "--", "true"], "--max-power-w"),
    # --timeout and --grace
    "timeout-nan": (["lease", "--gpus", "0", "--timeout", "nan", "--", "true"], "--timeout"),
    "timeout-inf": (["lease", "--gpus", "0", "--timeout", "inf", "--", "true"], "--timeout"),
    "timeout-overflow": (["lease", "--gpus", "0", "--timeout", "1e999", "--", "true"], "--timeout"),
    "timeout-negative": (["lease", "--gpus", "0", "--timeout", "-1", "--", "true"], "--timeout"),
    "timeout-fullwidth": (["lease", "--gpus", "0", "--timeout", "５", "--", "true"], "--timeout"),
    "grace-inf": ([*TRAIN, "--grace", "inf", "--", "true"], "--grace"),
    "grace-nan": ([*TRAIN, "--grace", "nan", "--", "true"], "--grace"),
    "grace-negative-inf": ([*TRAIN, "--grace", "-inf", "--", "true"], "--grace"),
    "grace-negative": ([*TRAIN, "--grace", "-0.5", "--", "true"], "--grace"),
    "grace-junk": ([*TRAIN, "--grace", "soon", "--", "true"], "--grace"),
    # --sleep-url: loopback http only
    "sleep-remote-name": ([*SERVE, "--sleep-url", "http://example.com:8000", "--", "true"], "--sleep-url"),
    "sleep-remote-ip": ([*SERVE, "--sleep-url", "http://10.0.0.2:8000", "--", "true"], "--sleep-url"),
    "sleep-any-address": ([*SERVE, "--sleep-url", "http://0.0.0.0:8000", "--", "true"], "--sleep-url"),
    "sleep-https": ([*SERVE, "--sleep-url", "https://127.0.0.1:8000", "--", "true"], "--sleep-url"),
    "sleep-ftp": ([*SERVE, "--sleep-url", "ftp://127.0.0.1", "--", "true"], "--sleep-url"),
    "sleep-userinfo-trick": ([*SERVE, "--sleep-url", "http://127.0.0.1@evil.example", "--", "true"], "--sleep-url"),
    "sleep-localhost-suffix": ([*SERVE, "--sleep-url", "http://localhost.evil.example", "--", "true"],
                               "--sleep-url"),
    "sleep-user": ([*SERVE, "--sleep-url", "http://me:pw@127.0.0.1:8000", "--", "true"], "--sleep-url"),
    "sleep-path": ([*SERVE, "--sleep-url", "http://127.0.0.1:8000/admin", "--", "true"], "--sleep-url"),
    "sleep-query": ([*SERVE, "--sleep-url", "http://127.0.0.1:8000?x=1", "--", "true"], "--sleep-url"),
    "sleep-port-arabic": ([*SERVE, "--sleep-url", "http://127.0.0.1:٨٠٠٠", "--", "true"], "--sleep-url"),
    "sleep-port-zero": ([*SERVE, "--sleep-url", "http://127.0.0.1:0", "--", "true"], "--sleep-url"),
    "sleep-port-range": ([*SERVE, "--sleep-url", "http://127.0.0.1:99999", "--", "true"], "--sleep-url"),
    "sleep-mapped-v4": ([*SERVE, "--sleep-url", "http://[::ffff:10.0.0.2]:8000", "--", "true"], "--sleep-url"),
    "sleep-no-scheme": ([*SERVE, "--sleep-url", "localhost:8000", "--", "true"], "--sleep-url"),
    "sleep-newline": ([*SERVE, "--sleep-url", "http://127.0.0.1:8000\nx", "--", "true"], "--sleep-url"),
}

OTHER = {
    # the same GPU-list and number readers in the other commands
    "power-set-gpus-arabic": (["power", "set", "--gpus", "١", "--watts", "300", "--dry-run"], "--gpus"),
    "power-restore-gpus-fullwidth": (["power", "restore", "--gpus", "１", "--dry-run"], "--gpus"),
    "bench-gpus-arabic": (["bench", RECIPE, "--gpus", "0", "--gpus", "٠,١", "--dry-run"], "--gpus"),
    "bench-keep-efficiency-nan": (["bench", RECIPE, "--gpus", "0", "--gpus", "0,1", "--keep-efficiency", "nan",
                                   "--dry-run"], "--keep-efficiency"),
    "merge-shard-inf": (["merge", "--base", "b", "--adapter", "a", "-o", "m", "--max-shard-gb", "inf"],
                        "--max-shard-gb"),
    "merge-shard-overflow": (["merge", "--base", "b", "--adapter", "a", "-o", "m", "--max-shard-gb", "1e999"],
                             "--max-shard-gb"),
    # paths longer than the system allows
    "compose-long-name": (["compose", RECIPE, "-o", LONG_NAME], "--output"),
    "compose-long-path": (["compose", RECIPE, "-o", LONG_PATH], "--output"),
    "up-long-name": (["up", RECIPE, "--dry-run", "--runs-dir", LONG_NAME], "--runs-dir"),
    "up-long-path": (["up", RECIPE, "--dry-run", "--runs-dir", LONG_PATH], "--runs-dir"),
    "export-long-output": (["export", RECIPE, "-o", LONG_NAME], "--output"),
    "schema-long-output": (["schema", "-o", LONG_PATH], "--output"),
    "status-long-runs-dir": (["status", "--runs-dir", LONG_NAME], "--runs-dir"),
    "logs-long-run": (["logs", LONG_NAME], "aaaa"),  # a name, not a flag: the backstop in cli.main names it
    "merge-long-output": (["merge", "--base", "b", "--adapter", "a", "-o", LONG_NAME, "--dry-run"], "--output"),
    "lease-long-dir": (["lease", "--lease-dir", LONG_PATH, "--show"], "--lease-dir"),
    # kernel and device files are no place for output, dry run or not
    "up-proc-self": (["up", RECIPE, "--dry-run", "--runs-dir", "/proc/self"], "/proc"),
    "up-sys": (["up", RECIPE, "--dry-run", "--runs-dir", "/sys/kernel"], "/sys"),
    "up-dev-shm": (["up", RECIPE, "--dry-run", "--runs-dir", "/dev/shm/ftkit-runs"], "/dev"),
    "up-proc-dotdot": (["up", RECIPE, "--dry-run", "--runs-dir", "/tmp/../proc/1"], "/proc"),
    "up-resume-proc": (["up", "--resume", "/proc/self", "--dry-run"], "/proc"),
    "compose-proc": (["compose", RECIPE, "-o", "/proc/self/stack"], "/proc"),
    "report-sys": (["report", "/tmp", "-o", "/sys/ftkit-report"], "/sys"),
    "merge-dev": (["merge", "--base", "b", "--adapter", "a", "-o", "/dev/ftkit-model", "--dry-run"], "/dev"),
    "status-proc": (["status", "--runs-dir", "/proc"], "/proc"),
    # Kubernetes names kubectl would refuse only when the manifest is applied
    "ns-upper": (["export", RECIPE, "--namespace", "Team"], "--namespace"),
    "ns-underscore": (["export", RECIPE, "--namespace", "team_a"], "--namespace"),
    "ns-leading-dash": (["export", RECIPE, "--namespace", "-team"], "--namespace"),
    "ns-trailing-dash": (["export", RECIPE, "--namespace", "team-"], "--namespace"),
    "ns-dot": (["export", RECIPE, "--namespace", "team.a"], "--namespace"),
    "ns-too-long": (["export", RECIPE, "--namespace", "a" * 64], "--namespace"),
    "ns-empty": (["export", RECIPE, "--namespace", ""], "--namespace"),
    "ns-unicode": (["export", RECIPE, "--namespace", "tëam"], "--namespace"),
    "ns-newline": (["export", RECIPE, "--namespace", "team\n"], "--namespace"),
    "ns-injection": (["export", RECIPE, "--namespace", "a\nkind: Secret"], "--namespace"),
    "pvc-upper": (["export", RECIPE, "--pvc", "Data"], "--pvc"),
    "pvc-leading-dash": (["export", RECIPE, "--pvc", "-data"], "--pvc"),
    "pvc-trailing-dot": (["export", RECIPE, "--pvc", "data."], "--pvc"),
    "pvc-double-dot": (["export", RECIPE, "--pvc", "data..x"], "--pvc"),
    "pvc-dash-dot": (["export", RECIPE, "--pvc", "data-.x"], "--pvc"),
    "pvc-slash": (["export", RECIPE, "--pvc", "data/x"], "--pvc"),
    "pvc-too-long": (["export", RECIPE, "--pvc", "a" * 254], "--pvc"),
    "pvc-empty": (["export", RECIPE, "--pvc", ""], "--pvc"),
}


def _refused_in_one_line(args: list[str], words: str, cwd: Path) -> str:
    r = run_cli(*args, cwd=cwd)
    assert r.code == 2, (args[:4], r.code, r.out[-300:], r.err[-600:])
    assert "Traceback" not in r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert words.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lease directory, runs root and power record: a case that got through would
    touch nothing of this machine's."""
    for key in [k for k in os.environ if k.startswith(("FTKIT_SIMULATED", "NVIDIA_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "lease"))
    monkeypatch.setenv("FTKIT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,words", list(LEASE.values()), ids=list(LEASE))
def test_hostile_lease_arguments_are_refused(private: Path, args: list[str], words: str) -> None:
    before = set(private.iterdir())
    _refused_in_one_line(args, words, private)
    assert set(private.iterdir()) == before  # no lease directory, no record: nothing ran


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,words", list(OTHER.values()), ids=list(OTHER))
def test_hostile_cli_arguments_are_refused(private: Path, args: list[str], words: str) -> None:
    before = set(private.iterdir())
    _refused_in_one_line(args, words, private)
    assert set(private.iterdir()) == before  # nothing written (the working directory is the tmp dir)


@pytest.mark.timeout(60)
def test_a_symlink_into_proc_is_refused(private: Path) -> None:
    (private / "runs").symlink_to("/proc/self")
    line = _refused_in_one_line(["up", RECIPE, "--dry-run", "--runs-dir", str(private / "runs")], "/proc", private)
    assert "runs" in line


@pytest.mark.timeout(60)
def test_a_profile_runs_directory_in_dev_is_refused(private: Path) -> None:
    machine = private / "m.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: m\npaths: {runs: /dev/shm/ftkit-hostile-runs}\n")
    _refused_in_one_line(["up", RECIPE, "-m", str(machine), "--dry-run"], "paths.runs", private)
    assert not Path("/dev/shm/ftkit-hostile-runs").exists()


# --------------------------------------------------------------------------- the readers accept the ordinary


def test_ordinary_values_still_read() -> None:
    assert parse_gpus("0,1") == [0, 1] and parse_gpus(" 3 ") == [3] and parse_gpus("GPU-8f3a-11") == ["GPU-8f3a-11"]
    assert gpu_index("7") == 7
    assert parse_power_caps("0=350,1=300.5", [0, 1]) == {0: 350.0, 1: 300.5}
    assert parse_power_caps("350", [0]) == {None: 350.0}
    for text, value in [("30", 30.0), ("2.5", 2.5), (".5", 0.5), ("1e3", 1000.0), ("0", 0.0), ("-1", -1.0)]:
        assert finite_float(text) == value
    for text in ["nan", "inf", "-inf", "1e999", "1_0", "٣", "", "0x10", "1e", "."]:
        assert finite_float(text) is None, text
    assert FiniteFloat(min=0).convert("0", None, None) == 0.0
    assert FiniteFloat(min=0).convert(30.0, None, None) == 30.0  # a default
    with pytest.raises(UserError):
        FiniteFloat(0.05, 1.0).convert(float("nan"), None, None)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://[::1]:8000",
                                 "http://localhost:8000", "http://localhost", "http://LOCALHOST:8000",
                                 "http://127.0.0.1"])
def test_loopback_sleep_urls_pass(url: str) -> None:
    assert loopback_http_url(url, "--sleep-url") == url


@pytest.mark.parametrize("name", ["team-a", "a", "ftkit-quickstart", "0abc", "a" * 63])
def test_valid_kubernetes_names_pass(name: str) -> None:
    assert dns_label(name, "--namespace") == name
    assert dns_subdomain(name, "--pvc") == name


def test_dotted_pvc_names_pass() -> None:
    assert dns_subdomain("data.ftkit-1.example", "--pvc") == "data.ftkit-1.example"
    assert dns_subdomain(".".join(["a" * 63] * 3) + ".b", "--pvc")
    with pytest.raises(UserError):
        dns_label("data.ftkit", "--namespace")


def test_ordinary_paths_pass(tmp_path: Path) -> None:
    assert checked_path(str(tmp_path / "runs"), "--runs-dir", fills=True, system_ok=False)
    assert checked_path("runs", "--runs-dir", fills=True, system_ok=False) == "runs"
    assert checked_path("/dev/stdout", "--output") == "/dev/stdout"  # a single file may go to a device
    assert checked_path("/device-backups/runs", "--runs-dir", system_ok=False)  # /dev is a whole component
