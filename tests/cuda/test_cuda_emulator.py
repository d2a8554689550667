"""The CPU emulator of the CUDA thread model: warp operations, barriers, schedules, errors, argument checks."""
import numpy as np
import pytest

from tinysft.cuda import csrc_dir
from tinysft.cuda.emulator import SCHEDULES, EmulatorError, EmuModule, schedule

FULL = 0xFFFFFFFF

WARP_OPS = r"""
extern "C" __global__ void warp_ops(const float* in, float* out, unsigned* ballot) {
    int l = threadIdx.x;
    float v = in[l];
    out[0 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[1 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 3, 8);
    out[2 * 32 + l] = __shfl_up_sync(0xffffffffu, v, 2, 16);
    out[3 * 32 + l] = __shfl_sync(0xffffffffu, v, 7, 8);
    double d = __shfl_xor_sync(0xffffffffu, (double)v * 3.0, 1);
    out[4 * 32 + l] = (float)d;
    ballot[l] = __ballot_sync(0xffffffffu, v > 10.0f);
    __syncwarp();
}
"""


def test_warp_shuffles_follow_cuda_semantics():
    kern = EmuModule(WARP_OPS).get_function("warp_ops")
    x = np.arange(32, dtype=np.float32) * 1.5
    out = np.zeros(5 * 32, dtype=np.float32)
    ballot = np.zeros(32, dtype=np.uint32)
    kern((1,), (32,), (x, out, ballot))
    lane = np.arange(32)
    seg8, seg16 = lane & ~7, lane & ~15
    np.testing.assert_array_equal(out[:32], x[lane ^ 5])
    np.testing.assert_array_equal(out[32:64], x[np.where(lane + 3 < seg8 + 8, lane + 3, lane)])
    np.testing.assert_array_equal(out[64:96], x[np.where(lane - 2 >= seg16, lane - 2, lane)])
    np.testing.assert_array_equal(out[96:128], x[seg8 + 7])
    np.testing.assert_array_equal(out[128:], (x[lane ^ 1] * 3.0).astype(np.float32))
    assert (ballot == sum(1 << i for i in range(32) if x[i] > 10)).all()


INDEXING = r"""
extern "C" __global__ void indexing(int* out, unsigned long long* counter, float* sum) {
    int block = blockIdx.y * gridDim.x + blockIdx.x;
    int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int per_block = blockDim.x * blockDim.y * blockDim.z;
    out[block * per_block + thread] = block * 1000 + thread;
    atomicAdd(counter, 1ull);
    atomicAdd(sum, 0.5f);
}
"""


def test_multidimensional_indices_and_atomics():
    kern = EmuModule(INDEXING).get_function("indexing")
    out = np.full(3 * 2 * 4 * 3 * 2, -1, dtype=np.int32)
    counter = np.zeros(1, dtype=np.uint64)
    total = np.zeros(1, dtype=np.float32)
    kern((3, 2), (4, 3, 2), (out, counter, total))
    expect = np.array([b * 1000 + t for b in range(6) for t in range(24)])
    np.testing.assert_array_equal(out, expect)
    assert counter[0] == 144 and total[0] == 72.0


SHARED = r"""
extern "C" __global__ void unwritten_shared(float* out) {
    __shared__ float tile[64];
    if (threadIdx.x < 32) tile[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = tile[threadIdx.x];
}

extern "C" __global__ void missing_barrier(const float* in, float* out) {
    __shared__ float tile[64];
    tile[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = tile[63 - threadIdx.x];
}

extern "C" __global__ void flush_to_zero(const float* in, float* out) {
    out[0] = in[0] * 0.5f;   // smallest normal / 2: a subnormal, flushed to 0
    out[1] = in[1] * 1e30f;  // a subnormal input, read as 0
}
"""


def test_shared_memory_is_refilled_with_nan_before_every_block():
    out = np.zeros(2 * 64, dtype=np.float32)
    EmuModule(SHARED).get_function("unwritten_shared")((2,), (64,), (out,))
    for b in range(2):
        assert (out[b * 64:b * 64 + 32] == 1.0).all()
        assert (out[b * 64 + 32:b * 64 + 64].view(np.uint32) == 0xFFFFFFFF).all()


def test_missing_barrier_shows_up_across_schedules():
    kern = EmuModule(SHARED).get_function("missing_barrier")
    x = np.arange(64, dtype=np.float32)
    results = set()
    for name in SCHEDULES:
        out = np.zeros(64, dtype=np.float32)
        with schedule(name, seed=3):
            kern((1,), (64,), (x, out))
        results.add(out.tobytes())
    assert len(results) > 1


def test_flush_to_zero_matches_cupy_default():
    x = np.array([np.finfo(np.float32).tiny, np.float32(1e-40)], dtype=np.float32)
    out = np.ones(2, dtype=np.float32)
    EmuModule(SHARED).get_function("flush_to_zero")((1,), (1,), (x, out))
    np.testing.assert_array_equal(out, [0.0, 0.0])


ERRORS = r"""
extern "C" __global__ void early_return(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
}
extern "C" __global__ void reads_absent_lane(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
    out[threadIdx.x] = v;
}
extern "C" __global__ void mask_excludes_self(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x80000000u, 1.0f, 1);
}
extern "C" __global__ void mask_names_missing_lanes(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
extern "C" __global__ void different_barriers(float* out) {
    if (threadIdx.x % 2)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void barrier_after_return(float* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void deadlock(float* out) {
    if (threadIdx.x == 0) __syncthreads();
    else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
extern "C" __global__ void takes_scalars(float* out, float f, int i, long long n, double d) {
    out[0] = f + i + n + d;
}
"""


@pytest.mark.parametrize("kernel, block, message", [
    ("early_return", 32, "which has already returned"),
    ("reads_absent_lane", 32, "reads lane 16, which did not take part"),
    ("mask_excludes_self", 32, "which excludes itself"),
    ("mask_names_missing_lanes", 48, "do not exist"),
    ("different_barriers", 64, "threads at different barriers"),
    ("barrier_after_return", 64, "returned"),
    ("deadlock", 32, "deadlock"),
])
def test_misuse_raises_a_clear_error(kernel, block, message):
    kern = EmuModule(ERRORS).get_function(kernel)
    with pytest.raises(EmulatorError, match=message):
        kern((2,), (block,), (np.zeros(64, dtype=np.float32),))
    kern_ok = EmuModule(ERRORS).get_function("takes_scalars")  # the library is usable after an aborted launch
    out = np.zeros(1, dtype=np.float32)
    kern_ok((1,), (1,), (out, np.float32(1), np.int32(2), 3, 4.0))
    assert out[0] == 10.0


@pytest.mark.parametrize("args, message", [
    ((np.zeros(1, np.float32), 1.0, np.int32(2), 3, 4.0), "expects float32, got float"),
    ((np.zeros(1, np.float64), np.float32(1), np.int32(2), 3, 4.0), "expects dtype float32"),
    ((np.zeros(1, np.float32), np.float32(1), 2, 3, 4.0), "expects int32, got int"),
    ((np.zeros(1, np.float32), np.float32(1), np.int32(2), 3), "takes 5 arguments"),
    (([0.0], np.float32(1), np.int32(2), 3, 4.0), "expects a NumPy float32 array"),
])
def test_argument_types_are_checked_like_cupy_converts_them(args, message):
    kern = EmuModule(ERRORS).get_function("takes_scalars")
    with pytest.raises(TypeError, match=message):
        kern((1,), (1,), args)


def test_read_only_output_and_bad_launch_shapes_are_rejected():
    kern = EmuModule(ERRORS).get_function("takes_scalars")
    out = np.zeros(1, np.float32)
    out.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        kern((1,), (1,), (out, np.float32(1), np.int32(2), 3, 4.0))
    with pytest.raises(ValueError, match="more than 1024"):
        kern((1,), (2048,), (np.zeros(1, np.float32), np.float32(1), np.int32(2), 3, 4.0))
    with pytest.raises(ValueError, match="dynamic shared memory"):
        kern((1,), (1,), (np.zeros(1, np.float32), np.float32(1), np.int32(2), 3, 4.0), shared_mem=16)
    with pytest.raises(KeyError, match="no kernel"):
        EmuModule(ERRORS).get_function("nope")
    with pytest.raises(ValueError, match="unknown schedule"):
        with schedule("sideways"):
            pass


def test_ucontext_fallback_gives_identical_results():
    from tinysft.cuda.ops.cross_entropy import make_input

    x, t = make_input(n=3, v=333, offset=1)
    outs = []
    for flags in ((), ("-DEMU_USE_UCONTEXT",)):
        kern = EmuModule(path=csrc_dir() / "cross_entropy.cu", extra_flags=flags).get_function("cross_entropy_fwd_bwd")
        loss, lse, err = np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(1, np.int32)
        grad = np.zeros_like(x)
        with schedule("random", seed=7):
            kern((3,), (64,), (x, grad, t.astype(np.int64), loss, lse, err, np.int64(333), np.int64(-100),
                               np.float32(0.1), np.float32(0.0), np.float32(1.0)))
        outs.append(b"".join(a.tobytes() for a in (loss, lse, grad)))
    assert outs[0] == outs[1]


def test_build_errors_show_the_compiler_output():
    with pytest.raises(EmulatorError, match="compiling"):
        EmuModule('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }')
