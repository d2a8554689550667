// clip.cu: gradient clipping over many float32 tensors, one launch per step.
//
// Multi-tensor table (device arrays): tensor k starts at address ptrs[k]
// (uint64) and holds sizes[k] (int64) elements. The work is cut into chunks:
// chunk b covers elements [chunk_start[b], min(chunk_start[b] + chunk, sizes[k]))
// of tensor k = chunk_tensor[b].
//
//   clip_sumsq     partial[b] = sum x^2 over chunk b, in float64        grid (num_chunks), block (B)
//   clip_finalize  total = sum_b partial[b] (fixed order), norm = sqrt(total)
//                  scale = min(1, max_norm / (norm + 1e-6)), or 1 when norm is
//                  not finite (then *nonfinite = 1)                       grid (1), block (B)
//   clip_scale     x *= *scale over every chunk (skipped when scale == 1) grid (num_chunks), block (B)
//   clip_value     x = clamp(x, -c, c), NaN stays NaN                     grid (num_chunks), block (B)
//
// Deterministic: float64 per-thread sums, a fixed shuffle tree, per-block
// partials and a one-block final reduction; no float atomics. A float64 sum of
// squares of finite float32 values cannot overflow, so a non-finite total means
// a non-finite gradient. B is a multiple of 32 in [32, 1024]. Pointers need
// 4-byte alignment (the loops of common.cuh use float4 only from the first
// 16-byte boundary on).

#include "common.cuh"

__device__ __forceinline__ double add_f64(double a, double b) { return a + b; }

// The chunk of blockIdx.x: its first element and its length.
__device__ __forceinline__ float* clip_chunk(const unsigned long long* ptrs, const long long* sizes,
                                             const long long* chunk_tensor, const long long* chunk_start,
                                             long long chunk, long long& n) {
    long long k = chunk_tensor[blockIdx.x], start = chunk_start[blockIdx.x];
    long long end = start + chunk < sizes[k] ? start + chunk : sizes[k];
    n = end - start;
    return reinterpret_cast<float*>(ptrs[k]) + start;
}

extern "C" __global__ void clip_sumsq(const unsigned long long* ptrs, const long long* sizes,
                                      const long long* chunk_tensor, const long long* chunk_start, long long chunk,
                                      double* partial) {
    long long n;
    const float* x = clip_chunk(ptrs, sizes, chunk_tensor, chunk_start, chunk, n);
    __shared__ double warp_part[32];
    double acc = 0.0;
    block_for_each(x, n, [&](long long, float v) { acc += (double)v * (double)v; });
    acc = block_reduce(acc, warp_part, 0.0, add_f64);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void clip_finalize(const double* partial, long long num_partial, double max_norm,
                                         double* norm, float* scale, int* nonfinite) {
    __shared__ double warp_part[32];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < num_partial; i += blockDim.x) acc += partial[i];
    acc = block_reduce(acc, warp_part, 0.0, add_f64);
    if (threadIdx.x == 0) {
        double total = sqrt(acc);
        bool finite = isfinite(total);
        double coef = max_norm / (total + 1e-6);
        *norm = total;
        *scale = finite && coef < 1.0 ? (float)coef : 1.0f;
        *nonfinite = finite ? 0 : 1;
    }
}

extern "C" __global__ void clip_scale(const unsigned long long* ptrs, const long long* sizes,
                                      const long long* chunk_tensor, const long long* chunk_start, long long chunk,
                                      const float* scale) {
    float c = *scale;
    if (c == 1.0f) return;
    long long n;
    float* x = clip_chunk(ptrs, sizes, chunk_tensor, chunk_start, chunk, n);
    block_transform(x, x, n, [&](long long, float v) { return v * c; });
}

extern "C" __global__ void clip_value(const unsigned long long* ptrs, const long long* sizes,
                                      const long long* chunk_tensor, const long long* chunk_start, long long chunk,
                                      float clip) {
    long long n;
    float* x = clip_chunk(ptrs, sizes, chunk_tensor, chunk_start, chunk, n);
    block_transform(x, x, n, [&](long long, float v) { return v < -clip ? -clip : (v > clip ? clip : v); });
}
