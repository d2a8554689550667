"""`tinysft verify` from the command line: exit codes, JSON, flags, and the one-minute budget."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinysft import verify
from tinysft.app.cli import _parser, main

ROOT = Path(__file__).resolve().parents[2]


def _dispatch_verify(argv):
    """Parse with the real CLI parser and call verify.main exactly as tinysft.app.cli does."""
    args = _parser().parse_args(["verify", *argv])
    return verify.main(only=args.only, seed=args.seed, dtype=args.dtype, as_json=args.json,
                       explain=args.explain, list_checks=args.list)


@pytest.fixture
def cli():
    """tinysft.app.cli.main, the function behind the ``tinysft`` command."""
    return main


def test_cli_verify_json_exit_0_and_valid_json(cli, capsys):
    assert cli(["verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["summary"]["failed"] == 0
    assert {c["status"] for c in data["checks"]} <= {"passed", "skipped"}


def test_cli_verify_flags(cli, capsys):
    assert cli(["verify", "--only", "adam", "--only", "mse", "--seed", "3", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "2 checks, seed 3, implementations in float32" in out
    assert cli(["verify", "--only", "nope"]) == 2
    assert cli(["verify", "--explain", "dropout_mean"]) == 0
    assert "α = 1e-6" in capsys.readouterr().out


def test_parser_flags_reach_verify_main(capsys):
    assert _dispatch_verify(["--json", "--only", "sgd", "--only", "gelu", "--seed", "7", "--dtype", "float32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seed"] == 7 and data["dtype"] == "float32"
    assert [c["name"] for c in data["checks"]] == ["sgd", "gelu"]
    assert _dispatch_verify(["--list"]) == 0
    assert "[losses]" in capsys.readouterr().out
    assert _dispatch_verify(["--explain", "adam"]) == 0
    assert "bias" in capsys.readouterr().out


def test_whole_command_runs_in_a_subprocess_within_a_minute(tmp_path):
    """Cold: a fresh emulator cache (g++ builds the kernels). Budget: 60 s for `tinysft verify`."""
    env = dict(os.environ, TINYSFT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    code = "import sys; from tinysft.verify import main; sys.exit(main(as_json=True))"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert json.loads(done.stdout)["ok"] is True
    assert elapsed < 60, f"tinysft verify took {elapsed:.1f} s with a cold emulator cache"
