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
// then a block reduction; a second pass writes the gradient. Both passes and
// the reduction are the shared ones of common.cuh, so rows need not be 16-byte
// aligned.
//
// Launch: grid (N), block (B) with B a multiple of 32 in [32, 1024]; no
// dynamic shared memory.

#include "common.cuh"

// The running state of one thread (and, reduced, of the row): max m, sum of
// exp(x - m) s, and the plain sum of x for label smoothing.
struct RowStats {
    float m, s;
    double sum_x;
};

// Folds one element into a running (m, s). (-inf, 0) is the empty state; a
// -inf element adds nothing (exp(-inf - -inf) would be NaN).
__device__ __forceinline__ void ce_update(RowStats& r, float x) {
    if (x > r.m) {
        r.s = r.s * expf(r.m - x) + 1.0f;
        r.m = x;
    } else if (x != NEG_INF) {
        r.s += expf(x - r.m);
    }
    r.sum_x += x;
}

// Merges two states; symmetric in a and b, so every lane of a butterfly agrees.
__device__ __forceinline__ RowStats ce_merge(RowStats a, RowStats b) {
    float mm = fmaxf(a.m, b.m);
    RowStats r = {mm, 0.0f, a.sum_x + b.sum_x};
    if (mm == NEG_INF) return r;  // both empty: exp(-inf - -inf) would be NaN
    r.s = a.s * expf(a.m - mm) + b.s * expf(b.m - mm);
    return r;
}

__device__ __forceinline__ RowStats shfl_xor(RowStats v, int lane_mask) {
    return {shfl_xor(v.m, lane_mask), shfl_xor(v.s, lane_mask), shfl_xor(v.sum_x, lane_mask)};
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

    __shared__ RowStats warp_part[32];
    RowStats r = {NEG_INF, 0.0f, 0.0};
    block_for_each(x, V, [&](long long, float v) { ce_update(r, v); });
    float x_t = 0.0f;
    if (threadIdx.x == 0 && valid) x_t = x[t];  // read before the barrier: dx may alias x
    r = block_reduce(r, warp_part, RowStats{NEG_INF, 0.0f, 0.0}, ce_merge);
    float m = r.m, s = r.s;
    double sum_x = r.sum_x;

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
        block_transform(x, dx, V, [&](long long, float) { return 0.0f; });
        return;
    }
    float inv_s = 1.0f / s;
    float p_scale = z_loss != 0.0f ? 1.0f + 2.0f * z_loss * lse : 1.0f;
    float hit = 1.0f - eps, smooth = eps / (float)V;
    block_transform(x, dx, V, [&](long long j, float v) {
        float g = expf(v - m) * inv_s * p_scale - smooth;
        if (j == t) g -= hit;
        return g * row_scale;
    });
}
