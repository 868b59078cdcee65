"""probe_loss: the linear probe's training pass (SPEC.md section 2) in one launch: logits of the
flattened latent, softmax cross-entropy, accuracy, and the gradients of the dense layer.

The probe reads the detached latent, so its pass is independent of the networks' backward: one
Triton program computes the loss, the accuracy and dW/db (written into the parameters' .grad) where
plain PyTorch needs ~13 launches. One program, rows in fixed blocks: deterministic. Reference in
plain PyTorch (`probe_loss_ref`). Limits: at most 128 classes; the latent in any layout and fp32/bf16.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _ext

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run
_ext.fix_triton_interpreter()

MAX_CLASSES = 128


class ProbeLoss(NamedTuple):
    """loss: mean softmax cross-entropy (0-d fp32); accuracy: fraction of argmax == label (0-d fp32);
    d_weight (C, D), d_bias (C,): the gradients of loss (fp32)."""
    loss: torch.Tensor
    accuracy: torch.Tensor
    d_weight: torch.Tensor
    d_bias: torch.Tensor


# ------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ------------------------------------------------------------------------------------------------


def probe_loss_ref(z, weight, bias, labels, *, upcast: bool = True) -> ProbeLoss:
    """F.cross_entropy(z.flatten(1) @ weight.T + bias, labels), its accuracy, and its gradients with
    respect to weight and bias by autograd. z (N, ...) is flattened in its logical (NCHW) order."""
    zf = z.detach().flatten(1)
    if upcast:
        zf = zf.float()
    w = weight.detach().to(zf.dtype).requires_grad_()
    b = bias.detach().to(zf.dtype).requires_grad_()
    logits = F.linear(zf, w, b)
    loss = F.cross_entropy(logits, labels)
    dw, db = torch.autograd.grad(loss, (w, b))
    accuracy = (logits.argmax(1) == labels).float().mean()
    return ProbeLoss(loss.detach().float(), accuracy, dw.float(), db.float())


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _probe_loss_kernel(Z_ptr, W_ptr, B_ptr, L_ptr, DW_ptr, DB_ptr, Out_ptr,
                       N, C, D, HW, WD, stride_zn, stride_zc, stride_zh, stride_zw, stride_zr,
                       stride_wr, stride_br, stride_dwr, stride_dbr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program. For each block of BLOCK_N rows: logits = z @ W^T + b over D in BLOCK_D chunks
    (z gathered through its strides: feature d = (c, h, w) with d = c*HW + h*WD + w), softmax,
    loss_i = logsumexp - logit[label], correct_i = argmax == label, g = (softmax - onehot) / N;
    db += sum_i g; dW += g^T @ z (a second pass over the chunks, read-add-write: the rows blocks
    run in order, so the sums are deterministic). Out = [mean loss, accuracy].
    Runs: one program per run (grid axis 0), each with its own latent rows (run stride), labels,
    dense layer and outputs (contiguous per run; the run strides are arguments: the trainer's
    probe parameters are views of rows of its flat buffers)."""
    run = tl.program_id(0).to(tl.int64)
    Z_ptr += run * stride_zr
    W_ptr += run * stride_wr
    B_ptr += run * stride_br
    L_ptr += run * N
    DW_ptr += run * stride_dwr
    DB_ptr += run * stride_dbr
    Out_ptr += run * 2
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    bias = tl.load(B_ptr + cls, mask=c_ok, other=0.0).to(tl.float32)
    loss_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    correct = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        z_rows = Z_ptr + rows.to(tl.int64) * stride_zn
        logits = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            zoff = (d // HW) * stride_zc + ((d % HW) // WD) * stride_zh + (d % WD) * stride_zw
            zt = tl.load(z_rows[:, None] + zoff[None, :], mask=r_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
            wt = tl.load(W_ptr + cls[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
            logits = tl.dot(zt, tl.trans(wt), logits, input_precision="ieee")
        logits = logits + bias[None, :]
        logits = tl.where(c_ok[None, :], logits, float("-inf"))
        m = tl.max(logits, axis=1)
        e = tl.exp(logits - m[:, None])
        s = tl.sum(e, axis=1)
        lab = tl.load(L_ptr + rows, mask=r_ok, other=0).to(tl.int32)
        onehot = cls[None, :] == lab[:, None]
        picked = tl.sum(tl.where(onehot, logits, 0.0), axis=1)
        loss_sum += tl.where(r_ok, m + tl.log(s) - picked, 0.0)
        top = tl.argmax(logits, axis=1)
        correct += tl.where(r_ok & (top == lab), 1.0, 0.0)
        g = (e / s[:, None] - tl.where(onehot, 1.0, 0.0)) / N
        g = tl.where(r_ok[:, None] & c_ok[None, :], g, 0.0)
        db += tl.sum(g, axis=0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            zoff = (d // HW) * stride_zc + ((d % HW) // WD) * stride_zh + (d % WD) * stride_zw
            zt = tl.load(z_rows[:, None] + zoff[None, :], mask=r_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
            dw_ptrs = DW_ptr + cls[:, None] * D + d[None, :]
            dw_mask = c_ok[:, None] & d_ok[None, :]
            part = tl.dot(tl.trans(g), zt, input_precision="ieee")  # (BLOCK_C, BLOCK_D)
            if r0 > 0:
                part += tl.load(dw_ptrs, mask=dw_mask, other=0.0)
            tl.store(dw_ptrs, part, mask=dw_mask)
    tl.store(DB_ptr + cls, db, mask=c_ok)
    tl.store(Out_ptr, tl.sum(loss_sum, axis=0) / N)
    tl.store(Out_ptr + 1, tl.sum(correct, axis=0) / N)


# ------------------------------------------------------------------------------------------------
# Launcher and the functional op
# ------------------------------------------------------------------------------------------------


def _check_inputs(z, weight, bias, labels, runs=None):
    op = "probe_loss"
    for name, t in (("z", z), ("weight", weight), ("bias", bias), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    lead = (runs,) if runs is not None else ()
    k = len(lead)
    if z.dim() < 2 + k or z.shape[k] < 1 or z.shape[:k] != lead:
        raise ValueError(f"{op}: z must be {'(runs, ' if k else '('}N, ...) with N >= 1, got shape {tuple(z.shape)}")
    n, d = z.shape[k], z[(0,) * (k + 1)].numel()
    if weight.dim() != 2 + k or weight.shape[k + 1] != d or bias.shape != weight.shape[:k + 1] \
            or weight.shape[:k] != lead:
        raise ValueError(f"{op}: weight must be {lead + ('C', d)} and bias {lead + ('C',)}, got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if not 1 <= weight.shape[k] <= MAX_CLASSES:
        raise ValueError(f"{op}: 1 to {MAX_CLASSES} classes are supported, got {weight.shape[k]}")
    if labels.shape != lead + (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be {lead + (n,)} int64, got {tuple(labels.shape)} {labels.dtype}")
    if z.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.float32:
        raise ValueError(f"{op}: z must be float32 or bfloat16 and weight float32, got {z.dtype} "
                         f"and {weight.dtype}")
    if len({t.device for t in (z, weight, bias, labels)}) > 1:
        raise ValueError(f"{op}: z, weight, bias and labels must be on one device")


def probe_loss(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, *,
               d_weight_out: torch.Tensor | None = None, d_bias_out: torch.Tensor | None = None,
               runs: bool = False, backend: str = "auto") -> ProbeLoss:
    """The probe's loss, accuracy and gradients (see ProbeLoss) for the latent z (N, C, H, W) or
    (N, D) in any layout, the dense layer (weight (classes, D), bias) and integer labels, in one
    launch. d_weight_out / d_bias_out: contiguous fp32 tensors to write the gradients into (e.g.
    the probe parameters' persistent .grad). runs=True: an array of R runs, every argument with a
    leading run axis (z (R, N, ...) with any run stride, weight (R, classes, D) contiguous, labels
    (R, N)); losses and accuracies come out (R,). backend: "auto" (triton for CUDA tensors, else
    reference), "triton" (CUDA, or the CPU interpreter) or "reference". Labels outside
    [0, classes) are not checked here (the trainer checks them once)."""
    R = z.shape[0] if runs and isinstance(z, torch.Tensor) else None
    _check_inputs(z, weight, bias, labels, R)
    if backend == "auto":
        backend = "triton" if _ext.HAS_TRITON and z.is_cuda else "reference"
    if backend not in ("triton", "reference"):
        raise ValueError(f"probe_loss: unknown backend {backend!r}; valid: auto, triton, reference")
    _ext.check_backend_runs("probe_loss", backend, z.device)
    dw = d_weight_out if d_weight_out is not None else torch.empty_like(weight, dtype=torch.float32)
    db = d_bias_out if d_bias_out is not None else torch.empty_like(bias, dtype=torch.float32)
    if backend == "reference":
        outs = [probe_loss_ref(z[r], weight[r], bias[r], labels[r]) for r in range(R)] if runs \
            else [probe_loss_ref(z, weight, bias, labels)]
        stack = (lambda ts: torch.stack(ts)) if runs else (lambda ts: ts[0])
        dw.copy_(stack([o.d_weight for o in outs]))
        db.copy_(stack([o.d_bias for o in outs]))
        return ProbeLoss(stack([o.loss for o in outs]), stack([o.accuracy for o in outs]), dw, db)

    z5 = z if runs else z.unsqueeze(0)
    n = z5.shape[1]
    d = z5[0, 0].numel()
    classes = weight.shape[-2]
    z5 = z5 if z5.dim() == 5 else z5.reshape(*z5.shape[:2], -1, 1, 1)  # (R, N, D) -> (R, N, D, 1, 1)
    _, _, ch, h, w = z5.shape
    def per_run_contiguous(t):
        return t.is_contiguous() if not runs else all(t[r].is_contiguous() for r in range(t.shape[0]))

    if not (per_run_contiguous(dw) and dw.shape == weight.shape and dw.dtype == torch.float32
            and per_run_contiguous(db) and db.shape == bias.shape and db.dtype == torch.float32):
        raise ValueError("probe_loss: d_weight_out / d_bias_out must be fp32 tensors of the parameters' "
                         "shapes, contiguous within each run")
    if not per_run_contiguous(weight):
        weight = weight.contiguous()
    if not per_run_contiguous(bias):
        bias = bias.contiguous()

    def run_stride(t):
        return t.stride(0) if runs else 0
    out = torch.empty(z5.shape[0], 2, dtype=torch.float32, device=z.device)
    block_c = max(16, triton.next_power_of_2(classes))
    block_n = 16 if n <= 16 else 32
    block_d = 64 if block_c <= 32 else 32
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _probe_loss_kernel[(z5.shape[0],)](z5, weight, bias, labels, dw, db, out, n, classes, d, h * w, w,
                                           *z5.stride()[1:], z5.stride(0), run_stride(weight),
                                           run_stride(bias), run_stride(dw), run_stride(db),
                                           BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d)
    return ProbeLoss(out[:, 0] if runs else out[0, 0], out[:, 1] if runs else out[0, 1], dw, db)
