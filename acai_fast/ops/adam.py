"""adam: the paper's Adam (lr 1e-4, betas 0.9/0.999, eps 1e-8) over flat parameter buffers, for
K runs at once, in one launch.

The trainer keeps every run's parameters, gradients and Adam moments as rows of flat fp32 buffers
(R, P) (acai_fast.parameters): the networks' parameters first (P_NETS elements), then the linear
probe's. One step updates, per run r and element i (PyTorch's fused Adam, TF1 up to eps placement):
    t      = step[r, segment(i)] + 1                (segment: 0 networks, 1 probe)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g * g
    p     -= lr[r] / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
and, when asked, writes p rounded to bf16 into a low-precision copy (R, P) that the bf16 conv
kernels read instead of the fp32 master weights (half the bytes through L2 in every conv, and no
cast launch). The probe segment takes part only on steps with labels (without them it has no
gradient and Adam leaves it alone, as PyTorch's optimisers skip a parameter whose grad is None).
found_inf (R,) skips a run's whole update and its step count (GradScaler's contract).

Reference (`adam_ref`): PyTorch's own fused Adam (`torch._fused_adam_`, what torch.optim.Adam(
fused=True) runs) on each run's contiguous segment rows: bit for bit the optimiser the trainer used
before the buffers were flat. Triton kernel (`_adam_kernel`): one program per BLOCK elements of
one run (hundreds of CTAs: the update is bound by HBM, 16 B read + 12 B written per element, 14 B
more for the copy); the step counts advance on the device, by the last program of each run to
finish (a ticket counter, as the conv dW kernel's split reduction), so the launch is graph-safe and
is the whole optimiser: no separate step-count launch.
"""
from __future__ import annotations

import math

import torch

from .. import _ext

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run
_ext.fix_triton_interpreter()

BETAS = (0.9, 0.999)
EPS = 1e-8
BLOCK = 2048  # elements per program: lines (1.57M per run) -> 770 programs, ~6 per SM on an H100


# ------------------------------------------------------------------------------------------------
# Reference (PyTorch's fused Adam)
# ------------------------------------------------------------------------------------------------


def adam_ref(params, grads, exp_avg, exp_avg_sq, steps, lrs, *, p_nets: int, probe: bool,
             found_inf=None, lowp=None, betas=BETAS, eps=EPS) -> None:
    """One Adam step in place on rows of (R, P) fp32 buffers with torch._fused_adam_.

    steps: (R, 2) fp32 step counts (networks, probe); lrs: R floats; p_nets: where the probe's
    segment starts; probe: update the probe's segment; found_inf: None or (R,) fp32 (nonzero:
    skip that run); lowp: None or an (R, P) bf16 copy to refresh."""
    runs, total = params.shape
    segments = [(0, 0, p_nets)] + ([(1, p_nets, total)] if probe and total > p_nets else [])
    by_lr: dict[float, list[int]] = {}
    for r, lr in enumerate(lrs):
        by_lr.setdefault(float(lr), []).append(r)
    for lr, rows in by_lr.items():
        # One call per (learning rate, found_inf row): found_inf is one scalar per call.
        calls = [rows] if found_inf is None else [[r] for r in rows]
        for call in calls:
            for seg, lo, hi in segments:
                step_views = [steps[r, seg] for r in call]
                torch._foreach_add_(step_views, 1)
                found = None if found_inf is None else found_inf[call[0]].reshape(())
                torch._fused_adam_([params[r, lo:hi] for r in call], [grads[r, lo:hi] for r in call],
                                   [exp_avg[r, lo:hi] for r in call], [exp_avg_sq[r, lo:hi] for r in call],
                                   [], step_views, amsgrad=False, lr=lr, beta1=betas[0], beta2=betas[1],
                                   weight_decay=0.0, eps=eps, maximize=False, grad_scale=None,
                                   found_inf=found)
                if found is not None:  # PyTorch's contract: a skipped step does not count
                    torch._foreach_sub_(step_views, [found] * len(step_views))
    if lowp is not None:
        lowp.copy_(params)


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _adam_kernel(P_ptr, G_ptr, M_ptr, V_ptr, LOWP_ptr, Steps_ptr, LR_ptr, Found_ptr, Counter_ptr,
                 stride_r, P_NETS, P_ACTIVE, beta1, beta2, log2_beta1, log2_beta2, eps,
                 HAS_LOWP: tl.constexpr, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """Adam on elements [pid * BLOCK, (pid + 1) * BLOCK) of run program_id(1), in fp32.

    Bias corrections in fp64 from the step count, beta^t = 2^(t * log2(beta)) (log2(beta) from the
    host: its fp32 rounding moves beta^t by < 1e-7 relative at every t, where 1 - beta^t computed
    in fp32 would lose ~1e-4 to cancellation at t = 1), then fp32, as PyTorch uses them. The step counts
    (R, 2) are read by every program before it takes its run's ticket (acq_rel); the program with
    the last ticket advances them (the probe's only when its segment took part) and resets the
    counter to 0, so every program saw the same t."""
    pid = tl.program_id(0)
    run = tl.program_id(1)
    base = run.to(tl.int64) * stride_r
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P_ACTIVE
    go = 1.0
    if HAS_FOUND:
        go = 1.0 - (tl.load(Found_ptr + run) != 0).to(tl.float32)
    t_net = tl.load(Steps_ptr + run * 2).to(tl.float64) + 1.0
    t_probe = tl.load(Steps_ptr + run * 2 + 1).to(tl.float64) + 1.0
    bc1_net = (1.0 - tl.exp2(t_net * log2_beta1)).to(tl.float32)
    bc2_net = tl.sqrt((1.0 - tl.exp2(t_net * log2_beta2)).to(tl.float32))
    bc1_probe = (1.0 - tl.exp2(t_probe * log2_beta1)).to(tl.float32)
    bc2_probe = tl.sqrt((1.0 - tl.exp2(t_probe * log2_beta2)).to(tl.float32))
    is_net = offs < P_NETS
    lr = tl.load(LR_ptr + run)
    step_size = lr / tl.where(is_net, bc1_net, bc1_probe)
    bc2_sqrt = tl.where(is_net, bc2_net, bc2_probe)

    p = tl.load(P_ptr + base + offs, mask=mask, other=0.0)
    g = tl.load(G_ptr + base + offs, mask=mask, other=0.0)
    m = tl.load(M_ptr + base + offs, mask=mask, other=0.0)
    v = tl.load(V_ptr + base + offs, mask=mask, other=0.0)
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v_new) / bc2_sqrt + eps
    p_new = p - step_size * m_new / denom
    ok = mask & (go > 0)
    tl.store(P_ptr + base + offs, p_new, mask=ok)
    tl.store(M_ptr + base + offs, m_new, mask=ok)
    tl.store(V_ptr + base + offs, v_new, mask=ok)
    if HAS_LOWP:
        tl.store(LOWP_ptr + base + offs, p_new.to(LOWP_ptr.dtype.element_ty), mask=ok)

    tl.debug_barrier()  # every thread of this program has read the step counts
    ticket = tl.atomic_add(Counter_ptr + run, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        if go > 0:
            tl.store(Steps_ptr + run * 2, (t_net).to(tl.float32))
            if P_ACTIVE > P_NETS:
                tl.store(Steps_ptr + run * 2 + 1, (t_probe).to(tl.float32))
        tl.store(Counter_ptr + run, 0)


# ------------------------------------------------------------------------------------------------
# Launcher and entry point
# ------------------------------------------------------------------------------------------------


def adam_triton(params, grads, exp_avg, exp_avg_sq, steps, lr, counter, *, p_nets: int, probe: bool,
                found_inf=None, lowp=None, betas=BETAS, eps=EPS, block: int = BLOCK) -> None:
    """The one-launch Triton Adam. lr: (R,) fp32 on the device; counter: (R,) int32 zeros (left at
    zero); the rest as in `adam_ref`."""
    runs, total = params.shape
    active = total if probe else p_nets
    for name, t in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != params.shape or t.stride() != params.stride() or t.dtype != torch.float32:
            raise ValueError(f"adam: {name} must be fp32 with params' shape and strides {tuple(params.shape)}")
    if params.stride(1) != 1 or params.dtype != torch.float32:
        raise ValueError("adam: params must be fp32 (R, P) rows with contiguous elements")
    if lowp is not None and (lowp.shape != params.shape or lowp.stride() != params.stride()):
        raise ValueError("adam: lowp must have params' shape and strides")
    if steps.shape != (runs, 2) or lr.shape != (runs,) or counter.shape[0] < runs:
        raise ValueError(f"adam: steps (R, 2), lr (R,), counter (>= R,) expected for R = {runs}")
    grid = (triton.cdiv(max(active, 1), block), runs)
    _adam_kernel[grid](params, grads, exp_avg, exp_avg_sq, lowp if lowp is not None else params, steps, lr,
                       found_inf if found_inf is not None else lr, counter, params.stride(0), p_nets, active,
                       betas[0], betas[1], math.log2(betas[0]), math.log2(betas[1]), eps, HAS_LOWP=lowp is not None, HAS_FOUND=found_inf is not None,
                       BLOCK=block)
