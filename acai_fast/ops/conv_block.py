"""conv_block: avgpool2x2(leaky_relu(conv2d(upsample2x(x)))) as one op, the building block of every
ACAI network (SPEC.md section 1).

Reference in plain PyTorch (`conv_block_ref`); fused Triton kernels (implicit GEMM over NHWC
activations, fp32 accumulation, autotuned and cached on disk): one forward kernel, and a dx and a
deterministic dW/db kernel for backward. Limits: odd square kernels, stride 1, "same" padding; no
split-K in the forward (small-spatial wide layers rely on small tiles); not timed on a GPU yet.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _ext

HAS_TRITON = _ext.HAS_TRITON
triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET = _ext.INTERPRET
_ext.fix_triton_interpreter()


def conv_block_ref(x, weight, bias, *, upsample_input=False, leaky_slope=0.2, pool_output=False,
                   upcast=False):
    """Plain-PyTorch conv block: (N, Cin, H, W) -> (N, Cout, H', W').

    upsample_input: nearest 2x upsample of x before the conv; leaky_slope: None for no activation;
    pool_output: 2x2 average pool (stride 2) after the activation; upcast: compute in fp32.
    """
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float() if bias is not None else None
    if upsample_input:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (N, C, H, W) -> (N, C, 2H, 2W)
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    if leaky_slope is not None:
        y = F.leaky_relu(y, leaky_slope)
    if pool_output:
        y = F.avg_pool2d(y, 2)  # (N, C, H, W) -> (N, C, H/2, W/2)
    return y


# ------------------------------------------------------------------------------------------------
# Triton kernels
#
# Notation (NHWC everywhere, channels contiguous):
#   x (N, Hx, Wx, Cin) the block input; u = upsample2x(x) if UPSAMPLE else x, (N, H, W, Cin);
#   z = conv(u, w) + b (N, H, W, Cout), "same" padding PAD = KS // 2;  a = lrelu(z);
#   y = avgpool2x2(a) (N, HO, WO, Cout) with HO = H // 2 if POOL, else y = a.
# The weight w (Cout, Cin, KS, KS) is read through its four strides and cast to x's dtype in the
# kernel: any layout is correct, and the loads are coalesced when Cin or Cout is the contiguous
# dimension (see `kernel_weight`); tap = kh*KS + kw.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _conv_fwd_kernel(
    X_ptr, W_ptr, B_ptr, Y_ptr, S_ptr,
    N, H, W, CIN, COUT, HO, WO,
    stride_xn, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wkh, stride_wkw,
    stride_yn, stride_yh, stride_yw,
    stride_xr, stride_wr, stride_br, stride_yr, stride_sr,
    leaky_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_SIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: y = pool(lrelu(conv(upsample(x), w) + b)) as one implicit GEMM.

    GEMM view: rows = output pixels of the conv (M = N*H*W), columns = Cout, reduction over the
    KS*KS taps x Cin: z[m, co] = sum_{tap, ci} u[pixel(m) + offset(tap), ci] * w[co, ci, tap].
    Tiling: one program per (BLOCK_M pixels x BLOCK_N out-channels) tile, flattened 1-D grid with
    the Cout tiles fastest (programs that share x rows run together); one loop over
    (tap, Cin chunk of BLOCK_K), so the pipeliner sees a single loop even when Cin <= BLOCK_K.
    The A tile is gathered straight from x: rows out of the image are masked to 0 (the padding),
    and with UPSAMPLE the row (ih, iw) of u reads x[ih // 2, iw // 2] (never materialised).
    The compute dtype is y's: x (e.g. an fp32 batch feeding bf16 layers) and w (fp32 master
    weights) are cast to it as they are loaded, so no cast or copy ever runs as a launch of its own.
    Epilogue in fp32: + bias, the sign of z (int8, only when backward cannot read it off y),
    leaky ReLU, and with POOL the 2x2 mean: the pixel dimension is then ordered
    (n, ho, wo, q) with q = 2*dh + dw the position in the pool window, so each window is 4
    consecutive rows of one tile and the pool is a reshape (BLOCK_M/4, 4, BLOCK_N) + sum.
    Odd H or W with POOL: the last row/column is never computed (avg_pool2d floors).
    Runs: grid axis 1 is the run of an array of same-shaped models; every tensor's base moves by
    its run stride (`stride_*r`: 0 for a single run), N counts one run's images.
    """
    pid = tl.program_id(0)
    run = tl.program_id(1).to(tl.int64)
    X_ptr += run * stride_xr
    W_ptr += run * stride_wr
    B_ptr += run * stride_br
    Y_ptr += run * stride_yr
    S_ptr += run * stride_sr
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    PAD: tl.constexpr = KS // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if POOL:  # rows (n, ho, wo, q): a pool window is 4 consecutive rows
        q = offs_m % 4
        win = offs_m // 4
        wo = win % WO
        t = win // WO
        h = 2 * (t % HO) + q // 2
        w = 2 * wo + q % 2
        n = t // HO
        m_ok = offs_m < N * HO * WO * 4
    else:  # rows (n, h, w): plain NHWC order, so the stores are contiguous
        w = offs_m % W
        t = offs_m // W
        h = t % H
        n = t // H
        m_ok = offs_m < N * H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X_ptr + n.to(tl.int64) * stride_xn  # (BLOCK_M,) image base pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = (CIN + BLOCK_K - 1) // BLOCK_K
    for kk in range(0, KS * KS * num_k):
        tap = kk // num_k
        c = (kk % num_k) * BLOCK_K + offs_k
        c_ok = c < CIN
        ih = h + (tap // KS - PAD)
        iw = w + (tap % KS - PAD)
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if UPSAMPLE:  # nearest 2x: u[ih, iw] = x[ih // 2, iw // 2] (negative ih is masked)
            ih = ih // 2
            iw = iw // 2
        a = tl.load((x_rows + ih * stride_xh + iw * stride_xw)[:, None] + c[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0).to(Y_ptr.dtype.element_ty)
        w_tap = W_ptr + (tap // KS) * stride_wkh + (tap % KS) * stride_wkw
        b = tl.load(w_tap + c[:, None] * stride_wi + offs_n[None, :] * stride_wo,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K ci, BLOCK_N co)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_SIGN:  # (N, H, W, Cout) int8: z > 0, what the leaky-ReLU backward needs
        s_rows = ((n.to(tl.int64) * H + h) * W + w) * COUT
        tl.store(S_ptr + s_rows[:, None] + offs_n[None, :], (acc > 0).to(tl.int8),
                 mask=m_ok[:, None] & n_ok[None, :])
    if ACT:
        acc = tl.where(acc > 0, acc, acc * leaky_slope)
    if POOL:
        acc = tl.sum(tl.reshape(acc, (BLOCK_M // 4, 4, BLOCK_N)), axis=1) * 0.25
        offs_o = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)  # (n, ho, wo) windows
        o_ok = offs_o < N * HO * WO
        wo = offs_o % WO
        t = offs_o // WO
        y_rows = Y_ptr + (t // HO).to(tl.int64) * stride_yn + (t % HO) * stride_yh + wo * stride_yw
    else:
        o_ok = m_ok
        y_rows = Y_ptr + n.to(tl.int64) * stride_yn + h * stride_yh + w * stride_yw
    tl.store(y_rows[:, None] + offs_n[None, :], acc.to(Y_ptr.dtype.element_ty),
             mask=o_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_pre_tile(G_ptr, S_ptr, n, h, w, ok, co, co_ok, H, W, HO, WO, COUT, NS, leaky_slope,
                   ACT: tl.constexpr, POOL: tl.constexpr, SIGN_FROM_OUT: tl.constexpr):
    """dL/dz at conv-output pixels (n, h, w) (each (BLOCK,)) x channels co, in fp32.

    dL/da = dL/dy[n, h//2, w//2] / 4 with POOL (0 on the floored-off last row/column), else dL/dy;
    dL/dz = dL/da * (1 if z > 0 else slope). The sign of z comes from y itself when there is no pool
    and slope >= 0 (then y > 0 <=> z > 0; S = y), else from the int8 sign map S (N, H, W, Cout).
    G (the incoming gradient) and S are contiguous NHWC. G may hold more images than the forward
    saved: gradient image n reads the saved image n % NS (several objectives' gradients stacked
    over one forward, e.g. the critic's [mix; real] rows followed by the autoencoder's mix rows).
    """
    n64 = n.to(tl.int64)
    ns64 = (n % NS).to(tl.int64)
    if POOL:
        ok = ok & (h < 2 * HO) & (w < 2 * WO)
        g_rows = ((n64 * HO + h // 2) * WO + w // 2) * COUT
    else:
        g_rows = ((n64 * H + h) * W + w) * COUT
    mask = ok[:, None] & co_ok[None, :]
    g = tl.load(G_ptr + g_rows[:, None] + co[None, :], mask=mask, other=0.0).to(tl.float32)
    if POOL:
        g = g * 0.25
    if ACT:
        s_rows = ((ns64 * H + h) * W + w) * COUT
        if SIGN_FROM_OUT:
            pos = tl.load(S_ptr + s_rows[:, None] + co[None, :], mask=mask, other=0.0) > 0
        else:
            pos = tl.load(S_ptr + s_rows[:, None] + co[None, :], mask=mask, other=0) != 0
        g = tl.where(pos, g, g * leaky_slope)
    return g


@triton.jit
def _conv_bwd_dx_kernel(
    G_ptr, S_ptr, W_ptr, DX_ptr,
    N, H, W, CIN, COUT, HO, WO, NS,
    stride_wo, stride_wi, stride_wkh, stride_wkw,
    stride_dxn, stride_dxh, stride_dxw,
    stride_gr, stride_sr, stride_wr, stride_dxr,
    leaky_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    SIGN_FROM_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Input gradient: the transposed convolution of dL/dz, with the pool, leaky-ReLU and
    upsample backward fused in.

    du[p, ci] = sum_{tap, co} dz[p - offset(tap), co] * w[co, ci, tap]   (dz by _grad_pre_tile,
    recomputed from dL/dy and the sign of z while loading the A tile: dz is never materialised);
    with UPSAMPLE dx[n, hx, wx] = sum of du over its 2x2 block, else dx = du. N counts the
    gradient's images, NS the forward's (see `_grad_pre_tile`).
    Tiling as in the forward: rows = pixels of u (M = N*H*W), columns = Cin, one loop over
    (tap, Cout chunk). With UPSAMPLE the rows are ordered (n, hx, wx, q) so the 2x2 sum is a
    reshape + sum in the epilogue, like the forward's pool. Runs: grid axis 1, as in the forward.
    """
    pid = tl.program_id(0)
    run = tl.program_id(1).to(tl.int64)
    G_ptr += run * stride_gr
    S_ptr += run * stride_sr
    W_ptr += run * stride_wr
    DX_ptr += run * stride_dxr
    num_pid_n = tl.cdiv(CIN, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    PAD: tl.constexpr = KS // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if UPSAMPLE:  # rows (n, hx, wx, q) over u pixels (2hx + q//2, 2wx + q%2)
        HX = H // 2
        WX = W // 2
        q = offs_m % 4
        win = offs_m // 4
        wx = win % WX
        t = win // WX
        ih = 2 * (t % HX) + q // 2
        iw = 2 * wx + q % 2
        n = t // HX
    else:
        iw = offs_m % W
        t = offs_m // W
        ih = t % H
        n = t // H
    m_ok = offs_m < N * H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CIN
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = (COUT + BLOCK_K - 1) // BLOCK_K
    for kk in range(0, KS * KS * num_k):
        tap = kk // num_k
        co = (kk % num_k) * BLOCK_K + offs_k
        co_ok = co < COUT
        oh = ih - (tap // KS - PAD)  # z[oh] used u[ih] through this tap
        ow = iw - (tap % KS - PAD)
        ok = m_ok & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
        dz = _grad_pre_tile(G_ptr, S_ptr, n, oh, ow, ok, co, co_ok, H, W, HO, WO, COUT, NS,
                            leaky_slope, ACT, POOL, SIGN_FROM_OUT)
        w_tap = W_ptr + (tap // KS) * stride_wkh + (tap % KS) * stride_wkw
        b = tl.load(w_tap + co[:, None] * stride_wo + offs_n[None, :] * stride_wi,
                    mask=co_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K co, BLOCK_N ci)
        dtype = DX_ptr.dtype.element_ty
        acc = tl.dot(dz.to(dtype), b.to(dtype), acc, input_precision=DOT_PRECISION)

    if UPSAMPLE:
        acc = tl.sum(tl.reshape(acc, (BLOCK_M // 4, 4, BLOCK_N)), axis=1)
        offs_o = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)  # (n, hx, wx)
        o_ok = offs_o < N * HX * WX
        wx = offs_o % WX
        t = offs_o // WX
        dx_rows = DX_ptr + (t // HX).to(tl.int64) * stride_dxn + (t % HX) * stride_dxh + wx * stride_dxw
    else:
        o_ok = m_ok
        dx_rows = DX_ptr + n.to(tl.int64) * stride_dxn + ih * stride_dxh + iw * stride_dxw
    tl.store(dx_rows[:, None] + offs_n[None, :], acc.to(DX_ptr.dtype.element_ty),
             mask=o_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_bwd_dw_kernel(
    X_ptr, G_ptr, S_ptr, DW_ptr, DB_ptr, WS_ptr, WSB_ptr, Counter_ptr,
    N, H, W, CIN, COUT, HO, WO,
    stride_xn, stride_xh, stride_xw,
    stride_dwo, stride_dwi, stride_dwkh, stride_dwkw,
    stride_xr, stride_gr, stride_sr, stride_dwr, stride_dbr,
    PIX_PER_SPLIT, leaky_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    SIGN_FROM_OUT: tl.constexpr, NEED_DB: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Weight and bias gradients: reductions over all N*H*W conv-output pixels p.

    dW[co, ci, tap] = sum_p u[p + offset(tap), ci] * dz[p, co];   db[co] = sum_p dz[p, co].
    Tiling: one program per (tap, BLOCK_CI in-channels) x (BLOCK_CO out-channels) x split; the
    pixels are cut into contiguous ranges of PIX_PER_SPLIT (a multiple of every BLOCK_P), one per
    split, each walked in chunks of BLOCK_P: acc (BLOCK_CI, BLOCK_CO) += u_chunk^T @ dz_chunk, in
    the dtype of G (u, e.g. the fp32 input batch, is cast to it as it is loaded).
    The split reduction is part of this launch and deterministic: with SPLIT, every program
    stores its fp32 partial to WS (splits, Cout, Cin, KS*KS) / WSB (splits, Cout), passes a barrier
    and takes a ticket from its tile's int32 counter (acq_rel); the program holding the last ticket
    sums the partials in split order, writes dW (through its strides, in DW's dtype: the fp32
    gradient of the master weight, any layout) and db, and resets the counter to 0. The result
    depends only on the shape and the config, never on which program finished last.
    db is accumulated in fp32 (before dz is rounded) by the tap-0, ci-block-0 programs only, from
    the dz tile they load anyway. G may hold more images than N: only its first N are read.
    Runs: grid axis 1 holds (run, Cout block) with the Cout blocks fastest; every tensor's base
    moves by its run stride, and each run has its own partials and tile counters.
    """
    pid_t = tl.program_id(0)  # tap * num_ci_blocks + ci block
    num_co = tl.cdiv(COUT, BLOCK_CO)
    run = tl.program_id(1) // num_co
    pid_co = tl.program_id(1) % num_co
    pid_s = tl.program_id(2)
    run64 = run.to(tl.int64)
    X_ptr += run64 * stride_xr
    G_ptr += run64 * stride_gr
    S_ptr += run64 * stride_sr
    DW_ptr += run64 * stride_dwr
    DB_ptr += run64 * stride_dbr
    num_ci = tl.cdiv(CIN, BLOCK_CI)
    tap = pid_t // num_ci
    PAD: tl.constexpr = KS // 2
    dh = tap // KS - PAD
    dw = tap % KS - PAD

    ci = (pid_t % num_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < CIN
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    P = N * H * W
    p_lo = pid_s * PIX_PER_SPLIT
    p_hi = tl.minimum(p_lo + PIX_PER_SPLIT, P)
    do_db = pid_t == 0  # (with NEED_DB) these programs also reduce db
    cdt = G_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    db = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_hi
        w = offs_p % W
        t = offs_p // W
        h = t % H
        n = t // H
        dz = _grad_pre_tile(G_ptr, S_ptr, n, h, w, p_ok, co, co_ok, H, W, HO, WO, COUT, N,
                            leaky_slope, ACT, POOL, SIGN_FROM_OUT)  # (BLOCK_P, BLOCK_CO)
        ih = h + dh
        iw = w + dw
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if UPSAMPLE:
            ih = ih // 2
            iw = iw // 2
        u = tl.load((X_ptr + n.to(tl.int64) * stride_xn + ih * stride_xh + iw * stride_xw)[:, None]
                    + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_CI)
        acc = tl.dot(tl.trans(u.to(cdt)), dz.to(cdt), acc, input_precision=DOT_PRECISION)
        if NEED_DB:
            if do_db:
                db += tl.sum(dz, axis=0)

    tile_mask = ci_ok[:, None] & co_ok[None, :]
    dw_ptrs = (DW_ptr + co[None, :] * stride_dwo + ci[:, None] * stride_dwi
               + (tap // KS) * stride_dwkh + (tap % KS) * stride_dwkw)
    dw_ty = DW_ptr.dtype.element_ty
    if SPLIT:
        # (splits, Cout, Cin, KS*KS) partials: offset of (co, ci, tap) within one split
        ws_offs = (co[None, :] * CIN + ci[:, None]) * (KS * KS) + tap
        split_size = COUT * CIN * KS * KS
        splits = tl.num_programs(2)
        WS_ptr += run64 * splits * split_size  # (runs, splits, Cout, Cin, KS*KS)
        WSB_ptr += run64 * splits * COUT
        tl.store(WS_ptr + pid_s * split_size + ws_offs, acc, mask=tile_mask)
        if NEED_DB:
            tl.store(WSB_ptr + pid_s * COUT + co, db, mask=co_ok & do_db)
        tl.debug_barrier()
        tile = (run * tl.num_programs(0) + pid_t) * num_co + pid_co
        ticket = tl.atomic_add(Counter_ptr + tile, 1, sem="acq_rel")
        if ticket == splits - 1:
            total = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
            total_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(WS_ptr + s * split_size + ws_offs, mask=tile_mask, other=0.0,
                                 cache_modifier=".cg")
                if NEED_DB:
                    if do_db:
                        total_b += tl.load(WSB_ptr + s * COUT + co, mask=co_ok, other=0.0,
                                           cache_modifier=".cg")
            tl.store(dw_ptrs, total.to(dw_ty), mask=tile_mask)
            if NEED_DB:
                tl.store(DB_ptr + co, total_b.to(DB_ptr.dtype.element_ty), mask=co_ok & do_db)
            tl.store(Counter_ptr + tile, 0)
    else:
        tl.store(dw_ptrs, acc.to(dw_ty), mask=tile_mask)
        if NEED_DB:
            tl.store(DB_ptr + co, db.to(DB_ptr.dtype.element_ty), mask=co_ok & do_db)


# ------------------------------------------------------------------------------------------------
# Configs: a table, a heuristic, and autotuning on request
#
# Every config below is correct for every shape (the kernels mask all edges); the choice only
# changes the speed. tests/test_conv_block.py runs each one explicitly (GPU: all; CPU: a few).
# Which config a launch uses (`choose_config`): the one passed in; under the interpreter one fixed
# config per kernel; with ACAI_FAST_AUTOTUNE=1 Triton's autotuner over the lists below (results
# persisted by Triton under TRITON_CACHE_DIR); otherwise the table ops/tuned/sm<major><minor>.json
# for this GPU and layer shape (written by bench/tune.py on that GPU), else `heuristic_config`.
# Tuning is data, not a ritual: a first step compiles each kernel once and benchmarks nothing.
# ------------------------------------------------------------------------------------------------


def _cfg(a, b, c, warps, stages, names):
    return triton.Config(dict(zip(names, (a, b, c))), num_warps=warps, num_stages=stages)


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Wide tiles for the 32x32 layers, small ones for the
# 2x2-8x8 wide-channel layers (more programs: ANCHORS.md's 256->512 at 4x4 lost with 1 wave),
# 16-wide ones for the colors/latent (1-3 channel) ends.
FWD_CONFIGS = [
    _cfg(128, 64, 32, 4, 3, _MNK),
    _cfg(128, 128, 32, 8, 3, _MNK),
    _cfg(64, 64, 32, 4, 3, _MNK),
    _cfg(64, 64, 64, 4, 3, _MNK),
    _cfg(32, 64, 64, 4, 3, _MNK),
    _cfg(32, 32, 64, 4, 3, _MNK),
    _cfg(128, 16, 16, 4, 3, _MNK),
    _cfg(64, 128, 32, 4, 3, _MNK),
    # large batches (M = N*H*W in the hundreds of thousands): bigger tiles, deeper pipelines
    _cfg(128, 128, 64, 8, 4, _MNK),
    _cfg(256, 64, 32, 8, 3, _MNK),
    _cfg(128, 256, 32, 8, 3, _MNK),
]
DX_CONFIGS = list(FWD_CONFIGS)
_DW = ("BLOCK_CI", "BLOCK_CO", "BLOCK_P")
DW_CONFIGS = [
    _cfg(64, 64, 64, 4, 3, _DW),
    _cfg(64, 64, 128, 4, 3, _DW),
    _cfg(128, 64, 64, 8, 3, _DW),
    _cfg(32, 64, 128, 8, 3, _DW),  # 4 warps: 255 registers + spills (ptxas -v, sm_90a)
    _cfg(32, 32, 128, 4, 3, _DW),
    _cfg(16, 16, 128, 4, 3, _DW),
    _cfg(64, 128, 64, 8, 3, _DW),
]
# The interpreter's single configs: big enough to keep the number of (slow, Python) program
# instances down, small enough to exercise the edge masks on the test shapes.
INTERPRET_FWD_CONFIG = _cfg(256, 16, 16, 4, 1, _MNK)
INTERPRET_DX_CONFIG = _cfg(256, 16, 16, 4, 1, _MNK)
INTERPRET_DW_CONFIG = _cfg(16, 16, 256, 4, 1, _DW)
_MAX_BLOCK_P = 256  # PIX_PER_SPLIT is a multiple of this, hence of every BLOCK_P
_MIN_DW_TILE = 16  # the smallest BLOCK_CI / BLOCK_CO of DW_CONFIGS (sizes the tile counters)


def _pow2_at_least_16(v):
    return max(16, 1 << max(0, int(v) - 1).bit_length())


def _prune_mnk(n_name, k_name):
    """Drop configs whose N or K tile is more than twice the (16-rounded) channel count: they only
    add masked lanes. Keeps at least the smallest config."""

    def prune(configs, named_args, **kwargs):
        cap_n = 2 * _pow2_at_least_16(named_args[n_name])
        cap_k = 2 * _pow2_at_least_16(named_args[k_name])
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_K"] <= cap_k]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]

    return prune


def _prune_dw(configs, named_args, **kwargs):
    cap_i, cap_o = 2 * _pow2_at_least_16(named_args["CIN"]), 2 * _pow2_at_least_16(named_args["COUT"])
    kept = [c for c in configs if c.kwargs["BLOCK_CI"] <= cap_i and c.kwargs["BLOCK_CO"] <= cap_o]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_CI"] * c.kwargs["BLOCK_CO"])]


_KEY = ["N", "H", "W", "CIN", "COUT", "KS", "UPSAMPLE", "ACT", "POOL"]
AUTOTUNE = os.environ.get("ACAI_FAST_AUTOTUNE", "0") == "1"  # read once, at import (like the interpreter)
_TUNED = {}  # kernel name -> its triton.autotune wrapper (ACAI_FAST_AUTOTUNE=1 only)
if HAS_TRITON and not INTERPRET and AUTOTUNE:
    _TUNED["fwd"] = triton.autotune(
        configs=FWD_CONFIGS, key=_KEY, cache_results=True,
        prune_configs_by=dict(early_config_prune=_prune_mnk("COUT", "CIN")))(_conv_fwd_kernel)
    _TUNED["dx"] = triton.autotune(
        configs=DX_CONFIGS, key=_KEY, cache_results=True,
        prune_configs_by=dict(early_config_prune=_prune_mnk("CIN", "COUT")))(_conv_bwd_dx_kernel)
    _TUNED["dw"] = triton.autotune(
        configs=DW_CONFIGS, key=_KEY + ["PIX_PER_SPLIT"], cache_results=True,
        prune_configs_by=dict(early_config_prune=_prune_dw))(_conv_bwd_dw_kernel)
_KERNELS = dict(fwd=_conv_fwd_kernel, dx=_conv_bwd_dx_kernel, dw=_conv_bwd_dw_kernel)
_INTERPRET_CONFIGS = dict(fwd=INTERPRET_FWD_CONFIG, dx=INTERPRET_DX_CONFIG, dw=INTERPRET_DW_CONFIG)


TUNED_DIR = Path(__file__).with_name("tuned")
_SMS = 132  # streaming multiprocessors of an H100 SXM (H200: 132 too); the heuristic's wave size
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles the heuristic allows (H100: 227 KB per block)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def shape_key(name: str, args: dict) -> str:
    """The table key of one launch: kernel, compute dtype, shape and flags."""
    dtype = str(args["G_ptr" if name != "fwd" else "Y_ptr"].dtype).replace("torch.", "")
    fields = [name, dtype] + [f"{k}={int(args[k])}" for k in _KEY]
    if name == "dw":
        fields.append(f"PIX_PER_SPLIT={int(args['PIX_PER_SPLIT'])}")
    return "|".join(fields)


def heuristic_config(name: str, args: dict):
    """A config from the shape alone, for shapes the table does not list. fwd/dx: the N and K tiles
    cover the channels (16..128 and 16..64: no wasted lanes on the narrow layers), the M tile is the
    largest of 128/64/32 that still gives ~2 waves of programs (the small-spatial wide layers need
    parallelism, ANCHORS.md: 256->512 at 4x4 lost to cuDNN with one wave), 8 warps for 128x128
    tiles. dw: channel tiles up to 64, 128-pixel chunks. Unmeasured on a GPU: bench/tune.py's table
    replaces these where it has the shape."""
    elsize = _compute_itemsize(name, args)
    if name == "dw":
        ci = min(64, max(16, _next_pow2(args["CIN"])))
        co = min(64, max(16, _next_pow2(args["COUT"])))
        stages = 3
        while stages > 2 and stages * 128 * (ci + co) * elsize > _SMEM_BUDGET:
            stages -= 1
        return _cfg(ci, co, 128, 8 if ci * co >= 64 * 64 else 4, stages, _DW)
    n_dim, k_dim = (args["COUT"], args["CIN"]) if name == "fwd" else (args["CIN"], args["COUT"])
    rows = args["N"] * args["H"] * args["W"]
    bn = min(128, max(16, _next_pow2(n_dim)))
    bk = min(64, max(16, _next_pow2(k_dim)))
    n_tiles = -(-n_dim // bn)
    bm = 32
    for cand in (128, 64):
        if -(-rows // cand) * n_tiles >= 2 * _SMS:
            bm = cand
            break
    big = bm * bn >= 128 * 128
    stages = 4 if big and rows >= 1 << 18 else 3
    while stages > 2 and stages * (bm * bk + bk * bn) * elsize > _SMEM_BUDGET:
        stages -= 1  # fp32 tiles are twice the bytes of bf16 ones
    return _cfg(bm, bn, bk, 8 if big else 4, stages, _MNK)


def _compute_itemsize(name: str, args: dict) -> int:
    t = args.get("G_ptr" if name != "fwd" else "Y_ptr")
    return t.element_size() if isinstance(t, torch.Tensor) else 2


def smem_bytes(name: str, config, itemsize: int) -> int:
    """Shared memory of a config's pipelined A and B tiles (what Triton allocates, to first order)."""
    k = config.kwargs
    if name == "dw":
        return config.num_stages * (k["BLOCK_P"] * (k["BLOCK_CI"] + k["BLOCK_CO"])) * itemsize
    return config.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * itemsize


@functools.lru_cache(maxsize=None)
def tuned_table(arch: str) -> dict:
    """The shipped table of tuned configs for a GPU architecture ("sm90"): {key: config dict}; {}
    when there is none. Read once (package data, never written at run time)."""
    path = TUNED_DIR / f"{arch}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def choose_config(name: str, args: dict, device: torch.device):
    """(config, source) for a launch without an explicit config: source is "interpreter",
    "autotune" (config None: Triton's autotuner picks), "table" or "heuristic"."""
    if INTERPRET:
        return _INTERPRET_CONFIGS[name], "interpreter"
    if AUTOTUNE:
        return None, "autotune"
    entry = tuned_table(_arch(device)).get(shape_key(name, args))
    if entry is not None:
        names = _MNK if name != "dw" else _DW
        return _cfg(*(entry[k] for k in names), entry["num_warps"], entry["num_stages"], names), "table"
    return heuristic_config(name, args), "heuristic"


def _launch(name, config, grid, *args, **constexprs):
    """Launch kernel `name` ("fwd", "dx", "dw") with `config` (a triton.Config) or, when None, the
    one `choose_config` picks. Returns (the config that ran, its source)."""
    source = "given"
    if config is None:
        named = {**dict(zip(_KERNELS[name].arg_names, args)), **constexprs}
        config, source = choose_config(name, named, args[0].device)
    if config is None:  # autotune
        _TUNED[name][grid](*args, **constexprs)
        return _TUNED[name].best_config, source
    _KERNELS[name][grid(config.kwargs)](*args, **constexprs, **config.kwargs,
                                        num_warps=config.num_warps, num_stages=config.num_stages)
    return config, source


# ------------------------------------------------------------------------------------------------
# Weights as the kernels read them
# ------------------------------------------------------------------------------------------------


def _good_layout(weight):
    """Cin or Cout contiguous: the kernels' weight tiles are then read with wide, coalesced loads."""
    cout, cin = weight.shape[-4:-2]
    return weight.stride(-3) == 1 or cin == 1 or weight.stride(-4) == 1 or cout == 1


def kernel_weight(weight):
    """The weight (Cout, Cin, k, k) (or an array's (runs, Cout, Cin, k, k)) as the kernels read it:
    itself when Cin or Cout is contiguous (channels_last parameters, which the fused engine keeps,
    and 1x1 kernels), else a copy with Cout contiguous ((k, k, Cin, Cout) order). Any dtype: the
    kernels cast weights to the compute dtype as they load them (fp32 master weights feed bf16
    layers without a cast launch)."""
    if _good_layout(weight):
        return weight
    with torch.no_grad():
        if weight.dim() == 5:
            return weight.detach().permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)
        return weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _flags(leaky_slope, pool_output):
    act = leaky_slope is not None
    # y > 0 <=> z > 0 holds for slope >= 0; with a pool y is a mean, so the sign must be stored.
    sign_from_out = act and not pool_output and leaky_slope >= 0
    return act, sign_from_out, act and not sign_from_out


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (the fp32 path is for checking, not speed); bf16/fp16: tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def output_shape(x_shape, cout, *, upsample_input=False, pool_output=False):
    """(N, Cout, H', W') of a block on input (N, Cin, Hx, Wx)."""
    n, _, hx, wx = x_shape[-4:]
    h, w = (2 * hx, 2 * wx) if upsample_input else (hx, wx)
    return (n, cout, h // 2, w // 2) if pool_output else (n, cout, h, w)


def empty_activation(shape, dtype, device, runs: int | None = None) -> torch.Tensor:
    """An (N, C, H, W) channels_last tensor, or for an array of runs a (runs, N, C, H, W) one whose
    every run is channels_last (strides (N*H*W*C, H*W*C, 1, W*C, C)): the layout of every activation
    of the fused engine. Row blocks [:, a:b] of it are valid activations too."""
    n, c, h, w = shape
    if runs is None:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    return torch.empty(runs, n, h, w, c, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)


def _is_activation(t: torch.Tensor) -> bool:
    """(N, C, H, W) channels_last, or (runs, N, C, H, W) with every run channels_last."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and (t.shape[0] == 1 or t.stride(0) >= 1) and \
        t[0].is_contiguous(memory_format=torch.channels_last)


def _runs_view(t: torch.Tensor | None, single: bool) -> torch.Tensor | None:
    """A (runs, ...) view: a single run's tensor gets a leading run axis of 1."""
    return t.unsqueeze(0) if (t is not None and single) else t


def _run_stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None and t.shape[0] > 1 else 0


def _check_out(name, t, shape, dtype, device):
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype
            or t.device != device or not _is_activation(t)):
        got = (f"{tuple(t.shape)} {t.dtype} on {t.device}, channels_last={_is_activation(t)}"
               if isinstance(t, torch.Tensor) else t)
        raise ValueError(f"conv_block: {name} must be a channels_last {tuple(shape)} {dtype} tensor on "
                         f"{device}, got {got}")


def _check_array(x, weight):
    """Single run: x (N, Cin, H, W), weight (Cout, Cin, k, k). Array of R runs: x (R, N, Cin, H, W)
    with every run channels_last, weight (R, Cout, Cin, k, k) (per-run bias (R, Cout))."""
    if x.dim() == 5 and weight.dim() == 5 and x.shape[0] == weight.shape[0]:
        if not _is_activation(x):
            raise ValueError("conv_block: an array input (runs, N, C, H, W) must be channels_last per run "
                             "(see empty_activation)")
        return True
    if x.dim() == 5 or weight.dim() == 5:
        raise ValueError(f"conv_block: an array of runs needs x (runs, N, Cin, H, W) and weight (runs, "
                         f"Cout, Cin, k, k) with the same runs, got {tuple(x.shape)} and {tuple(weight.shape)}")
    return False


def conv_fwd(x, weight, bias, *, upsample_input=False, leaky_slope=0.2, pool_output=False,
             out=None, out_dtype=None, config=None, poison=False):
    """Forward launcher. x (N, Cin, Hx, Wx) -> (y channels_last, sign map or None); or, for an array
    of R same-shaped models, x (R, N, Cin, Hx, Wx) (see `empty_activation`), weight (R, Cout, Cin,
    k, k), bias (R, Cout) -> y (R, N, Cout, H', W'), one launch for all runs.

    y is computed in `out_dtype` (default x's dtype; x and the weight are cast to it in the kernel)
    and written into `out` when given (a channels_last tensor of y's shape and dtype, e.g. a block of
    rows of a larger buffer), else into a new tensor. The sign map ((R,) N, H, W, Cout) int8 is
    returned only when backward needs it (activation with a pool, or a negative slope). weight: any
    dtype and layout (see `kernel_weight`). `config`: a triton.Config to force (else
    `choose_config`'s); `poison`: fill the outputs with NaN first (tests).
    """
    array = _check_array(x, weight)
    if not array:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is
    runs = x.shape[0] if array else None
    if bias is not None and bias.stride(-1) != 1:  # per-run rows of any run stride are read in place
        bias = bias.contiguous()
    N, CIN, HX, WX = x.shape[-4:]
    COUT, _, KS, _ = weight.shape[-4:]
    H, W = (2 * HX, 2 * WX) if upsample_input else (HX, WX)
    _, _, HO, WO = output_shape(x.shape, COUT, upsample_input=upsample_input, pool_output=pool_output)
    act, _, save_sign = _flags(leaky_slope, pool_output)
    dtype = out_dtype or x.dtype
    fill = float("nan") if poison else None
    yshape = ((runs,) if array else ()) + (N, COUT, HO, WO)
    if out is None:
        y = empty_activation((N, COUT, HO, WO), dtype, x.device, runs)
        if fill is not None:
            y.fill_(fill)
    else:
        _check_out("out", out, yshape, dtype, x.device)
        y = out.fill_(fill) if fill is not None else out
    sign = torch.empty(((runs,) if array else ()) + (N, H, W, COUT), dtype=torch.int8,
                       device=x.device) if save_sign else None
    if N == 0:
        return y, sign
    wk = kernel_weight(weight)
    x5, w5, y5, s5 = (_runs_view(t, not array) for t in (x, wk, y, sign))
    b5 = _runs_view(bias, not array)
    m = N * HO * WO * 4 if pool_output else N * H * W
    R = x5.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(COUT, meta["BLOCK_N"]), R)

    _launch("fwd", config, grid,
            x5, w5, b5 if b5 is not None else w5, y5, s5 if s5 is not None else y5,
            N, H, W, CIN, COUT, HO, WO,
            x5.stride(1), x5.stride(3), x5.stride(4), *w5.stride()[1:],
            y5.stride(1), y5.stride(3), y5.stride(4),
            _run_stride(x5), _run_stride(w5), _run_stride(b5), _run_stride(y5), _run_stride(s5),
            float(leaky_slope) if act else 0.0,
            KS=KS, UPSAMPLE=upsample_input, ACT=act, POOL=pool_output, HAS_BIAS=bias is not None,
            SAVE_SIGN=save_sign, DOT_PRECISION=_dot_precision(dtype))
    return y, sign


def _dw_splits(P, KS, CIN, COUT):
    """Pixel splits of the dW reduction: enough programs to fill an H100 (~2 waves of 132 SMs at
    64x64 tiles), each split at least 4 chunks of _MAX_BLOCK_P pixels. Depends on the shape only,
    so the summation order (and the result) does not change from call to call."""
    if P == 0:
        return 1, _MAX_BLOCK_P
    tiles = KS * KS * math.ceil(CIN / 64) * math.ceil(COUT / 64)
    max_splits = max(1, P // (4 * _MAX_BLOCK_P))
    splits = max(1, min(max_splits, math.ceil(264 / tiles)))
    per_split = math.ceil(math.ceil(P / splits) / _MAX_BLOCK_P) * _MAX_BLOCK_P
    return math.ceil(P / per_split), per_split


def dw_counter_size(KS, CIN, COUT, runs: int = 1):
    """Elements of the int32 tile counters of one dW launch: enough for the smallest tile config."""
    return runs * KS * KS * math.ceil(CIN / _MIN_DW_TILE) * math.ceil(COUT / _MIN_DW_TILE)


def conv_bwd(grad_y, x, weight, y, sign, *, weight_dtype=None, bias_dtype=None,
             upsample_input=False, leaky_slope=0.2, pool_output=False, need_dx=True, need_dw=True,
             need_db=True, dx_out=None, dw_out=None, db_out=None, dw_counter=None,
             dx_config=None, dw_config=None, poison=False):
    """Backward launcher: (dx channels_last or None, dw or None, db or None).

    x, y, sign: as saved by the forward of NS images (y is read only when the sign of z is taken
    from it); grad_y: dL/dy of NG >= NS images, in the compute dtype (y's), channels_last or made so.
    When NG > NS, gradient image n belongs to saved image n % NS (several objectives' gradients
    stacked over one forward): dx covers all NG images, dw/db only the first NS (the objective
    that trains this block must come first). dx is written in x's dtype into `dx_out` when given
    (channels_last (NG, Cin, Hx, Wx)); dw ((Cout, Cin, k, k), `weight_dtype`, default weight.dtype)
    and db (`bias_dtype`; None: no bias) into `dw_out` / `db_out` when given (any layout: e.g. the
    parameters' persistent .grad tensors). weight: as in `conv_fwd`. dw_counter: int32 zeros of
    `dw_counter_size` elements that the dW launch uses and leaves at zero (default: a fresh one).
    Arrays of runs: every tensor gains a leading run axis (as in `conv_fwd`), one launch per kernel.
    """
    array = _check_array(x, weight)
    if not array:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    elif not _is_activation(grad_y):
        raise ValueError("conv_block: grad_y of an array must be channels_last per run")
    R = x.shape[0] if array else 1
    NS, CIN, HX, WX = x.shape[-4:]
    COUT, _, KS, _ = weight.shape[-4:]
    H, W = (2 * HX, 2 * WX) if upsample_input else (HX, WX)
    HO, WO = (H // 2, W // 2) if pool_output else (H, W)
    act, sign_from_out, _ = _flags(leaky_slope, pool_output)
    s = (y if array else y.contiguous(memory_format=torch.channels_last)) if sign_from_out else sign
    fill = float("nan") if poison else None
    g = grad_y
    NG = g.shape[-4]
    if NG < NS:
        raise ValueError(f"conv_block: grad_y holds {NG} images for a forward of {NS}; it needs at "
                         f"least one gradient image per saved image")
    cdt = y.dtype if y is not None else g.dtype
    if g.dtype != cdt:
        g = g.to(cdt)
    s = s if s is not None else g  # dummy pointer when there is no activation
    slope = float(leaky_slope) if act else 0.0
    common = dict(KS=KS, UPSAMPLE=upsample_input, ACT=act, POOL=pool_output,
                  SIGN_FROM_OUT=sign_from_out, DOT_PRECISION=_dot_precision(cdt))
    dx = dw = db = None
    need_db = need_db and bias_dtype is not None
    wk = kernel_weight(weight)
    x5, g5, s5, w5 = (_runs_view(t, not array) for t in (x, g, s, wk))
    lead = (R,) if array else ()

    if need_dx:
        if dx_out is None:
            dx = empty_activation((NG, CIN, HX, WX), x.dtype, x.device, R if array else None)
            if fill is not None:
                dx.fill_(fill)
        else:
            _check_out("dx_out", dx_out, lead + (NG, CIN, HX, WX), x.dtype, x.device)
            dx = dx_out.fill_(fill) if fill is not None else dx_out
        dx5 = _runs_view(dx, not array)
        if NG > 0:
            def grid_dx(meta):
                return (triton.cdiv(NG * H * W, meta["BLOCK_M"]) * triton.cdiv(CIN, meta["BLOCK_N"]), R)

            _launch("dx", dx_config, grid_dx, g5, s5, w5, dx5, NG, H, W, CIN, COUT, HO, WO, max(NS, 1),
                    *w5.stride()[1:], dx5.stride(1), dx5.stride(3), dx5.stride(4),
                    _run_stride(g5), _run_stride(s5), _run_stride(w5), _run_stride(dx5), slope, **common)

    if need_dw or need_db:
        wshape = lead + (COUT, CIN, KS, KS)
        dw = dw_out if dw_out is not None else torch.empty(wshape, device=x.device,
                                                           dtype=weight_dtype or weight.dtype)
        db = (db_out if db_out is not None else torch.empty(lead + (COUT,), device=x.device,
                                                            dtype=bias_dtype)) if need_db else None
        if tuple(dw.shape) != wshape or (db is not None and tuple(db.shape) != lead + (COUT,)):
            raise ValueError(f"conv_block: dw_out / db_out must have shapes {wshape} / {lead + (COUT,)}")
        if fill is not None:
            dw.fill_(fill)
            if db is not None:
                db.fill_(fill)
        if NS == 0:
            dw.zero_()
            if db is not None:
                db.zero_()
        else:
            splits, per_split = _dw_splits(NS * H * W, KS, CIN, COUT)
            split = splits > 1
            # fp32 partials of the in-kernel split reduction (unused when splits == 1)
            ws = torch.empty((R, splits, COUT, CIN, KS * KS) if split else (1,), device=x.device,
                             dtype=torch.float32)
            wsb = torch.empty((R, splits, COUT) if split else (1,), device=x.device, dtype=torch.float32)
            if split and dw_counter is None:
                dw_counter = torch.zeros(dw_counter_size(KS, CIN, COUT, R), dtype=torch.int32,
                                         device=x.device)
            counter = dw_counter if split else ws
            dw5, db5 = _runs_view(dw, not array), _runs_view(db, not array)

            def grid_dw(meta):
                return (KS * KS * triton.cdiv(CIN, meta["BLOCK_CI"]), R * triton.cdiv(COUT, meta["BLOCK_CO"]),
                        splits)

            _launch("dw", dw_config, grid_dw, x5, g5, s5, dw5, db5 if db5 is not None else dw5, ws, wsb,
                    counter, NS, H, W, CIN, COUT, HO, WO, x5.stride(1), x5.stride(3), x5.stride(4),
                    *dw5.stride()[1:], _run_stride(x5), _run_stride(g5), _run_stride(s5),
                    _run_stride(dw5), _run_stride(db5), per_split, slope, NEED_DB=need_db, SPLIT=split,
                    **common)
        if not need_dw:
            dw = None
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Autograd and the functional op
# ------------------------------------------------------------------------------------------------


class ConvBlockFunction(torch.autograd.Function):
    """The Triton conv block in autograd (the fused engine calls conv_fwd / conv_bwd directly).
    Saves x, the weight as the kernels read it (see `kernel_weight`) and either y (when the sign of
    z can be read off it) or the int8 sign map: no pre-activation, no upsampled input, no pre-pool map."""

    @staticmethod
    def forward(ctx, x, weight, bias, upsample_input, leaky_slope, pool_output):
        x = x.contiguous(memory_format=torch.channels_last)  # free when it already is
        wk = kernel_weight(weight)
        y, sign = conv_fwd(x, wk, bias, upsample_input=upsample_input, leaky_slope=leaky_slope,
                           pool_output=pool_output)
        _, sign_from_out, _ = _flags(leaky_slope, pool_output)
        ctx.save_for_backward(x, wk, y if sign_from_out else None, sign)
        ctx.flags = (upsample_input, leaky_slope, pool_output)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None, y.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, wk, y, sign = ctx.saved_tensors
        upsample_input, leaky_slope, pool_output = ctx.flags
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = conv_bwd(grad_y.to(ctx.dtypes[2]), x, wk, y, sign, weight_dtype=ctx.dtypes[0],
                              bias_dtype=ctx.dtypes[1], upsample_input=upsample_input,
                              leaky_slope=leaky_slope, pool_output=pool_output, need_dx=need_dx,
                              need_dw=need_dw, need_db=need_db)
        return dx, dw, db, None, None, None


def resolve_backend(x, backend):
    """The backend that `conv_block` will run for input x: "reference" or "triton".

    "auto" -> "triton" for CUDA tensors when Triton is installed, else "reference". An explicit
    "triton" is never replaced: it fails in `check_inputs` when it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"conv_block: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "triton" if HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda else "reference"


def check_inputs(x, weight, bias, *, upsample_input, leaky_slope, pool_output, backend):
    """Raise ValueError naming the problem (before any launch) for input conv_block cannot take."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"conv_block: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"conv_block: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"conv_block: weight must be (Cout, Cin, k, k) with odd k (1 or 3), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv_block: x has {x.shape[1]} channels but weight {tuple(weight.shape)} "
                         f"expects {weight.shape[1]}")
    if min(weight.shape[:2]) < 1:
        raise ValueError(f"conv_block: weight has no channels: {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"conv_block: bias must be a ({weight.shape[0]},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    dtypes = DTYPES if backend == "triton" else DTYPES + (torch.float64,)  # fp64: reference checks
    if x.dtype not in dtypes:
        raise ValueError(f"conv_block: x dtype {x.dtype} not supported by backend {backend!r}; "
                         f"use one of {dtypes}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"conv_block: wrong dtype mix: weight {weight.dtype} with x {x.dtype} "
                         f"(weight must be x's dtype or float32 master weights)")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"conv_block: wrong dtype mix: bias {bias.dtype} with weight {weight.dtype}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"conv_block: x, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if leaky_slope is not None and not (isinstance(leaky_slope, (int, float)) and math.isfinite(leaky_slope)):
        raise ValueError(f"conv_block: leaky_slope must be a finite number or None, got {leaky_slope!r}")
    size = [s * (2 if upsample_input else 1) for s in x.shape[2:]]
    if min(size) < 1 or pool_output and min(size) < 2:
        raise ValueError(f"conv_block: spatial size {tuple(size)} (after upsample) is too small"
                         f"{' for the 2x2 pool' if pool_output else ''}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("conv_block: backend='triton' but triton is not installed")
        if not x.is_cuda and not INTERPRET:
            raise ValueError(f"conv_block: backend='triton' needs CUDA tensors, got x on {x.device} "
                             f"(use backend='reference', or TRITON_INTERPRET=1 for the interpreter)")


def conv_block(x, weight, bias, *, upsample_input=False, leaky_slope=0.2, pool_output=False,
               backend="auto"):
    """pool(lrelu(conv2d(upsample(x), weight, bias, padding=k//2))): (N, Cin, H, W) -> (N, Cout, H', W').

    backend: "reference" (plain PyTorch), "triton" (fused kernels; CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1) or "auto" (triton on CUDA, reference otherwise); the choice is logged
    at DEBUG level (`resolve_backend` returns it). x may be fp32/bf16/fp16 in any memory format;
    weight and bias in x's dtype or fp32 (master weights). The output is in x's dtype; the triton
    backend returns it in channels_last, so a chain never copies. Weights with Cin or Cout
    contiguous (channels_last parameters) are read in place and cast in the kernel; others are
    re-laid out once per call (see `kernel_weight`).
    """
    name = resolve_backend(x, backend)
    check_inputs(x, weight, bias, upsample_input=upsample_input, leaky_slope=leaky_slope,
                 pool_output=pool_output, backend=name)
    logger.debug("conv_block: backend=%s (asked %s) for x %s %s on %s", name, backend,
                 tuple(x.shape), x.dtype, x.device)
    if name == "reference":
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return conv_block_ref(x, weight, bias, upsample_input=upsample_input,
                              leaky_slope=leaky_slope, pool_output=pool_output)
    return ConvBlockFunction.apply(x, weight, bias, upsample_input, leaky_slope, pool_output)
