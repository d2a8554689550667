// cross_entropy.cu: softmax cross-entropy, forward and backward in one launch.
//
// For row i of logits x [N, V] (float32, C-contiguous) with target t = targets[i]:
//   m   = max_j x_j        s = sum_j exp(x_j - m)        lse = m + log s
//   loss[i]      = (1 - eps) (lse - x_t) + eps (lse - mean_j x_j) + z lse^2
//   dlogits[i,j] = row_scale * (p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V),  p_j = exp(x_j - m) / s
// eps is label smoothing with PyTorch semantics (target distribution
// (1 - eps) onehot + eps / V), z the z-loss weight. Loss terms are formed as
// (m - x_t) + log s so that huge logits (1e4) lose no digits to cancellation.
//   * t == ignore_index: loss 0, gradient 0 (lse is still written).
//   * t outside [0, V): *error = 1, loss NaN, gradient 0; nothing is read out of bounds.
// Targets are int64. dlogits may alias logits (gradient written in place): the
// block barrier in the reduction orders every read of the row before any write.
//
// One streaming pass keeps a running (max, rescaled sum of exp) per thread,
// then a block reduction; a second pass writes the gradient. Rows need not be
// 16-byte aligned: each pass uses a scalar head up to the first 16-byte
// boundary, float4 in the middle, and a scalar tail.
//
// Launch: grid (N), block (B) with B a multiple of 32 in [32, 1024]; no
// dynamic shared memory.

#define CE_NEG_INF __int_as_float(0xff800000)
#define CE_FULL_MASK 0xffffffffu

// Folds one element into a running (m, s). (-inf, 0) is the empty state; a
// -inf element adds nothing (exp(-inf - -inf) would be NaN).
__device__ __forceinline__ void ce_update(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else if (x != CE_NEG_INF) {
        s += expf(x - m);
    }
}

// Merges two running (m, s); symmetric, so every lane of a butterfly agrees.
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == CE_NEG_INF) return;  // both empty: exp(-inf - -inf) would be NaN
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Calls f(j, x[j]) for every j in [0, n), each j on exactly one thread.
template <class F>
__device__ __forceinline__ void ce_for_each(const float* x, long long n, F f) {
    long long head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;
    if (head > n) head = n;
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

// y[j] = f(j, x[j]) for every j in [0, n); float4 when x and y share their
// 16-byte phase (always when in place), scalar otherwise.
template <class F>
__device__ __forceinline__ void ce_transform(const float* x, float* y, long long n, F f) {
    long long head = n;
    if ((((unsigned long long)x ^ (unsigned long long)y) & 15) == 0) {
        head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;
        if (head > n) head = n;
    }
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

// Block-wide reduction of (m, s) and sum_x; every thread gets the totals.
__device__ __forceinline__ void ce_block_reduce(float& m, float& s, double& sum_x) {
    __shared__ float warp_m[32];
    __shared__ float warp_s[32];
    __shared__ double warp_sum[32];
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(CE_FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(CE_FULL_MASK, s, o);
        sum_x += __shfl_xor_sync(CE_FULL_MASK, sum_x, o);
        ce_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
        warp_sum[warp] = sum_x;
    }
    __syncthreads();
    m = lane < nwarps ? warp_m[lane] : CE_NEG_INF;
    s = lane < nwarps ? warp_s[lane] : 0.0f;
    sum_x = lane < nwarps ? warp_sum[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(CE_FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(CE_FULL_MASK, s, o);
        sum_x += __shfl_xor_sync(CE_FULL_MASK, sum_x, o);
        ce_merge(m, s, m2, s2);
    }
}

extern "C" __global__ void cross_entropy_fwd_bwd(const float* logits, float* dlogits, const long long* targets,
                                                 float* loss, float* lse_out, int* error, long long V,
                                                 long long ignore_index, float label_smoothing, float z_loss,
                                                 float row_scale) {
    long long row = blockIdx.x;
    const float* x = logits + row * V;
    float* dx = dlogits + row * V;
    long long t = targets[row];
    bool ignored = t == ignore_index;
    bool valid = !ignored && t >= 0 && t < V;

    float m = CE_NEG_INF, s = 0.0f, x_t = 0.0f;
    double sum_x = 0.0;
    ce_for_each(x, V, [&](long long, float v) {
        ce_update(m, s, v);
        sum_x += v;
    });
    if (threadIdx.x == 0 && valid) x_t = x[t];  // read before the barrier: dx may alias x
    ce_block_reduce(m, s, sum_x);

    float log_s = logf(s);
    float lse = m + log_s;
    float eps = label_smoothing;
    if (threadIdx.x == 0) {
        float l = 0.0f;
        if (valid) {
            l = (1.0f - eps) * ((m - x_t) + log_s);
            if (eps != 0.0f) l += eps * ((float)((double)m - sum_x / (double)V) + log_s);
            if (z_loss != 0.0f) l += z_loss * lse * lse;
        } else if (!ignored) {
            *error = 1;
            l = __int_as_float(0x7fc00000);  // NaN
        }
        loss[row] = l;
        lse_out[row] = lse;
    }

    if (!valid) {
        ce_transform(x, dx, V, [&](long long, float) { return 0.0f; });
        return;
    }
    float inv_s = 1.0f / s;
    float p_scale = z_loss != 0.0f ? 1.0f + 2.0f * z_loss * lse : 1.0f;
    float hit = 1.0f - eps, smooth = eps / (float)V;
    ce_transform(x, dx, V, [&](long long j, float v) {
        float g = expf(v - m) * inv_s * p_scale - smooth;
        if (j == t) g -= hit;
        return g * row_scale;
    });
}
