// common.cuh: the access loop and the block reduction every kernel in csrc/ shares.
//
//   block_for_each(x, n, f)       f(j, x[j]) for every j in [0, n), each j on exactly one thread
//   block_transform(x, y, n, f)   y[j] = f(j, x[j]) for every j in [0, n); y may be x (in place)
//   block_reduce(v, part, empty, combine)
//                                 the combine-total of every thread's v, returned on every thread
//
// Loops: the threads of the block stride over [0, n). x need only be 4-byte
// aligned: a scalar head runs up to the first 16-byte boundary, float4 loads
// (and stores) cover the middle, a scalar tail the rest. block_transform uses
// float4 only when x and y share their 16-byte phase (always when in place).
//
// Reduction: a butterfly (__shfl_xor_sync) inside each warp, one partial per
// warp in `part`, then the same butterfly over the partials. combine must be
// commutative (so every lane of a butterfly gets the same bits) and `empty` its
// identity (it fills the lanes past the last warp). A type T other than float
// or double brings its own shfl_xor(T, lane_mask) overload.
//   * part is a __shared__ T[32] declared by the kernel, not here: the emulator
//     refills kernel-scope shared memory with NaN bytes before every block, but
//     not a __shared__ declared inside a template.
//   * One barrier: a kernel that reduces twice into the same part needs a
//     __syncthreads() between the two calls.
// blockDim.x must be a multiple of 32 in [32, 1024].
#pragma once

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// Elements of x before its first 16-byte boundary, at most n.
__device__ __forceinline__ long long head_to_16(const float* x, long long n) {
    long long head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;
    return head < n ? head : n;
}

template <class F>
__device__ __forceinline__ void block_for_each(const float* x, long long n, F f) {
    long long head = head_to_16(x, n);
    for (long long j = threadIdx.x; j < head; j += blockDim.x) f(j, x[j]);
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    long long n4 = (n - head) / 4;
    for (long long k = threadIdx.x; k < n4; k += blockDim.x) {
        float4 v = x4[k];
        long long j = head + 4 * k;
        f(j, v.x); f(j + 1, v.y); f(j + 2, v.z); f(j + 3, v.w);
    }
    for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) f(j, x[j]);
}

template <class F>
__device__ __forceinline__ void block_transform(const float* x, float* y, long long n, F f) {
    bool same_phase = (((unsigned long long)x ^ (unsigned long long)y) & 15) == 0;
    long long head = same_phase ? head_to_16(x, n) : n;
    for (long long j = threadIdx.x; j < head; j += blockDim.x) y[j] = f(j, x[j]);
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    float4* y4 = reinterpret_cast<float4*>(y + head);
    long long n4 = (n - head) / 4;
    for (long long k = threadIdx.x; k < n4; k += blockDim.x) {
        float4 v = x4[k];
        long long j = head + 4 * k;
        y4[k] = make_float4(f(j, v.x), f(j + 1, v.y), f(j + 2, v.z), f(j + 3, v.w));
    }
    for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) y[j] = f(j, x[j]);
}

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(FULL_MASK, v, lane_mask); }
__device__ __forceinline__ double shfl_xor(double v, int lane_mask) { return __shfl_xor_sync(FULL_MASK, v, lane_mask); }

template <class T, class C>
__device__ __forceinline__ T warp_reduce(T v, C combine) {
    for (int o = 16; o > 0; o >>= 1) v = combine(v, shfl_xor(v, o));
    return v;
}

template <class T, class C>
__device__ __forceinline__ T block_reduce(T v, T* part, T empty, C combine) {
    v = warp_reduce(v, combine);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nwarps ? part[lane] : empty;
    return warp_reduce(v, combine);
}
