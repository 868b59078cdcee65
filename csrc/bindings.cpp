// Python bindings of the acai_fast CUDA kernels: module acai_fast._C.
// Every function takes device pointers, sizes, dtype codes and the CUDA stream as plain integers
// (no PyTorch C++ ABI: the module works with any torch build); the Python wrappers in
// acai_fast/ops/ check tensors first. Here: argument checks with readable messages, a clear error
// when no GPU is visible, and CUDA launch errors as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "acai_fast.h"

namespace py = pybind11;

namespace {

// ValueError "acai_fast._C.<fn>: <what>" unless cond.
#define ACAI_CHECK(cond, fn, what)                                                         \
    do {                                                                                   \
        if (!(cond)) throw py::value_error(std::string("acai_fast._C.") + fn + ": " + what); \
    } while (0)

void check_dtype(const char* fn, const char* name, int dtype) {
    ACAI_CHECK(dtype == acai::kFloat32 || dtype == acai::kBFloat16, fn,
               std::string(name) + " must be 0 (float32) or 1 (bfloat16), got " + std::to_string(dtype));
}

void check_ptr(const char* fn, const char* name, uintptr_t p) {
    ACAI_CHECK(p != 0, fn, std::string(name) + " is a null pointer");
}

// The kernels need a GPU: say so plainly rather than report a driver error code. Cached: the
// device count does not change within a process (and this is allowed during graph capture).
void require_gpu(const char* fn) {
    static const int count = acai::cuda_device_count();
    if (count <= 0)
        throw std::runtime_error(std::string("acai_fast._C.") + fn +
                                 ": no CUDA GPU is visible (no device or no driver); the CUDA kernels "
                                 "need one. Use backend='triton' or backend='reference' instead.");
}

void check_launch(const char* fn, int code) {
    if (code != 0)
        throw std::runtime_error(std::string("acai_fast._C.") + fn + ": CUDA launch failed: " +
                                 acai::cuda_error_string(code) + " (error " + std::to_string(code) + ")");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "acai_fast CUDA kernels (fused latent mixing, fused ACAI losses). Raw-pointer API: use "
              "the wrappers in acai_fast.ops.mix and acai_fast.ops.acai_loss.";
    m.attr("DTYPE_FLOAT32") = static_cast<int>(acai::kFloat32);
    m.attr("DTYPE_BFLOAT16") = static_cast<int>(acai::kBFloat16);
    m.attr("MAX_PARTIALS") = acai::kMaxPartials;
    m.attr("PARTIALS_PER_BLOCK") = acai::kPartialsPerBlock;

    m.def("cuda_device_count", &acai::cuda_device_count,
          "Number of visible CUDA devices; 0 when there is no GPU or no driver (never raises).");

    m.def(
        "philox_alpha_host",
        [](uint64_t seed, uint64_t offset, int64_t n) {
            ACAI_CHECK(n >= 0 && n <= (int64_t{1} << 24), "philox_alpha_host", "n must be in [0, 2^24], got " + std::to_string(n));
            std::vector<float> out(static_cast<size_t>(n));
            acai::philox_alpha_host(seed, offset, n, out.data());
            return out;
        },
        py::arg("seed"), py::arg("offset"), py::arg("n"),
        "The n alphas mix_fwd draws from state [seed, offset], computed on the CPU by the kernel's own\n"
        "__host__ __device__ Philox code (csrc/common.cuh philox_alpha, counter offset + i).\n"
        "For tests (needs no GPU). seed and offset as unsigned 64-bit integers.");

    m.def(
        "mix_fwd",
        [](uintptr_t z, uintptr_t z_mix, uintptr_t alpha, uintptr_t state, int64_t n, int64_t d,
           int dtype, uintptr_t stream) {
            const char* fn = "mix_fwd";
            check_ptr(fn, "z", z);
            check_ptr(fn, "z_mix", z_mix);
            check_ptr(fn, "alpha", alpha);
            ACAI_CHECK(n >= 1 && d >= 1, fn, "n and d must be >= 1, got n=" + std::to_string(n) + ", d=" + std::to_string(d));
            ACAI_CHECK((n + 1) / 2 <= 0x7fffffff, fn, "n is too large for the grid");
            check_dtype(fn, "dtype", dtype);
            require_gpu(fn);
            check_launch(fn, acai::mix_fwd(z, z_mix, alpha, state, n, d, dtype, stream));
        },
        py::arg("z"), py::arg("z_mix"), py::arg("alpha"), py::arg("state"), py::arg("n"), py::arg("d"),
        py::arg("dtype"), py::arg("stream"),
        "z_mix[i] = alpha[i]*z[i] + (1-alpha[i])*z[n-1-i] for contiguous z, z_mix (n, d) of `dtype`.\n"
        "alpha: float32 (n,). state: 0 -> alpha is read; else a device int64[3] [seed, offset, counter]:\n"
        "alpha[i] = 0.5 - |u - 0.5| with u from the Philox4x32-10 word of (key=seed, counter=offset+i)\n"
        "(as triton's tl.randint; folded in integers, see csrc/common.cuh) is written to alpha, and\n"
        "the kernel adds n to offset on the device (counter must be 0 before; it is left at 0).\n"
        "One launch on `stream` (a cudaStream_t as int, 0 = legacy default stream).");

    m.def(
        "mix_bwd",
        [](uintptr_t g, uintptr_t alpha, uintptr_t dz, int64_t n, int64_t d, int dtype, bool accumulate,
           uintptr_t stream) {
            const char* fn = "mix_bwd";
            check_ptr(fn, "g", g);
            check_ptr(fn, "alpha", alpha);
            check_ptr(fn, "dz", dz);
            ACAI_CHECK(n >= 1 && d >= 1, fn, "n and d must be >= 1, got n=" + std::to_string(n) + ", d=" + std::to_string(d));
            ACAI_CHECK((n + 1) / 2 <= 0x7fffffff, fn, "n is too large for the grid");
            check_dtype(fn, "dtype", dtype);
            require_gpu(fn);
            check_launch(fn, acai::mix_bwd(g, alpha, dz, n, d, dtype, accumulate, stream));
        },
        py::arg("g"), py::arg("alpha"), py::arg("dz"), py::arg("n"), py::arg("d"), py::arg("dtype"),
        py::arg("accumulate"), py::arg("stream"),
        "dz[i] (+)= alpha[i]*g[i] + (1-alpha[n-1-i])*g[n-1-i] for contiguous g, dz (n, d) of `dtype`,\n"
        "alpha float32 (n,). accumulate=True adds to dz (fp32 math, one rounding), else overwrites.\n"
        "g and dz must not overlap. One launch on `stream`.");

    m.def(
        "image_loss_fwd",
        [](uintptr_t x, uintptr_t ae, uintptr_t d_ae, uintptr_t x_real, uintptr_t loss,
           uintptr_t partials, uintptr_t counter, int64_t m_, float reg, int dtype_x, int dtype_ae,
           uintptr_t stream) {
            const char* fn = "image_loss_fwd";
            check_ptr(fn, "x", x);
            check_ptr(fn, "ae", ae);
            check_ptr(fn, "d_ae", d_ae);
            check_ptr(fn, "x_real", x_real);
            check_ptr(fn, "loss", loss);
            check_ptr(fn, "partials", partials);
            check_ptr(fn, "counter", counter);
            ACAI_CHECK(m_ >= 1, fn, "m (elements) must be >= 1, got " + std::to_string(m_));
            check_dtype(fn, "dtype_x", dtype_x);
            check_dtype(fn, "dtype_ae", dtype_ae);
            require_gpu(fn);
            check_launch(fn, acai::image_loss_fwd(x, ae, d_ae, x_real, loss, partials, counter, m_, reg,
                                                  dtype_x, dtype_ae, stream));
        },
        py::arg("x"), py::arg("ae"), py::arg("d_ae"), py::arg("x_real"), py::arg("loss"),
        py::arg("partials"), py::arg("counter"), py::arg("m"), py::arg("reg"), py::arg("dtype_x"),
        py::arg("dtype_ae"), py::arg("stream"),
        "Over m contiguous elements: loss[0] = mean((ae-x)^2) (float32), d_ae = 2*(ae-x)/m and\n"
        "x_real = ae + reg*(x-ae) (both in ae's dtype). partials: float32 workspace of MAX_PARTIALS;\n"
        "counter: device uint32, 0 before the launch and reset to 0 by it. Deterministic. One launch.");

    m.def(
        "critic_loss_fwd",
        [](uintptr_t c_mix, uintptr_t c_real, uintptr_t alpha, uintptr_t g_mix_ae, uintptr_t g_mix_critic,
           uintptr_t g_real_critic, uintptr_t losses, uintptr_t partials, uintptr_t counter, int64_t n,
           int64_t k, float advweight, bool grad_maps, int dtype, uintptr_t stream) {
            const char* fn = "critic_loss_fwd";
            check_ptr(fn, "c_mix", c_mix);
            check_ptr(fn, "c_real", c_real);
            check_ptr(fn, "alpha", alpha);
            check_ptr(fn, "g_mix_ae", g_mix_ae);
            check_ptr(fn, "g_mix_critic", g_mix_critic);
            check_ptr(fn, "g_real_critic", g_real_critic);
            check_ptr(fn, "losses", losses);
            check_ptr(fn, "partials", partials);
            check_ptr(fn, "counter", counter);
            ACAI_CHECK(n >= 1 && k >= 1, fn, "n and k must be >= 1, got n=" + std::to_string(n) + ", k=" + std::to_string(k));
            check_dtype(fn, "dtype", dtype);
            require_gpu(fn);
            check_launch(fn, acai::critic_loss_fwd(c_mix, c_real, alpha, g_mix_ae, g_mix_critic,
                                                   g_real_critic, losses, partials, counter, n, k,
                                                   advweight, grad_maps, dtype, stream));
        },
        py::arg("c_mix"), py::arg("c_real"), py::arg("alpha"), py::arg("g_mix_ae"), py::arg("g_mix_critic"),
        py::arg("g_real_critic"), py::arg("losses"), py::arg("partials"), py::arg("counter"), py::arg("n"),
        py::arg("k"), py::arg("advweight"), py::arg("grad_maps"), py::arg("dtype"), py::arg("stream"),
        "Critic maps c_mix, c_real (n, k) contiguous of `dtype`, alpha float32 (n,). With c = row mean:\n"
        "losses[0:3] = mean(c_mix^2), mean((c_mix-alpha)^2), mean(c_real^2) (float32); gradients\n"
        "g_mix_ae = advweight*2*c_mix/(n*k), g_mix_critic = 2*(c_mix-alpha)/(n*k), g_real_critic =\n"
        "2*c_real/(n*k), written over whole (n, k) maps if grad_maps else as (n,) vectors, in `dtype`.\n"
        "partials: float32 workspace of 3*MAX_PARTIALS; counter as for image_loss_fwd. One launch.");
}
