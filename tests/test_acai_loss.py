"""acai_loss: the fused image pass and critic-map pass (CUDA, Triton) against the PyTorch references.

CPU (TRITON_INTERPRET=1, fp32): the closed-form gradients are the autograd of the SPEC's loss
expressions; the Triton kernels match them (values and every gradient) on every preset's image and
latent shapes at odd batch sizes, with per-image or whole-map gradients, through the grid-stride
and multi-program reduction paths; the autograd Functions; the reduction counter is left at 0; bad input;
the Triton kernels compile for sm_90 (no GPU needed) with the PTX the grid reduction relies on.
GPU (marked `gpu`): CUDA vs Triton vs reference in fp32 and bf16 (and mixed x/ae dtypes), bitwise
determinism across runs, CUDA-graph capture and replay.
"""
from __future__ import annotations

import pytest
import torch

import acai_fast.ops.acai_loss as al
from acai_fast import _ext
from acai_fast.config import PRESETS, ACAIConfig
from acai_fast.ops.acai_loss import (acai_critic_loss, acai_critic_loss_ref, acai_image_loss,
                                     acai_image_loss_ref, critic_loss_fwd, critic_loss_grads_ref,
                                     image_loss_fwd, image_loss_grads_ref)
from helpers import assert_close, assert_close_lowp, compile_sm90_in_subprocess

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
IMAGE_SHAPES = sorted({(ACAIConfig.preset(p).colors, 32, 32) for p in PRESETS})
LATENT_SHAPES = sorted({ACAIConfig.preset(p).latent_shape for p in PRESETS})
BATCHES = (1, 3, 64)
ODD_IMAGE, ODD_LATENT = (5, 7, 9), (3, 5, 7)


def assert_close_grad(got, want, name, rtol=1e-5):
    """Map gradients: 2 (c - alpha) / (N K) can be tiny where c_mix ~ alpha, so the absolute
    tolerance scales with the largest gradient (fp32 rounding of the per-image mean)."""
    assert_close(got, want, atol=1e-6 * want.float().abs().max().item() + 1e-20, rtol=rtol, name=name)


# loss_ae is a mean of M <= 2^20 positive terms (x, ae from image_inputs). The kernel adds <= 4 terms
# per lane (grid-stride; one when the grid is not capped), then sums 1024 lanes and <= 1024 program
# partials, each a pairwise tree (numpy's under the interpreter: 8 accumulators over blocks of 128,
# then halving: <= 22 levels per 1024). Positive terms: relative error <= (4 + 2 x 22) u = 48 x 2^-24
# = 2.9e-6 against the exact mean. Against torch's fp32 mean, whose order depends on the CPU's
# vector width, the two errors would add up; so the kernel is held to the float64 mean instead.
LOSS_AE_RTOL = 48 * 2 ** -24


def assert_loss_ae(got, x, ae, name="loss_ae"):
    exact = (ae.detach().double() - x.detach().double()).square().mean()
    assert_close(got, exact, atol=0, rtol=LOSS_AE_RTOL, name=name)


def assert_close_loss(got, want, name, rtol=1e-6):
    """Losses: mean((c_mix - alpha)^2) of one image can be tiny; its error is ~1e-8 absolute."""
    assert_close(got, want, atol=1e-8, rtol=rtol, name=name)


def counter_of(device):
    return _ext.reduction_counter(torch.device(device))


def image_inputs(n, shape, device=DEVICE, dtype=torch.float32):
    x = (torch.rand(n, *shape, device=device) * 2 - 1).to(dtype)
    ae = (x.float() + 0.3 * torch.randn(n, *shape, device=device)).to(dtype)
    return x, ae


def critic_inputs(n, shape, device=DEVICE, dtype=torch.float32):
    c_mix = (torch.randn(n, *shape, device=device) * 0.3 + 0.1).to(dtype)
    c_real = (torch.randn(n, *shape, device=device) * 0.3 - 0.05).to(dtype)
    alpha = torch.rand(n, device=device) * 0.5
    return c_mix, c_real, alpha


# ------------------------------------------------------------------------------------------------
# The closed forms are the gradients of the SPEC's expressions
# ------------------------------------------------------------------------------------------------


def test_image_closed_form_is_the_autograd_of_the_spec(seed):
    x, ae = image_inputs(3, (3, 32, 32), device="cpu")
    x, ae = x.double(), ae.double().requires_grad_()
    loss_ae, x_real = acai_image_loss_ref(x, ae, 0.2)
    (d_ae,) = torch.autograd.grad(loss_ae, ae)
    out = image_loss_grads_ref(x, ae.detach(), 0.2)
    assert_close(out.loss_ae, loss_ae, atol=0, rtol=1e-12, name="loss_ae")
    assert_close(out.d_ae, d_ae, atol=0, rtol=1e-12, name="d_ae")
    assert_close(out.x_real, ae + 0.2 * (x - ae), atol=0, rtol=1e-12, name="x_real")


def test_critic_closed_form_is_the_autograd_of_the_spec(seed):
    c_mix, c_real, alpha = critic_inputs(5, (16, 4, 4), device="cpu")
    c_mix, c_real, alpha = c_mix.double().requires_grad_(), c_real.double().requires_grad_(), alpha.double()
    loss_ae_disc, loss_disc, loss_disc_real = acai_critic_loss_ref(c_mix, c_real, alpha)
    # The SPEC's own expressions, with the critic's mean over channels, height and width.
    cm, cr = c_mix.mean((1, 2, 3)), c_real.mean((1, 2, 3))
    assert_close(loss_ae_disc, cm.square().mean(), atol=0, rtol=1e-12, name="loss_ae_disc")
    assert_close(loss_disc, (cm - alpha).square().mean(), atol=0, rtol=1e-12, name="loss_disc")
    assert_close(loss_disc_real, cr.square().mean(), atol=0, rtol=1e-12, name="loss_disc_real")
    out = critic_loss_grads_ref(c_mix.detach(), c_real.detach(), alpha, 0.5)
    (g_ae,) = torch.autograd.grad(0.5 * loss_ae_disc, c_mix, retain_graph=True)
    (g_d,) = torch.autograd.grad(loss_disc, c_mix)
    (g_r,) = torch.autograd.grad(loss_disc_real, c_real)
    for got, want, name in ((out.g_mix_ae, g_ae, "g_mix_ae"), (out.g_mix_critic, g_d, "g_mix_critic"),
                            (out.g_real_critic, g_r, "g_real_critic")):
        assert_close(got, want, atol=0, rtol=1e-12, name=name)


# ------------------------------------------------------------------------------------------------
# Triton (interpreter on the CPU) against the references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES + [ODD_IMAGE], ids=str)
def test_image_pass_matches_reference(shape, n, seed):
    x, ae = image_inputs(n, shape)
    out = image_loss_fwd(x, ae, 0.2, backend="triton", poison=True)
    ref = image_loss_grads_ref(x, ae, 0.2)
    assert out.loss_ae.shape == () and out.loss_ae.dtype == torch.float32
    assert_loss_ae(out.loss_ae, x, ae)
    assert_close(out.d_ae, ref.d_ae, atol=1e-12, rtol=1e-6, name="d_ae")
    assert_close(out.x_real, ref.x_real, atol=1e-7, rtol=1e-6, name="x_real")
    assert counter_of(x.device).item() == 0


@pytest.mark.parametrize("grad_maps", (True, False), ids=("maps", "per-image"))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape", LATENT_SHAPES + [ODD_LATENT], ids=str)
def test_critic_pass_matches_reference(shape, n, grad_maps, seed):
    c_mix, c_real, alpha = critic_inputs(n, shape)
    out = critic_loss_fwd(c_mix, c_real, alpha, 0.5, grad_maps=grad_maps, backend="triton", poison=True)
    ref = critic_loss_grads_ref(c_mix, c_real, alpha, 0.5)
    for name in ("loss_ae_disc", "loss_disc", "loss_disc_real"):
        assert getattr(out, name).shape == ()
        assert_close_loss(getattr(out, name), getattr(ref, name), name)
    for name in ("g_mix_ae", "g_mix_critic", "g_real_critic"):
        got = getattr(out, name)
        assert got.shape == c_mix.shape
        assert got.is_contiguous() == grad_maps
        assert_close_grad(got, getattr(ref, name), name)
    assert counter_of(c_mix.device).item() == 0


def test_reductions_over_many_programs_and_grid_stride(monkeypatch, seed):
    """Cap the grid at 3 programs so that every program loops (grid-stride) and the last-program
    reduction adds several partials; and run twice: the results are bitwise identical."""
    monkeypatch.setattr(al, "MAX_PARTIALS", 4)
    x, ae = image_inputs(5, (3, 32, 32))  # 15 tiles of 1024 over 4 programs
    out1 = image_loss_fwd(x, ae, 0.2, backend="triton", poison=True)
    out2 = image_loss_fwd(x, ae, 0.2, backend="triton", poison=True)
    ref = image_loss_grads_ref(x, ae, 0.2)
    assert_loss_ae(out1.loss_ae, x, ae)
    assert_close(out1.d_ae, ref.d_ae, atol=1e-12, rtol=1e-6, name="d_ae")
    assert torch.equal(out1.loss_ae, out2.loss_ae)
    c_mix, c_real, alpha = critic_inputs(300, (64, 4, 4))  # 300 images, one per tile row, 4 programs
    out = critic_loss_fwd(c_mix, c_real, alpha, 0.5, backend="triton", poison=True)
    ref = critic_loss_grads_ref(c_mix, c_real, alpha, 0.5)
    for a, b, name in zip(out, ref, out._fields):
        assert_close_grad(a, b, name)
    assert counter_of(x.device).item() == 0


def test_long_critic_rows_loop_over_k(seed):
    """K larger than the 1024-wide tile: the per-image sums loop over column blocks."""
    c_mix, c_real, alpha = critic_inputs(2, (3, 30, 30))  # K = 2700
    out = critic_loss_fwd(c_mix, c_real, alpha, 0.5, backend="triton", poison=True)
    ref = critic_loss_grads_ref(c_mix, c_real, alpha, 0.5)
    for a, b, name in zip(out, ref, out._fields):
        assert_close_grad(a, b, name)


@pytest.mark.parametrize("n", (1, 3))
def test_image_autograd(n, seed):
    x, ae = image_inputs(n, (3, 32, 32))
    x, ae = x.requires_grad_(), ae.requires_grad_()
    w = torch.randn_like(ae)
    loss, x_real = acai_image_loss(x, ae, 0.2, backend="triton")
    dx, dae = torch.autograd.grad(3 * loss + (x_real * w).sum(), (x, ae))
    xr, aer = x.detach().clone().requires_grad_(), ae.detach().clone().requires_grad_()
    loss_r, x_real_r = acai_image_loss_ref(xr, aer, 0.2)
    dx_r, dae_r = torch.autograd.grad(3 * loss_r + (x_real_r * w).sum(), (xr, aer))
    assert_loss_ae(loss, x, ae)
    assert_close(dx, dx_r, atol=1e-7, rtol=1e-5, name="dx")
    assert_close(dae, dae_r, atol=1e-7, rtol=1e-5, name="dae")
    # The ACAI step: only loss_ae is differentiated (x_real's gradient stays in the critic).
    (dae_only,) = torch.autograd.grad(acai_image_loss(x, ae, 0.2, backend="triton")[0], ae)
    assert_close(dae_only, image_loss_grads_ref(x.detach(), ae.detach(), 0.2).d_ae, atol=1e-12,
                 rtol=1e-6, name="d_ae")


@pytest.mark.parametrize("n", (1, 3))
def test_critic_autograd(n, seed):
    c_mix, c_real, alpha = critic_inputs(n, (16, 2, 2))
    c_mix, c_real = c_mix.requires_grad_(), c_real.requires_grad_()
    losses = acai_critic_loss(c_mix, c_real, alpha, backend="triton")
    ref_in = [t.detach().clone().requires_grad_() for t in (c_mix, c_real)]
    losses_r = acai_critic_loss_ref(*ref_in, alpha)
    for got, want in zip(losses, losses_r):
        assert_close_loss(got, want, "loss")
    # The two objectives of the step, each on its own.
    for weights in ((0.5, 0.0, 0.0), (0.0, 1.0, 1.0), (0.7, -1.3, 2.0)):
        obj = sum(w * l for w, l in zip(weights, losses) if w)
        obj_r = sum(w * l for w, l in zip(weights, losses_r) if w)
        got = torch.autograd.grad(obj, (c_mix, c_real), retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(obj_r, ref_in, retain_graph=True, allow_unused=True)
        for g, r, name in zip(got, want, ("d c_mix_map", "d c_real_map")):
            if r is None:
                assert g is None or not g.any(), name
            else:
                assert_close_grad(g, r, f"{name} for weights {weights}")


def test_reference_backends(seed):
    x, ae = image_inputs(3, (1, 32, 32), device="cpu")
    loss, x_real = acai_image_loss(x, ae.requires_grad_(), 0.2, backend="reference")
    assert loss.requires_grad and x_real.requires_grad
    out = critic_loss_fwd(*critic_inputs(3, (2, 4, 4), device="cpu"), 0.5, grad_maps=False, backend="reference")
    assert out.g_mix_ae.stride()[1:] == (0, 0, 0)


def compile_sm90():
    """Compile both kernels (both dtypes, both gradient layouts) for sm_90 without a GPU
    (interpreter off, see test_kernels_compile_for_sm90) and check the PTX of the grid reduction:
    one acq_rel ticket atomic after a barrier, partials read back through L2 (ld.global.cg)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(fn, signature, constexprs):
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]

    ptxs = []
    for dt in ("fp32", "bf16"):
        p = "*" + dt
        ptxs.append(compile_(al._image_loss_fwd_kernel,
                             dict(X_ptr="*fp32", Ae_ptr=p, Dae_ptr=p, Xreal_ptr=p, Loss_ptr="*fp32",
                                  Partials_ptr="*fp32", Counter_ptr="*i32", M="i32", reg="fp32",
                                  grad_scale="fp32", Reg_ptr="*fp32", stride_xr="i32", stride_ar="i32",
                                  stride_dr="i32", stride_rr="i32"),
                             dict(BLOCK=1024, MAX_PARTIALS=al.MAX_PARTIALS, REG_PER_RUN=dt == "bf16")))
        for grad_maps in (True, False):
            ptxs.append(compile_(al._critic_loss_fwd_kernel,
                                 dict(Cmix_ptr=p, Creal_ptr=p, Alpha_ptr="*fp32", Gae_ptr=p, Gd_ptr=p,
                                      Gr_ptr=p, Losses_ptr="*fp32", Partials_ptr="*fp32",
                                      Counter_ptr="*i32", N="i32", K="i32", inv_k="fp32", scale="fp32",
                                      advweight="fp32", Adv_ptr="*fp32", stride_mr="i32",
                                      stride_rr="i32", stride_gr="i32"),
                                 dict(GRAD_MAPS=grad_maps, BLOCK_N=16, BLOCK_K=256,
                                      MAX_PARTIALS=al.MAX_PARTIALS, ADV_PER_RUN=grad_maps)))
    for ptx in ptxs:
        assert ptx.count("atom.global.gpu.acq_rel.add.u32") == 1
        assert ptx.rindex("bar.sync", 0, ptx.index("atom.global")) > 0
        assert "ld.global.cg" in ptx


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_arrays_of_runs_equal_single_runs(backend):
    """image_loss_fwd_runs / critic_loss_fwd_runs over R=3 runs with per-run reg and advweight, in row
    blocks of bigger buffers, equal R single calls (losses, gradients, x_real), bit for bit."""
    runs, n, shape = 3, 5, (4, 4, 1)
    xbig, aebig = torch.rand(runs, n + 2, *shape, device=DEVICE), torch.randn(runs, 2 * n, *shape, device=DEVICE)
    x, ae = xbig[:, 1:n + 1], aebig[:, n:]
    reg = torch.tensor([0.2, 0.5, 0.9], device=DEVICE)
    outs = torch.zeros(runs, 3 * n, *shape, device=DEVICE)
    img = al.image_loss_fwd_runs(x, ae, reg, d_ae_out=outs[:, :n], x_real_out=outs[:, 2 * n:], backend=backend)
    maps = torch.randn(runs, 2 * n, 2, 2, 3, device=DEVICE)
    alpha = torch.rand(runs, n, device=DEVICE) / 2
    adv = torch.tensor([0.0, 0.5, 1.0], device=DEVICE)
    g = torch.zeros(runs, 3 * n, 2, 2, 3, device=DEVICE)
    crit = al.critic_loss_fwd_runs(maps[:, :n], maps[:, n:], alpha, adv,
                                   grads_out=(g[:, 2 * n:], g[:, :n], g[:, n:2 * n]), backend=backend)
    for r in range(runs):
        one = al.image_loss_fwd(x[r].contiguous(), ae[r].contiguous(), float(reg[r]), backend=backend)
        assert torch.equal(img.loss_ae[r], one.loss_ae) and torch.equal(outs[r, :n], one.d_ae), r
        assert torch.equal(outs[r, 2 * n:], one.x_real), r
        c1 = al.critic_loss_fwd(maps[r, :n].contiguous(), maps[r, n:].contiguous(), alpha[r],
                                float(adv[r]), backend=backend)
        for f in ("loss_ae_disc", "loss_disc", "loss_disc_real"):
            assert torch.equal(getattr(crit, f)[r], getattr(c1, f)), (r, f)
        assert torch.equal(g[r, 2 * n:], c1.g_mix_ae) and torch.equal(g[r, :n], c1.g_mix_critic), r
        assert torch.equal(g[r, n:2 * n], c1.g_real_critic), r
    assert not g[0, 2 * n:].any()  # advweight 0: no adversarial gradient for run 0
    with pytest.raises(ValueError, match="float32 \\(3,\\) tensor"):
        al.image_loss_fwd_runs(x, ae, reg[:2], d_ae_out=outs[:, :n], x_real_out=outs[:, 2 * n:])


@pytest.mark.skipif(HAS_GPU, reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    compile_sm90_in_subprocess("test_acai_loss")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any launch
# ------------------------------------------------------------------------------------------------


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(al, "_image_loss_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(al, "_critic_loss_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(_ext, "extension", lambda: (_ for _ in ()).throw(AssertionError("launch")))


def _img():
    return torch.rand(3, 1, 32, 32)


BAD_IMAGE = [
    ("not a tensor", lambda: ([[1.0]], _img(), 0.2), "torch.Tensor"),
    ("fp16", lambda: (_img().half(), _img(), 0.2), "float16 is not supported"),
    ("fp64", lambda: (_img(), _img().double(), 0.2), "float64 is not supported"),
    ("shapes", lambda: (_img(), torch.rand(3, 1, 32, 31), 0.2), "same shape"),
    ("empty", lambda: (torch.rand(0, 1, 32, 32), torch.rand(0, 1, 32, 32), 0.2), "empty"),
    ("non-contiguous", lambda: (_img(), torch.rand(3, 1, 32, 64)[..., ::2], 0.2), "contiguous"),
    ("devices", lambda: (_img(), torch.rand(3, 1, 32, 32, device="meta"), 0.2), "one device"),
    ("reg", lambda: (_img(), _img(), float("nan")), "reg must be a finite number"),
    ("reg type", lambda: (_img(), _img(), "0.2"), "reg must be a finite number"),
]


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("case", BAD_IMAGE, ids=[c[0] for c in BAD_IMAGE])
def test_bad_image_input(case, backend, no_launch):
    _, make, match = case
    with pytest.raises(ValueError, match=match):
        image_loss_fwd(*make(), backend=backend)
    with pytest.raises(ValueError, match=match):
        acai_image_loss(*make(), backend=backend)


def _maps(n=3, shape=(16, 2, 2)):
    return torch.randn(n, *shape)


BAD_CRITIC = [
    ("not a tensor", lambda: (1.0, _maps(), torch.rand(3)), "torch.Tensor"),
    ("fp16", lambda: (_maps().half(), _maps().half(), torch.rand(3)), "float16 is not supported"),
    ("dtype mix", lambda: (_maps(), _maps().bfloat16(), torch.rand(3)), "same shape and dtype"),
    ("shapes", lambda: (_maps(), _maps(3, (16, 4, 4)), torch.rand(3)), "same shape and dtype"),
    ("empty", lambda: (_maps(0), _maps(0), torch.rand(0)), "N >= 1"),
    ("non-contiguous", lambda: (_maps(3, (2, 2, 16)).permute(0, 3, 1, 2),) * 2 + (torch.rand(3),), "contiguous"),
    ("alpha size", lambda: (_maps(), _maps(), torch.rand(4)), "N=3 values"),
    ("alpha dtype", lambda: (_maps(), _maps(), torch.rand(3).double()), "alpha dtype"),
    ("devices", lambda: (_maps(), _maps(), torch.rand(3, device="meta")), "one device"),
]


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("case", BAD_CRITIC, ids=[c[0] for c in BAD_CRITIC])
def test_bad_critic_input(case, backend, no_launch):
    _, make, match = case
    with pytest.raises(ValueError, match=match):
        critic_loss_fwd(*make(), 0.5, backend=backend)
    with pytest.raises(ValueError, match=match):
        acai_critic_loss(*make(), backend=backend)


def test_bad_advweight_and_counter(no_launch):
    with pytest.raises(ValueError, match="advweight"):
        critic_loss_fwd(_maps(), _maps(), torch.rand(3), float("inf"), backend="triton")
    with pytest.raises(ValueError, match="counter must be"):
        image_loss_fwd(_img(), _img(), 0.2, backend="triton", counter=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown backend"):
        image_loss_fwd(_img(), _img(), 0.2, backend="fast")


# ------------------------------------------------------------------------------------------------
# GPU: CUDA vs Triton vs reference, determinism, CUDA graphs
# ------------------------------------------------------------------------------------------------

GPU_BACKENDS = ("cuda", "triton") if _ext.cuda_extension_available() else ("triton",)
LOWP = torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", ((torch.float32,) * 2, (LOWP,) * 2, (torch.float32, LOWP)),
                         ids=("fp32", "bf16", "x-fp32-ae-bf16"))
@pytest.mark.parametrize("n", (1, 3, 64, 1024))
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
def test_gpu_image_pass(shape, n, dtypes, backend, seed):
    x32, ae32 = image_inputs(n, shape, device="cuda")
    x, ae = x32.to(dtypes[0]), ae32.to(dtypes[1])
    out = image_loss_fwd(x, ae, 0.2, backend=backend, poison=True)
    ref = image_loss_grads_ref(x, ae, 0.2)  # fp32 math on the same (rounded) inputs
    assert_close(out.loss_ae, ref.loss_ae, atol=0, rtol=2e-6, name="loss_ae")
    if ae.dtype == torch.float32:
        assert_close(out.d_ae, ref.d_ae, atol=1e-12, rtol=1e-6, name="d_ae")
        assert_close(out.x_real, ref.x_real, atol=1e-7, rtol=1e-6, name="x_real")
    else:
        ref32 = image_loss_grads_ref(x.float(), ae.float(), 0.2)  # fp32 outputs, not rounded to bf16
        lp_loss, lp_xreal = acai_image_loss_ref(x.to(ae.dtype), ae, 0.2)
        lp_dae = 2 * (ae - x.to(ae.dtype)) / ae.numel()
        assert_close_lowp(out.d_ae, ref32.d_ae, lp_dae, name="d_ae", floor=1e-9)
        assert_close_lowp(out.x_real, ref32.x_real, lp_xreal, name="x_real")
    again = image_loss_fwd(x, ae, 0.2, backend=backend)
    assert torch.equal(out.loss_ae, again.loss_ae), "the reduction is not deterministic"
    assert counter_of("cuda").item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("grad_maps", (True, False), ids=("maps", "per-image"))
@pytest.mark.parametrize("dtype", (torch.float32, LOWP), ids=str)
@pytest.mark.parametrize("n", (1, 3, 64, 1024, 3000))
@pytest.mark.parametrize("shape", LATENT_SHAPES + [ODD_LATENT], ids=str)
def test_gpu_critic_pass(shape, n, dtype, grad_maps, backend, seed):
    c_mix, c_real, alpha = critic_inputs(n, shape, device="cuda", dtype=dtype)
    out = critic_loss_fwd(c_mix, c_real, alpha, 0.5, grad_maps=grad_maps, backend=backend, poison=True)
    ref = critic_loss_grads_ref(c_mix, c_real, alpha, 0.5)
    for name in ("loss_ae_disc", "loss_disc", "loss_disc_real"):
        assert_close_loss(getattr(out, name), getattr(ref, name), name, rtol=2e-6)
    for name in ("g_mix_ae", "g_mix_critic", "g_real_critic"):
        got, want = getattr(out, name), getattr(ref, name)
        # bf16: one rounding of (nearly) the same fp32 value on both sides, at most one ulp apart
        assert_close_grad(got, want, name, rtol=1e-5 if dtype == torch.float32 else 2 ** -7)
    again = critic_loss_fwd(c_mix, c_real, alpha, 0.5, grad_maps=grad_maps, backend=backend)
    for a, b, name in zip(out, again, out._fields):
        assert torch.equal(a, b), f"{name} is not deterministic"
    assert counter_of("cuda").item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_extension_available(), reason="acai_fast._C is not built")
def test_gpu_cuda_matches_triton(seed):
    x, ae = image_inputs(1024, (3, 32, 32), device="cuda")
    a, b = (image_loss_fwd(x, ae, 0.2, backend=k) for k in ("cuda", "triton"))
    assert_close(a.loss_ae, b.loss_ae, atol=0, rtol=1e-6, name="loss_ae cuda vs triton")
    assert_close(a.d_ae, b.d_ae, atol=1e-12, rtol=1e-6, name="d_ae cuda vs triton")
    assert_close(a.x_real, b.x_real, atol=1e-7, rtol=1e-6, name="x_real cuda vs triton")
    maps = critic_inputs(1024, (64, 4, 4), device="cuda")
    a, b = (critic_loss_fwd(*maps, 0.5, backend=k) for k in ("cuda", "triton"))
    for u, v, name in zip(a[:3], b[:3], a._fields):
        assert_close_loss(u, v, f"{name} cuda vs triton")
    for u, v, name in zip(a[3:], b[3:], a._fields[3:]):
        assert_close_grad(u, v, f"{name} cuda vs triton", rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph(backend, seed):
    x, ae = image_inputs(64, (3, 32, 32), device="cuda")
    c_mix, c_real, alpha = critic_inputs(64, (16, 4, 4), device="cuda")

    def step():
        return image_loss_fwd(x, ae, 0.2, backend=backend), critic_loss_fwd(c_mix, c_real, alpha, 0.5, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and create the reduction counter outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        img, crit = step()
    for r in range(3):
        x.copy_(torch.rand_like(x) * 2 - 1)
        c_mix.copy_(torch.randn_like(c_mix))
        graph.replay()
        torch.cuda.synchronize()
        ref_img = image_loss_grads_ref(x, ae, 0.2)
        ref_crit = critic_loss_grads_ref(c_mix, c_real, alpha, 0.5)
        assert_close(img.loss_ae, ref_img.loss_ae, atol=0, rtol=2e-6, name=f"loss_ae replay {r}")
        assert_close(img.x_real, ref_img.x_real, atol=1e-7, rtol=1e-6, name=f"x_real replay {r}")
        for a, b, name in zip(crit, ref_crit, crit._fields):
            assert_close_grad(a, b, f"{name} replay {r}")
    assert counter_of("cuda").item() == 0


# ------------------------------------------------------------------------------------------------
# bench/bench_fused_ops.py: its pure-Python parts (the timings need a GPU)
# ------------------------------------------------------------------------------------------------


def load_bench():
    import importlib.util
    import pathlib
    import sys

    if "bench_fused_ops" not in sys.modules:
        bench_dir = pathlib.Path(__file__).resolve().parents[1] / "bench"
        sys.path.insert(0, str(bench_dir))
        try:
            spec = importlib.util.spec_from_file_location("bench_fused_ops", bench_dir / "bench_fused_ops.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules["bench_fused_ops"] = module  # dataclasses look their module up while building
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(bench_dir))
    return sys.modules["bench_fused_ops"]


def test_bench_covers_every_preset_shape():
    bench = load_bench()
    cases = bench.cases([64, 1024], "bf16")
    for p in PRESETS:
        cfg = ACAIConfig.preset(p)
        for op, shape in (("mix", cfg.latent_shape), ("critic_loss", cfg.latent_shape),
                          ("image_loss", (cfg.colors, 32, 32))):
            for b in (64, 1024):
                assert any(c.op == op and c.shape == tuple(shape) and c.batch == b and p in c.presets
                           for c in cases), (p, op, b)


def test_bench_bytes_moved():
    bench = load_bench()
    c = bench.Case("image_loss", (3, 32, 32), 1024, "bf16", ("cifar1024",))
    assert bench.bytes_moved(c) == 4 * 1024 * 3 * 1024 * 2  # read x, ae; write d_ae, x_real
    c = bench.Case("mix", (64, 4, 4), 64, "fp32", ("cifar1024",))
    assert bench.bytes_moved(c) == 5 * 64 * 1024 * 4 + 8 * 64
    c = bench.Case("critic_loss", (16, 2, 2), 64, "bf16", ("lines",))
    assert bench.bytes_moved(c) == 5 * 64 * 64 * 2 + 4 * 64
    assert bench.bytes_moved(c, "cuda_maps1") == 2 * 64 * 64 * 2 + 3 * 64 * 2 + 4 * 64


@pytest.mark.skipif(HAS_GPU, reason="checks the message without a GPU")
def test_bench_without_gpu_says_so(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"])
    assert "needs a CUDA GPU" in str(exc.value.code)
