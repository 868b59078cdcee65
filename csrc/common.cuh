// Shared device helpers of the acai_fast CUDA kernels: dtype conversion, Philox4x32-10 (bit-identical
// to triton.language.random), deterministic block sums and the last-block-done grid reduction.
// Header-only; included by mix.cu and acai_loss.cu (never by bindings.cpp, which sees only acai_fast.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "acai_fast.h"

namespace acai {

// ------------------------------------------------------------------ dtypes (fp32 math everywhere)
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ------------------------------------------------------------------ Philox4x32-10
// Exactly triton.language.random.randint4x(seed, offset) (Triton 3.x): counter (c0, c1, c2, c3) =
// (offset lo, offset hi, 0, 0), key (k0, k1) = (seed lo, seed hi), 10 rounds, key bumped after each.
// This is also Random123's philox4x32_10 (known-answer vectors checked in tests/test_mix.py).
// __host__ __device__ with exactly rounded arithmetic: the same source runs on the CPU through
// acai_fast._C.philox_alpha_host, which the CPU tests compare bit for bit with the reference
// (itself checked against Triton's tl.randint under the interpreter).
#define ACAI_HD __host__ __device__ __forceinline__

ACAI_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);  // mul.hi.u32 on the GPU
}

ACAI_HD uint32_t philox4x32_10_first(uint64_t seed, uint64_t counter) {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0u, c3 = 0u;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t p0 = c0, p2 = c2;
        c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
        c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
        c1 = 0xCD9E8D57u * p2;
        c3 = 0xD2511F53u * p0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c0;  // randint returns the first word of randint4x
}

// alpha from one Philox word w, computed so that no compiler can change it (every backend gets the
// same bits): x = w as int32, x < 0 -> ~x (Triton's uint_to_uniform_float: x in [0, 2^31 - 1], and
// tl.rand = x * scale); fold y = min(x, 2^31 - 1 - x) in integers (y in [0, 2^30 - 1], uniform);
// alpha = float(y) * scale, scale = float32(4.6566127342e-10) = 0x2fffffff = 0x1.fffffep-32.
// So alpha = 0.5 - |u - 0.5| with u = tl.rand(seed, counter) to within 2.4e-7 (exactly u for
// u < 0.5), and uniform on [0, 0.5): each y comes from exactly four words w. Why the fold in integers: `u - 0.5` after `x * scale` is an FMA candidate (nvcc and
// Triton both contract by default), which would make the float formula backend-dependent.
ACAI_HD float philox_alpha(uint64_t seed, uint64_t counter) {
    int32_t x = static_cast<int32_t>(philox4x32_10_first(seed, counter));
    x = x < 0 ? ~x : x;
    const int32_t y = x < 0x7fffffff - x ? x : 0x7fffffff - x;
#ifdef __CUDA_ARCH__
    return __fmul_rn(__int2float_rn(y), 0x1.fffffep-32f);  // never contracted
#else
    return static_cast<float>(y) * 0x1.fffffep-32f;
#endif
}

// ------------------------------------------------------------------ deterministic reductions
// Sum over a warp: butterfly (xor) shuffles, every lane gets the same total, fixed order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}

// Sum over a block (blockDim.x a multiple of 32, <= 1024): warp sums, then warp 0 adds the warp
// results in warp order. Returns the total in every thread. `smem` holds >= 33 floats; callers may
// reuse it only after the __syncthreads() at the end of this function.
__device__ __forceinline__ float block_sum(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nwarps ? smem[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) smem[32] = t;
    }
    __syncthreads();
    const float total = smem[32];
    __syncthreads();
    return total;
}

// Last-block-done: thread 0 of each block publishes its partial(s), fences, and takes a ticket
// from an int counter; the block with the last ticket sees every partial and finishes the
// reduction in a fixed order (no float atomics: the result is the same on every run), then resets
// the counter to 0 for the next launch. Returns true in every thread of the last block.
__device__ __forceinline__ bool take_last_block_ticket(unsigned int* counter, bool* s_flag) {
    if (threadIdx.x == 0) {
        __threadfence();  // this block's partials are visible to the GPU before its ticket
        const unsigned int ticket = atomicAdd(counter, 1u);
        *s_flag = ticket == gridDim.x * gridDim.y - 1;
    }
    __syncthreads();
    return *s_flag;
}

// Launch-error check shared by the host launchers: the error code (0 = cudaSuccess).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace acai
