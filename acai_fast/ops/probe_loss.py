"""probe_loss: the linear probe's training pass (SPEC.md section 2) in one launch: logits of the
flattened latent, softmax cross-entropy, accuracy, and the gradients of the dense layer.

The probe reads the detached latent, so its pass is independent of the networks' backward: one
Triton launch computes the loss, the accuracy and dW/db (written into the parameters' .grad) where
plain PyTorch needs ~13 launches. Many programs per run (row blocks x chunks of the feature
dimension), reduced in-launch in a fixed order: deterministic and bit-repeatable. Reference in
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
def _probe_loss_kernel(Z_ptr, W_ptr, B_ptr, L_ptr, DW_ptr, DB_ptr, Out_ptr, WS_ptr, WSS_ptr, Counter_ptr,
                       N, C, D, HW, WD, D_CHUNK, stride_zn, stride_zc, stride_zh, stride_zw, stride_zr,
                       stride_wr, stride_br, stride_dwr, stride_dbr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block i, feature chunk j, run r). Rows R_i = [i*BLOCK_N, (i+1)*BLOCK_N) of N:
    logits = z[R_i] @ W^T + b over all of D in BLOCK_D chunks (z gathered through its strides:
    feature d = (c, h, w) with d = c*HW + h*WD + w), softmax, loss_n = logsumexp - logit[label],
    correct_n = (argmax == label), g = (softmax - onehot) / N (zero on padded rows and classes);
    then this row block's partial dW_i[:, J_j] = g^T @ z[R_i, J_j] over the feature chunk
    J_j = [j*D_CHUNK, (j+1)*D_CHUNK) only (every chunk's programs recompute the row block's logits:
    a read of BLOCK_N x D of z, so that no program waits for another).
    Deterministic two-level reduction in this launch: every program stores its fp32 partial to WS
    (runs, row blocks, C, D) (the j = 0 programs also [db_i (BLOCK_C) | sum loss_n, sum correct_n]
    to WSS (runs, row blocks, 2*BLOCK_C)), passes a barrier and takes a ticket from the counter
    of (r, j) (acq_rel); the program holding the last ticket sums the partials of chunk j over the
    row blocks in order 0, 1, ... (and for j = 0 the losses, accuracies and db), writes them, and
    resets the counter to 0. The result depends on the shapes only, never on which program
    finished last. Out = [mean loss, accuracy] per run.
    Runs: grid axis 2, each with its own latent rows, labels, dense layer, outputs, partials and
    counters; the dense layer and its gradients are contiguous within a run, with run strides as
    arguments (the trainer's probe parameters are views of rows of its flat buffers)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    run = tl.program_id(2).to(tl.int64)
    num_n = tl.num_programs(0)
    Z_ptr += run * stride_zr
    W_ptr += run * stride_wr
    B_ptr += run * stride_br
    L_ptr += run * N
    DW_ptr += run * stride_dwr
    DB_ptr += run * stride_dbr
    Out_ptr += run * 2
    WS_ptr += run * num_n * C * D
    WSS_ptr += run * num_n * (2 * BLOCK_C)
    Counter_ptr += run * tl.num_programs(1) + pid_d
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    bias = tl.load(B_ptr + cls, mask=c_ok, other=0.0).to(tl.float32)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    g = (e / s[:, None] - tl.where(onehot, 1.0, 0.0)) / N
    g = tl.where(r_ok[:, None] & c_ok[None, :], g, 0.0)

    # this row block's partial of dW over this program's feature chunk
    d_lo = pid_d * D_CHUNK
    d_hi = tl.minimum(d_lo + D_CHUNK, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < d_hi
        zoff = (d // HW) * stride_zc + ((d % HW) // WD) * stride_zh + (d % WD) * stride_zw
        zt = tl.load(z_rows[:, None] + zoff[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        part = tl.dot(tl.trans(g), zt, input_precision="ieee")  # (BLOCK_C, BLOCK_D)
        tl.store(WS_ptr + pid_n * C * D + cls[:, None] * D + d[None, :], part,
                 mask=c_ok[:, None] & d_ok[None, :])
    pair = tl.arange(0, 2)
    if pid_d == 0:
        loss_i = tl.sum(tl.where(r_ok, m + tl.log(s) - picked, 0.0), axis=0)
        correct_i = tl.sum(tl.where(r_ok & (tl.argmax(logits, axis=1) == lab), 1.0, 0.0), axis=0)
        rec = WSS_ptr + pid_n * (2 * BLOCK_C)
        tl.store(rec + cls, tl.sum(g, axis=0))
        tl.store(rec + BLOCK_C + pair, tl.where(pair == 0, loss_i, correct_i))

    tl.debug_barrier()  # every thread's partials are stored before the ticket is taken
    ticket = tl.atomic_add(Counter_ptr, 1, sem="acq_rel")
    if ticket == num_n - 1:
        for d0 in range(d_lo, d_hi, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = c_ok[:, None] & (d < d_hi)[None, :]
            total = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
            for i in range(0, num_n):
                total += tl.load(WS_ptr + i * C * D + cls[:, None] * D + d[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(DW_ptr + cls[:, None] * D + d[None, :], total, mask=mask)
        if pid_d == 0:
            db = tl.zeros([BLOCK_C], dtype=tl.float32)
            sums = tl.zeros([2], dtype=tl.float32)
            for i in range(0, num_n):
                rec = WSS_ptr + i * (2 * BLOCK_C)
                db += tl.load(rec + cls, cache_modifier=".cg")
                sums += tl.load(rec + BLOCK_C + pair, cache_modifier=".cg")
            tl.store(DB_ptr + cls, db, mask=c_ok)
            tl.store(Out_ptr + pair, sums / N)
        tl.store(Counter_ptr, 0)


# ------------------------------------------------------------------------------------------------
# Launcher and the functional op
# ------------------------------------------------------------------------------------------------


MAX_CHUNKS = 8  # feature chunks per row block: programs whose dW partials one program sums
# 8 warps: with 4, ptxas spills 12 B (96 registers) for a bf16 latent on sm_90a (32 x 16 x 64
# tiles; tests/test_compile_targets.py compiles the launches for sm_80 and sm_90).
NUM_WARPS = 8


def launch_shape(n: int, classes: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_N, BLOCK_D, D_CHUNK) of a launch: rows in blocks of 32 (16 for tiny batches),
    features in up to MAX_CHUNKS chunks of whole BLOCK_D tiles. cifar1024 at batch 1024 (D = 1024):
    32 row blocks x 8 chunks = 256 programs, each summing 32 partials of 10 x 128 (was 1 program)."""
    block_c = max(16, triton.next_power_of_2(classes))
    block_n = 16 if n <= 16 else 32
    block_d = 64 if block_c <= 32 else 32
    tiles = triton.cdiv(d, block_d)
    d_chunk = triton.cdiv(tiles, min(MAX_CHUNKS, tiles)) * block_d
    return block_c, block_n, block_d, d_chunk


def counter_size(runs: int = 1) -> int:
    """Elements of the int32 counter a launch over `runs` runs needs (see probe_loss's counter)."""
    return runs * MAX_CHUNKS


_counters: dict[torch.device, torch.Tensor] = {}


def _default_counter(device: torch.device, size: int) -> torch.Tensor:
    """The per-device counter of launches that pass none (as acai_fast._ext.reduction_counter):
    zeroed when created or grown (never inside a CUDA graph capture), left at zero by every launch."""
    counter = _counters.get(device)
    if counter is None or counter.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("probe_loss: its reduction counter would be created inside CUDA graph capture; "
                               "run the op once before capturing, or pass counter=")
        counter = _counters[device] = torch.zeros(max(size, 16 * MAX_CHUNKS), dtype=torch.int32, device=device)
    return counter


def _runs_contiguous(t: torch.Tensor) -> bool:
    """Every run t[r] of an (R, ...) tensor is contiguous (any run stride)."""
    return all(t[r].is_contiguous() for r in range(t.shape[0]))


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
               runs: bool = False, backend: str = "auto", counter: torch.Tensor | None = None) -> ProbeLoss:
    """The probe's loss, accuracy and gradients (see ProbeLoss) for the latent z (N, C, H, W) or
    (N, D) in any layout, the dense layer (weight (classes, D), bias) and integer labels, in one
    launch. d_weight_out / d_bias_out: contiguous fp32 tensors to write the gradients into (e.g.
    the probe parameters' persistent .grad). runs=True: an array of R runs, every argument with a
    leading run axis (z (R, N, ...) with any run stride; weight (R, classes, D), bias and the
    gradient outputs contiguous within each run, any run stride; labels (R, N)); losses and accuracies come out (R,). backend: "auto" (triton for CUDA tensors, else
    reference), "triton" (CUDA, or the CPU interpreter) or "reference". counter: int32 zeros of at
    least `counter_size(R)` elements on z's device that the launch uses for its in-kernel reduction
    and leaves at zero; default: one per device that this module keeps (safe for launches on one
    stream; launches that may run concurrently on different streams must each pass their own).
    Labels outside [0, classes) are not checked here (the trainer checks them once)."""
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
    w3, b2, dw3, db2 = (t if runs else t.unsqueeze(0) for t in (weight, bias, dw, db))
    if not (_runs_contiguous(dw3) and dw.shape == weight.shape and dw.dtype == torch.float32
            and _runs_contiguous(db2) and db.shape == bias.shape and db.dtype == torch.float32):
        raise ValueError("probe_loss: d_weight_out / d_bias_out must be fp32 tensors of the parameters' "
                         "shapes, contiguous within each run")
    w3 = w3 if _runs_contiguous(w3) else w3.contiguous()
    b2 = b2 if _runs_contiguous(b2) else b2.contiguous()
    R = z5.shape[0]
    if counter is None:
        counter = _default_counter(z.device, counter_size(R))
    elif not (counter.dtype == torch.int32 and counter.is_contiguous() and counter.numel() >= counter_size(R)
              and counter.device == z.device):
        raise ValueError(f"probe_loss: counter must be a contiguous int32 tensor of at least {counter_size(R)} "
                         f"zeros on {z.device}, got {tuple(counter.shape)} {counter.dtype} on {counter.device}")
    block_c, block_n, block_d, d_chunk = launch_shape(n, classes, d)
    row_blocks, chunks = triton.cdiv(n, block_n), triton.cdiv(d, d_chunk)
    out = torch.empty(R, 2, dtype=torch.float32, device=z.device)
    partials = torch.empty(R * row_blocks * classes * d, dtype=torch.float32, device=z.device)
    sums = torch.empty(R * row_blocks * 2 * block_c, dtype=torch.float32, device=z.device)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _probe_loss_kernel[(row_blocks, chunks, R)](z5, w3, b2, labels, dw3, db2, out, partials, sums, counter,
                                                    n, classes, d, h * w, w, d_chunk, *z5.stride()[1:],
                                                    z5.stride(0), w3.stride(0), b2.stride(0), dw3.stride(0),
                                                    db2.stride(0), BLOCK_N=block_n, BLOCK_C=block_c,
                                                    BLOCK_D=block_d, num_warps=NUM_WARPS)
    return ProbeLoss(out[:, 0] if runs else out[0, 0], out[:, 1] if runs else out[0, 1], dw, db)
