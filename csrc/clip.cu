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
// 4-byte alignment; float4 accesses are used only from the first 16-byte
// boundary on.

#define CLIP_FULL_MASK 0xffffffffu

// Calls f(x[j]) for j in [0, n), each j on one thread: scalar head up to the
// first 16-byte boundary, float4 body, scalar tail.
template <class F>
__device__ __forceinline__ void clip_for_each(const float* x, long long n, F f) {
    long long head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;
    if (head > n) head = n;
    for (long long j = threadIdx.x; j < head; j += blockDim.x) f(x[j]);
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    long long n4 = (n - head) / 4;
    for (long long k = threadIdx.x; k < n4; k += blockDim.x) {
        float4 v = x4[k];
        f(v.x); f(v.y); f(v.z); f(v.w);
    }
    for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) f(x[j]);
}

// x[j] = f(x[j]) in place for j in [0, n), same access pattern.
template <class F>
__device__ __forceinline__ void clip_update(float* x, long long n, F f) {
    long long head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;
    if (head > n) head = n;
    for (long long j = threadIdx.x; j < head; j += blockDim.x) x[j] = f(x[j]);
    float4* x4 = reinterpret_cast<float4*>(x + head);
    long long n4 = (n - head) / 4;
    for (long long k = threadIdx.x; k < n4; k += blockDim.x) {
        float4 v = x4[k];
        x4[k] = make_float4(f(v.x), f(v.y), f(v.z), f(v.w));
    }
    for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) x[j] = f(x[j]);
}

// Block-wide float64 sum; the result is valid on thread 0.
__device__ __forceinline__ double clip_block_sum(double v) {
    __shared__ double warp_sum[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CLIP_FULL_MASK, v, o);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) warp_sum[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_sum[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CLIP_FULL_MASK, v, o);
    }
    return v;
}

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
    double acc = 0.0;
    clip_for_each(x, n, [&](float v) { acc += (double)v * (double)v; });
    acc = clip_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void clip_finalize(const double* partial, long long num_partial, double max_norm,
                                         double* norm, float* scale, int* nonfinite) {
    double acc = 0.0;
    for (long long i = threadIdx.x; i < num_partial; i += blockDim.x) acc += partial[i];
    acc = clip_block_sum(acc);
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
    clip_update(x, n, [&](float v) { return v * c; });
}

extern "C" __global__ void clip_value(const unsigned long long* ptrs, const long long* sizes,
                                      const long long* chunk_tensor, const long long* chunk_start, long long chunk,
                                      float clip) {
    long long n;
    float* x = clip_chunk(ptrs, sizes, chunk_tensor, chunk_start, chunk, n);
    clip_update(x, n, [&](float v) { return v < -clip ? -clip : (v > clip ? clip : v); });
}
