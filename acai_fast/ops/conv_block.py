"""conv_block: avgpool2x2(leaky_relu(conv2d(upsample2x(x)))) as one op, the building block of every
ACAI network (SPEC.md section 1).

The reference in plain PyTorch (`conv_block_ref`) and the fused Triton kernels (implicit GEMM over
NHWC activations, fp32 accumulation: one forward kernel, a dx and a dW/db kernel for backward, with
deterministic in-launch split reductions) sit side by side in conv_kernels.py; this module launches
them: configs chosen in conv_configs.py (tuned table, cost model, heuristic), output and workspace
buffers, weights as the kernels read them, autograd, and `conv_block`, the op the networks call. Limits: odd square
kernels (all-taps dW programs for 3x3 only), stride 1, "same" padding; not timed on a GPU yet.
"""
from __future__ import annotations

import logging
import math

import torch

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

# The reference and the kernels live in conv_kernels.py; this module launches them.
from .conv_kernels import (_conv_bwd_dw_kernel, _conv_bwd_dx_kernel, _conv_fwd_kernel,  # noqa: E402,F401
                           conv_block_ref)


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
