// cuda_emu.h: runs unchanged CUDA C kernels on the host CPU, for testing.
//
// A generated stub #includes this header, then a .cu file, then registers the
// file's `extern "C" __global__` kernels (EMU_KERNEL_TABLE below). Python
// (tinysft/cuda/emulator.py) compiles the stub with g++ -std=c++20 -fno-weak
// and calls emu_launch() through ctypes.
//
// Thread model
//   * Blocks run one at a time (order depends on the schedule). The threads of a
//     block are fibers on mmap'd stacks with a PROT_NONE guard page, switched by
//     a six-register x86-64 routine (ucontext where that is unavailable or
//     EMU_USE_UCONTEXT is defined).
//   * A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle,
//     __syncwarp, a vote) or returns; the scheduler then picks the next ready
//     fiber. Schedules: forward / reverse round-robin, greedy (lowest ready
//     thread: warp 0 runs as far ahead as it can), greedy-reverse (highest warp
//     first), seeded random. Correct kernels give bit-identical results under
//     all of them; a missing barrier usually does not.
//   * `__shared__` variables live in the `emu_shared` section, which is refilled
//     with 0xFF bytes (a NaN pattern) before every block.
//   * Shuffles go through a per-warp exchange: results are computed when the
//     last lane in the mask arrives; reading a lane outside the mask is an error.
//   * Errors (deadlock, threads at different barriers, a barrier after some
//     threads returned, bad masks) abort the launch with a message.
//   * MXCSR flush-to-zero and denormals-are-zero are on during a launch,
//     matching CuPy's default -ftz=true.
// Limits: no dynamic shared memory; no inter-block races, memory-model effects,
// coalescing or timing; no FMA contraction (x86-64 g++ does not contract without
// -mfma, nvcc does); one warp operation in flight per warp (disjoint masks
// running concurrently are reported as a mismatch); a stack overflow hits the
// guard page and crashes rather than raising; __shared__ variables inside
// template functions escape the refill (so csrc/common.cuh takes its shared
// buffers from the kernel).
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <xmmintrin.h>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define EMU_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif
#if !defined(__x86_64__)
#define EMU_USE_UCONTEXT 1
#endif
#if defined(EMU_USE_UCONTEXT)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------
// CUDA vocabulary
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("emu_shared")))

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
constexpr int warpSize = 32;

namespace cuda_emu {

enum State : int { READY, AT_BARRIER, AT_WARP_OP, DONE };
enum WarpKind : int { SHFL_IDX, SHFL_XOR, SHFL_DOWN, SHFL_UP, SYNCWARP, BALLOT, ANY, ALL };
static const char* const kWarpKindName[] = {"__shfl_sync", "__shfl_xor_sync", "__shfl_down_sync",
                                            "__shfl_up_sync", "__syncwarp", "__ballot_sync",
                                            "__any_sync", "__all_sync"};

struct Ctx {
#if defined(EMU_USE_UCONTEXT)
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
    char* stack_lo = nullptr;  // usable stack (above the guard page)
    size_t stack_size = 0;
    void* asan_fake = nullptr;
    void* tsan_fiber = nullptr;
};

struct Fiber {
    Ctx ctx;
    uint3 thread_idx;
    int index = 0;  // linear thread index in the block
    State state = DONE;
    const char* file = nullptr;  // site of the barrier it waits at
    int line = 0;
};

struct WarpExchange {
    int kind = -1;
    unsigned mask = 0, arrived = 0;
    const char* file = nullptr;
    int line = 0;
    uint64_t value[32];
    int arg[32], width[32];
    uint64_t result[32];
    unsigned generation = 0;
};

// Launch state. Launches are serialised by g_launch_mutex, so plain globals.
static std::mutex g_launch_mutex;
static Ctx g_sched;
static std::vector<Fiber> g_fibers;
static std::vector<WarpExchange> g_warps;
static Fiber* g_current = nullptr;  // read relaxed-atomically (TSan)
static int g_nthreads = 0, g_done = 0;
static unsigned g_barrier_gen = 0;
static std::string g_error;
static void (*g_body)(void**) = nullptr;
static void** g_args = nullptr;
static char* g_stack_pool = nullptr;
static size_t g_stack_pool_bytes = 0;
static bool g_stacks_dirty = false;  // a launch was aborted with fibers mid-stack
static std::vector<void*> g_tsan_fibers;
[[maybe_unused]] static char g_tsan_block_start, g_tsan_block_end, g_tsan_barrier[2];

}  // namespace cuda_emu

static uint3 blockIdx;
static dim3 blockDim, gridDim;
#define threadIdx (__atomic_load_n(&::cuda_emu::g_current, __ATOMIC_RELAXED)->thread_idx)

namespace cuda_emu {

#if defined(EMU_ASAN)
constexpr size_t kStackBytes = 1 << 20;
#else
constexpr size_t kStackBytes = 128 << 10;
#endif
constexpr size_t kGuardBytes = 4096;

// ---------------------------------------------------------------------------
// Context switching
// ---------------------------------------------------------------------------
#if !defined(EMU_USE_UCONTEXT)
// emu_switch(void** save_sp, void* next_sp): push callee-saved registers, save
// rsp, load the other stack, pop its registers, return into it.
asm(R"(
    .text
    .p2align 4
    .globl emu_switch_x86_64
    .hidden emu_switch_x86_64
    .type emu_switch_x86_64, @function
emu_switch_x86_64:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_x86_64, .-emu_switch_x86_64
)");
extern "C" void emu_switch_x86_64(void** save_sp, void* next_sp);
#endif

void fiber_main();

__attribute__((no_sanitize("thread"))) inline void switch_ctx(Ctx* from, Ctx* to, bool from_done) {
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(from_done ? nullptr : &from->asan_fake, to->stack_lo, to->stack_size);
#else
    (void)from_done;
#endif
#if defined(EMU_TSAN)
    __tsan_switch_to_fiber(to->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(EMU_USE_UCONTEXT)
    swapcontext(&from->uc, &to->uc);
#else
    emu_switch_x86_64(&from->sp, to->sp);
#endif
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr);
#endif
}

__attribute__((no_sanitize("thread"))) inline void init_fiber_ctx(Fiber& f, char* lo, size_t size) {
    f.ctx.stack_lo = lo;
    f.ctx.stack_size = size;
    f.ctx.asan_fake = nullptr;
#if defined(EMU_ASAN)
    // A finished fiber leaves the redzones of its last frames (fiber_main never returns); an aborted
    // launch leaves whole kernel frames.
    size_t stale = g_stacks_dirty ? size : std::min<size_t>(size, 16 << 10);
    __asan_unpoison_memory_region(lo + size - stale, stale);
#endif

#if defined(EMU_USE_UCONTEXT)
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = lo;
    f.ctx.uc.uc_stack.ss_size = size;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#else
    // Stack image popped by emu_switch_x86_64: r15 r14 r13 r12 rbx rbp, then
    // the return address fiber_main; a zero fake return address above it.
    auto top = reinterpret_cast<uintptr_t>(lo + size) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top - 64);
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&fiber_main);
    sp[7] = nullptr;
    f.ctx.sp = sp;
#endif
}

// ---------------------------------------------------------------------------
// Fiber side: barriers and warp operations
// ---------------------------------------------------------------------------
__attribute__((no_sanitize("thread"))) inline Fiber* self() { return g_current; }

// Records an error and leaves the fiber for good: the scheduler aborts the launch.
[[noreturn]] __attribute__((no_sanitize("thread"))) inline void fail(const std::string& msg) {
    if (g_error.empty()) g_error = msg;
    Fiber* f = self();
    switch_ctx(&f->ctx, &g_sched, true);
    __builtin_trap();  // never resumed
}

inline std::string where(const char* file, int line) {
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

inline std::string thread_name(int index) {
    const Fiber& f = g_fibers[index];
    return "thread (" + std::to_string(f.thread_idx.x) + "," + std::to_string(f.thread_idx.y) + "," +
           std::to_string(f.thread_idx.z) + ") of block (" + std::to_string(blockIdx.x) + "," +
           std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

__attribute__((no_sanitize("thread"))) inline void yield_to_scheduler() {
    Fiber* f = self();
    switch_ctx(&f->ctx, &g_sched, false);
}

__attribute__((no_sanitize("thread"))) inline void sync_block(const char* file, int line) {
    Fiber* f = self();
    f->state = AT_BARRIER;
    f->file = file;
    f->line = line;
    unsigned gen = g_barrier_gen;
#if defined(EMU_TSAN)
    __tsan_release(&g_tsan_barrier[gen & 1]);
#endif
    yield_to_scheduler();
#if defined(EMU_TSAN)
    __tsan_acquire(&g_tsan_barrier[gen & 1]);
#else
    (void)gen;
#endif
}

inline unsigned lanes_present(int warp) {
    int n = g_nthreads - warp * 32;
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

inline std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

// Source lane for lane `l` of a shuffle, following the CUDA programming guide:
// a source outside the caller's width segment yields the caller's own value.
inline int shuffle_source(int kind, int l, int arg, int width) {
    int seg = l & ~(width - 1);
    switch (kind) {
        case SHFL_IDX: return seg + (arg & (width - 1));
        case SHFL_XOR: { int s = l ^ arg; return (s & ~(width - 1)) == seg && s < 32 ? s : l; }
        case SHFL_DOWN: { int s = l + arg; return s < seg + width ? s : l; }
        case SHFL_UP: { int s = l - arg; return s >= seg ? s : l; }
    }
    return l;
}

__attribute__((no_sanitize("thread"))) inline void complete_warp_op(int warp, WarpExchange& w) {
    unsigned ballot = 0;
    int count = 0;
    for (int l = 0; l < 32; ++l)
        if ((w.mask >> l & 1u) && w.value[l] != 0) { ballot |= 1u << l; ++count; }
    for (int l = 0; l < 32; ++l) {
        if (!(w.mask >> l & 1u)) continue;
        uint64_t r = 0;
        switch (w.kind) {
            case BALLOT: r = ballot; break;
            case ANY: r = count > 0; break;
            case ALL: r = count == __builtin_popcount(w.mask); break;
            case SYNCWARP: break;
            default: {
                int s = shuffle_source(w.kind, l, w.arg[l], w.width[l]);
                if (!(w.mask >> s & 1u))
                    fail(std::string(kWarpKindName[w.kind]) + " at " + where(w.file, w.line) + ": lane " +
                         std::to_string(l) + " of warp " + std::to_string(warp) + " reads lane " +
                         std::to_string(s) + ", which did not take part (mask " + hex(w.mask) + ")");
                r = w.value[s];
            }
        }
        w.result[l] = r;
        g_fibers[warp * 32 + l].state = READY;
    }
    w.arrived = 0;
    w.kind = -1;
    ++w.generation;
}

// One lane arrives at a warp-level operation; returns its result bits once
// every lane in `mask` has arrived.
__attribute__((no_sanitize("thread"))) inline uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg,
                                                               int width, const char* file, int line) {
    Fiber* f = self();
    int warp = f->index / 32, lane = f->index % 32;
    WarpExchange& w = g_warps[warp];
    std::string op = std::string(kWarpKindName[kind]) + " at " + where(file, line) + ": ";
    if (!(mask >> lane & 1u))
        fail(op + thread_name(f->index) + " (lane " + std::to_string(lane) + ") calls it with mask " + hex(mask) +
             ", which excludes itself");
    if (mask & ~lanes_present(warp))
        fail(op + "mask " + hex(mask) + " names lanes that do not exist in warp " + std::to_string(warp) +
             " (present " + hex(lanes_present(warp)) + ")");
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail(op + "width " + std::to_string(width) + " is not a power of two in [1, 32]");
    if (w.arrived && (w.kind != kind || w.mask != mask || w.line != line || std::strcmp(w.file, file) != 0))
        fail(op + "lane " + std::to_string(lane) + " (mask " + hex(mask) + ") meets lanes of warp " +
             std::to_string(warp) + " waiting in " + kWarpKindName[w.kind] + " at " + where(w.file, w.line) +
             " with mask " + hex(w.mask));
    for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && g_fibers[warp * 32 + l].state == DONE)
            fail(op + "mask " + hex(mask) + " includes lane " + std::to_string(l) + " of warp " +
                 std::to_string(warp) + ", which has already returned");
    w.kind = kind;
    w.mask = mask;
    w.file = file;
    w.line = line;
    w.value[lane] = value;
    w.arg[lane] = arg;
    w.width[lane] = width;
    w.arrived |= 1u << lane;
    f->state = AT_WARP_OP;
    f->file = file;
    f->line = line;
    unsigned gen = w.generation;
#if defined(EMU_TSAN)
    __tsan_release(&w.result[gen & 1]);
#endif
    if (w.arrived == mask) complete_warp_op(warp, w);
    yield_to_scheduler();
#if defined(EMU_TSAN)
    __tsan_acquire(&w.result[gen & 1]);
#else
    (void)gen;
#endif
    return w.result[lane];
}

template <class T>
inline T shuffle(int kind, unsigned mask, T var, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_op(kind, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

// ---------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------
enum Schedule : int { FORWARD, REVERSE, GREEDY, GREEDY_REVERSE, RANDOM };

__attribute__((no_sanitize("thread"))) inline void fiber_main() {
#if defined(EMU_ASAN)
    const void* lo;
    size_t size;
    __sanitizer_finish_switch_fiber(nullptr, &lo, &size);
    g_sched.stack_lo = static_cast<char*>(const_cast<void*>(lo));
    g_sched.stack_size = size;
#endif
#if defined(EMU_TSAN)
    __tsan_acquire(&g_tsan_block_start);
#endif
    g_body(g_args);
#if defined(EMU_TSAN)
    __tsan_release(&g_tsan_block_end);
#endif
    Fiber* f = self();
    f->state = DONE;
    ++g_done;
    switch_ctx(&f->ctx, &g_sched, true);
    __builtin_trap();
}

struct Picker {
    Schedule schedule;
    std::vector<int> order;  // position -> thread index
    int cursor = 0;
    uint64_t rng;

    Picker(Schedule s, int n, uint64_t seed) : schedule(s), order(n), rng(seed * 0x9E3779B97F4A7C15ull + 1) {
        int nwarps = (n + 31) / 32, k = 0;
        if (s == GREEDY_REVERSE) {
            for (int w = nwarps - 1; w >= 0; --w)
                for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) order[k++] = i;
        } else {
            for (int i = 0; i < n; ++i) order[i] = s == REVERSE ? n - 1 - i : i;
        }
    }
    uint64_t next_random() {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        return rng;
    }
    // Round-robin from the cursor (forward/reverse/random start); the lowest
    // position (greedy). Returns -1 if no thread is ready.
    int pick() {
        int n = static_cast<int>(order.size());
        int start = schedule == RANDOM ? static_cast<int>(next_random() % n)
                    : (schedule == GREEDY || schedule == GREEDY_REVERSE) ? 0 : cursor;
        for (int k = 0; k < n; ++k) {
            int pos = (start + k) % n;
            if (g_fibers[order[pos]].state == READY) {
                cursor = pos + 1;
                return order[pos];
            }
        }
        return -1;
    }
};

// Called when no fiber is ready: releases a complete __syncthreads or reports
// why the block is stuck. Returns false on error.
inline bool resolve_block_barrier() {
    int first_barrier = -1, first_done = -1, first_warp = -1;
    for (int i = 0; i < g_nthreads; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state == AT_BARRIER && first_barrier < 0) first_barrier = i;
        if (f.state == DONE && first_done < 0) first_done = i;
        if (f.state == AT_WARP_OP && first_warp < 0) first_warp = i;
    }
    if (first_warp >= 0) {  // a warp operation waits for lanes that will never arrive
        const Fiber& w = g_fibers[first_warp];
        const WarpExchange& x = g_warps[first_warp / 32];
        std::string msg = std::string(kWarpKindName[x.kind]) + " at " + where(w.file, w.line) + " (mask " +
                          hex(x.mask) + ", arrived " + hex(x.arrived) + ") waits forever: ";
        int missing = __builtin_ctz(x.mask & ~x.arrived);
        const Fiber& m = g_fibers[first_warp / 32 * 32 + missing];
        if (m.state == DONE)
            msg += "the mask includes lane " + std::to_string(missing) + ", which has already returned";
        else
            msg += "deadlock: lane " + std::to_string(missing) + " waits at " +
                   (m.state == AT_BARRIER ? std::string("__syncthreads") : std::string("another warp operation")) +
                   " at " + where(m.file, m.line);
        g_error = msg;
        return false;
    }
    const Fiber& b = g_fibers[first_barrier];
    if (first_done >= 0) {
        g_error = "__syncthreads at " + where(b.file, b.line) + " reached by " + thread_name(first_barrier) +
                  " after " + thread_name(first_done) + " returned (" + std::to_string(g_done) + " of " +
                  std::to_string(g_nthreads) + " threads have returned)";
        return false;
    }
    for (int i = 0; i < g_nthreads; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.line != b.line || std::strcmp(f.file, b.file) != 0) {
            g_error = "threads at different barriers: " + thread_name(first_barrier) + " at __syncthreads at " +
                      where(b.file, b.line) + ", " + thread_name(i) + " at __syncthreads at " +
                      where(f.file, f.line);
            return false;
        }
    }
    ++g_barrier_gen;
    for (int i = 0; i < g_nthreads; ++i) g_fibers[i].state = READY;
    return true;
}

__attribute__((no_sanitize("thread"))) inline bool run_block(Picker& picker) {
    char* stacks = g_stack_pool;
    for (int i = 0; i < g_nthreads; ++i) {
        Fiber& f = g_fibers[i];
        f.index = i;
        f.thread_idx = {static_cast<unsigned>(i % blockDim.x), static_cast<unsigned>(i / blockDim.x % blockDim.y),
                        static_cast<unsigned>(i / (blockDim.x * blockDim.y))};
        f.state = READY;
        f.file = nullptr;
        f.line = 0;
        init_fiber_ctx(f, stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes, kStackBytes);
    }
    for (auto& w : g_warps) { w.arrived = 0; w.kind = -1; }
    g_done = 0;
#if defined(EMU_TSAN)
    __tsan_release(&g_tsan_block_start);
#endif
    g_stacks_dirty = false;
    bool ok = true;
    while (g_done < g_nthreads) {
        int next = picker.pick();
        if (next < 0) {
            if (!resolve_block_barrier()) { ok = false; break; }
            continue;
        }
        __atomic_store_n(&g_current, &g_fibers[next], __ATOMIC_RELAXED);
        switch_ctx(&g_sched, &g_fibers[next].ctx, false);
        if (!g_error.empty()) { ok = false; break; }
    }
#if defined(EMU_TSAN)
    __tsan_acquire(&g_tsan_block_end);
#endif
    return ok;
}

// Refills every __shared__ variable with 0xFF bytes (skipping the sanitizer's
// bookkeeping: byte stores through a volatile pointer, not memset).
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));
__attribute__((no_sanitize("address", "thread"))) inline void poison_shared() {
    volatile char* p = __start_emu_shared;
    for (; p && p < __stop_emu_shared; ++p) *p = static_cast<char>(0xFF);
}

inline bool ensure_stacks(int nthreads) {
    size_t need = static_cast<size_t>(nthreads) * (kStackBytes + kGuardBytes);
    if (need <= g_stack_pool_bytes) return true;
    if (g_stack_pool) munmap(g_stack_pool, g_stack_pool_bytes);
    void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { g_stack_pool = nullptr; g_stack_pool_bytes = 0; return false; }
    g_stack_pool = static_cast<char*>(p);
    g_stack_pool_bytes = need;
    for (int i = 0; i < nthreads; ++i) mprotect(g_stack_pool + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
    return true;
}

// ---------------------------------------------------------------------------
// Kernel registration: the parameter types become a signature string that
// Python checks arguments against, e.g. "pf32c,i64,f32".
// ---------------------------------------------------------------------------
template <class T> constexpr const char* scalar_code() {
    if constexpr (std::is_same_v<T, float>) return "f32";
    else if constexpr (std::is_same_v<T, double>) return "f64";
    else if constexpr (std::is_same_v<T, int>) return "i32";
    else if constexpr (std::is_same_v<T, unsigned int>) return "u32";
    else if constexpr (std::is_same_v<T, long long> || std::is_same_v<T, long>) return "i64";
    else if constexpr (std::is_same_v<T, unsigned long long> || std::is_same_v<T, unsigned long>) return "u64";
    else if constexpr (std::is_same_v<T, float4>) return "f32x4";
    else static_assert(!sizeof(T), "kernel parameter type not supported by the emulator");
}

template <class T> std::string type_code() {
    using U = std::remove_cv_t<std::remove_reference_t<T>>;
    if constexpr (std::is_pointer_v<U>) {
        using E = std::remove_pointer_t<U>;
        return std::string("p") + scalar_code<std::remove_cv_t<E>>() + (std::is_const_v<E> ? "c" : "");
    } else {
        return scalar_code<U>();
    }
}

struct Kernel {
    const char* name;
    std::string signature;
    void (*body)(void**);
};

template <auto Fn, class... A, size_t... I>
void invoke(void** args, std::index_sequence<I...>) {
    Fn(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <auto Fn, class... A>
Kernel make_kernel(const char* name, void (*)(A...)) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ","), sig += type_code<A>()), ...);
    return {name, sig, [](void** args) { invoke<Fn, A...>(args, std::index_sequence_for<A...>{}); }};
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------
// Device functions and intrinsics
// ---------------------------------------------------------------------------
#define __syncthreads() ::cuda_emu::sync_block(__FILE__, __LINE__)
#define __syncwarp(...) ((void)::cuda_emu::warp_op(::cuda_emu::SYNCWARP, ::cuda_emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, var, src, ...) ::cuda_emu::shuffle(::cuda_emu::SHFL_IDX, mask, var, src, ::cuda_emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lm, ...) ::cuda_emu::shuffle(::cuda_emu::SHFL_XOR, mask, var, lm, ::cuda_emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, d, ...) ::cuda_emu::shuffle(::cuda_emu::SHFL_DOWN, mask, var, d, ::cuda_emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, d, ...) ::cuda_emu::shuffle(::cuda_emu::SHFL_UP, mask, var, d, ::cuda_emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, p) static_cast<unsigned>(::cuda_emu::warp_op(::cuda_emu::BALLOT, mask, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) static_cast<int>(::cuda_emu::warp_op(::cuda_emu::ANY, mask, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) static_cast<int>(::cuda_emu::warp_op(::cuda_emu::ALL, mask, (p) != 0, 0, 32, __FILE__, __LINE__))

namespace cuda_emu {
inline unsigned syncwarp_mask(unsigned mask = 0xffffffffu) { return mask; }
inline int width_arg(int width = 32) { return width; }
}  // namespace cuda_emu

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;

// ---------------------------------------------------------------------------
// Entry points for Python (ctypes)
// ---------------------------------------------------------------------------
#define EMU_KERNEL(name) ::cuda_emu::make_kernel<&name>(#name, &name)
#define EMU_KERNEL_TABLE(...)                                                                              \
    static const ::cuda_emu::Kernel emu_kernels[] = {__VA_ARGS__};                                        \
    extern "C" int emu_num_kernels() { return sizeof emu_kernels / sizeof emu_kernels[0]; }               \
    extern "C" const char* emu_kernel_name(int k) { return emu_kernels[k].name; }                         \
    extern "C" const char* emu_kernel_signature(int k) { return emu_kernels[k].signature.c_str(); }       \
    extern "C" int emu_launch(int k, const long long* grid, const long long* block, void** args,         \
                              int schedule, unsigned long long seed, char* err, int errlen) {             \
        return ::cuda_emu::launch(emu_kernels[k].body, grid, block, args, schedule, seed, err, errlen);  \
    }

namespace cuda_emu {

// Runs every block of the grid under `schedule`; returns 0, or 1 with a
// message in err.
inline int launch(void (*body)(void**), const long long* grid, const long long* block, void** args,
                  int schedule, unsigned long long seed, char* err, int errlen) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    int nthreads = static_cast<int>(block[0] * block[1] * block[2]);
    long long nblocks = grid[0] * grid[1] * grid[2];
    g_error.clear();
    if (!ensure_stacks(nthreads)) g_error = "cannot allocate fiber stacks";
    g_fibers.assign(nthreads, Fiber{});
#if defined(EMU_TSAN)
    while (g_tsan_fibers.size() < static_cast<size_t>(nthreads)) g_tsan_fibers.push_back(__tsan_create_fiber(0));
    for (int i = 0; i < nthreads; ++i) g_fibers[i].ctx.tsan_fiber = g_tsan_fibers[i];
#endif
    g_warps.assign((nthreads + 31) / 32, WarpExchange{});
    g_nthreads = nthreads;
    g_body = body;
    g_args = args;
    blockDim = {static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]), static_cast<unsigned>(block[2])};
    gridDim = {static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2])};
#if defined(EMU_TSAN)
    g_sched.tsan_fiber = __tsan_get_current_fiber();
#endif
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
    Picker picker(static_cast<Schedule>(schedule), nthreads, seed);
    std::vector<long long> block_order(nblocks);
    for (long long b = 0; b < nblocks; ++b) block_order[b] = schedule == REVERSE ? nblocks - 1 - b : b;
    if (schedule == RANDOM)
        for (long long b = nblocks - 1; b > 0; --b)
            std::swap(block_order[b], block_order[picker.next_random() % (b + 1)]);
    for (long long k = 0; k < nblocks && g_error.empty(); ++k) {
        long long b = block_order[k];
        blockIdx = {static_cast<unsigned>(b % grid[0]), static_cast<unsigned>(b / grid[0] % grid[1]),
                    static_cast<unsigned>(b / (grid[0] * grid[1]))};
        poison_shared();
        run_block(picker);
    }
    _mm_setcsr(csr);
    if (!g_error.empty()) g_stacks_dirty = true;
    __atomic_store_n(&g_current, nullptr, __ATOMIC_RELAXED);
    if (g_error.empty()) return 0;
    std::snprintf(err, errlen, "%s", g_error.c_str());
    return 1;
}

}  // namespace cuda_emu
