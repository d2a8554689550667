"""tinysft.distributed in one process, against fake communicators (no MPI library needed).

``FakeComm`` plays rank ``rank`` of ``size`` whose peers all hold ``peer_value`` times
its own buffer: an all-reduce must come back as (1 + (size − 1)·peer_value) × mine.
"""
import numpy as np
import pytest

from tinysft import distributed as dist


class Done:
    def __init__(self, finish=None):
        self.finish = finish

    def Test(self):  # noqa: N802
        if self.finish is not None:
            self.finish()
            self.finish = None
        return True


class Never:
    def Test(self):  # noqa: N802
        return False


class FakeComm:
    def __init__(self, rank=0, size=2, peer_value=1.0, hang=False, root_payload=None):
        self.rank, self.size, self.peer_value, self.hang = rank, size, peer_value, hang
        self.calls, self.root_payload = [], root_payload

    def Get_rank(self):  # noqa: N802
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def Iallreduce(self, send, recv):  # noqa: N802
        self.calls.append(("Iallreduce", send.dtype, send.size))
        if self.hang:
            return Never()
        return Done(lambda: recv.__setitem__(Ellipsis, send * (1 + (self.size - 1) * self.peer_value)))

    def Ibcast(self, buffer, root=0):  # noqa: N802
        self.calls.append(("Ibcast", buffer.dtype, buffer.size))
        return Never() if self.hang else Done()

    def Ibarrier(self):  # noqa: N802
        self.calls.append(("Ibarrier",))
        return Never() if self.hang else Done()


@pytest.fixture
def world():
    """Installs a fake communicator; back to one process afterwards."""
    def install(**kwargs):
        comm = FakeComm(**kwargs)
        dist.init(comm=comm, timeout=0.2)
        return comm
    yield install
    dist.reset()


def test_one_process_is_a_no_op():
    dist.reset()
    a = np.arange(3.0)
    dist.all_reduce([a])
    dist.barrier()
    assert dist.init() == (0, 1) and dist.is_main()
    assert a.tolist() == [0.0, 1.0, 2.0]
    assert dist.broadcast({"lr": 1}) == {"lr": 1}


def test_launch_detection_reads_the_launchers_variables():
    assert not dist.launched({})
    assert dist.launched({"OMPI_COMM_WORLD_SIZE": "2"})
    assert dist.launched({"PMI_SIZE": "4"})
    assert dist.launched({"PMIX_RANK": "0"})


def test_all_reduce_sends_one_flat_buffer_per_dtype(world):
    comm = world(size=3, peer_value=2.0)  # the sum is (1 + 2·2) = 5 × mine
    grads = [np.ones((2, 3), np.float32), np.full(4, 2.0, np.float32), np.ones((1,), np.float64)]
    dist.all_reduce(grads)
    assert comm.calls == [("Iallreduce", np.float32, 10), ("Iallreduce", np.float64, 1)]
    assert grads[0].tolist() == [[5.0] * 3] * 2
    assert grads[1].tolist() == [10.0] * 4 and grads[2].tolist() == [5.0]


def test_gpu_arrays_go_to_nccl_and_host_arrays_to_mpi(world, monkeypatch):
    """Dispatch by the arrays' device: ``device_of`` marks one array as CUDA; NCCL is a fake here too."""
    comm = world(size=2)
    on_gpu = np.ones(3, np.float32)
    monkeypatch.setattr(dist, "device_of", lambda a: "cuda" if a is on_gpu or a.base is on_gpu else "cpu")
    monkeypatch.setattr(dist, "xp_for", lambda device: np)
    seen = []

    def fake_nccl(flat, what):
        seen.append((flat.size, what))
        flat *= 2

    dist._world.nccl = fake_nccl
    host = np.ones(2, np.float32)
    dist.all_reduce([on_gpu, host], "the gradients")
    assert seen == [(3, "the gradients")]
    assert comm.calls == [("Iallreduce", np.float32, 2)]
    assert on_gpu.tolist() == [2.0] * 3 and host.tolist() == [2.0] * 2


def test_a_collective_that_never_completes_fails_with_a_clear_error(world):
    world(rank=1, size=2, hang=True)
    with pytest.raises(dist.DistributedError, match=r"rank 1 of 2: the gradients of step 7 did not complete "
                                                    r"within 0.2 s: another rank died or hung"):
        dist.all_reduce([np.ones(2)], "the gradients of step 7")
    assert dist._world.failed  # MPI_Finalize is skipped at exit
    with pytest.raises(dist.DistributedError, match="barrier"):
        dist.barrier()


def test_shards_are_disjoint_and_cover_everything():
    order = np.random.default_rng(0).permutation(11)
    parts = [dist.shard(order, 3, r) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]
    with pytest.raises(ValueError, match="replica 3 is not in 0..2"):
        dist.shard(order, 3, 3)


def test_sharded_loaders_make_up_the_one_process_batches():
    """W loaders of batch B draw, batch for batch, the examples one loader of batch W·B draws."""
    from tinysft.data import DataLoader
    data = list(range(23))
    one = DataLoader(data, batch_size=6, seed=4)
    ranks = [DataLoader(data, batch_size=2, seed=4, num_replicas=3, rank=r) for r in range(3)]
    for epoch in range(2):
        expected = [sorted(b.tolist()) for b in one]
        got = [sorted(x for b in batches if b is not None for x in b.tolist())
               for batches in zip(*[list(r) for r in ranks])]
        assert got == expected, epoch
    assert all(len(r) == len(one) == 4 for r in ranks)


def test_an_empty_shard_is_none_and_the_state_holds_the_global_batch():
    from tinysft.data import DataLoader
    loaders = [DataLoader(list(range(7)), batch_size=3, shuffle=False, num_replicas=2, rank=r) for r in range(2)]
    last = [list(l)[-1] for l in loaders]
    assert last[0].tolist() == [6] and last[1] is None
    single = DataLoader(list(range(7)), batch_size=6, shuffle=False)
    state = loaders[1].state_dict()
    assert state["batch_size"] == 6
    single.load_state_dict(state)  # a checkpoint of 2 ranks × 3 resumes in 1 process × 6
