// mix: ACAI's latent mixing (SPEC.md section 2) as one kernel forward and one backward.
//   forward  z_mix[i] = alpha_i * z[i] + (1 - alpha_i) * z[N-1-i]
//   backward dz[i]    = alpha_i * g[i] + (1 - alpha_{N-1-i}) * g[N-1-i]     (optionally dz += ...)
// alpha is given, or drawn in the kernel: alpha_i = 0.5 - |u_i - 0.5|, u_i = Philox(seed, offset + i),
// seed and offset read from a device int64 state [seed, offset, counter] that the kernel advances
// by N (so a CUDA graph replays fresh draws). Twin of acai_fast/ops/mix.py (Triton + reference).
#include "common.cuh"

namespace acai {

constexpr int kMixThreads = 128;  // columns per block and pass; 4 passes per block at most (below)

// One block per (pair p, column chunk): rows i = p and j = N-1-p (i == j for the middle row of an
// odd batch). Each element of z is read once and each of z_mix written once.
// With state != nullptr, threads 0 and 1 draw alpha_i and alpha_j (same warp, in parallel), blocks
// with blockIdx.y == 0 write them to `alpha`, and the last block to finish adds N to state[1]
// (state[2] is its ticket counter, reset to 0): every block reads the offset before any writes it.
template <typename T>
__global__ void __launch_bounds__(kMixThreads) mix_fwd_kernel(
    const T* __restrict__ z, T* __restrict__ z_mix, float* __restrict__ alpha,
    long long* __restrict__ state, int64_t n, int64_t d) {
    __shared__ float s_alpha[2];
    __shared__ bool s_last;
    const int64_t i = blockIdx.x, j = n - 1 - i;
    long long offset = 0;
    if (state != nullptr) {
        if (threadIdx.x < 2) {
            const uint64_t seed = static_cast<uint64_t>(state[0]);
            offset = state[1];
            const int64_t row = threadIdx.x == 0 ? i : j;
            s_alpha[threadIdx.x] = philox_alpha(seed, static_cast<uint64_t>(offset + row));
        }
    } else if (threadIdx.x < 2) {
        s_alpha[threadIdx.x] = alpha[threadIdx.x == 0 ? i : j];
    }
    __syncthreads();
    const float ai = s_alpha[0], aj = s_alpha[1];

    const T* zi = z + i * d;
    const T* zj = z + j * d;
    for (int64_t c = static_cast<int64_t>(blockIdx.y) * kMixThreads + threadIdx.x; c < d;
         c += static_cast<int64_t>(gridDim.y) * kMixThreads) {
        const float vi = to_float(zi[c]), vj = to_float(zj[c]);
        z_mix[i * d + c] = from_float<T>(ai * vi + (1.0f - ai) * vj);
        if (j != i) z_mix[j * d + c] = from_float<T>(aj * vj + (1.0f - aj) * vi);
    }

    if (state != nullptr) {
        if (blockIdx.y == 0 && threadIdx.x == 0) {
            alpha[i] = ai;
            alpha[j] = aj;
        }
        // Thread 1's read of state[1] is ordered before thread 0's ticket by this barrier (inside).
        __syncthreads();
        if (take_last_block_ticket(reinterpret_cast<unsigned int*>(state + 2), &s_last) && threadIdx.x == 0) {
            state[1] = offset + n;
            state[2] = 0;
        }
    }
}

// Same tiling as the forward; alpha is always read (the forward's output).
template <typename T>
__global__ void __launch_bounds__(kMixThreads) mix_bwd_kernel(
    const T* __restrict__ g, const float* __restrict__ alpha, T* __restrict__ dz, int64_t n,
    int64_t d, bool accumulate) {
    const int64_t i = blockIdx.x, j = n - 1 - i;
    const float ai = alpha[i], aj = alpha[j];
    for (int64_t c = static_cast<int64_t>(blockIdx.y) * kMixThreads + threadIdx.x; c < d;
         c += static_cast<int64_t>(gridDim.y) * kMixThreads) {
        const float gi = to_float(g[i * d + c]), gj = to_float(g[j * d + c]);
        float di = ai * gi + (1.0f - aj) * gj;
        float dj = aj * gj + (1.0f - ai) * gi;
        if (accumulate) {
            di += to_float(dz[i * d + c]);
            if (j != i) dj += to_float(dz[j * d + c]);
        }
        dz[i * d + c] = from_float<T>(di);
        if (j != i) dz[j * d + c] = from_float<T>(dj);
    }
}

// Grid: x = (N + 1) / 2 pairs; y = column chunks, enough that each block makes at most 4 passes of
// kMixThreads columns, capped at 65535 (the grid's y limit; a larger d just loops more).
static dim3 mix_grid(int64_t n, int64_t d) {
    const int64_t chunks = (d + 4 * kMixThreads - 1) / (4 * kMixThreads);
    return dim3(static_cast<unsigned int>((n + 1) / 2),
                static_cast<unsigned int>(chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks)));
}

int mix_fwd(uintptr_t z, uintptr_t z_mix, uintptr_t alpha, uintptr_t state, int64_t n, int64_t d,
            int dtype, uintptr_t stream) {
    const dim3 grid = mix_grid(n, d);
    auto* st = reinterpret_cast<long long*>(state);
    auto* a = reinterpret_cast<float*>(alpha);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == kBFloat16)
        mix_fwd_kernel<__nv_bfloat16><<<grid, kMixThreads, 0, s>>>(
            reinterpret_cast<const __nv_bfloat16*>(z), reinterpret_cast<__nv_bfloat16*>(z_mix), a, st, n, d);
    else
        mix_fwd_kernel<float><<<grid, kMixThreads, 0, s>>>(
            reinterpret_cast<const float*>(z), reinterpret_cast<float*>(z_mix), a, st, n, d);
    return launch_status();
}

int mix_bwd(uintptr_t g, uintptr_t alpha, uintptr_t dz, int64_t n, int64_t d, int dtype,
            bool accumulate, uintptr_t stream) {
    const dim3 grid = mix_grid(n, d);
    const auto* a = reinterpret_cast<const float*>(alpha);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == kBFloat16)
        mix_bwd_kernel<__nv_bfloat16><<<grid, kMixThreads, 0, s>>>(
            reinterpret_cast<const __nv_bfloat16*>(g), a, reinterpret_cast<__nv_bfloat16*>(dz), n, d, accumulate);
    else
        mix_bwd_kernel<float><<<grid, kMixThreads, 0, s>>>(
            reinterpret_cast<const float*>(g), a, reinterpret_cast<float*>(dz), n, d, accumulate);
    return launch_status();
}

void philox_alpha_host(uint64_t seed, uint64_t offset, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = philox_alpha(seed, offset + static_cast<uint64_t>(i));
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int cuda_device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear the (non-sticky) error: no driver or no device
        return 0;
    }
    return count;
}

}  // namespace acai
