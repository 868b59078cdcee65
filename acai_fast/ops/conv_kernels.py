"""conv_kernels: the conv block's math, avgpool2x2(leaky_relu(conv2d(upsample2x(x)))), in plain
PyTorch (`conv_block_ref`, the reference) and as the three fused Triton kernels that compute it:
forward, dx, and dW/db (implicit GEMM over NHWC activations, fp32 accumulation, deterministic
in-launch split reductions). conv_block.py launches them (configs, shapes, workspaces, autograd) and
is the op the networks call; the tests hold every kernel against `conv_block_ref`.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import _ext

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run
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
