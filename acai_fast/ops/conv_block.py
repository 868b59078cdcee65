"""conv_block: avgpool2x2(leaky_relu(conv2d(upsample2x(x)))) as one op, the building block of every
ACAI network (SPEC.md section 1).

Reference in plain PyTorch (`conv_block_ref`); fused Triton kernels (implicit GEMM over NHWC
activations, fp32 accumulation): one forward kernel, and a dx and a dW/db kernel for backward, with
deterministic in-launch split reductions (split-K for fwd/dx, two-level pixel splits for dW). Their
configs are chosen in conv_configs.py (tuned table, cost model, heuristic). Limits: odd square
kernels (all-taps dW programs for 3x3 only), stride 1, "same" padding; not timed on a GPU yet.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .. import _ext
from .conv_configs import (DW_CONFIGS, DX_CONFIGS, FWD_CONFIGS, INTERPRET_DW_CONFIG,  # noqa: F401
                           INTERPRET_DX_CONFIG, INTERPRET_FWD_CONFIG, TUNED_DIR, _prune_dw, _prune_mnk,
                           autotune, choose_config, dw_counter_size, dw_counters_needed, dw_split_plan,
                           dw_taps, heuristic_config, launch_shape, normalized, output_tiles, shape_key,
                           smem_bytes, split_k_counter_size, split_k_steps, tuned_table)

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
# The weight w (Cout, Cin, KS, KS) is read through its four strides and cast to the compute dtype in
# the kernel: any layout and any dtype (fp32 master weights, or a bf16 copy) are correct, and the
# loads are coalesced when Cin or Cout is the contiguous dimension (see `kernel_weight`);
# tap = kh*KS + kw.
#
# Split reductions (fwd/dx with SPLIT_K > 1, dW with more than one pixel split) are deterministic
# and finished inside the launch: every program stores its fp32 partial to a workspace, passes a
# barrier and takes a ticket from its output tile's int32 counter (atomic, acq_rel); the program
# holding the last ticket sums the partials in split order (never in arrival order), finishes the
# tile and resets the counter to 0 for the next launch. So the result depends only on the shape and
# the config, never on which program finished last.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _split_k_sum(acc, WS_ptr, Counter_ptr, tile, pid_s,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K reduction of one (BLOCK_M, BLOCK_N) output tile of the fwd/dx kernels.

    Stores this program's fp32 partial `acc` to WS[tile, pid_s] (WS: (tiles, SPLIT_K, BLOCK_M,
    BLOCK_N) fp32, tile = run * tiles_per_run + tile index), takes a ticket from Counter[tile];
    returns (sum of the SPLIT_K partials in split order, True) to the last program of the tile and
    (zeros, False) to the others. The last one resets the counter to 0.
    """
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ws = WS_ptr + tile * (SPLIT_K * TILE)
    tl.store(ws + pid_s * TILE + offs, acc)
    tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
    ticket = tl.atomic_add(Counter_ptr + tile, 1, sem="acq_rel")
    last = ticket == SPLIT_K - 1
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if last:
        for s in tl.static_range(SPLIT_K):  # split order: the same sum whoever came last
            total += tl.load(ws + s * TILE + offs, cache_modifier=".cg")  # L2, not a stale L1 line
        tl.store(Counter_ptr + tile, 0)
    return total, last


@triton.jit
def _conv_fwd_epilogue(acc, Y_ptr, B_ptr, S_ptr, pid_m, n, h, w, m_ok, offs_n, n_ok,
                       N, H, W, COUT, HO, WO, stride_yn, stride_yh, stride_yw, leaky_slope,
                       ACT: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SAVE_SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """z = acc + bias (fp32); the int8 sign of z (SAVE_SIGN); lrelu; with POOL the 2x2 mean over
    the 4 consecutive rows of each window; y stored in Y's dtype."""
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
def _conv_fwd_kernel(
    X_ptr, W_ptr, B_ptr, Y_ptr, S_ptr, WS_ptr, Counter_ptr,
    N, H, W, CIN, COUT, HO, WO,
    stride_xn, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wkh, stride_wkw,
    stride_yn, stride_yh, stride_yw,
    stride_xr, stride_wr, stride_br, stride_yr, stride_sr,
    leaky_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_SIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Forward: y = pool(lrelu(conv(upsample(x), w) + b)) as one implicit GEMM.

    GEMM view: rows = output pixels of the conv (M = N*H*W), columns = Cout, reduction over the
    KS*KS taps x Cin: z[m, co] = sum_{tap, ci} u[pixel(m) + offset(tap), ci] * w[co, ci, tap].
    Tiling: one program per (BLOCK_M pixels x BLOCK_N out-channels) tile, flattened 1-D grid with
    the Cout tiles fastest (programs that share x rows run together); one loop over the
    KT = KS*KS * ceil(Cin / BLOCK_K) (tap, Cin chunk) steps, so the pipeliner sees a single loop
    even when Cin <= BLOCK_K.
    Split-K (grid axis 2, SPLIT_K programs per tile): program s runs the contiguous steps
    [s*ceil(KT/S), (s+1)*ceil(KT/S)) and the last program of the tile sums the S fp32 partials in
    split order (`_split_k_sum`) and runs the epilogue. For the small-spatial wide layers: 64-row
    tiles keep each weight tile re-read by half as many programs as 32-row ones, and the split
    gives back the parallelism the bigger tiles take away (cifar critic 256->512 at 4x4, batch 64:
    128 tiles of 64x128 on 132 SMs; with S = 4, 512 programs).
    The A tile is gathered straight from x: rows out of the image are masked to 0 (the padding),
    and with UPSAMPLE the row (ih, iw) of u reads x[ih // 2, iw // 2] (never materialised).
    The compute dtype is y's: x (e.g. an fp32 batch feeding bf16 layers) and w (fp32 master
    weights or their bf16 copy) are cast to it as they are loaded, so no cast runs as a launch.
    Epilogue in fp32 (`_conv_fwd_epilogue`): + bias, the sign of z (int8, only when backward cannot
    read it off y), leaky ReLU, and with POOL the 2x2 mean: the pixel dimension is then ordered
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

    num_k = (CIN + BLOCK_K - 1) // BLOCK_K
    k_steps = KS * KS * num_k
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = k_steps
    else:  # this program's contiguous share of the (tap, Cin chunk) steps
        per_split = tl.cdiv(k_steps, SPLIT_K)
        k_lo = tl.program_id(2) * per_split
        k_hi = tl.minimum(k_lo + per_split, k_steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(k_lo, k_hi):
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

    if SPLIT_K == 1:
        _conv_fwd_epilogue(acc, Y_ptr, B_ptr, S_ptr, pid_m, n, h, w, m_ok, offs_n, n_ok,
                           N, H, W, COUT, HO, WO, stride_yn, stride_yh, stride_yw, leaky_slope,
                           ACT, POOL, HAS_BIAS, SAVE_SIGN, BLOCK_M, BLOCK_N)
    else:
        tile = run * tl.num_programs(0) + pid
        total, last = _split_k_sum(acc, WS_ptr, Counter_ptr, tile, tl.program_id(2),
                                   SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _conv_fwd_epilogue(total, Y_ptr, B_ptr, S_ptr, pid_m, n, h, w, m_ok, offs_n, n_ok,
                               N, H, W, COUT, HO, WO, stride_yn, stride_yh, stride_yw, leaky_slope,
                               ACT, POOL, HAS_BIAS, SAVE_SIGN, BLOCK_M, BLOCK_N)


@triton.jit
def _grad_pre_tile(G_ptr, S_ptr, n, h, w, ok, co, co_ok, H, W, HO, WO, COUT, NS, leaky_slope,
                   ACT: tl.constexpr, POOL: tl.constexpr, SIGN_FROM_OUT: tl.constexpr,
                   GRAD_IS_DZ: tl.constexpr):
    """dL/dz at conv-output pixels (n, h, w) (each (BLOCK,)) x channels co, in fp32.

    dL/da = dL/dy[n, h//2, w//2] / 4 with POOL (0 on the floored-off last row/column), else dL/dy;
    dL/dz = dL/da * (1 if z > 0 else slope). The sign of z comes from y itself when there is no pool
    and slope >= 0 (then y > 0 <=> z > 0; S = y), else from the int8 sign map S (N, H, W, Cout).
    GRAD_IS_DZ (no pool): G already holds dL/dz (the next block's dx kernel applied this block's
    leaky-ReLU derivative in its epilogue, see `_conv_dx_epilogue`): dz = G, nothing else is read.
    G (the incoming gradient) and S are contiguous NHWC. G may hold more images than the forward
    saved: gradient image n reads the saved image n % NS (several objectives' gradients stacked
    over one forward, e.g. the critic's [mix; real] rows followed by the autoencoder's mix rows).
    """
    tl.static_assert(not (GRAD_IS_DZ and POOL), "dL/dz is at the conv's resolution: no pool")
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
    if ACT and not GRAD_IS_DZ:
        s_rows = ((ns64 * H + h) * W + w) * COUT
        if SIGN_FROM_OUT:
            pos = tl.load(S_ptr + s_rows[:, None] + co[None, :], mask=mask, other=0.0) > 0
        else:
            pos = tl.load(S_ptr + s_rows[:, None] + co[None, :], mask=mask, other=0) != 0
        g = tl.where(pos, g, g * leaky_slope)
    return g


@triton.jit
def _conv_dx_epilogue(acc, DX_ptr, X_ptr, pid_m, n, ih, iw, m_ok, offs_n, n_ok, N, H, W, NS,
                      stride_dxn, stride_dxh, stride_dxw, stride_xn, stride_xh, stride_xw, input_slope,
                      UPSAMPLE: tl.constexpr, INPUT_ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = du, or with UPSAMPLE the sum of du over each 2x2 block (4 consecutive rows); with
    INPUT_ACT then times the derivative of the leaky ReLU that produced x (the previous block's
    output, no pool, slope >= 0): dx * (1 if x > 0 else input_slope), x read once per output
    element at the saved image n % NS; stored in DX's dtype."""
    if UPSAMPLE:
        HX = H // 2
        WX = W // 2
        acc = tl.sum(tl.reshape(acc, (BLOCK_M // 4, 4, BLOCK_N)), axis=1)
        offs_o = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)  # (n, hx, wx)
        o_ok = offs_o < N * HX * WX
        ox = offs_o % WX
        t = offs_o // WX
        oy = t % HX
        on = t // HX
    else:
        o_ok = m_ok
        ox = iw
        oy = ih
        on = n
    mask = o_ok[:, None] & n_ok[None, :]
    if INPUT_ACT:  # x > 0 <=> the previous block's z > 0 (slope >= 0): dL/dz_prev = dL/dx * lrelu'
        x_rows = X_ptr + (on % NS).to(tl.int64) * stride_xn + oy * stride_xh + ox * stride_xw
        pos = tl.load(x_rows[:, None] + offs_n[None, :], mask=mask, other=0.0) > 0
        acc = tl.where(pos, acc, acc * input_slope)
    dx_rows = DX_ptr + on.to(tl.int64) * stride_dxn + oy * stride_dxh + ox * stride_dxw
    tl.store(dx_rows[:, None] + offs_n[None, :], acc.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_dx_kernel(
    G_ptr, S_ptr, W_ptr, DX_ptr, X_ptr, WS_ptr, Counter_ptr,
    N, H, W, CIN, COUT, HO, WO, NS,
    stride_wo, stride_wi, stride_wkh, stride_wkw,
    stride_dxn, stride_dxh, stride_dxw,
    stride_xn, stride_xh, stride_xw,
    stride_gr, stride_sr, stride_wr, stride_dxr, stride_xr,
    leaky_slope, input_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    SIGN_FROM_OUT: tl.constexpr, GRAD_IS_DZ: tl.constexpr, INPUT_ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Input gradient: the transposed convolution of dL/dz, with the pool, leaky-ReLU and
    upsample backward fused in.

    du[p, ci] = sum_{tap, co} dz[p - offset(tap), co] * w[co, ci, tap]   (dz by _grad_pre_tile,
    recomputed from dL/dy and the sign of z while loading the A tile: dz is never materialised;
    with GRAD_IS_DZ, G is dz itself and only G is gathered);
    with UPSAMPLE dx[n, hx, wx] = sum of du over its 2x2 block, else dx = du; with INPUT_ACT the
    epilogue multiplies dx by the derivative of the leaky ReLU (slope `input_slope` >= 0) that
    produced x, read off the sign of x (X: the block's saved input), so that DX receives the
    previous block's dL/dz, which its own backward then reads with GRAD_IS_DZ. N counts the
    gradient's images, NS the forward's (see `_grad_pre_tile`; the epilogue reads x[n % NS]).
    Tiling as in the forward: rows = pixels of u (M = N*H*W), columns = Cin, one loop over the
    KS*KS * ceil(Cout / BLOCK_K) (tap, Cout chunk) steps, cut into SPLIT_K contiguous ranges on
    grid axis 2 exactly as the forward's (`_split_k_sum`; the epilogue, `_conv_dx_epilogue`, runs
    on the sum). With UPSAMPLE the rows are ordered (n, hx, wx, q) so the 2x2 sum is a reshape +
    sum in the epilogue, like the forward's pool. Runs: grid axis 1, as in the forward.
    """
    pid = tl.program_id(0)
    run = tl.program_id(1).to(tl.int64)
    G_ptr += run * stride_gr
    S_ptr += run * stride_sr
    W_ptr += run * stride_wr
    DX_ptr += run * stride_dxr
    X_ptr += run * stride_xr
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

    num_k = (COUT + BLOCK_K - 1) // BLOCK_K
    k_steps = KS * KS * num_k
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = k_steps
    else:
        per_split = tl.cdiv(k_steps, SPLIT_K)
        k_lo = tl.program_id(2) * per_split
        k_hi = tl.minimum(k_lo + per_split, k_steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(k_lo, k_hi):
        tap = kk // num_k
        co = (kk % num_k) * BLOCK_K + offs_k
        co_ok = co < COUT
        oh = ih - (tap // KS - PAD)  # z[oh] used u[ih] through this tap
        ow = iw - (tap % KS - PAD)
        ok = m_ok & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
        dz = _grad_pre_tile(G_ptr, S_ptr, n, oh, ow, ok, co, co_ok, H, W, HO, WO, COUT, NS,
                            leaky_slope, ACT, POOL, SIGN_FROM_OUT, GRAD_IS_DZ)
        w_tap = W_ptr + (tap // KS) * stride_wkh + (tap % KS) * stride_wkw
        b = tl.load(w_tap + co[:, None] * stride_wo + offs_n[None, :] * stride_wi,
                    mask=co_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K co, BLOCK_N ci)
        dtype = DX_ptr.dtype.element_ty
        acc = tl.dot(dz.to(dtype), b.to(dtype), acc, input_precision=DOT_PRECISION)

    if SPLIT_K == 1:
        _conv_dx_epilogue(acc, DX_ptr, X_ptr, pid_m, n, ih, iw, m_ok, offs_n, n_ok, N, H, W, NS,
                          stride_dxn, stride_dxh, stride_dxw, stride_xn, stride_xh, stride_xw,
                          input_slope, UPSAMPLE, INPUT_ACT, BLOCK_M, BLOCK_N)
    else:  # the epilogue (the 2x2 sum, the input's activation) runs on the summed partials
        tile = run * tl.num_programs(0) + pid
        total, last = _split_k_sum(acc, WS_ptr, Counter_ptr, tile, tl.program_id(2),
                                   SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _conv_dx_epilogue(total, DX_ptr, X_ptr, pid_m, n, ih, iw, m_ok, offs_n, n_ok, N, H, W, NS,
                              stride_dxn, stride_dxh, stride_dxw, stride_xn, stride_xh, stride_xw,
                              input_slope, UPSAMPLE, INPUT_ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _dw_tap(acc, x_rows, h, w, p_ok, ci, ci_ok, dz, tap, H, W, stride_xh, stride_xw,
            KS: tl.constexpr, UPSAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_CI, BLOCK_CO) += u_tap^T @ dz for one tap: u_tap (BLOCK_P, BLOCK_CI) is the input
    at the chunk's pixels shifted by the tap (0 outside the image), cast to dz's dtype."""
    PAD: tl.constexpr = KS // 2
    ih = h + (tap // KS - PAD)
    iw = w + (tap % KS - PAD)
    ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    if UPSAMPLE:
        ih = ih // 2
        iw = iw // 2
    u = tl.load((x_rows + ih * stride_xh + iw * stride_xw)[:, None] + ci[None, :],
                mask=ok[:, None] & ci_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_CI)
    return tl.dot(tl.trans(u.to(dz.dtype)), dz, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dw_store(D_ptr, stride_o, stride_i, stride_kh, stride_kw, tile, co, ci, mask, tap,
              KS: tl.constexpr):
    """Store a (BLOCK_CI, BLOCK_CO) tile of tap `tap` at D[co, ci, tap // KS, tap % KS] (D's dtype)."""
    ptrs = (D_ptr + co[None, :] * stride_o + ci[:, None] * stride_i
            + (tap // KS) * stride_kh + (tap % KS) * stride_kw)
    tl.store(ptrs, tile.to(D_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_sum_slots(WS_ptr, WSB_ptr, lo, hi, D_ptr, stride_o, stride_i, stride_kh, stride_kw,
                  DB_ptr, co, ci, co_ok, mask, tap0, CIN, COUT,
                  KS: tl.constexpr, TAPS: tl.constexpr, NEED_DB: tl.constexpr, do_db,
                  BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Sum the workspace slots lo..hi-1 (in slot order) of this tile's TAPS taps and store them
    through (D_ptr, strides); db likewise from WSB into DB_ptr. A slot of WS is (KS*KS, Cout, Cin)
    fp32 (Cin contiguous: coalesced tiles), a slot of WSB is (Cout,)."""
    SLOT = KS * KS * COUT * CIN
    for t in tl.static_range(TAPS):
        offs = ((tap0 + t) * COUT + co[None, :]) * CIN + ci[:, None]
        total = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        for s in range(lo, hi):
            total += tl.load(WS_ptr + s * SLOT + offs, mask=mask, other=0.0, cache_modifier=".cg")
        _dw_store(D_ptr, stride_o, stride_i, stride_kh, stride_kw, total, co, ci, mask, tap0 + t, KS)
    if NEED_DB:
        if do_db:
            total_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
            for s in range(lo, hi):
                total_b += tl.load(WSB_ptr + s * COUT + co, mask=co_ok, other=0.0, cache_modifier=".cg")
            tl.store(DB_ptr + co, total_b.to(DB_ptr.dtype.element_ty), mask=co_ok)


@triton.jit
def _conv_bwd_dw_kernel(
    X_ptr, G_ptr, S_ptr, DW_ptr, DB_ptr, WS_ptr, WSB_ptr, Counter_ptr,
    N, H, W, CIN, COUT, HO, WO,
    stride_xn, stride_xh, stride_xw,
    stride_dwo, stride_dwi, stride_dwkh, stride_dwkw,
    stride_xr, stride_gr, stride_sr, stride_dwr, stride_dbr,
    REDUCE_GROUP, leaky_slope,
    KS: tl.constexpr, UPSAMPLE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    SIGN_FROM_OUT: tl.constexpr, GRAD_IS_DZ: tl.constexpr, NEED_DB: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, TAPS: tl.constexpr,
):
    """Weight and bias gradients: reductions over all N*H*W conv-output pixels p.

    dW[co, ci, tap] = sum_p u[p + offset(tap), ci] * dz[p, co];   db[co] = sum_p dz[p, co].
    Tiling: one program per (TAPS taps, BLOCK_CI in-channels) x (BLOCK_CO out-channels) x split;
    the ceil(P / BLOCK_P) pixel chunks are dealt to the splits (grid axis 2) in contiguous ranges
    of whole chunks (split s: chunks [s*C // splits, (s+1)*C // splits), so any split count up to C
    runs, e.g. one that fills whole waves, and no range is empty): for each of its taps, acc_tap (BLOCK_CI, BLOCK_CO)
    += u_tap_chunk^T @ dz_chunk, in the dtype of G (u, e.g. the fp32 input batch, is cast to it as
    it is loaded). TAPS = 1: one tap per program (grid axis 0 = KS*KS * Cin blocks). TAPS = KS*KS
    (9, for the narrow layers): all taps in one program, so the dz tile is loaded (and the
    pool/lrelu backward recomputed) once per chunk instead of 9 times, and the 9 shifted u tiles
    overlap in L1/L2 instead of being fetched by 9 programs; 9 accumulators of BLOCK_CI x BLOCK_CO
    fp32 (the configs keep them <= 72 registers a thread).
    The split reduction is part of this launch, deterministic, and two-level: with SPLIT, every
    program stores its fp32 partial to slot `split` of WS (runs, splits + groups, KS*KS, Cout, Cin)
    / WSB (runs, splits + groups, Cout); the splits form groups of REDUCE_GROUP consecutive ones,
    and the last program of a group (ticket on the group's counter) sums the group's partials in
    split order into slot splits + group; the last group (ticket on the tile's counter) sums the
    group sums in group order and writes dW (through its strides, in DW's dtype: the fp32 gradient
    of the master weight, any layout) and db. So no program sums more than REDUCE_GROUP + groups
    partials serially (lines critic.blocks.0 at batch 64: 128 splits, 12 + 11 instead of 128);
    with one group (REDUCE_GROUP >= splits) its last program writes dW directly. Counters are left
    at 0; layout: [tiles] final counters, then [tiles * groups] group counters.
    db is accumulated in fp32 (before dz is rounded) by the tap-0, ci-block-0 programs only, from
    the dz tile they load anyway. G may hold more images than N: only its first N are read.
    GRAD_IS_DZ (no pool): G holds dz itself (written by the next block's dx epilogue), so the
    chunks read G alone, without the sign (see `_grad_pre_tile`).
    Runs: grid axis 1 holds (run, Cout block) with the Cout blocks fastest; every tensor's base
    moves by its run stride, and each run has its own partials and tile counters.
    """
    pid_t = tl.program_id(0)  # tap group * num_ci_blocks + ci block
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
    tap0 = (pid_t // num_ci) * TAPS  # this program's first tap
    tl.static_assert(TAPS == 1 or (TAPS == 9 and KS == 3), "TAPS is 1 or all 9 taps of a 3x3 kernel")

    ci = (pid_t % num_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < CIN
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    P = N * H * W
    num_chunks = tl.cdiv(P, BLOCK_P)  # split s: chunks [s * num_chunks // splits, (s+1) * ...)
    p_lo = ((pid_s.to(tl.int64) * num_chunks) // tl.num_programs(2)).to(tl.int32) * BLOCK_P
    p_hi = tl.minimum(((((pid_s + 1).to(tl.int64) * num_chunks) // tl.num_programs(2)).to(tl.int32)) * BLOCK_P, P)
    do_db = pid_t == 0  # (with NEED_DB) these programs also reduce db
    cdt = G_ptr.dtype.element_ty

    acc0 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    if TAPS == 9:  # one accumulator per tap (tap = kh*3 + kw)
        acc1 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc4 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc5 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc6 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc7 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        acc8 = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    db = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_hi
        w = offs_p % W
        t = offs_p // W
        h = t % H
        n = t // H
        dz = _grad_pre_tile(G_ptr, S_ptr, n, h, w, p_ok, co, co_ok, H, W, HO, WO, COUT, N,
                            leaky_slope, ACT, POOL, SIGN_FROM_OUT, GRAD_IS_DZ)  # (BLOCK_P, BLOCK_CO) fp32
        if NEED_DB:
            if do_db:
                db += tl.sum(dz, axis=0)
        dz = dz.to(cdt)
        x_rows = X_ptr + n.to(tl.int64) * stride_xn  # (BLOCK_P,) image base pointers
        if TAPS == 1:
            acc0 = _dw_tap(acc0, x_rows, h, w, p_ok, ci, ci_ok, dz, tap0, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
        else:  # the same dz tile feeds the 9 shifted input tiles
            acc0 = _dw_tap(acc0, x_rows, h, w, p_ok, ci, ci_ok, dz, 0, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc1 = _dw_tap(acc1, x_rows, h, w, p_ok, ci, ci_ok, dz, 1, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc2 = _dw_tap(acc2, x_rows, h, w, p_ok, ci, ci_ok, dz, 2, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc3 = _dw_tap(acc3, x_rows, h, w, p_ok, ci, ci_ok, dz, 3, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc4 = _dw_tap(acc4, x_rows, h, w, p_ok, ci, ci_ok, dz, 4, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc5 = _dw_tap(acc5, x_rows, h, w, p_ok, ci, ci_ok, dz, 5, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc6 = _dw_tap(acc6, x_rows, h, w, p_ok, ci, ci_ok, dz, 6, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc7 = _dw_tap(acc7, x_rows, h, w, p_ok, ci, ci_ok, dz, 7, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)
            acc8 = _dw_tap(acc8, x_rows, h, w, p_ok, ci, ci_ok, dz, 8, H, W, stride_xh, stride_xw,
                           KS, UPSAMPLE, DOT_PRECISION)

    tile_mask = ci_ok[:, None] & co_ok[None, :]
    if SPLIT:  # this program's partial goes to its slot; DW is written by the last program
        splits = tl.num_programs(2)
        groups = tl.cdiv(splits, REDUCE_GROUP)
        SLOT = KS * KS * COUT * CIN
        WS_ptr += run64 * (splits + groups) * SLOT  # (runs, splits + groups, KS*KS, Cout, Cin)
        WSB_ptr += run64 * (splits + groups) * COUT
        D_ptr = WS_ptr + pid_s * SLOT
        so = CIN  # the strides of one (KS*KS, Cout, Cin) slot
        si = 1
        skh = KS * COUT * CIN
        skw = COUT * CIN
    else:
        D_ptr = DW_ptr
        so = stride_dwo
        si = stride_dwi
        skh = stride_dwkh
        skw = stride_dwkw
    _dw_store(D_ptr, so, si, skh, skw, acc0, co, ci, tile_mask, tap0, KS)
    if TAPS == 9:
        _dw_store(D_ptr, so, si, skh, skw, acc1, co, ci, tile_mask, 1, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc2, co, ci, tile_mask, 2, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc3, co, ci, tile_mask, 3, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc4, co, ci, tile_mask, 4, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc5, co, ci, tile_mask, 5, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc6, co, ci, tile_mask, 6, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc7, co, ci, tile_mask, 7, KS)
        _dw_store(D_ptr, so, si, skh, skw, acc8, co, ci, tile_mask, 8, KS)
    if SPLIT:
        if NEED_DB:
            tl.store(WSB_ptr + pid_s * COUT + co, db, mask=co_ok & do_db)
        tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
        tiles = tl.num_programs(0) * tl.num_programs(1)  # over all runs
        tile = tl.program_id(1) * tl.num_programs(0) + pid_t  # = run * tiles_per_run + ...
        group = pid_s // REDUCE_GROUP
        g_lo = group * REDUCE_GROUP
        g_hi = tl.minimum(g_lo + REDUCE_GROUP, splits)
        group_counter = Counter_ptr + tiles + tile * groups + group
        ticket = tl.atomic_add(group_counter, 1, sem="acq_rel")
        if ticket == g_hi - g_lo - 1:  # the last program of its group
            tl.store(group_counter, 0)
            if groups == 1:  # one level: the partials, in split order, into dW and db
                _dw_sum_slots(WS_ptr, WSB_ptr, 0, splits, DW_ptr, stride_dwo, stride_dwi, stride_dwkh,
                              stride_dwkw, DB_ptr, co, ci, co_ok, tile_mask, tap0, CIN, COUT, KS, TAPS,
                              NEED_DB, do_db, BLOCK_CI, BLOCK_CO)
            else:  # level 1: the group's partials into slot splits + group
                _dw_sum_slots(WS_ptr, WSB_ptr, g_lo, g_hi, WS_ptr + (splits + group) * SLOT,
                              CIN, 1, KS * COUT * CIN, COUT * CIN, WSB_ptr + (splits + group) * COUT,
                              co, ci, co_ok, tile_mask, tap0, CIN, COUT, KS, TAPS, NEED_DB, do_db,
                              BLOCK_CI, BLOCK_CO)
                tl.debug_barrier()
                ticket2 = tl.atomic_add(Counter_ptr + tile, 1, sem="acq_rel")
                if ticket2 == groups - 1:  # level 2: the group sums, in group order, into dW and db
                    _dw_sum_slots(WS_ptr, WSB_ptr, splits, splits + groups, DW_ptr, stride_dwo,
                                  stride_dwi, stride_dwkh, stride_dwkw, DB_ptr, co, ci, co_ok,
                                  tile_mask, tap0, CIN, COUT, KS, TAPS, NEED_DB, do_db,
                                  BLOCK_CI, BLOCK_CO)
                    tl.store(Counter_ptr + tile, 0)
    else:
        if NEED_DB:
            tl.store(DB_ptr + co, db.to(DB_ptr.dtype.element_ty), mask=co_ok & do_db)


# ------------------------------------------------------------------------------------------------
# Configs (chosen in conv_configs.py) and the one launch path
# ------------------------------------------------------------------------------------------------

_KERNELS = dict(fwd=_conv_fwd_kernel, dx=_conv_bwd_dx_kernel, dw=_conv_bwd_dw_kernel)


def _launch(name, shape, config, device, run):
    """One launch of kernel `name` ("fwd", "dx", "dw"): with `config` (a triton.Config) when given,
    else the one `choose_config` picks for `shape` (`launch_shape`'s dict) on `device` (with
    ACAI_FAST_AUTOTUNE=1: the fastest candidate, timed). `run(config)` plans the launch for that
    config (grid, split counts, workspace, counters) and launches it. Returns (config, source)."""
    source = "given"
    if config is None:
        config, source = choose_config(name, shape, device)
        if config is None:  # autotune: time the candidates, each a whole planned launch
            config = autotune(name, shape, run, device)
    config = normalized(name, config)
    run(config)
    return config, source


def _dummy(device, dtype):
    """A one-element stand-in for a workspace or counter a launch does not use (no split)."""
    return torch.empty(1, dtype=dtype, device=device)


def _split_k_buffers(split_k, tiles, config, counter, device):
    """(fp32 workspace, int32 counters) of a fwd/dx launch with `tiles` output tiles over all runs:
    (tiles, SPLIT_K, BLOCK_M, BLOCK_N) partials; `counter` (>= tiles zeros, left at zero) or a new one."""
    if split_k == 1:
        return _dummy(device, torch.float32), _dummy(device, torch.int32)
    if counter is None:
        counter = torch.zeros(tiles, dtype=torch.int32, device=device)
    elif counter.numel() < tiles or counter.dtype != torch.int32:
        raise ValueError(f"conv_block: the split-K counter must hold >= {tiles} int32 zeros for "
                         f"config {config.kwargs}, got {counter.numel()} {counter.dtype} "
                         f"(see split_k_counter_size)")
    k = config.kwargs
    ws = torch.empty(tiles * split_k * k["BLOCK_M"] * k["BLOCK_N"], dtype=torch.float32, device=device)
    return ws, counter


def _mnk_meta(config, split_k):
    k = config.kwargs
    return dict(BLOCK_M=k["BLOCK_M"], BLOCK_N=k["BLOCK_N"], BLOCK_K=k["BLOCK_K"], SPLIT_K=split_k,
                num_warps=config.num_warps, num_stages=config.num_stages)


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
             out=None, out_dtype=None, config=None, counter=None, poison=False):
    """Forward launcher. x (N, Cin, Hx, Wx) -> (y channels_last, sign map or None); or, for an array
    of R same-shaped models, x (R, N, Cin, Hx, Wx) (see `empty_activation`), weight (R, Cout, Cin,
    k, k), bias (R, Cout) -> y (R, N, Cout, H', W'), one launch for all runs.

    y is computed in `out_dtype` (default x's dtype; x and the weight are cast to it in the kernel)
    and written into `out` when given (a channels_last tensor of y's shape and dtype, e.g. a block of
    rows of a larger buffer), else into a new tensor. The sign map ((R,) N, H, W, Cout) int8 is
    returned only when backward needs it (activation with a pool, or a negative slope). weight and
    bias: any dtype (fp32 master weights, or the bf16 copy an optimizer step writes) and any layout
    (see `kernel_weight`). `config`: a triton.Config to force (else `choose_config`'s); `counter`:
    int32 zeros of `split_k_counter_size(R)` elements for a split-K config (left at zero; default:
    a new one per split launch, which costs a memset); `poison`: fill the outputs with NaN first (tests).
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
    R = x5.shape[0]
    shape = launch_shape("fwd", N=N, H=H, W=W, CIN=CIN, COUT=COUT, KS=KS, UPSAMPLE=upsample_input,
                         ACT=act, POOL=pool_output, dtype=dtype, weight_dtype=weight.dtype, RUNS=R)

    def run(cfg):
        split_k = split_k_steps("fwd", shape, cfg)
        tiles = output_tiles("fwd", shape, cfg)
        ws, cnt = _split_k_buffers(split_k, R * tiles, cfg, counter, x.device)
        _KERNELS["fwd"][(tiles, R, split_k)](
            x5, w5, b5 if b5 is not None else w5, y5, s5 if s5 is not None else y5, ws, cnt,
            N, H, W, CIN, COUT, HO, WO,
            x5.stride(1), x5.stride(3), x5.stride(4), *w5.stride()[1:],
            y5.stride(1), y5.stride(3), y5.stride(4),
            _run_stride(x5), _run_stride(w5), _run_stride(b5), _run_stride(y5), _run_stride(s5),
            float(leaky_slope) if act else 0.0,
            KS=KS, UPSAMPLE=upsample_input, ACT=act, POOL=pool_output, HAS_BIAS=bias is not None,
            SAVE_SIGN=save_sign, DOT_PRECISION=_dot_precision(dtype), **_mnk_meta(cfg, split_k))

    _launch("fwd", shape, config, x.device, run)
    return y, sign


def conv_bwd(grad_y, x, weight, y, sign, *, weight_dtype=None, bias_dtype=None,
             upsample_input=False, leaky_slope=0.2, pool_output=False, need_dx=True, need_dw=True,
             need_db=True, dx_out=None, dw_out=None, db_out=None, dw_counter=None, dx_counter=None,
             dx_config=None, dw_config=None, grad_is_dz=False, input_leaky_slope=None, poison=False):
    """Backward launcher: (dx channels_last or None, dw or None, db or None).

    x, y, sign: as saved by the forward of NS images (y is read only when the sign of z is taken
    from it); grad_y: dL/dy of NG >= NS images, in the compute dtype (y's), channels_last or made so.
    The two ends of a chain link (block i without pool feeding block i+1; they halve what block i's
    dx and dW gather, since no sign is read beside the gradient):
    - input_leaky_slope (block i+1's call): x is the output of a leaky ReLU with this slope (>= 0:
      block i's, which has no pool). dx is then returned as the gradient of that ReLU's input, i.e.
      block i's dL/dz = dL/dx * (1 if x > 0 else input_leaky_slope), instead of dL/dx (applied in
      the dx kernel's epilogue, after the 2x2 upsample sum and the split-K sum; gradient image n
      reads the saved x[n % NS]). dw and db are unchanged.
    - grad_is_dz (block i's call): grad_y holds dL/dz (NG, Cout, H, W), the gradient of the conv's
      output before this block's leaky ReLU (as block i+1's call with input_leaky_slope returns
      it), instead of dL/dy: dx, dw and db are what grad_y = dL/dy would give, and y and sign are
      not read (pass None). Only for blocks without pool (dL/dz is at the conv's resolution).
    In reference terms: conv_bwd(dL/dy, x, ...) = autograd of conv_block_ref(x, w, b, **flags);
    conv_bwd(dz, x, ..., grad_is_dz=True) = autograd of conv_block_ref(x, w, b, upsample_input,
    leaky_slope=None, pool_output=False) with the gradient dz; dx with input_leaky_slope=s is
    d L / d z_prev for x = leaky_relu(z_prev, s) (autograd through that ReLU).
    When NG > NS, gradient image n belongs to saved image n % NS (several objectives' gradients
    stacked over one forward): dx covers all NG images, dw/db only the first NS (the objective
    that trains this block must come first). dx is written in x's dtype into `dx_out` when given
    (channels_last (NG, Cin, Hx, Wx)). weight: any dtype and layout, as in `conv_fwd` (fp32 master
    weights or their bf16 copy: it is only read). dw ((Cout, Cin, k, k), `weight_dtype`, default
    weight.dtype: pass the master weight's fp32 when `weight` is a bf16 copy) and db (`bias_dtype`;
    None: no bias) go into `dw_out` / `db_out` when given (any layout and dtype: e.g. the fp32
    parameters' persistent .grad tensors). dw_counter: int32 zeros of `dw_counter_size` elements,
    dx_counter: of `split_k_counter_size`; the launches use them and leave them at zero (default:
    new ones, a memset each). Arrays of runs: every tensor gains a leading run axis (as in
    `conv_fwd`), one launch per kernel.
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
    if grad_is_dz and pool_output:
        raise ValueError("conv_block: grad_is_dz needs a block without pool (dL/dz is at the conv's "
                         "resolution, the gradient of a pooled block at the pool's)")
    input_act = input_leaky_slope is not None
    if input_act and not (isinstance(input_leaky_slope, (int, float)) and math.isfinite(input_leaky_slope)
                          and input_leaky_slope >= 0):
        raise ValueError(f"conv_block: input_leaky_slope must be a finite number >= 0 (the sign of the "
                         f"previous block's z is read off x), got {input_leaky_slope!r}")
    if grad_is_dz:  # dz is given: no sign of z to read
        s = None
    else:
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
                  SIGN_FROM_OUT=sign_from_out, GRAD_IS_DZ=bool(grad_is_dz),
                  DOT_PRECISION=_dot_precision(cdt))
    dx = dw = db = None
    need_db = need_db and bias_dtype is not None
    wk = kernel_weight(weight)
    x5, g5, s5, w5 = (_runs_view(t, not array) for t in (x, g, s, wk))
    lead = (R,) if array else ()
    shape = dict(N=NS, H=H, W=W, CIN=CIN, COUT=COUT, KS=KS, UPSAMPLE=upsample_input, ACT=act,
                 POOL=pool_output, dtype=cdt, weight_dtype=weight.dtype, RUNS=R,
                 GRAD_IS_DZ=bool(grad_is_dz))

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
            dx_shape = launch_shape("dx", **dict(shape, N=NG, INPUT_ACT=input_act))

            def run_dx(cfg):
                split_k = split_k_steps("dx", dx_shape, cfg)
                tiles = output_tiles("dx", dx_shape, cfg)
                ws, cnt = _split_k_buffers(split_k, R * tiles, cfg, dx_counter, x.device)
                _KERNELS["dx"][(tiles, R, split_k)](
                    g5, s5, w5, dx5, x5, ws, cnt, NG, H, W, CIN, COUT, HO, WO, max(NS, 1),
                    *w5.stride()[1:], dx5.stride(1), dx5.stride(3), dx5.stride(4),
                    x5.stride(1), x5.stride(3), x5.stride(4),
                    _run_stride(g5), _run_stride(s5), _run_stride(w5), _run_stride(dx5), _run_stride(x5),
                    slope, float(input_leaky_slope) if input_act else 0.0,
                    INPUT_ACT=input_act, **common, **_mnk_meta(cfg, split_k))

            _launch("dx", dx_shape, dx_config, x.device, run_dx)

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
            dw5, db5 = _runs_view(dw, not array), _runs_view(db, not array)
            dw_shape = launch_shape("dw", **shape)

            def run_dw(cfg):
                k = cfg.kwargs
                taps = dw_taps(KS, k["TAPS"])
                splits, _ = dw_split_plan(NS * H * W, k["SPLITS"], k["BLOCK_P"])
                group = k["REDUCE_GROUP"] if k["REDUCE_GROUP"] > 0 else splits  # 0: one group
                groups = -(-splits // group)
                if splits > 1:  # (runs, splits + groups, KS*KS, Cout, Cin) partials and group sums
                    slot = KS * KS * COUT * CIN
                    if (splits + groups) * slot >= 2 ** 31:
                        raise ValueError(f"conv_block: {splits} dW splits of a {COUT}x{CIN}x{KS}x{KS} "
                                         f"weight overflow the int32 workspace offsets; use fewer SPLITS")
                    ws = torch.empty(R * (splits + groups) * slot, device=x.device, dtype=torch.float32)
                    wsb = torch.empty(R * (splits + groups) * COUT, device=x.device, dtype=torch.float32)
                    need = R * dw_counters_needed(dw_shape, cfg)
                    counter = dw_counter
                    if counter is None:
                        counter = torch.zeros(need, dtype=torch.int32, device=x.device)
                    elif counter.numel() < need or counter.dtype != torch.int32:
                        raise ValueError(f"conv_block: dw_counter must hold >= {need} int32 zeros for "
                                         f"config {k}, got {counter.numel()} {counter.dtype} "
                                         f"(see dw_counter_size)")
                else:
                    ws = wsb = _dummy(x.device, torch.float32)
                    counter = _dummy(x.device, torch.int32)
                grid = ((KS * KS // taps) * triton.cdiv(CIN, k["BLOCK_CI"]),
                        R * triton.cdiv(COUT, k["BLOCK_CO"]), splits)
                _KERNELS["dw"][grid](
                    x5, g5, s5, dw5, db5 if db5 is not None else dw5, ws, wsb, counter,
                    NS, H, W, CIN, COUT, HO, WO, x5.stride(1), x5.stride(3), x5.stride(4),
                    *dw5.stride()[1:], _run_stride(x5), _run_stride(g5), _run_stride(s5),
                    _run_stride(dw5), _run_stride(db5), group, slope,
                    NEED_DB=need_db, SPLIT=splits > 1, **common, BLOCK_CI=k["BLOCK_CI"],
                    BLOCK_CO=k["BLOCK_CO"], BLOCK_P=k["BLOCK_P"], TAPS=taps,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            _launch("dw", dw_shape, dw_config, x.device, run_dw)
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
