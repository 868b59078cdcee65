"""conv_configs: which config each conv_block kernel launch runs, and why.

A config is a triton.Config: fwd/dx kwargs BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K; dw kwargs BLOCK_CI,
BLOCK_CO, BLOCK_P, TAPS, SPLITS, REDUCE_GROUP; plus num_warps / num_stages (the meaning of each key
is in the kernels' docstrings in conv_block.py). Every config is correct for every shape (the
kernels mask all edges); the choice only changes the speed. Which config a launch runs
(`choose_config`): the one passed in; under the interpreter one fixed config per kernel; with
ACAI_FAST_AUTOTUNE=1 the fastest candidate timed on this GPU (`autotune`); otherwise the table
ops/tuned/sm<major><minor>.json for this GPU and layer shape (written by bench/tune.py on that GPU),
else the cost model's fastest candidate that fits the GPU (`acai_fast.ops.cost.best_config`), else,
when the model is unavailable, `heuristic_config`. Tuning is data, not a ritual: a first step
compiles each kernel once and benchmarks nothing.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from .. import _ext

triton, tl = _ext.triton_modules()

INTERPRET = _ext.INTERPRET
AUTOTUNE = os.environ.get("ACAI_FAST_AUTOTUNE", "0") == "1"  # read once, at import (like the interpreter)
TUNED_DIR = Path(__file__).with_name("tuned")

MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
DW = ("BLOCK_CI", "BLOCK_CO", "BLOCK_P", "TAPS", "SPLITS", "REDUCE_GROUP")
DEFAULTS = dict(SPLIT_K=1, TAPS=1, SPLITS=1, REDUCE_GROUP=0)  # what a config without the key means
# (REDUCE_GROUP 0: all splits in one group, a one-level reduction)
KEY_FIELDS = ("N", "H", "W", "CIN", "COUT", "KS", "UPSAMPLE", "ACT", "POOL")

# Split-K only where a launch has few output tiles: its tile counters are preallocated per layer
# (`split_k_counter_size`); 1024 tiles per run is ~8 waves of 132 SMs, far past where a split pays.
SPLIT_K_MAX_TILES = 1024
MAX_DW_SPLITS = 1024  # pixel splits of one dW launch (lines critic.blocks.0 at batch 64 wants ~260)
MIN_DW_TILE = 16  # the smallest BLOCK_CI / BLOCK_CO any config may use (sizes the dW counters)
DW_GROUP_COUNTERS = 256  # per run: room for the group counters of narrow layers' two-level reductions


def _cfg(kwargs: dict, warps: int, stages: int):
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


def mnk(m, n, k, warps, stages, split_k=1):
    """A fwd/dx config: BLOCK_M x BLOCK_N output tiles, BLOCK_K-deep steps, SPLIT_K programs per tile."""
    return _cfg(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=split_k), warps, stages)


def dwc(ci, co, p, warps, stages, taps=1, splits=1, reduce_group=0):
    """A dW config: BLOCK_CI x BLOCK_CO tiles over BLOCK_P-pixel chunks, TAPS taps per program
    (1 or KS*KS), SPLITS pixel splits summed in groups of REDUCE_GROUP (0: one group)."""
    return _cfg(dict(BLOCK_CI=ci, BLOCK_CO=co, BLOCK_P=p, TAPS=taps, SPLITS=splits,
                     REDUCE_GROUP=reduce_group), warps, stages)


def normalized(name: str, config):
    """config with every key of its kernel (missing ones take DEFAULTS: a table written before
    SPLIT_K/TAPS existed, or a hand-made config, keeps its meaning)."""
    keys = DW if name == "dw" else MNK
    kwargs = {k: int(config.kwargs.get(k, DEFAULTS.get(k, 0))) for k in keys}
    return _cfg(kwargs, config.num_warps, config.num_stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), SPLIT_K = 1. Wide tiles for the 32x32 layers, small
# ones for the 2x2-8x8 wide-channel layers, 16-wide ones for the colors/latent (1-3 channel) ends;
# `candidates` adds the split-K variants of the >= 64-row tiles for launches with few tiles.
FWD_CONFIGS = [
    mnk(128, 64, 32, 4, 3),
    mnk(128, 128, 32, 8, 3),
    mnk(64, 64, 32, 4, 3),
    mnk(64, 64, 64, 4, 3),
    mnk(32, 64, 64, 4, 3),
    mnk(32, 32, 64, 4, 3),
    mnk(128, 16, 16, 4, 3),
    mnk(64, 16, 128, 4, 3),  # 16 output channels over a deep K (2x2 256->16: K = 2,304): 8x fewer K steps than 128x16x16
    mnk(64, 128, 32, 4, 3),
    # large batches (M = N*H*W in the hundreds of thousands): bigger tiles, deeper pipelines
    mnk(128, 128, 64, 8, 4),
    mnk(256, 64, 32, 8, 3),
    mnk(128, 256, 32, 8, 3),
]
DX_CONFIGS = list(FWD_CONFIGS)
SPLIT_K_VALUES = (2, 3, 4, 6, 8)  # each split keeps >= 2 K steps (see `candidates`)
# (BLOCK_CI, BLOCK_CO, BLOCK_P, warps, stages, TAPS); SPLITS/REDUCE_GROUP are planned per shape.
DW_CONFIGS = [
    dwc(64, 64, 64, 4, 3),
    dwc(64, 64, 128, 4, 3),
    dwc(128, 64, 64, 8, 3),
    dwc(32, 64, 128, 8, 3),  # 4 warps: 255 registers + spills (ptxas -v, sm_90a)
    dwc(32, 32, 128, 4, 3),
    dwc(16, 16, 128, 4, 3),
    dwc(64, 128, 64, 8, 3),
    # all 9 taps per program (narrow layers), one stage: a chunk's 9 shifted input tiles are loaded
    # together (their own latency hiding), and they, not the accumulators, fill the registers.
    # ptxas (Triton 3.9, bf16, launch-specialised, sm_90 and sm_80): 16x16x64 w4 s1 168 registers,
    # 16x32x64 w4 s1 128-138, 32x64x32 w8 s1 174, none spilled; left out: 16x16x128 w4 s1 (253-255),
    # 32x32x64 w4 s1 (24 B spilled), and every s2 variant with 128 pixels or 32x32 tiles (8-432 B).
    dwc(16, 16, 64, 4, 1, taps=9),
    dwc(16, 32, 64, 4, 1, taps=9),
    dwc(32, 64, 32, 8, 1, taps=9),
]
# The interpreter's single configs: big enough to keep the number of (slow, Python) program
# instances down, small enough to exercise the edge masks on the test shapes.
INTERPRET_FWD_CONFIG = mnk(256, 16, 16, 4, 1)
INTERPRET_DX_CONFIG = mnk(256, 16, 16, 4, 1)
INTERPRET_DW_CONFIG = dwc(16, 16, 256, 4, 1)  # SPLITS from `dw_heuristic_splits` per shape
_INTERPRET_CONFIGS = dict(fwd=INTERPRET_FWD_CONFIG, dx=INTERPRET_DX_CONFIG, dw=INTERPRET_DW_CONFIG)

# GPU name fragments -> cost.GPUS keys, and their architectures (the tuned tables' names)
GPU_ARCH = {"a100": "sm80", "h100": "sm90", "h200": "sm90"}
_SMS = 132  # streaming multiprocessors of an H100 SXM (H200: 132 too); the fallback's wave size
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles the heuristic allows (H100: 227 KB per block)


# ------------------------------------------------------------------------------------------------
# The launch's shape and its derived sizes
# ------------------------------------------------------------------------------------------------


def launch_shape(name: str, *, N, H, W, CIN, COUT, KS, UPSAMPLE, ACT, POOL, dtype,
                 weight_dtype=None, RUNS=1, GRAD_IS_DZ=False, INPUT_ACT=False) -> dict:
    """The dict that describes one launch to the config choosers and the cost model: N images
    (dx: the gradient's images), H x W the conv's resolution (after any upsample), channel counts,
    kernel size, flags, the compute dtype (y's / dL/dy's), the weight's dtype as stored (fp32
    master weights or a bf16 copy), the runs of an array, and (dx/dW) whether the gradient read is
    dL/dz already (GRAD_IS_DZ: no sign gathered) and (dx) whether the epilogue applies the input's
    leaky-ReLU derivative (INPUT_ACT: one read of x per output element). The last two change the
    modelled bytes, not the table key (`shape_key`)."""
    return dict(kind=name, N=int(N), H=int(H), W=int(W), CIN=int(CIN), COUT=int(COUT), KS=int(KS),
                UPSAMPLE=bool(UPSAMPLE), ACT=bool(ACT), POOL=bool(POOL), dtype=dtype,
                weight_dtype=weight_dtype or dtype, RUNS=int(RUNS), GRAD_IS_DZ=bool(GRAD_IS_DZ),
                INPUT_ACT=bool(INPUT_ACT))


def shape_of(name: str, args: dict) -> dict:
    """`launch_shape`'s dict of a launch given either that dict or the kernel's named arguments (its
    tensors, real or meta, and constexprs: what acai_fast.engine.launches records): the compute
    dtype from Y (fwd) / G (dx, dw), the weight's dtype from W, the runs from the leading axis."""
    if "dtype" in args:
        return args
    out = args.get("Y_ptr" if name == "fwd" else "G_ptr")
    w = args.get("W_ptr")
    runs = out.shape[0] if getattr(out, "dim", lambda: 0)() == 5 else 1
    return launch_shape(name, N=args["N"], H=args["H"], W=args["W"], CIN=args["CIN"], COUT=args["COUT"],
                        KS=args["KS"], UPSAMPLE=args["UPSAMPLE"], ACT=args["ACT"], POOL=args["POOL"],
                        dtype=getattr(out, "dtype", torch.bfloat16), weight_dtype=getattr(w, "dtype", None),
                        RUNS=runs, GRAD_IS_DZ=bool(args.get("GRAD_IS_DZ", False)),
                        INPUT_ACT=bool(args.get("INPUT_ACT", False)))


def _itemsize(args: dict) -> int:
    dtype = args.get("dtype", torch.bfloat16)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 2


def gemm_dims(name: str, args: dict) -> tuple[int, int, int]:
    """(rows M, columns, reduction channels) of the fwd/dx implicit GEMM of one run."""
    n, h, w = args["N"], args["H"], args["W"]
    if name == "fwd":
        rows = n * (h // 2) * (w // 2) * 4 if args["POOL"] else n * h * w
        return rows, args["COUT"], args["CIN"]
    return n * h * w, args["CIN"], args["COUT"]


def output_tiles(name: str, args: dict, config) -> int:
    """fwd/dx output tiles of one run for a config (the split-K counters: one per tile)."""
    rows, cols, _ = gemm_dims(name, args)
    k = config.kwargs
    return math.ceil(rows / k["BLOCK_M"]) * math.ceil(cols / k["BLOCK_N"])


def split_k_steps(name: str, args: dict, config) -> int:
    """Effective SPLIT_K of a fwd/dx config on a shape: at most one split per (tap, chunk) step, and
    no empty split (S = ceil(KT / ceil(KT / SPLIT_K)) with KT the reduction's steps)."""
    _, _, red = gemm_dims(name, args)
    k = normalized(name, config).kwargs
    steps = args["KS"] ** 2 * math.ceil(red / k["BLOCK_K"])
    return math.ceil(steps / math.ceil(steps / max(1, min(k["SPLIT_K"], steps))))


def split_k_counter_size(runs: int = 1) -> int:
    """int32 counters that any fwd or dx launch of `runs` runs needs for its split-K (left at 0)."""
    return runs * SPLIT_K_MAX_TILES


def dw_split_plan(P: int, splits: int, block_p: int) -> tuple[int, int]:
    """(splits, chunks) of a dW reduction over P pixels asked to run `splits` splits: the
    C = ceil(P / BLOCK_P) pixel chunks are dealt in contiguous ranges of whole chunks, split s taking
    chunks [s*C // splits, (s+1)*C // splits) (sizes differ by at most one chunk); at most C splits,
    so none is empty."""
    chunks = max(1, math.ceil(P / block_p))
    return max(1, min(int(splits), chunks)), chunks


def dw_taps(KS: int, taps: int) -> int:
    """Effective TAPS: 1, or all KS*KS taps of the kernel (9 for a 3x3; a 1x1 has just one)."""
    if taps <= 1 or KS == 1:
        return 1
    if KS != 3:
        raise ValueError(f"conv_block: TAPS={taps} (all taps per dW program) exists for 3x3 kernels only, "
                         f"got a {KS}x{KS} kernel")
    return 9


def dw_tiles(args: dict, config) -> int:
    """dW output tiles of one run: (KS*KS / TAPS tap groups) x Cin blocks x Cout blocks."""
    k = config.kwargs
    taps = dw_taps(args["KS"], k.get("TAPS", 1))
    return (args["KS"] ** 2 // taps) * math.ceil(args["CIN"] / k["BLOCK_CI"]) * math.ceil(args["COUT"] / k["BLOCK_CO"])


def dw_counters_needed(args: dict, config) -> int:
    """int32 counters of one run's dW launch: one per tile, plus one per (tile, group) when split."""
    k = normalized("dw", config).kwargs
    splits, _ = dw_split_plan(args["N"] * args["H"] * args["W"], k["SPLITS"], k["BLOCK_P"])
    if splits == 1:
        return 0
    groups = math.ceil(splits / k["REDUCE_GROUP"]) if k["REDUCE_GROUP"] > 0 else 1
    return dw_tiles(args, config) * (1 + groups)


def dw_counter_size(KS, CIN, COUT, runs: int = 1) -> int:
    """int32 counters that a dW launch of this layer needs for any config `choose_config` returns
    (tiles of at least MIN_DW_TILE channels: 2 per tile for a one-group reduction, plus
    DW_GROUP_COUNTERS for the groups of a two-level one); left at zero by every launch."""
    tiles = KS * KS * math.ceil(CIN / MIN_DW_TILE) * math.ceil(COUT / MIN_DW_TILE)
    return runs * (2 * tiles + DW_GROUP_COUNTERS)


def dw_heuristic_splits(P, KS, CIN, COUT, block_p=256):
    """The fallback's pixel splits of the dW reduction: enough programs to fill an H100 (~2 waves of
    132 SMs at 64x64 tiles), each split at least 4 chunks of 256 pixels."""
    if P == 0:
        return 1
    tiles = KS * KS * math.ceil(CIN / 64) * math.ceil(COUT / 64)
    max_splits = max(1, P // (4 * 256))
    return max(1, min(max_splits, math.ceil(2 * _SMS / tiles)))


def reduce_group(splits: int, tiles: int = 1, counters: int | None = None) -> int:
    """Partials per group of the two-level dW reduction: ~sqrt(splits), so neither level sums more
    than ~2 sqrt(splits) tiles serially (128 splits: groups of 12, 11 groups); one level up to 8.
    With `counters` (what `dw_counter_size` gives one run) the groups of the `tiles` tiles are
    capped so that their counters fit (tiles * (1 + groups) <= counters)."""
    group = splits if splits <= 8 else math.ceil(math.sqrt(splits))
    if counters is not None:
        max_groups = max(1, counters // max(1, tiles) - 1)
        group = max(group, math.ceil(splits / max_groups))
    return group


def _dw_config(args, ci, co, p, warps, stages, taps, splits):
    """A dW config with `reduce_group`'s groups for this shape, its counters within `dw_counter_size`."""
    cfg = dwc(ci, co, p, warps, stages, taps, splits, 0)
    splits, _ = dw_split_plan(args["N"] * args["H"] * args["W"], splits, p)
    tiles = dw_tiles(args, cfg)
    group = reduce_group(splits, tiles, dw_counter_size(args["KS"], args["CIN"], args["COUT"]))
    return dwc(ci, co, p, warps, stages, taps, splits, group)


# ------------------------------------------------------------------------------------------------
# Candidates, the fallback heuristic, shared memory
# ------------------------------------------------------------------------------------------------


def _pow2_at_least_16(v):
    return max(16, 1 << max(0, int(v) - 1).bit_length())


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _narrow_enough(name, args, config) -> bool:
    """No tile more than twice the (16-rounded) channels it covers: wider ones only add masked lanes."""
    k = config.kwargs
    if name == "dw":
        return (k["BLOCK_CI"] <= 2 * _pow2_at_least_16(args["CIN"])
                and k["BLOCK_CO"] <= 2 * _pow2_at_least_16(args["COUT"]))
    _, cols, red = gemm_dims(name, args)
    return k["BLOCK_N"] <= 2 * _pow2_at_least_16(cols) and k["BLOCK_K"] <= 2 * _pow2_at_least_16(red)


def _sms(gpu) -> int:
    try:
        from . import cost
        return int(_gpu_field(cost.GPUS[gpu], "sms"))
    except Exception:  # no model, or an unknown GPU: the H100's count
        return _SMS


def _gpu_field(spec, name):
    return spec[name] if isinstance(spec, dict) else getattr(spec, name)


def _prune_mnk(n_name, k_name):
    """Triton-autotune-style pruner of a fwd/dx list by the channels (kept for callers of the
    former autotune lists, e.g. bench/model_old_engine.py): tiles at most twice the channels."""
    def prune(configs, named_args, **kwargs):
        cap_n = 2 * _pow2_at_least_16(named_args[n_name])
        cap_k = 2 * _pow2_at_least_16(named_args[k_name])
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_K"] <= cap_k]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return prune


def _prune_dw(configs, named_args, **kwargs):
    """As `_prune_mnk` for dW lists (tiles at most twice Cin / Cout)."""
    cap_i, cap_o = 2 * _pow2_at_least_16(named_args["CIN"]), 2 * _pow2_at_least_16(named_args["COUT"])
    kept = [c for c in configs if c.kwargs["BLOCK_CI"] <= cap_i and c.kwargs["BLOCK_CO"] <= cap_o]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_CI"] * c.kwargs["BLOCK_CO"])]


def candidates(name: str, args: dict, gpu: str | None = None, narrow: bool = True) -> list:
    """Every config worth modelling for one launch: the tile lists pruned to the channel counts
    (narrow=False: not pruned, the fallback where no pruned candidate fits the GPU), with fwd/dx
    split-K variants (>= 64-row tiles, launches of at most SPLIT_K_MAX_TILES tiles, >= 2 K steps per
    split) and dW pixel-split counts that fill whole waves of the GPU's SMs (j * SMs / tiles programs
    per tile, j = 1..8, and powers of two), each with `reduce_group`'s groups."""
    args = shape_of(name, args)
    out = []
    if name != "dw":
        base = [c for c in FWD_CONFIGS if not narrow or _narrow_enough(name, args, c)] or [
            min(FWD_CONFIGS, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
        for c in base:
            out.append(c)
            k = c.kwargs
            if k["BLOCK_M"] < 64 or output_tiles(name, args, c) > SPLIT_K_MAX_TILES:
                continue
            _, _, red = gemm_dims(name, args)
            steps = args["KS"] ** 2 * math.ceil(red / k["BLOCK_K"])
            for s in SPLIT_K_VALUES:
                if 2 * s <= steps:
                    out.append(mnk(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages, s))
        return out
    P = args["N"] * args["H"] * args["W"]
    sms = _sms(gpu)
    bound = dw_counter_size(args["KS"], args["CIN"], args["COUT"])
    base = [c for c in DW_CONFIGS if (not narrow or _narrow_enough(name, args, c))
            and not (c.kwargs["TAPS"] > 1 and args["KS"] != 3)] or [
        min(DW_CONFIGS, key=lambda c: c.kwargs["BLOCK_CI"] * c.kwargs["BLOCK_CO"])]
    for c in base:
        k = c.kwargs
        tiles = dw_tiles(args, c) * args.get("RUNS", 1)
        max_splits = min(MAX_DW_SPLITS, max(1, math.ceil(P / k["BLOCK_P"]) // 2))  # >= 2 chunks each
        wanted = {1} | {max(1, j * sms // tiles) for j in range(1, 9)} | {2 ** i for i in range(11)}
        seen = set()
        for s in sorted(wanted):
            s_eff, _ = dw_split_plan(P, min(s, max_splits), k["BLOCK_P"])
            if s_eff in seen:
                continue
            seen.add(s_eff)
            cfg = _dw_config(args, k["BLOCK_CI"], k["BLOCK_CO"], k["BLOCK_P"], c.num_warps, c.num_stages,
                             k["TAPS"], s_eff)
            if dw_counters_needed(args, cfg) <= bound:
                out.append(cfg)
    return out


def heuristic_config(name: str, args: dict, gpu: str | None = None):
    """A config from the shape alone: the fallback where neither a table nor the cost model can
    answer. fwd/dx: the N and K tiles cover the channels (16..128 and 16..64: no wasted lanes on
    the narrow layers), the M tile is the largest of 128/64/32 that still gives ~2 waves of programs
    (ANCHORS.md: 256->512 at 4x4 lost to cuDNN with one wave), 8 warps for 128x128 tiles, no split.
    dw: channel tiles up to 64, 128-pixel chunks, one tap per program, `dw_heuristic_splits`.
    gpu (a cost.GPUS key): the same rule as the model's picks (`fits_gpu`: shared memory as
    allocated within the GPU's limit, no bf16 spills on its arch); where the shape's config does not
    fit, the first candidate (`candidates`, pruned to the channels, then not) that does."""
    config = _shape_heuristic(name, shape_of(name, args))
    if gpu is None or fits_gpu(name, args, config, gpu) is not False:
        return config
    for narrow in (True, False):
        for c in candidates(name, args, gpu, narrow):
            if fits_gpu(name, args, c, gpu):
                return c
    return config  # nothing in the lists fits either


def fits_gpu(name: str, args: dict, config, gpu: str) -> bool | None:
    """cost.fits for a launch (`launch_shape`'s dict) on a cost.GPUS key: shared memory as Triton
    allocates it within the per-block limit and, in bf16, no register spills measured for (or
    expected on) the GPU's arch; None when the model is unavailable or does not know the GPU."""
    try:
        from . import cost
    except ImportError:
        return None
    if gpu not in getattr(cost, "GPUS", {}):
        return None
    shape = cost.conv_shape(name, shape_of(name, args))
    return cost.fits(name, config, shape.itemsize, gpu, cost.reshape_epilogue(name, shape))


def _shape_heuristic(name: str, args: dict):
    """`heuristic_config`'s rule from the shape alone (no GPU)."""
    elsize = _itemsize(args)
    if name == "dw":
        ci = min(64, max(16, _next_pow2(args["CIN"])))
        co = min(64, max(16, _next_pow2(args["COUT"])))
        stages = 3
        while stages > 2 and stages * 128 * (ci + co) * elsize > _SMEM_BUDGET:
            stages -= 1
        splits = dw_heuristic_splits(args["N"] * args["H"] * args["W"], args["KS"], args["CIN"], args["COUT"])
        return _dw_config(args, ci, co, 128, 8 if ci * co >= 64 * 64 else 4, stages, 1, splits)
    rows, n_dim, k_dim = gemm_dims(name, args)
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
    return mnk(bm, bn, bk, 8 if big else 4, stages)


def smem_bytes(name: str, config, itemsize: int) -> int:
    """Shared memory of a config's pipelined A and B tiles (first order; Triton allocates more, see
    acai_fast.ops.cost.smem_estimate). dW with TAPS = 9: 9 input tiles per stage."""
    k = normalized(name, config).kwargs
    if name == "dw":
        taps = k["TAPS"] if k["TAPS"] > 1 else 1
        return config.num_stages * (k["BLOCK_P"] * (taps * k["BLOCK_CI"] + k["BLOCK_CO"])) * itemsize
    return config.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * itemsize


# ------------------------------------------------------------------------------------------------
# Tables, the model, autotuning: choose_config
# ------------------------------------------------------------------------------------------------


def shape_key(name: str, args: dict) -> str:
    """The table key of one launch: kernel, compute dtype, shape and flags (and the runs of an array)."""
    args = shape_of(name, args)
    dtype = str(args.get("dtype", torch.bfloat16)).replace("torch.", "")
    fields = [name, dtype] + [f"{k}={int(args[k])}" for k in KEY_FIELDS]
    if args.get("RUNS", 1) > 1:
        fields.append(f"RUNS={int(args['RUNS'])}")
    return "|".join(fields)


@functools.lru_cache(maxsize=None)
def tuned_table(arch: str) -> dict:
    """The shipped table of tuned configs for a GPU architecture ("sm90"): {key: config dict}; {}
    when there is none. Read once (package data, never written at run time)."""
    path = TUNED_DIR / f"{arch}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


def gpu_of(device) -> str | None:
    """The cost.GPUS key of a CUDA device ("a100", "h100", "h200"), from its name, else from its
    compute capability (8.0 -> a100, 9.x -> h100); None for other GPUs."""
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return {(8, 0): "a100", (9, 0): "h100"}.get(tuple(torch.cuda.get_device_capability(device)))


def gpu_key(gpu) -> str:
    """A cost.GPUS key from a key ("H100" too) or a cost.GPU; ValueError for others."""
    if not isinstance(gpu, str):
        try:
            from . import cost
            gpu = next(k for k, v in cost.GPUS.items() if v == gpu)
        except (ImportError, StopIteration):
            raise ValueError(f"conv_block: unknown gpu {gpu!r}; known: {', '.join(GPU_ARCH)}") from None
    if gpu.lower() not in GPU_ARCH:
        raise ValueError(f"conv_block: unknown gpu {gpu!r}; known: {', '.join(GPU_ARCH)}")
    return gpu.lower()


def _arch(device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _device_target(device) -> tuple:
    """(cost.GPUS key or None, architecture) of a device, asked of the driver once per device."""
    return gpu_of(device), _arch(device)


def from_entry(name: str, entry: dict):
    """A table entry {BLOCK_*, SPLIT_K | TAPS/SPLITS/REDUCE_GROUP, num_warps, num_stages} as a config."""
    kwargs = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
    return normalized(name, _cfg(kwargs, entry["num_warps"], entry["num_stages"]))


def to_entry(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _interpreter_config(name: str, args: dict):
    if name != "dw":
        return _INTERPRET_CONFIGS[name]
    k = INTERPRET_DW_CONFIG.kwargs
    splits = dw_heuristic_splits(args["N"] * args["H"] * args["W"], args["KS"], args["CIN"], args["COUT"],
                                 k["BLOCK_P"])
    return _dw_config(args, k["BLOCK_CI"], k["BLOCK_CO"], k["BLOCK_P"], INTERPRET_DW_CONFIG.num_warps,
                      INTERPRET_DW_CONFIG.num_stages, 1, splits)


def model_config(name: str, args: dict, gpu: str):
    """The cost model's fastest candidate that fits `gpu` (the candidates pruned to the channels;
    where none of them fits, the unpruned lists), or None when the model is unavailable (no
    acai_fast.ops.cost, or a GPU it does not know) or nothing in the lists fits."""
    try:
        from . import cost
    except ImportError:
        return None
    if gpu not in getattr(cost, "GPUS", {}):
        return None
    args = shape_of(name, args)
    best = cost.best_config(name, args, candidates(name, args, gpu), gpu)
    if best is None:  # every tile pruned to the channels spills or is over the limit: the whole lists
        best = cost.best_config(name, args, candidates(name, args, gpu, narrow=False), gpu)
    return normalized(name, best) if best is not None else None


def choose_config(name: str, args: dict, device=None, gpu: str | None = None):
    """(config, source) for a launch without an explicit config; source is "interpreter",
    "autotune" (config None: the launcher times the candidates, see `autotune`), "table", "model"
    or "heuristic".

    args: `launch_shape`'s dict. gpu: a cost.GPUS key ("a100", "h100", "h200") to ask which config
    that GPU would get, on any machine (a CPU included: the profile and the compile check use it);
    None: the GPU of `device`. With gpu given, the interpreter and autotuning are not consulted.
    """
    args = shape_of(name, args)
    if gpu is None:
        if INTERPRET:
            return _interpreter_config(name, args), "interpreter"
        if AUTOTUNE:
            return None, "autotune"
        gpu, arch = _device_target(device)
    else:
        gpu = gpu_key(gpu)
        arch = GPU_ARCH[gpu]
    return _choose_for_gpu(name, shape_key(name, args), _frozen(args), gpu, arch)


def _frozen(args: dict):
    return tuple(sorted(args.items()))


@functools.lru_cache(maxsize=4096)
def _choose_for_gpu(name, key, frozen_args, gpu, arch):
    """Cached: the same launch shape on the same GPU always gets the same config (and a step's ~60
    launches do not rerun the model each time)."""
    entry = tuned_table(arch).get(key)
    if entry is not None:
        return from_entry(name, entry), "table"
    args = dict(frozen_args)
    if gpu is not None:
        best = model_config(name, args, gpu)
        if best is not None:
            return best, "model"
    return heuristic_config(name, args, gpu), "heuristic"


AUTOTUNED: dict = {}  # shape key -> the config `autotune` timed fastest in this process


def autotune(name: str, args: dict, run, device) -> object:
    """ACAI_FAST_AUTOTUNE=1: time every candidate of this launch on this GPU (triton.testing.do_bench
    of `run(config)`, which launches the whole planned launch) and keep the fastest per shape key in
    AUTOTUNED (bench/tune.py writes them to the table). Candidates that fail to compile or launch
    (out of shared memory) are skipped."""
    key = shape_key(name, args)
    if key not in AUTOTUNED:
        best = None
        for c in candidates(name, args, gpu_of(device)):
            try:
                t = triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - e.g. triton's OutOfResources for this GPU
                continue
            if best is None or t < best[0]:
                best = (t, c)
        AUTOTUNED[key] = best[1] if best is not None else heuristic_config(name, args)
    return AUTOTUNED[key]
