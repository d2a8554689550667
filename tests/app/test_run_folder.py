"""The run folder after crashes and reruns: its log describes exactly the one run whose state it holds.

- kill -9 at random moments (before the first checkpoint, between checkpoints, during the
  test evaluation and the final writes) of ``python -m tinysft finetune ... --resume``, then the
  same command again, until it finishes: metrics.jsonl holds steps 1..N once each, in order,
  and it and the weights are byte-identical to those of a run that was never interrupted;
- a second run into the same ``--out`` is refused naming ``--out`` and leaves the folder as it
  was; ``--overwrite`` starts afresh; ``--resume`` continues only with the settings the run
  started with, and leaves a finished run alone;
- the metrics log passes over a last line cut short by a crash, and names the file and line of
  any other line that is not JSON.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tinysft.finetune.callbacks import MetricsLog

from .helpers import assert_user_error, run_cli

FLAGS = ["--no-progress", "--epochs", "3", "--batch-size", "4", "--max-length", "12", "--checkpoint-every", "3",
         "--log-every", "1", "--patience", "0"]
STEPS = 21  # 28 training examples, 4 per step: 7 steps a epoch, 3 epochs
VOLATILE = ("seconds", "examples_per_second")  # the run.json entries that measure time


def finetune_argv(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), *FLAGS, *extra]


def train_steps(out: Path) -> list:
    return [r["step"] for r in MetricsLog(out / "metrics.jsonl").read() if r["event"] == "train"]


def lasting(out: Path) -> dict:
    """What a finished run folder holds, less the timings and its own path: log, weights, settings, run.json."""
    info = json.loads((out / "run.json").read_text())
    config = tomllib.loads((out / "config.toml").read_text())
    return {"metrics": (out / "metrics.jsonl").read_bytes(), "weights": (out / "model.safetensors").read_bytes(),
            "config": {k: v for k, v in config.items() if k != "out"},
            "info": {k: v for k, v in info.items() if k not in VOLATILE}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, csv_data):
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out))
    assert code == 0, err
    assert train_steps(out) == list(range(1, STEPS + 1))
    return out


# ----------------------------------------------------------------------- kill -9, then the same command again

def _kill(process, when):
    """SIGKILL ``process`` once ``when()`` is true (polled every millisecond) or it has exited."""
    while process.poll() is None:
        if when():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()


def _last_step(out: Path) -> int:
    """The last step in the log now (0 if none); the log may be mid-write or being replaced."""
    try:
        return max((r["step"] for r in MetricsLog(out / "metrics.jsonl").read()), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def test_kill_9_and_resume_leaves_one_run_in_the_folder(tmp_path, tiny_model, csv_data, reference):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tinysft", *finetune_argv(tiny_model, csv_data, out, "--resume")]
    chooser = random.Random(int(os.environ.get("KILL_SEED", time.time_ns())))
    # where each run is killed: once the log reaches a step (1, then 2: before the first
    # checkpoint, at step 3; then a few steps past where it stands), or after a random delay
    # (anywhere: the start-up, the evaluations, the final writes)
    kinds = ["step", "step"] + chooser.sample(["step"] * 3 + ["seconds"] * 2, 5)
    kills = []
    for kind in kinds:
        if kind == "step":
            at = _last_step(out) + (chooser.randint(1, 6) if len(kills) >= 2 else 1)
            when = (lambda: _last_step(out) >= at)
        else:
            at = round(chooser.uniform(0.0, 3.0), 2)
            deadline = time.monotonic() + at
            when = (lambda: time.monotonic() >= deadline)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _kill(process, when)
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert process.returncode in (0, -signal.SIGKILL), stderr
        kills.append((kind, at, process.returncode))
        steps = train_steps(out) if out.exists() else []
        assert steps == sorted(set(steps)), (kills, steps)  # however it was cut, no step twice
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert train_steps(out) == list(range(1, STEPS + 1)), kills
    assert lasting(out) == lasting(reference), kills  # the log and the weights, byte for byte
    assert sum(code == -signal.SIGKILL for *_, code in kills) >= 2, kills  # it was killed, at least before step 3


# ----------------------------------------------------------------------- a second run meets the folder

def test_a_second_run_into_the_same_out_is_refused_and_changes_nothing(tmp_path, tiny_model, csv_data, reference):
    before = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    for extra in ([], ["--lr", "0.5"]):
        assert_user_error(run_cli(finetune_argv(tiny_model, csv_data, reference, *extra)),
                          f"--out {reference} already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()} == before


def test_overwrite_starts_afresh_and_keeps_other_files(tmp_path, tiny_model, csv_data, reference):
    out = tmp_path / "run"
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out, "--lr", "3e-4", "--epochs", "1"))
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out, "--overwrite"))
    assert code == 0, err
    assert lasting(out) == lasting(reference)
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_with_a_bad_setting_leaves_the_old_run(tmp_path, tiny_model, csv_data, reference):
    before = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    assert_user_error(run_cli(finetune_argv(tiny_model, csv_data, reference, "--overwrite", "--max-length", "99")),
                      "max_length = 99")
    assert {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()} == before


def test_resume_leaves_a_finished_run_alone(tiny_model, csv_data, reference):
    before = lasting(reference)
    code, out, err = run_cli(finetune_argv(tiny_model, csv_data, reference, "--resume"))
    assert code == 0, err
    assert "holds a finished run" in out and "nothing to resume" in out
    assert lasting(reference) == before


def test_resume_refuses_other_settings(tmp_path, tiny_model, csv_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out, "--max-steps", "2"))  # refused: a run is there
    assert code == 2, err
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out, "--resume", "--max-steps", "2",
                                         "--checkpoint-every", "1"))
    assert code == 0, err
    (out / "run.json").unlink()  # as if killed before the end
    assert_user_error(run_cli(finetune_argv(tiny_model, csv_data, out, "--resume", "--max-steps", "2",
                                            "--checkpoint-every", "1", "--lr", "0.5")),
                      "--resume", "lr = 0.0001", "not 0.5", "config.toml")


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, tiny_model, csv_data, reference):
    """A run killed before its first checkpoint: its records go, the new run logs from step 1."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"event": "train", "step": s}) + "\n" for s in (1, 2))
                                       + '{"event": "tra')  # and a line cut short
    code, _, err = run_cli(finetune_argv(tiny_model, csv_data, out, "--resume"))
    assert code == 0, err
    assert lasting(out) == lasting(reference)


# ----------------------------------------------------------------------- the log itself

def test_metrics_log_passes_over_a_torn_last_line_only(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"event": "train", "step": step})
    with open(log.path, "a") as f:
        f.write('{"event": "train", "st')
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.truncate(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    assert Path(log.path).read_text().endswith("}\n")
    Path(log.path).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        log.read()
    log.clear()
    assert log.read() == [] and Path(log.path).read_text() == ""
