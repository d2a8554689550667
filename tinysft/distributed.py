"""Data-parallel training over MPI (mpi4py) on CPUs and NCCL (CuPy) on GPUs; a no-op in one process.

Launched as ``mpirun -n W python train.py`` (or ``srun``), each of the W processes
(ranks) holds the whole model and a disjoint shard of every batch. One optimizer
step on rank r:

    n      = Σ_r n_r                         all_reduce of the supervised counts, before any backward
    g_r    = ∇ Σ_{i ∈ shard r} loss_i / n     the local backward, scaled by the global count
    g      = Σ_r g_r                          all_reduce: ONE flat buffer per dtype, one call per step
    θ     ← optimizer(θ, clip(g))            the same update on every rank

so every rank applies the gradient of the mean loss over the W shards' examples,
the same as one process with the W shards in one batch. The sum is the one thing
that differs: MPI adds the W partial gradients in its own order (a + b for two
ranks, a tree for more), one process adds the examples' contributions within one
matmul, so the weights agree to float32 round-off (about 1e-6 relative per step),
not bit for bit. Two runs with the same W give the same bits.

    init()                 detect the launch (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK, SLURM's PMI) and
                           import mpi4py then; without a launch every call below is a no-op
    rank(), world_size()   this process and how many there are
    all_reduce(arrays)     sum in place over the ranks: NumPy arrays through MPI, CuPy arrays through NCCL
    broadcast(obj)         rank 0's picklable object on every rank (broadcast_settings: the run config)
    broadcast_arrays(a)    rank 0's arrays copied into every rank's (the initial weights)
    barrier()              wait for every rank (the checkpoint written by rank 0)
    shard(indices)         rank r's slice ``indices[r::W]``; the W slices are disjoint, their union all

A rank that dies or hangs never leaves the others waiting forever: MPI's blocking
collectives cannot time out, so each collective here is the non-blocking one
(``Iallreduce``, ``Ibcast``, ``Ibarrier``) and a wait that polls it, sleeping 50 µs
doubling to at most 0.5 ms between polls, until a deadline of ``timeout`` seconds
(``TINYSFT_DIST_TIMEOUT``, default 300). Past the deadline the waiting rank raises
``DistributedError`` naming the collective and the rank, and skips ``MPI_Finalize``
at exit, which would wait on the dead rank too. The polls also drive the transfer
(Open MPI progresses a non-blocking collective inside ``Test``): summing 86 MiB over
2 ranks on 2 busy cores took 0.04–0.09 s with the 0.5 ms cap, 0.16–0.30 s with a
5 ms cap, and 0.6–0.8 s with the blocking ``Allreduce``, whose spinning takes the
core from the other rank.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import pickle
import time

import numpy as np

from .backend import cuda_available, device_of, to_device, xp_for

__all__ = ["DistributedError", "init", "is_initialized", "rank", "world_size", "is_main", "all_reduce",
           "all_reduce_sum", "broadcast", "broadcast_arrays", "all_gather", "barrier", "shard", "LAUNCH_VARIABLES"]

# Environment variables that a launcher sets in each process it starts.
LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE",   # Open MPI
                    "PMI_SIZE",               # MPICH, Intel MPI, srun --mpi=pmi2
                    "PMIX_RANK")              # PMIx launchers (srun --mpi=pmix, prterun)
DEFAULT_TIMEOUT = 300.0


class DistributedError(RuntimeError):
    """A collective did not complete: another rank died or hung, or the launch cannot be used."""


class _State:
    """The world of this process: one rank with no communicator until ``init`` finds a launch."""

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        self.timeout = DEFAULT_TIMEOUT
        self.nccl = None          # a NcclAllReduce, made on the first CuPy all_reduce
        self.initialized = False
        self.failed = False       # a collective timed out: skip MPI_Finalize at exit


_world = _State()


def launched(environ=None) -> bool:
    """Whether a launcher started this process (one of ``LAUNCH_VARIABLES`` is set in ``environ``)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCH_VARIABLES)


def init(timeout: float | None = None, comm=None) -> tuple[int, int]:
    """Join the launch (once; later calls return the same); returns ``(rank, world_size)``.

    ``comm``: a communicator to use instead of MPI's world (tests pass a fake one).
    Without a launch and without ``comm`` nothing is imported and the process is rank 0 of 1.
    """
    if timeout is not None:
        _world.timeout = float(timeout)
    elif "TINYSFT_DIST_TIMEOUT" in os.environ:
        _world.timeout = float(os.environ["TINYSFT_DIST_TIMEOUT"])
    if _world.initialized and comm is None:
        return _world.rank, _world.size
    if comm is None and launched():
        comm = _mpi_world()
    if comm is not None:
        _world.comm, _world.rank, _world.size = comm, comm.Get_rank(), comm.Get_size()
        _use_local_gpu()
    _world.initialized = True
    return _world.rank, _world.size


def _mpi_world():
    try:
        import mpi4py
    except ImportError:
        raise DistributedError("this process was started by an MPI launcher but "
                               "mpi4py is not installed: pip install 'tinysft[mpi]'") from None
    mpi4py.rc.finalize = False  # finalized below, unless a collective timed out (it would wait forever)
    from mpi4py import MPI
    atexit.register(_finalize)
    return MPI.COMM_WORLD


LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def _use_local_gpu() -> None:
    """One GPU per rank: the rank's index on its host picks CuPy's current device (modulo the GPUs seen)."""
    local = next((int(os.environ[name]) for name in LOCAL_RANK_VARIABLES if name in os.environ), None)
    if local is not None and cuda_available():
        import cupy
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()


def _finalize():
    from mpi4py import MPI
    if not _world.failed and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


@contextlib.contextmanager
def failing_fast():
    """A block (a command's body) whose exception makes this rank skip ``MPI_Finalize`` at exit.

    ``MPI_Finalize`` waits for every rank, so a rank that stops on an error and then
    finalizes waits for the others, which wait in their next collective until the
    timeout. Without it the rank exits at once, and the launcher ends the job.
    """
    try:
        yield
    except BaseException:
        _world.failed = True
        raise


def reset() -> None:
    """Back to one process (tests that installed a fake communicator call it)."""
    _world.__init__()


def is_initialized() -> bool:
    return _world.initialized


def rank() -> int:
    return _world.rank


def world_size() -> int:
    return _world.size


def is_main() -> bool:
    """Whether this is rank 0, the one that writes files and prints."""
    return _world.rank == 0


# ---------------------------------------------------------------------------- waiting with a deadline

def _wait(request, what: str) -> None:
    """Poll ``request`` until it completes; DistributedError after the timeout."""
    deadline = time.monotonic() + _world.timeout
    pause = 5e-5
    while not request.Test():
        if time.monotonic() > deadline:
            _world.failed = True
            raise DistributedError(
                f"rank {_world.rank} of {_world.size}: {what} did not complete within {_world.timeout:g} s: "
                "another rank died or hung (its own error, if any, is in the launcher's output); "
                "TINYSFT_DIST_TIMEOUT sets the limit")
        time.sleep(pause)
        pause = min(2 * pause, 5e-4)


# ---------------------------------------------------------------------------- collectives

def all_reduce(arrays, what: str = "all_reduce") -> None:
    """Sum each array in ``arrays`` over the ranks, in place, with one collective per dtype.

    The arrays are copied into one flat buffer per dtype (the bucket), summed in one
    call, and copied back: one message per step instead of one per tensor. NumPy
    arrays go through MPI, CuPy arrays through NCCL (``cupy.cuda.nccl``).
    """
    arrays = list(arrays)
    if _world.size == 1 or not arrays:
        return
    buckets: dict = {}
    for a in arrays:
        buckets.setdefault((device_of(a), a.dtype), []).append(a)
    for (device, _), members in buckets.items():
        flat = xp_for(device).concatenate([m.reshape(-1) for m in members])   # (Σ sizes,)
        if device == "cuda":
            if _world.nccl is None:
                _world.nccl = NcclAllReduce()
            _world.nccl(flat, what)
        else:
            _mpi_all_reduce(flat, what)
        start = 0
        for m in members:
            m[...] = flat[start:start + m.size].reshape(m.shape)
            start += m.size


def all_reduce_sum(values, what: str = "all_reduce") -> np.ndarray:
    """The element-wise sum over the ranks of a small vector of numbers (counts, loss sums), as float64."""
    buffer = np.array(values, dtype=np.float64)
    all_reduce([buffer], what)
    return buffer


def _mpi_all_reduce(flat: np.ndarray, what: str) -> None:
    total = np.empty_like(flat)
    _wait(_world.comm.Iallreduce(flat, total), what)  # mpi4py's default op: MPI.SUM
    flat[...] = total


class NcclAllReduce:
    """``ncclAllReduce`` in place on the current CUDA stream over one NCCL communicator (one GPU per rank).

    The communicator is made from rank 0's unique id, broadcast over MPI. The wait
    polls the stream with the same deadline as the MPI collectives.
    """

    TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int32": "NCCL_INT32", "int64": "NCCL_INT64"}

    def __init__(self):
        from cupy.cuda import nccl
        self.nccl = nccl
        uid = nccl.get_unique_id() if _world.rank == 0 else None
        uid = broadcast(uid, what="the NCCL unique id")
        self.comm = nccl.NcclCommunicator(_world.size, uid, _world.rank)

    def __call__(self, flat, what: str) -> None:
        import cupy
        if str(flat.dtype) not in self.TYPES:
            raise DistributedError(f"{what}: NCCL cannot sum {flat.dtype} arrays")
        stream = cupy.cuda.get_current_stream()
        self.comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, getattr(self.nccl, self.TYPES[str(flat.dtype)]),
                            self.nccl.NCCL_SUM, stream.ptr)
        _wait(_StreamDone(stream), what)


class _StreamDone:
    """A CUDA stream seen as a request: ``Test()`` is whether its queued work has finished."""

    def __init__(self, stream):
        self.stream = stream

    def Test(self) -> bool:  # noqa: N802 (MPI's name)
        return self.stream.done


def broadcast(obj=None, what: str = "broadcast"):
    """Rank 0's ``obj`` (pickled) on every rank; in one process ``obj`` itself."""
    return obj if _world.size == 1 else broadcast_from(obj, 0, what)


def broadcast_settings(config):
    """A dataclass of settings with rank 0's values on every rank (its fields are picklable)."""
    if _world.size == 1:
        return config
    return dataclasses.replace(config, **broadcast(dataclasses.asdict(config), "the run's settings"))


def broadcast_arrays(arrays, what: str = "broadcast of the weights") -> None:
    """Copy rank 0's ``arrays`` into every rank's (in place; same shapes and dtypes everywhere)."""
    arrays = list(arrays)
    if _world.size == 1 or not arrays:
        return
    buckets: dict = {}
    for a in arrays:
        buckets.setdefault(a.dtype, []).append(a)
    for members in buckets.values():
        host = [to_device(m, "cpu") for m in members]
        flat = np.concatenate([h.reshape(-1) for h in host])
        _wait(_world.comm.Ibcast(flat, root=0), what)
        start = 0
        for m in members:
            part = flat[start:start + m.size].reshape(m.shape)
            m[...] = xp_for(device_of(m)).asarray(part)
            start += m.size


def all_gather(array: np.ndarray, what: str = "all_gather") -> np.ndarray:
    """Every rank's ``array`` concatenated along axis 0 in rank order (the same on every rank)."""
    if _world.size == 1:
        return array
    return np.concatenate(broadcast_each(array, what), axis=0)


def broadcast_each(obj, what: str = "all_gather") -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    return [broadcast_from(obj, r, what) for r in range(_world.size)]


def broadcast_from(obj, root: int, what: str):
    """Rank ``root``'s picklable ``obj`` on every rank: its length, then its bytes."""
    payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if _world.rank == root else None
    length = np.array([payload.size if payload is not None else 0], dtype=np.int64)
    _wait(_world.comm.Ibcast(length, root=root), what)
    if payload is None:
        payload = np.empty(int(length[0]), dtype=np.uint8)
    _wait(_world.comm.Ibcast(payload, root=root), what)
    return obj if _world.rank == root else pickle.loads(payload.tobytes())


def barrier(what: str = "barrier") -> None:
    """Wait until every rank has arrived (with the deadline)."""
    if _world.size > 1:
        _wait(_world.comm.Ibarrier(), what)


def shard(indices, num_replicas: int | None = None, replica: int | None = None):
    """Replica ``replica``'s part of ``indices``: ``indices[replica::num_replicas]``.

    The parts of replicas 0..W−1 are disjoint and together are ``indices``; their
    sizes differ by at most one.

    >>> [list(shard(range(7), 3, r)) for r in range(3)]
    [[0, 3, 6], [1, 4], [2, 5]]
    """
    num_replicas = _world.size if num_replicas is None else num_replicas
    replica = _world.rank if replica is None else replica
    if not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} is not in 0..{num_replicas - 1}")
    return indices[replica::num_replicas]
