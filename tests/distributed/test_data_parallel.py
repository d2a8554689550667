"""Data-parallel training with two real MPI processes (``mpirun -n 2``) of a tiny BERT classifier.

- 2 ranks × batch 4 end with the weights of 1 process × batch 8 to float32 round-off, not
  bit for bit: the all-reduce adds the two ranks' partial gradients (g₀ + g₁), one process
  sums all eight examples' contributions inside its matmuls, in another order. Eight SGD
  steps (momentum 0.9, clipped at 0.5, 7 of 30 labels ignored so the ranks' counts differ)
  leave max |Δθ| ≤ 1e-5 for weights up to |θ| ≈ 3 (measured 2.4e-7: a few float32 ulps);
  a per-rank count instead of the global one, or clipping by a rank's own norm, moves
  them by more than 1e-3.
- two 2-rank runs give the same bits, and both ranks end with the same bits;
- the evaluations (sharded, then gathered) and so early stopping agree on both ranks and
  with one process;
- a rank that hangs makes the other fail with a clear error within the timeout, a rank
  that dies ends the job, and the last checkpoint stays loadable.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinysft.io.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("train_tiny.py")
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")

try:
    import mpi4py  # noqa: F401
    _HAVE_MPI4PY = True
except ImportError:
    _HAVE_MPI4PY = False

pytestmark = pytest.mark.skipif(not (MPIRUN and _HAVE_MPI4PY),
                                reason="needs mpirun and mpi4py: pip install 'tinysft[mpi]'")


def environment(**extra) -> dict:
    """One thread per rank; Open MPI may run as root (CI) and put two ranks on fewer cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
            **extra}


def run(out: Path, *args, ranks: int = 2, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    launcher = [MPIRUN, "-n", str(ranks), "--oversubscribe"] if ranks > 1 else []
    command = launcher + [sys.executable, str(SCRIPT), "--out", str(out), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment(**env))


def weights(out: Path, rank: int = 0) -> dict:
    with np.load(out / f"rank{rank}.npz") as f:
        return {k: f[k] for k in f.files}


def result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def check(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-rank runs (batch 4 each) and one 1-process run (batch 8): 2 epochs, 8 steps."""
    root = tmp_path_factory.mktemp("dp")
    for name, ranks, batch in (("a", 2, 4), ("b", 2, 4), ("one", 1, 8)):
        check(run(root / name, "--batch", batch, "--epochs", 2, "--steps", 100, ranks=ranks))
    return root


def test_two_ranks_match_one_process_with_the_doubled_batch(runs):
    two, one = weights(runs / "a"), weights(runs / "one")
    assert two.keys() == one.keys()
    worst = max(float(np.abs(two[k] - one[k]).max()) for k in one)
    assert worst <= 1e-5, worst
    assert result(runs / "a")["step"] == result(runs / "one")["step"] == 8


def test_two_rank_runs_are_bit_identical_and_ranks_agree(runs):
    a0, a1, b0 = weights(runs / "a", 0), weights(runs / "a", 1), weights(runs / "b", 0)
    for k in a0:
        assert np.array_equal(a0[k], a1[k]), k
        assert np.array_equal(a0[k], b0[k]), k


def test_evaluation_is_the_same_on_every_rank_and_as_one_process(runs):
    h0, h1, one = (result(runs / "a", 0)["history"], result(runs / "a", 1)["history"],
                   result(runs / "one")["history"])
    assert h0 == h1 and len(h0) == 2
    for got, want in zip(h0, one):
        assert got["accuracy"] == want["accuracy"] and got["macro_f1"] == want["macro_f1"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_the_log_is_one_run(runs):
    """Rank 0 alone writes the log: one train record per step, with the global count of examples."""
    two = [json.loads(line) for line in (runs / "a" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for got, want in zip(two, one):
        if got["event"] == "train":
            assert got["examples"] == want["examples"]
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_a_hung_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    """Rank 1 stops itself (SIGSTOP) before step 4; rank 0 waits in the all-reduce for 3 s, then fails."""
    started = time.monotonic()
    process = run(tmp_path, "--batch", 4, "--steps", 8, "--checkpoint-every", 2, "--stop-rank", 1,
                  "--stop-at", 4, "--signal", "STOP", timeout=90, TINYSFT_DIST_TIMEOUT="3")
    elapsed = time.monotonic() - started
    assert process.returncode != 0
    assert "rank 0 of 2: the count of step 4 did not complete within 3 s" in process.stderr, process.stderr[-3000:]
    assert elapsed < 60
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["trainer"]["step"] == 2 and tensors


def test_a_killed_rank_ends_the_job_and_the_checkpoint_loads(tmp_path):
    """Rank 1 dies (SIGKILL) before step 4: the launcher ends rank 0 too, with an exit status that says so."""
    process = run(tmp_path, "--batch", 4, "--steps", 8, "--checkpoint-every", 2, "--stop-rank", 1,
                  "--stop-at", 4, "--signal", "KILL", timeout=90, TINYSFT_DIST_TIMEOUT="3")
    assert process.returncode != 0
    assert not (tmp_path / "rank0.npz").exists()
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["trainer"]["step"] == 2 and tensors


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    """2 ranks × 4 stop at step 4 (a checkpoint); 1 process × 8 resumes it and ends as the 1-process run."""
    check(run(tmp_path, "--batch", 4, "--epochs", 2, "--steps", 4, "--checkpoint-every", 4))
    check(run(tmp_path, "--batch", 8, "--epochs", 2, "--steps", 100, "--checkpoint-every", 4, ranks=1))
    resumed, one = weights(tmp_path), weights(runs / "one")
    assert max(float(np.abs(resumed[k] - one[k]).max()) for k in one) <= 1e-5
    assert result(tmp_path)["history"][-1]["accuracy"] == result(runs / "one")["history"][-1]["accuracy"]
