// acai_loss: the ACAI losses of SPEC.md section 2 and their gradients, in two one-launch kernels.
//   image_loss_fwd:  loss_ae = mean((ae - x)^2), d_ae = 2 (ae - x) / M, x_real = ae + reg (x - ae)
//   critic_loss_fwd: c = spatial mean of each critic map; loss_ae_disc = mean(c_mix^2),
//                    loss_disc = mean((c_mix - alpha)^2), loss_disc_real = mean(c_real^2), and the
//                    map gradients (constant over each image's map) for both objectives.
// Two kernels because x_real (an output of the first) is the critic's input whose output map the
// second needs. Deterministic: fixed per-thread order, block sums, last-block-done over per-block
// partials (no float atomics). Twin of acai_fast/ops/acai_loss.py (Triton + reference).
#include "common.cuh"

namespace acai {

constexpr int kImageThreads = 256;
constexpr int kImageUnroll = 4;  // loads in flight per thread and pass

// Grid-stride over the M = N*C*H*W elements (grid size depends on M only, so the summation order,
// and the result, never change). Per element: read x, ae; write d_ae, x_real (in ae's dtype).
// Sum of squares: per thread in a fixed order, block_sum, then the last block adds the per-block
// partials in block order and writes loss = sum / M.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kImageThreads) image_loss_fwd_kernel(
    const TX* __restrict__ x, const TA* __restrict__ ae, TA* __restrict__ d_ae,
    TA* __restrict__ x_real, float* __restrict__ loss, float* __restrict__ partials,
    unsigned int* __restrict__ counter, int64_t m, float reg, float grad_scale) {
    __shared__ float smem[33];
    __shared__ bool s_last;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kImageThreads;
    int64_t k = static_cast<int64_t>(blockIdx.x) * kImageThreads + threadIdx.x;
    float acc = 0.0f;
    for (; k + (kImageUnroll - 1) * stride < m; k += kImageUnroll * stride) {
        float xv[kImageUnroll], av[kImageUnroll];
#pragma unroll
        for (int u = 0; u < kImageUnroll; ++u) {
            xv[u] = to_float(x[k + u * stride]);
            av[u] = to_float(ae[k + u * stride]);
        }
#pragma unroll
        for (int u = 0; u < kImageUnroll; ++u) {
            const float diff = av[u] - xv[u];
            acc += diff * diff;
            d_ae[k + u * stride] = from_float<TA>(grad_scale * diff);
            x_real[k + u * stride] = from_float<TA>(av[u] + reg * (xv[u] - av[u]));
        }
    }
    for (; k < m; k += stride) {
        const float xv = to_float(x[k]), av = to_float(ae[k]), diff = av - xv;
        acc += diff * diff;
        d_ae[k] = from_float<TA>(grad_scale * diff);
        x_real[k] = from_float<TA>(av + reg * (xv - av));
    }

    const float block_total = block_sum(acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
    if (take_last_block_ticket(counter, &s_last)) {
        float v = 0.0f;
        for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += kImageThreads) v += __ldcg(partials + b);
        const float total = block_sum(v, smem);
        if (threadIdx.x == 0) {
            *loss = total / static_cast<float>(m);
            *counter = 0u;
        }
    }
}

// One block per image (grid-stride over images when N > kMaxPartials); blockDim from the host,
// a multiple of 32 in [32, 256] sized to K = C*H*W of the map. The block sums both maps of its image,
// writes the gradients of its image (the whole map, constant, or one value per image when
// grad_maps is false), and accumulates the three per-image terms; partials are laid out
// [term][block] (3 x gridDim.x) and reduced by the last block: losses[t] = sum / N.
template <typename T>
__global__ void critic_loss_fwd_kernel(
    const T* __restrict__ c_mix, const T* __restrict__ c_real, const float* __restrict__ alpha,
    T* __restrict__ g_mix_ae, T* __restrict__ g_mix_critic, T* __restrict__ g_real_critic,
    float* __restrict__ losses, float* __restrict__ partials, unsigned int* __restrict__ counter,
    int64_t n, int64_t k, float advweight, bool grad_maps) {
    __shared__ float smem[33];
    __shared__ bool s_last;
    const float inv_k = 1.0f / static_cast<float>(k);
    const float scale = 2.0f / (static_cast<float>(n) * static_cast<float>(k));  // d mean_n mean_k / d c
    float t_ae = 0.0f, t_disc = 0.0f, t_real = 0.0f;
    for (int64_t img = blockIdx.x; img < n; img += gridDim.x) {
        const T* pm = c_mix + img * k;
        const T* pr = c_real + img * k;
        float sm = 0.0f, sr = 0.0f;
        for (int64_t q = threadIdx.x; q < k; q += blockDim.x) {
            sm += to_float(pm[q]);
            sr += to_float(pr[q]);
        }
        const float cm = block_sum(sm, smem) * inv_k;
        const float cr = block_sum(sr, smem) * inv_k;
        const float a = alpha[img];
        const float g_ae = advweight * scale * cm;
        const float g_d = scale * (cm - a), g_r = scale * cr;
        if (grad_maps) {
            const T v_ae = from_float<T>(g_ae), v_d = from_float<T>(g_d), v_r = from_float<T>(g_r);
            for (int64_t q = threadIdx.x; q < k; q += blockDim.x) {
                g_mix_ae[img * k + q] = v_ae;
                g_mix_critic[img * k + q] = v_d;
                g_real_critic[img * k + q] = v_r;
            }
        } else if (threadIdx.x == 0) {
            g_mix_ae[img] = from_float<T>(g_ae);
            g_mix_critic[img] = from_float<T>(g_d);
            g_real_critic[img] = from_float<T>(g_r);
        }
        t_ae += cm * cm;
        t_disc += (cm - a) * (cm - a);
        t_real += cr * cr;
    }

    if (threadIdx.x == 0) {  // every thread holds the same t_*: thread 0 publishes them
        partials[blockIdx.x] = t_ae;
        partials[gridDim.x + blockIdx.x] = t_disc;
        partials[2 * gridDim.x + blockIdx.x] = t_real;
    }
    if (take_last_block_ticket(counter, &s_last)) {
        for (int t = 0; t < 3; ++t) {
            float v = 0.0f;
            for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x)
                v += __ldcg(partials + t * gridDim.x + b);
            const float total = block_sum(v, smem);
            if (threadIdx.x == 0) losses[t] = total / static_cast<float>(n);
        }
        if (threadIdx.x == 0) *counter = 0u;
    }
}

template <typename TX, typename TA>
static void launch_image_loss(uintptr_t x, uintptr_t ae, uintptr_t d_ae, uintptr_t x_real,
                              uintptr_t loss, uintptr_t partials, uintptr_t counter, int64_t m,
                              float reg, cudaStream_t s) {
    const int64_t per_block = static_cast<int64_t>(kImageThreads) * kImageUnroll;
    const int64_t blocks = (m + per_block - 1) / per_block;
    const int grid = static_cast<int>(blocks < kMaxPartials ? blocks : kMaxPartials);
    image_loss_fwd_kernel<TX, TA><<<grid, kImageThreads, 0, s>>>(
        reinterpret_cast<const TX*>(x), reinterpret_cast<const TA*>(ae), reinterpret_cast<TA*>(d_ae),
        reinterpret_cast<TA*>(x_real), reinterpret_cast<float*>(loss), reinterpret_cast<float*>(partials),
        reinterpret_cast<unsigned int*>(counter), m, reg, 2.0f / static_cast<float>(m));
}

int image_loss_fwd(uintptr_t x, uintptr_t ae, uintptr_t d_ae, uintptr_t x_real, uintptr_t loss,
                   uintptr_t partials, uintptr_t counter, int64_t m, float reg, int dtype_x,
                   int dtype_ae, uintptr_t stream) {
    auto s = reinterpret_cast<cudaStream_t>(stream);
    using bf16 = __nv_bfloat16;
    if (dtype_x == kFloat32 && dtype_ae == kFloat32)
        launch_image_loss<float, float>(x, ae, d_ae, x_real, loss, partials, counter, m, reg, s);
    else if (dtype_x == kFloat32)
        launch_image_loss<float, bf16>(x, ae, d_ae, x_real, loss, partials, counter, m, reg, s);
    else if (dtype_ae == kFloat32)
        launch_image_loss<bf16, float>(x, ae, d_ae, x_real, loss, partials, counter, m, reg, s);
    else
        launch_image_loss<bf16, bf16>(x, ae, d_ae, x_real, loss, partials, counter, m, reg, s);
    return launch_status();
}

int critic_loss_fwd(uintptr_t c_mix, uintptr_t c_real, uintptr_t alpha, uintptr_t g_mix_ae,
                    uintptr_t g_mix_critic, uintptr_t g_real_critic, uintptr_t losses,
                    uintptr_t partials, uintptr_t counter, int64_t n, int64_t k, float advweight,
                    bool grad_maps, int dtype, uintptr_t stream) {
    // Threads: about 4 elements of each map per thread, a multiple of 32 in [32, 256].
    int64_t threads = ((k + 3) / 4 + 31) / 32 * 32;
    threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
    const int grid = static_cast<int>(n < kMaxPartials ? n : kMaxPartials);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    auto* a = reinterpret_cast<const float*>(alpha);
    auto* l = reinterpret_cast<float*>(losses);
    auto* p = reinterpret_cast<float*>(partials);
    auto* c = reinterpret_cast<unsigned int*>(counter);
    if (dtype == kBFloat16) {
        using T = __nv_bfloat16;
        critic_loss_fwd_kernel<T><<<grid, static_cast<int>(threads), 0, s>>>(
            reinterpret_cast<const T*>(c_mix), reinterpret_cast<const T*>(c_real), a,
            reinterpret_cast<T*>(g_mix_ae), reinterpret_cast<T*>(g_mix_critic),
            reinterpret_cast<T*>(g_real_critic), l, p, c, n, k, advweight, grad_maps);
    } else {
        critic_loss_fwd_kernel<float><<<grid, static_cast<int>(threads), 0, s>>>(
            reinterpret_cast<const float*>(c_mix), reinterpret_cast<const float*>(c_real), a,
            reinterpret_cast<float*>(g_mix_ae), reinterpret_cast<float*>(g_mix_critic),
            reinterpret_cast<float*>(g_real_critic), l, p, c, n, k, advweight, grad_maps);
    }
    return launch_status();
}

}  // namespace acai
