"""loss_kernels: the four ACAI losses of SPEC.md section 2 and the gradients the step needs, in plain
PyTorch (the references: the SPEC's formulas, and their closed-form gradients) and as the two
one-launch Triton kernels that compute them: the image pass (loss_ae, d loss_ae / d ae, x_real) and
the critic-map pass (per-image means, loss_ae_disc, loss_disc, loss_disc_real and the map gradients
of both objectives). acai_loss.py launches them (checks, the CUDA twin or Triton, autograd); the
tests hold every kernel against the references here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _ext

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run
_ext.fix_triton_interpreter()

DTYPES = (torch.float32, torch.bfloat16)


# The four logged ACAI losses, in the order the tables and metrics print them.
LOSS_NAMES = ("loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real")


class ImageLoss(NamedTuple):
    """Outputs of the image pass: loss_ae (0-d float32), d_ae = d loss_ae / d ae (ae's dtype and
    shape) and x_real = ae + reg * (x - ae) (ae's dtype and shape), the critic's "real" input."""
    loss_ae: torch.Tensor
    d_ae: torch.Tensor
    x_real: torch.Tensor


class CriticLoss(NamedTuple):
    """Outputs of the critic-map pass: the three losses (0-d float32) and the map gradients (the
    maps' dtype and shape): g_mix_ae = d (advweight * loss_ae_disc) / d c_mix_map (the autoencoder
    objective, flows into x_mix), g_mix_critic = d loss_disc / d c_mix_map and g_real_critic =
    d loss_disc_real / d c_real_map (the critic objective). Each is constant over an image's map."""
    loss_ae_disc: torch.Tensor
    loss_disc: torch.Tensor
    loss_disc_real: torch.Tensor
    g_mix_ae: torch.Tensor
    g_mix_critic: torch.Tensor
    g_real_critic: torch.Tensor


# ------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ------------------------------------------------------------------------------------------------


def acai_image_loss_ref(x, ae, reg: float = 0.2, *, upcast: bool = False):
    """(loss_ae = mean((ae - x)^2), x_real = ae + reg * (x - ae)), differentiable, as the SPEC's step
    writes them. upcast: compute in fp32 (outputs fp32); else in ae's dtype (x cast to it)."""
    if upcast:
        x, ae = x.float(), ae.float()
    x = x.to(ae.dtype)
    return F.mse_loss(ae, x), ae + reg * (x - ae)


def acai_critic_loss_ref(c_mix_map, c_real_map, alpha, *, upcast: bool = False):
    """(loss_ae_disc, loss_disc, loss_disc_real), differentiable in both maps, as the SPEC's step
    writes them: c = critic map (N, ...) averaged over everything but the batch, per image;
    loss_ae_disc = mean(c_mix^2), loss_disc = mean((c_mix - alpha)^2), loss_disc_real = mean(c_real^2)."""
    if upcast:
        c_mix_map, c_real_map = c_mix_map.float(), c_real_map.float()
    c_mix = c_mix_map.flatten(1).mean(1)
    c_real = c_real_map.flatten(1).mean(1)
    alpha = alpha.reshape(-1).to(c_mix.dtype)
    return c_mix.square().mean(), (c_mix - alpha).square().mean(), c_real.square().mean()


def _upcast(t):
    """At least fp32 (fp64 stays fp64: the tests check the closed forms in fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def image_loss_grads_ref(x, ae, reg: float = 0.2) -> ImageLoss:
    """The explicit form of the image pass in closed form (fp32 math, outputs as the kernels')."""
    m = ae.numel()
    xf, af = _upcast(x), _upcast(ae)
    diff = af - xf
    return ImageLoss(diff.square().mean(), (diff * (2.0 / m)).to(ae.dtype),
                     (af + reg * (xf - af)).to(ae.dtype))


def critic_loss_grads_ref(c_mix_map, c_real_map, alpha, advweight: float = 0.5) -> CriticLoss:
    """The explicit form of the critic-map pass in closed form (fp32 math, outputs as the kernels')."""
    n, k = c_mix_map.shape[0], c_mix_map.numel() // c_mix_map.shape[0]
    c_mix = _upcast(c_mix_map).reshape(n, k).mean(1)
    c_real = _upcast(c_real_map).reshape(n, k).mean(1)
    a = _upcast(alpha).reshape(n)
    scale = 2.0 / (n * k)

    def as_map(v):  # (N,) -> the map's shape and dtype, constant per image
        return v.to(c_mix_map.dtype).view(n, *[1] * (c_mix_map.dim() - 1)).expand(c_mix_map.shape).contiguous()

    return CriticLoss(c_mix.square().mean(), (c_mix - a).square().mean(), c_real.square().mean(),
                      as_map(advweight * scale * c_mix), as_map(scale * (c_mix - a)),
                      as_map(scale * c_real))


# ------------------------------------------------------------------------------------------------
# Triton kernels
#
# Deterministic grid reductions: each program stores its partial sum(s) to Partials, passes a
# barrier (all its stores issued) and takes a ticket from an int32 atomic on Counter (acq_rel);
# the program with the last ticket sums the partials in program order and resets the counter.
# The grid size depends on the shape only, so the order (and the result) never changes.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _image_loss_fwd_kernel(X_ptr, Ae_ptr, Dae_ptr, Xreal_ptr, Loss_ptr, Partials_ptr, Counter_ptr,
                           M, reg, grad_scale, Reg_ptr, stride_xr, stride_ar, stride_dr, stride_rr,
                           BLOCK: tl.constexpr, MAX_PARTIALS: tl.constexpr, REG_PER_RUN: tl.constexpr):
    """Image pass over the M flat elements, grid-stride in BLOCK-wide tiles:
    diff = ae - x; loss = sum(diff^2) / M; d_ae = grad_scale * diff (grad_scale = fp32(2 / M));
    x_real = ae + reg * (x - ae). Reads x, ae once; writes d_ae, x_real once (ae's dtype).
    Runs (grid axis 1): each run's tensors move by their run strides, its reg is Reg[run] when
    REG_PER_RUN, and it reduces into its own partials, counter and Loss[run]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    run = tl.program_id(1).to(tl.int64)
    X_ptr += run * stride_xr
    Ae_ptr += run * stride_ar
    Dae_ptr += run * stride_dr
    Xreal_ptr += run * stride_rr
    Loss_ptr += run
    Partials_ptr += run * MAX_PARTIALS
    Counter_ptr += run
    if REG_PER_RUN:
        reg = tl.load(Reg_ptr + run)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    out_ty = Dae_ptr.dtype.element_ty
    for start in range(pid * BLOCK, M, nprog * BLOCK):
        idx = start + offs
        mask = idx < M
        x = tl.load(X_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(Ae_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        diff = a - x
        acc += diff * diff
        tl.store(Dae_ptr + idx, (grad_scale * diff).to(out_ty), mask=mask)
        tl.store(Xreal_ptr + idx, (a + reg * (x - a)).to(out_ty), mask=mask)
    tl.store(Partials_ptr + pid, tl.sum(acc, axis=0))
    tl.debug_barrier()
    ticket = tl.atomic_add(Counter_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        p_offs = tl.arange(0, MAX_PARTIALS)
        p = tl.load(Partials_ptr + p_offs, mask=p_offs < nprog, other=0.0, cache_modifier=".cg")
        tl.store(Loss_ptr, tl.sum(p, axis=0) / M)
        tl.store(Counter_ptr, 0)


@triton.jit
def _critic_loss_fwd_kernel(Cmix_ptr, Creal_ptr, Alpha_ptr, Gae_ptr, Gd_ptr, Gr_ptr, Losses_ptr,
                            Partials_ptr, Counter_ptr, N, K, inv_k, scale, advweight, Adv_ptr,
                            stride_mr, stride_rr, stride_gr,
                            GRAD_MAPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            MAX_PARTIALS: tl.constexpr, ADV_PER_RUN: tl.constexpr):
    """Critic-map pass over maps viewed as (N, K), BLOCK_N images per tile, grid-stride over tiles:
    c = (sum over K) * inv_k per image; g_ae = advweight * scale * c_mix, g_disc = scale * (c_mix - a),
    g_real = scale * c_real with scale = fp32(2 / (N K)), stored over the whole map row (GRAD_MAPS)
    or once per image; the per-image terms c_mix^2, (c_mix - a)^2, c_real^2 summed per program
    (partials laid out [term][program]) and reduced by the last program: losses = sums / N.
    Runs (grid axis 1): maps move by stride_mr / stride_rr, the three gradients by stride_gr, alpha
    by N; advweight is Adv[run] when ADV_PER_RUN; own partials, counter and Losses[run, 0:3]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    run = tl.program_id(1).to(tl.int64)
    Cmix_ptr += run * stride_mr
    Creal_ptr += run * stride_rr
    Gae_ptr += run * stride_gr
    Gd_ptr += run * stride_gr
    Gr_ptr += run * stride_gr
    Alpha_ptr += run * N
    Losses_ptr += run * 3
    Partials_ptr += run * 3 * MAX_PARTIALS
    Counter_ptr += run
    if ADV_PER_RUN:
        advweight = tl.load(Adv_ptr + run)
    rows0 = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    out_ty = Gae_ptr.dtype.element_ty
    t_ae = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_disc = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_real = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(pid * BLOCK_N, N, nprog * BLOCK_N):
        rows = row_start + rows0
        rmask = rows < N
        s_mix = tl.zeros([BLOCK_N], dtype=tl.float32)
        s_real = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            m2 = rmask[:, None] & (cols < K)[None, :]
            ptrs = rows[:, None] * K + cols[None, :]  # (BLOCK_N, BLOCK_K)
            s_mix += tl.sum(tl.load(Cmix_ptr + ptrs, mask=m2, other=0.0).to(tl.float32), axis=1)
            s_real += tl.sum(tl.load(Creal_ptr + ptrs, mask=m2, other=0.0).to(tl.float32), axis=1)
        c_mix = s_mix * inv_k
        c_real = s_real * inv_k
        a = tl.load(Alpha_ptr + rows, mask=rmask, other=0.0)
        g_ae = advweight * scale * c_mix
        g_d = scale * (c_mix - a)
        g_r = scale * c_real
        if GRAD_MAPS:
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                m2 = rmask[:, None] & (cols < K)[None, :]
                ptrs = rows[:, None] * K + cols[None, :]
                zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                tl.store(Gae_ptr + ptrs, (zero + g_ae[:, None]).to(out_ty), mask=m2)
                tl.store(Gd_ptr + ptrs, (zero + g_d[:, None]).to(out_ty), mask=m2)
                tl.store(Gr_ptr + ptrs, (zero + g_r[:, None]).to(out_ty), mask=m2)
        else:
            tl.store(Gae_ptr + rows, g_ae.to(out_ty), mask=rmask)
            tl.store(Gd_ptr + rows, g_d.to(out_ty), mask=rmask)
            tl.store(Gr_ptr + rows, g_r.to(out_ty), mask=rmask)
        t_ae += tl.where(rmask, c_mix * c_mix, 0.0)
        t_disc += tl.where(rmask, (c_mix - a) * (c_mix - a), 0.0)
        t_real += tl.where(rmask, c_real * c_real, 0.0)
    tl.store(Partials_ptr + pid, tl.sum(t_ae, axis=0))
    tl.store(Partials_ptr + nprog + pid, tl.sum(t_disc, axis=0))
    tl.store(Partials_ptr + 2 * nprog + pid, tl.sum(t_real, axis=0))
    tl.debug_barrier()
    ticket = tl.atomic_add(Counter_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        p_offs = tl.arange(0, MAX_PARTIALS)
        p_mask = p_offs < nprog
        for t in tl.static_range(3):
            p = tl.load(Partials_ptr + t * nprog + p_offs, mask=p_mask, other=0.0, cache_modifier=".cg")
            tl.store(Losses_ptr + t, tl.sum(p, axis=0) / N)
        tl.store(Counter_ptr, 0)
