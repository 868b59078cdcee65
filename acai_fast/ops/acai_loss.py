"""acai_loss: the four ACAI losses of SPEC.md section 2 and all the gradients the step needs, fused.

Two one-launch kernels, because the critic's "real" input x_real = ae + reg (x - ae) must exist
before the critic runs on it, and the losses need that critic's output: an image pass (loss_ae,
d loss_ae / d ae, x_real) and a critic-map pass (per-image spatial means, loss_ae_disc, loss_disc,
loss_disc_real and the map gradients of both objectives). The references and the Triton kernels sit
side by side in loss_kernels.py; this module launches them (input checks, then one launch of the
chosen backend: CUDA (csrc/acai_loss.cu), Triton or the reference), with autograd and the functional
ops. Deterministic fp32 reductions; fp32/bf16 inputs.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from .. import _ext
from .._ext import BACKENDS, HAS_TRITON, INTERPRET, MAX_PARTIALS, PARTIALS_PER_BLOCK  # noqa: F401
from .loss_kernels import (DTYPES, LOSS_NAMES, CriticLoss, ImageLoss, _critic_loss_fwd_kernel,  # noqa: F401
                           _image_loss_fwd_kernel, acai_critic_loss_ref, acai_image_loss_ref,
                           critic_loss_grads_ref, image_loss_grads_ref)

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Launchers (checks, then one launch of the chosen backend)
# ------------------------------------------------------------------------------------------------

_IMAGE_BLOCK = 1024  # Triton tile of the image pass (elements)


def _check_tensor(op, name, t, dtypes=DTYPES):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} dtype {t.dtype} is not supported; use "
                         f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first")
    if t.numel() >= 2 ** 31:
        raise ValueError(f"{op}: {name} has {t.numel()} elements; at most 2^31 - 1 are supported")


def _check_same_device(op, **tensors):
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {where}")


def _check_counter(op, counter, device):
    if counter is None:
        return _ext.reduction_counter(device)
    if (not isinstance(counter, torch.Tensor) or counter.dtype != torch.int32 or counter.numel() != 1
            or counter.device != device):
        raise ValueError(f"{op}: counter must be a zero int32 tensor of one element on {device}")
    return counter


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_image_inputs(op, x, ae, reg):
    _check_tensor(op, "x", x)
    _check_tensor(op, "ae", ae)
    if x.shape != ae.shape:
        raise ValueError(f"{op}: x and ae must have the same shape, got {tuple(x.shape)} and {tuple(ae.shape)}")
    if ae.numel() < 1:
        raise ValueError(f"{op}: x and ae are empty (shape {tuple(ae.shape)})")
    _check_same_device(op, x=x, ae=ae)
    if not isinstance(reg, (int, float)) or not np.isfinite(reg):
        raise ValueError(f"{op}: reg must be a finite number, got {reg!r}")


def image_loss_fwd(x: torch.Tensor, ae: torch.Tensor, reg: float = 0.2, *, backend: str = "auto",
                   d_ae_out: torch.Tensor | None = None, x_real_out: torch.Tensor | None = None,
                   counter: torch.Tensor | None = None, poison: bool = False) -> ImageLoss:
    """Image pass, explicit form (what the fused trainer calls): ImageLoss(loss_ae, d_ae, x_real).

    x: the batch, ae: the reconstruction, same shape (any, contiguous), float32 or bfloat16 each.
    d_ae = 2 (ae - x) / M is the gradient of loss_ae alone (weight 1 in the autoencoder objective);
    x_real feeds the critic (no gradient flows back through it in the ACAI step). One launch.
    counter: the int32 ticket counter of the grid reduction (default: one per device, see
    acai_fast._ext.reduction_counter); d_ae_out, x_real_out: where to write d_ae and x_real
    (contiguous, ae's shape and dtype: e.g. blocks of rows of the step's larger buffers), default
    new tensors; poison: NaN-fill the outputs before the launch (tests)."""
    op = "acai_image_loss"
    _check_image_inputs(op, x, ae, reg)
    for out_name, t in (("d_ae_out", d_ae_out), ("x_real_out", x_real_out)):
        if t is not None:
            _check_tensor(op, out_name, t)
            if t.shape != ae.shape or t.dtype != ae.dtype or t.device != ae.device:
                raise ValueError(f"{op}: {out_name} must match ae ({tuple(ae.shape)}, {ae.dtype}, {ae.device})")
    name = _ext.resolve_backend(op, ae, backend)
    _ext.check_backend_runs(op, name, ae.device)
    logger.debug("image_loss_fwd: backend=%s (asked %s) %s x %s ae %s", name, backend,
                 tuple(ae.shape), x.dtype, ae.dtype)
    if name == "reference":
        out = image_loss_grads_ref(x, ae, reg)
        d_ae = d_ae_out.copy_(out.d_ae) if d_ae_out is not None else out.d_ae
        x_real = x_real_out.copy_(out.x_real) if x_real_out is not None else out.x_real
        return ImageLoss(out.loss_ae, d_ae, x_real)

    m = ae.numel()
    counter = _check_counter(op, counter, ae.device)
    d_ae = d_ae_out if d_ae_out is not None else torch.empty_like(ae)
    x_real = x_real_out if x_real_out is not None else torch.empty_like(ae)
    loss = torch.empty((), dtype=torch.float32, device=ae.device)
    partials = torch.empty(MAX_PARTIALS * PARTIALS_PER_BLOCK, dtype=torch.float32, device=ae.device)
    if poison:
        for t in (d_ae, x_real, loss):
            t.fill_(float("nan"))
    with _device_guard(ae):
        if name == "cuda":
            _ext.extension().image_loss_fwd(
                x.data_ptr(), ae.data_ptr(), d_ae.data_ptr(), x_real.data_ptr(), loss.data_ptr(),
                partials.data_ptr(), counter.data_ptr(), m, float(reg), _ext.dtype_code(x.dtype),
                _ext.dtype_code(ae.dtype), _ext.stream_handle(ae.device))
        else:
            grid = (min(triton.cdiv(m, _IMAGE_BLOCK), MAX_PARTIALS),)
            grad_scale = float(np.float32(2.0) / np.float32(m))  # as the CUDA kernel: fp32(2) / fp32(M)
            _image_loss_fwd_kernel[grid](x, ae, d_ae, x_real, loss, partials, counter, m, float(reg),
                                         grad_scale, loss, 0, 0, 0, 0, BLOCK=_IMAGE_BLOCK,
                                         MAX_PARTIALS=MAX_PARTIALS, REG_PER_RUN=False)
    return ImageLoss(loss, d_ae, x_real)


def _check_critic_inputs(op, c_mix_map, c_real_map, alpha):
    _check_tensor(op, "c_mix_map", c_mix_map)
    _check_tensor(op, "c_real_map", c_real_map)
    if c_mix_map.shape != c_real_map.shape or c_mix_map.dtype != c_real_map.dtype:
        raise ValueError(f"{op}: c_mix_map and c_real_map must have the same shape and dtype, got "
                         f"{tuple(c_mix_map.shape)} {c_mix_map.dtype} and {tuple(c_real_map.shape)} "
                         f"{c_real_map.dtype}")
    if c_mix_map.dim() < 1 or c_mix_map.shape[0] < 1 or c_mix_map.numel() < 1:
        raise ValueError(f"{op}: the critic maps must be (N, ...) with N >= 1 and at least one value "
                         f"per image, got shape {tuple(c_mix_map.shape)}")
    n = c_mix_map.shape[0]
    _check_tensor(op, "alpha", alpha, dtypes=(torch.float32,))
    if alpha.numel() != n or alpha.shape[0] != n:
        raise ValueError(f"{op}: alpha must have N={n} values, shape ({n},) or ({n}, 1, 1, 1), got "
                         f"shape {tuple(alpha.shape)}")
    _check_same_device(op, c_mix_map=c_mix_map, c_real_map=c_real_map, alpha=alpha)


def critic_loss_fwd(c_mix_map: torch.Tensor, c_real_map: torch.Tensor, alpha: torch.Tensor,
                    advweight: float = 0.5, *, grad_maps: bool = True, backend: str = "auto",
                    grads_out: tuple | None = None, counter: torch.Tensor | None = None,
                    poison: bool = False) -> CriticLoss:
    """Critic-map pass, explicit form (what the fused trainer calls): CriticLoss(loss_ae_disc,
    loss_disc, loss_disc_real, g_mix_ae, g_mix_critic, g_real_critic).

    c_mix_map, c_real_map: the critic's output maps before their mean, (N, latent, w, w) (any
    (N, ...)), contiguous, one dtype (float32 or bfloat16); alpha: float32 (N,) or (N, 1, 1, 1) (mix's).
    advweight scales g_mix_ae only (the autoencoder objective is loss_ae + advweight * loss_ae_disc).
    grad_maps=True writes the three gradients as whole contiguous maps; False writes one value per
    image and returns stride-0 expanded views of the map shape (no map bytes written: a consumer
    that can broadcast saves 3 N K elements of traffic). One launch."""
    op = "acai_critic_loss"
    _check_critic_inputs(op, c_mix_map, c_real_map, alpha)
    if not isinstance(advweight, (int, float)) or not np.isfinite(advweight):
        raise ValueError(f"{op}: advweight must be a finite number, got {advweight!r}")
    name = _ext.resolve_backend(op, c_mix_map, backend)
    _ext.check_backend_runs(op, name, c_mix_map.device)
    logger.debug("critic_loss_fwd: backend=%s (asked %s) maps %s %s grad_maps=%s", name, backend,
                 tuple(c_mix_map.shape), c_mix_map.dtype, grad_maps)
    if name == "reference":
        out = critic_loss_grads_ref(c_mix_map, c_real_map, alpha, advweight)
        if not grad_maps:  # same values, as expanded per-image views
            out = out._replace(**{f: _expand(getattr(out, f).flatten(1)[:, 0].contiguous(), c_mix_map)
                                  for f in ("g_mix_ae", "g_mix_critic", "g_real_critic")})
        if grads_out is not None:
            out = out._replace(**{f: t.copy_(getattr(out, f)) for f, t in
                                  zip(("g_mix_ae", "g_mix_critic", "g_real_critic"), grads_out)})
        return out

    n, k = c_mix_map.shape[0], c_mix_map.numel() // c_mix_map.shape[0]
    counter = _check_counter(op, counter, c_mix_map.device)
    gshape = c_mix_map.shape if grad_maps else (n,)
    grads = list(grads_out) if grads_out is not None else \
        [torch.empty(gshape, dtype=c_mix_map.dtype, device=c_mix_map.device) for _ in range(3)]
    losses = torch.empty(3, dtype=torch.float32, device=c_mix_map.device)
    partials = torch.empty(MAX_PARTIALS * PARTIALS_PER_BLOCK, dtype=torch.float32, device=c_mix_map.device)
    if poison:
        for t in (*grads, losses):
            t.fill_(float("nan"))
    with _device_guard(c_mix_map):
        if name == "cuda":
            _ext.extension().critic_loss_fwd(
                c_mix_map.data_ptr(), c_real_map.data_ptr(), alpha.data_ptr(), *(g.data_ptr() for g in grads),
                losses.data_ptr(), partials.data_ptr(), counter.data_ptr(), n, k, float(advweight),
                grad_maps, _ext.dtype_code(c_mix_map.dtype), _ext.stream_handle(c_mix_map.device))
        else:
            block_k = min(triton.next_power_of_2(k), 1024)
            block_n = max(1, min(triton.next_power_of_2(n), 4096 // block_k))
            grid = (min(triton.cdiv(n, block_n), MAX_PARTIALS),)
            # The same fp32 constants as the CUDA kernel: 1 / fp32(K) and 2 / (fp32(N) fp32(K)).
            inv_k = float(np.float32(1.0) / np.float32(k))
            scale = float(np.float32(2.0) / (np.float32(n) * np.float32(k)))
            _critic_loss_fwd_kernel[grid](c_mix_map, c_real_map, alpha, *grads, losses, partials, counter,
                                          n, k, inv_k, scale, float(advweight), losses, 0, 0, 0,
                                          GRAD_MAPS=grad_maps, BLOCK_N=block_n, BLOCK_K=block_k,
                                          MAX_PARTIALS=MAX_PARTIALS, ADV_PER_RUN=False)
    if not grad_maps:
        grads = [_expand(g, c_mix_map) for g in grads]
    return CriticLoss(losses[0], losses[1], losses[2], *grads)


def _check_runs(op, name, t, runs=None):
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or (runs is not None and t.shape[0] != runs):
        raise ValueError(f"{op}: {name} must be (runs{'=' + str(runs) if runs else ''}, N, ...) with "
                         f"every run contiguous, got {tuple(t.shape) if isinstance(t, torch.Tensor) else t}")
    _check_tensor(op, f"{name}[0]", t[0])


def _per_run(op, name, v, runs, device):
    """A per-run scalar hyper-parameter: a float (the same for every run) or an fp32 (runs,) tensor."""
    if isinstance(v, torch.Tensor):
        if tuple(v.shape) != (runs,) or v.dtype != torch.float32 or v.device != device:
            raise ValueError(f"{op}: {name} must be a float or a float32 ({runs},) tensor on {device}")
        return v
    if not isinstance(v, (int, float)) or not np.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    return float(v)


def _run_counter(op, counter, runs, device):
    if counter is None:
        return torch.zeros(runs, dtype=torch.int32, device=device)
    if counter.dtype != torch.int32 or tuple(counter.shape) != (runs,) or counter.device != device:
        raise ValueError(f"{op}: counter of an array must be int32 zeros of shape ({runs},) on {device}")
    return counter


def image_loss_fwd_runs(x, ae, reg, *, d_ae_out, x_real_out, counter=None, backend="auto") -> ImageLoss:
    """`image_loss_fwd` for an array of R runs in one launch: x, ae, d_ae_out, x_real_out (R, N, ...)
    with every run contiguous (any run stride); reg a float or an fp32 (R,) tensor (per run);
    counter: int32 zeros (R,) left at zero (default: a fresh one). -> ImageLoss(loss_ae (R,), ...).
    R = 1 is exactly `image_loss_fwd` (and may use the CUDA twin)."""
    op = "acai_image_loss"
    runs = ae.shape[0] if isinstance(ae, torch.Tensor) and ae.dim() >= 2 else 0
    for name, t in (("x", x), ("ae", ae), ("d_ae_out", d_ae_out), ("x_real_out", x_real_out)):
        _check_runs(op, name, t, runs)
    if x.shape != ae.shape:
        raise ValueError(f"{op}: x and ae must have the same shape, got {tuple(x.shape)} and {tuple(ae.shape)}")
    reg = _per_run(op, "reg", reg, runs, ae.device)
    if runs == 1 and not isinstance(reg, torch.Tensor):
        out = image_loss_fwd(x[0], ae[0], reg, backend=backend, d_ae_out=d_ae_out[0],
                             x_real_out=x_real_out[0], counter=counter[:1] if counter is not None else None)
        return ImageLoss(out.loss_ae.view(1), d_ae_out, x_real_out)
    name = _ext.resolve_backend(op, ae, backend)
    name = "triton" if name == "cuda" else name  # the CUDA twin has no run axis
    _ext.check_backend_runs(op, name, ae.device)
    if name == "reference":
        regs = reg.tolist() if isinstance(reg, torch.Tensor) else [reg] * runs
        losses = [image_loss_fwd(x[r], ae[r], regs[r], backend="reference", d_ae_out=d_ae_out[r],
                                 x_real_out=x_real_out[r]).loss_ae for r in range(runs)]
        return ImageLoss(torch.stack(losses), d_ae_out, x_real_out)
    m = ae[0].numel()
    counter = _run_counter(op, counter, runs, ae.device)
    loss = torch.empty(runs, dtype=torch.float32, device=ae.device)
    partials = torch.empty(runs * MAX_PARTIALS, dtype=torch.float32, device=ae.device)
    per_run = isinstance(reg, torch.Tensor)
    with _device_guard(ae):
        grid = (min(triton.cdiv(m, _IMAGE_BLOCK), MAX_PARTIALS), runs)
        grad_scale = float(np.float32(2.0) / np.float32(m))
        _image_loss_fwd_kernel[grid](x, ae, d_ae_out, x_real_out, loss, partials, counter, m,
                                     0.0 if per_run else reg, grad_scale, reg if per_run else loss,
                                     x.stride(0), ae.stride(0), d_ae_out.stride(0), x_real_out.stride(0),
                                     BLOCK=_IMAGE_BLOCK, MAX_PARTIALS=MAX_PARTIALS, REG_PER_RUN=per_run)
    return ImageLoss(loss, d_ae_out, x_real_out)


def critic_loss_fwd_runs(c_mix_map, c_real_map, alpha, advweight, *, grads_out, counter=None,
                         backend="auto") -> CriticLoss:
    """`critic_loss_fwd` (grad_maps=True) for an array of R runs in one launch: maps (R, N, ...) with
    every run contiguous, alpha (R, N), advweight a float or an fp32 (R,) tensor, grads_out three
    (R, N, ...) tensors with one run stride between them all (e.g. row blocks of one buffer).
    -> CriticLoss with (R,) losses. R = 1 is exactly `critic_loss_fwd`."""
    op = "acai_critic_loss"
    runs = c_mix_map.shape[0] if isinstance(c_mix_map, torch.Tensor) and c_mix_map.dim() >= 2 else 0
    for name, t in (("c_mix_map", c_mix_map), ("c_real_map", c_real_map), *(("grads_out", g) for g in grads_out)):
        _check_runs(op, name, t, runs)
    n = c_mix_map.shape[1]
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (runs, n) or alpha.dtype != torch.float32:
        raise ValueError(f"{op}: alpha of an array must be float32 ({runs}, {n})")
    if len({g.stride(0) for g in grads_out}) > 1:
        raise ValueError(f"{op}: the three grads_out of an array must share one run stride")
    advweight = _per_run(op, "advweight", advweight, runs, c_mix_map.device)
    if runs == 1 and not isinstance(advweight, torch.Tensor):
        out = critic_loss_fwd(c_mix_map[0], c_real_map[0], alpha[0], advweight, backend=backend,
                              grads_out=tuple(g[0] for g in grads_out),
                              counter=counter[:1] if counter is not None else None)
        return CriticLoss(out.loss_ae_disc.view(1), out.loss_disc.view(1), out.loss_disc_real.view(1),
                          *grads_out)
    name = _ext.resolve_backend(op, c_mix_map, backend)
    name = "triton" if name == "cuda" else name
    _ext.check_backend_runs(op, name, c_mix_map.device)
    if name == "reference":
        advs = advweight.tolist() if isinstance(advweight, torch.Tensor) else [advweight] * runs
        outs = [critic_loss_fwd(c_mix_map[r], c_real_map[r], alpha[r], advs[r], backend="reference",
                                grads_out=tuple(g[r] for g in grads_out)) for r in range(runs)]
        return CriticLoss(*(torch.stack([getattr(o, f) for o in outs])
                            for f in ("loss_ae_disc", "loss_disc", "loss_disc_real")), *grads_out)
    k = c_mix_map[0].numel() // n
    counter = _run_counter(op, counter, runs, c_mix_map.device)
    losses = torch.empty(runs, 3, dtype=torch.float32, device=c_mix_map.device)
    partials = torch.empty(runs * 3 * MAX_PARTIALS, dtype=torch.float32, device=c_mix_map.device)
    per_run = isinstance(advweight, torch.Tensor)
    with _device_guard(c_mix_map):
        block_k = min(triton.next_power_of_2(k), 1024)
        block_n = max(1, min(triton.next_power_of_2(n), 4096 // block_k))
        grid = (min(triton.cdiv(n, block_n), MAX_PARTIALS), runs)
        inv_k = float(np.float32(1.0) / np.float32(k))
        scale = float(np.float32(2.0) / (np.float32(n) * np.float32(k)))
        _critic_loss_fwd_kernel[grid](c_mix_map, c_real_map, alpha, *grads_out, losses, partials, counter,
                                      n, k, inv_k, scale, 0.0 if per_run else advweight,
                                      advweight if per_run else losses, c_mix_map.stride(0),
                                      c_real_map.stride(0), grads_out[0].stride(0), GRAD_MAPS=True,
                                      BLOCK_N=block_n, BLOCK_K=block_k, MAX_PARTIALS=MAX_PARTIALS,
                                      ADV_PER_RUN=per_run)
    return CriticLoss(losses[:, 0], losses[:, 1], losses[:, 2], *grads_out)


def _expand(v, like):
    """(N,) -> a stride-0 view of like's shape: v[n] at every position of image n."""
    return v.view(-1, *[1] * (like.dim() - 1)).expand(like.shape)


# ------------------------------------------------------------------------------------------------
# Autograd and the functional ops
# ------------------------------------------------------------------------------------------------


class ImageLossFunction(torch.autograd.Function):
    """(loss_ae, x_real) from one launch. Saves d_ae = d loss_ae / d ae only (the kernel wrote it).
    Backward (elementwise PyTorch): d_ae * g_loss + (1 - reg) g_xreal for ae, -d_ae * g_loss +
    reg g_xreal for x; in the ACAI step g_xreal is None (the critic's gradient stays in the critic)."""

    @staticmethod
    def forward(ctx, x, ae, reg, backend):
        out = image_loss_fwd(x, ae, reg, backend=backend)
        ctx.save_for_backward(out.d_ae)
        ctx.reg, ctx.x_dtype = reg, x.dtype
        ctx.set_materialize_grads(False)
        return out.loss_ae, out.x_real

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_xreal):
        (d_ae,) = ctx.saved_tensors
        need_x, need_ae = ctx.needs_input_grad[:2]
        dx = dae = None
        if g_loss is not None:
            base = d_ae.float() * g_loss.float()
            dx, dae = -base if need_x else None, base if need_ae else None
        if g_xreal is not None:
            g = g_xreal.float()
            if need_x:
                dx = ctx.reg * g if dx is None else dx + ctx.reg * g
            if need_ae:
                dae = (1 - ctx.reg) * g if dae is None else dae + (1 - ctx.reg) * g
        dx = dx.to(ctx.x_dtype) if dx is not None else None
        dae = dae.to(d_ae.dtype) if dae is not None else None
        return dx, dae, None, None


class CriticLossFunction(torch.autograd.Function):
    """(loss_ae_disc, loss_disc, loss_disc_real) from one launch (grad_maps=False, advweight=1: the
    kernel writes three (N,) coefficient vectors). Backward (elementwise PyTorch) broadcasts them:
    d c_mix_map = g1 * 2 c_mix / (N K) + g2 * 2 (c_mix - alpha) / (N K), d c_real_map = g3 * 2 c_real / (N K)."""

    @staticmethod
    def forward(ctx, c_mix_map, c_real_map, alpha, backend):
        out = critic_loss_fwd(c_mix_map, c_real_map, alpha, 1.0, grad_maps=False, backend=backend)
        ctx.save_for_backward(out.g_mix_ae, out.g_mix_critic, out.g_real_critic)
        ctx.set_materialize_grads(False)
        return out.loss_ae_disc, out.loss_disc, out.loss_disc_real

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ae_disc, g_disc, g_disc_real):
        v_ae, v_disc, v_real = ctx.saved_tensors  # expanded (N,) coefficient vectors
        need_mix, need_real = ctx.needs_input_grad[:2]
        d_mix = d_real = None
        if need_mix and (g_ae_disc is not None or g_disc is not None):
            terms = [v.float() * g.float() for v, g in ((v_ae, g_ae_disc), (v_disc, g_disc)) if g is not None]
            d_mix = (terms[0] if len(terms) == 1 else terms[0] + terms[1]).to(v_ae.dtype)
        if need_real and g_disc_real is not None:
            d_real = (v_real.float() * g_disc_real.float()).to(v_real.dtype)
        return d_mix, d_real, None, None


def acai_image_loss(x: torch.Tensor, ae: torch.Tensor, reg: float = 0.2, *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_ae = mean((ae - x)^2), x_real = ae + reg * (x - ae)), differentiable in x and ae.

    x, ae: same shape, contiguous, float32 or bfloat16 each; loss_ae is 0-d float32, x_real in ae's
    dtype. backend: "auto" (cuda if acai_fast._C is built and the tensors are on a GPU, else triton
    on a GPU, else reference), "cuda", "triton" (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1) or "reference"; logged at DEBUG level. See `image_loss_fwd` for the
    explicit form that also returns d loss_ae / d ae."""
    name = _ext.resolve_backend("acai_image_loss", ae, backend)
    if name == "reference":
        _check_image_inputs("acai_image_loss", x, ae, reg)
        loss_ae, x_real = acai_image_loss_ref(x, ae, reg, upcast=True)
        return loss_ae, x_real.to(ae.dtype)
    return ImageLossFunction.apply(x, ae, reg, name)


def acai_critic_loss(c_mix_map: torch.Tensor, c_real_map: torch.Tensor, alpha: torch.Tensor, *,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_ae_disc, loss_disc, loss_disc_real), differentiable in both critic maps (alpha gets no
    gradient). c_mix_map: critic(x_mix) before its mean, c_real_map: critic(x_real) before its mean,
    (N, latent, w, w), one dtype (float32 or bfloat16), contiguous; alpha float32 (N,) or (N,1,1,1).
    backend as for `acai_image_loss`. See `critic_loss_fwd` for the explicit form that also returns
    the map gradients of both objectives."""
    name = _ext.resolve_backend("acai_critic_loss", c_mix_map, backend)
    if name == "reference":
        _check_critic_inputs("acai_critic_loss", c_mix_map, c_real_map, alpha)
        return acai_critic_loss_ref(c_mix_map, c_real_map, alpha, upcast=True)
    return CriticLossFunction.apply(c_mix_map, c_real_map, alpha.detach(), name)
