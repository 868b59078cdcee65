// Host-side API of the acai_fast CUDA kernels: plain C++ types only (device pointers and the
// stream as integers), so that bindings.cpp compiles without CUDA or PyTorch headers.
// Each launcher returns a CUDA error code (0 = success); bindings.cpp turns a non-zero code into
// a Python RuntimeError with cuda_error_string(code).
#pragma once

#include <cstdint>

namespace acai {

// Element types of the tensors the kernels read and write (math is fp32 throughout).
enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Grid-reduction limits shared with the Python wrappers (which allocate the partials).
constexpr int kMaxPartials = 1024;       // blocks of a reducing kernel, at most
constexpr int kPartialsPerBlock = 3;     // floats per block in the partials buffer

// ---- mix.cu
int mix_fwd(uintptr_t z, uintptr_t z_mix, uintptr_t alpha, uintptr_t state, int64_t n, int64_t d,
            int dtype, uintptr_t stream);
int mix_bwd(uintptr_t g, uintptr_t alpha, uintptr_t dz, int64_t n, int64_t d, int dtype,
            bool accumulate, uintptr_t stream);

// ---- acai_loss.cu
int image_loss_fwd(uintptr_t x, uintptr_t ae, uintptr_t d_ae, uintptr_t x_real, uintptr_t loss,
                   uintptr_t partials, uintptr_t counter, int64_t m, float reg, int dtype_x,
                   int dtype_ae, uintptr_t stream);
int critic_loss_fwd(uintptr_t c_mix, uintptr_t c_real, uintptr_t alpha, uintptr_t g_mix_ae,
                    uintptr_t g_mix_critic, uintptr_t g_real_critic, uintptr_t losses,
                    uintptr_t partials, uintptr_t counter, int64_t n, int64_t k, float advweight,
                    bool grad_maps, int dtype, uintptr_t stream);

// The alphas mix_fwd draws, computed on the CPU by the same __host__ __device__ code (mix.cu):
// out[i] = 0.5 - |u - 0.5|, u = Philox(seed, offset + i). For tests; needs no GPU.
void philox_alpha_host(uint64_t seed, uint64_t offset, int64_t n, float* out);

// ---- runtime queries (defined in mix.cu)
const char* cuda_error_string(int code);
int cuda_device_count();  // 0 when there is no GPU or no driver (never throws)

}  // namespace acai
