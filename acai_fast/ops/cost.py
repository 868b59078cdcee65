"""cost: a model of what one kernel launch costs on a given GPU, for choosing kernel configs and for
explaining a step's profile without a GPU (`acai-fast profile --model h100`).

From a launch's shapes and config: FLOPs issued (tile padding included) and useful, the minimum HBM
bytes, the L2 traffic of the implicit GEMMs, CTAs against co-resident slots (shared memory as Triton
allocates it, registers, warps), waves, split-reduction tails and the per-launch gap; the time is
gap + fixed + the largest of (K-loop latency chain, tensor-core time, L2 time, HBM time) + tail.
Four constants are fitted to measured H100 numbers (ANCHORS below); everything else is GPU data or a
stated assumption. A model, not a measurement: it ranks configs and points at bottlenecks; it does
not replace a profile on a GPU (see MODEL_TO_WALL).

Units everywhere: time in microseconds (us), sizes in bytes (B), work in FLOPs, bandwidth in
bytes per second. Nothing here imports the kernels (conv_block imports this module). The GPUs as
data, and what fits on them (shared memory, registers, spills), are in gpus.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

# The GPUs and what fits on them live in gpus.py; cost re-exports them (cost.GPUS, cost.fits, ...).
from .gpus import (GPU, GPUS, KINDS, KNOWN_SPILLS, SMEM_RESERVED, SPILL_LIMIT, STATIC_SMEM, config_dict,  # noqa: F401
                   ctas_per_sm, describe_config, fits, get_gpu, gpu_for_device, measured_spills,
                   register_elements, registers_per_thread, smem_estimate, spill_key, spills)

# ------------------------------------------------------------------------------------------------
# Constants: fitted (FIT) and assumed
# ------------------------------------------------------------------------------------------------

LAUNCH_GAP_US = 1.0  # a trivial kernel inside a CUDA graph costs ~1.0 us (ANCHORS.md, H100): the gap
                     # between dependent kernels, paid by every launch of a step


@dataclasses.dataclass(frozen=True)
class Constants:
    """The fitted constants of the GEMM-launch model (see `fit_constants`).

    step_us: one pipelined K step of an implicit-GEMM program (wait for its A/B tiles, one MMA):
        the latency chain of a program is k_steps * step_us, overlapped across co-resident programs;
    fixed_us: per launch beyond the gap: prologue, epilogue stores, the ramp of the first wave;
    l2_eff: the fraction of the GPU's nominal L2 bandwidth that the gathers of an implicit GEMM get;
    mma_eff: the fraction of the tensor-core peak one SM's MMAs reach in these kernels."""
    step_us: float
    fixed_us: float
    l2_eff: float
    mma_eff: float


# FIT: `fit_constants()` (ANCHOR_CANDIDATES) on ANCHOR_CONV_FWD_H100, rounded (from several starts
# the search lands on step 0.25-0.27 us, fixed 2.8-3.1 us, l2_eff 0.50-0.52, mma_eff 0.62-0.64):
# rms error 1.06x, every row within 0.86x-1.09x (tests/test_cost.py re-runs the fit and pins these).
# Read: a conv launch costs ~4 us before any work (1.0 gap + 3.0 fixed); the L2 streams ~5.2 TB/s
# of gathers (0.52 x 10.1 TB/s nominal); MMAs reach ~63% of the bf16 peak (~620 TFLOP/s).
FIT = Constants(step_us=0.26, fixed_us=3.0, l2_eff=0.52, mma_eff=0.63)

# Assumptions (no anchor measures them; stated so they can be replaced by measurements):
HBM_EFF = 0.85            # streaming kernels reach ~85% of the datasheet HBM bandwidth
CTA_STREAM_BW = 50e9      # B/s one program streams on its own (Little's law: ~32 KB in flight per
                          # program / ~0.6 us latency): bounds launches with few programs (Adam, probe)
MEM_LATENCY_US = 0.5      # one dependent HBM round trip (~1000 cycles at 2 GHz incl. address math):
                          # the floor of one grid-stride iteration of a streaming kernel
REDUCE_STEP_US = 0.2      # one step of a serial split reduction: the last program loads one more
                          # fp32 partial tile from L2 (~300 cycles round trip) and adds it

# Model-to-wall factor: this model applied to the engine measured on an H100 (commit 1aa7db1: 2.04 /
# 4.47 / 46.4 ms per step for lines b64 / cifar1024 b64 / b1024, ANCHORS.md), its trace costed by
# bench/model_old_engine.py (conv configs: the model's best of that engine's autotuned lists), gives
# 1.58 / 3.19 / 33.0 ms: 0.78 / 0.71 / 0.71 of the measured step. The model leaves out what a real
# step also pays (graph-replay overheads, clock ramps, cache misses, imperfect overlap).
# Wall time ~ modelled time / MODEL_TO_WALL. (An independent model of the same kind, ANCHORS.md,
# found 0.65 / 0.59 / 0.59 for its own, ~1.2x smaller, numbers.)
MODEL_TO_WALL = 0.73


# ------------------------------------------------------------------------------------------------
# Conv launches (acai_fast.ops.conv_block): shapes and the model
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One conv-block kernel launch, as its arguments say (see conv_block's kernels).

    N: images of the launch (fwd: input images; dx: gradient images NG; dw: saved images NS);
    H, W: the conv's resolution (after the 2x upsample when UPSAMPLE); CIN, COUT, KS: the weight;
    flags as the kernels' constexprs (GRAD_IS_DZ, dx/dW: the gradient read is dL/dz already, no sign
    beside it; INPUT_ACT, dx: the epilogue reads x once per output element for the derivative of
    the previous block's leaky ReLU); runs: models of an array (grid axis 1);
    itemsize: the compute dtype (activations, gradients, y); x_itemsize: the block input x as read
    (an fp32 image batch feeding bf16 layers: 4); w_itemsize: the weight as read (fp32 master
    weights: 4; a bf16 copy: 2); pix_per_split, reduce_group: dw's pixels per split and partials per
    group of its two-level reduction when the launch says (a config's SPLITS / REDUCE_GROUP win)."""
    N: int
    H: int
    W: int
    CIN: int
    COUT: int
    KS: int = 3
    UPSAMPLE: bool = False
    POOL: bool = False
    ACT: bool = True
    SIGN_FROM_OUT: bool = False
    SAVE_SIGN: bool = False
    GRAD_IS_DZ: bool = False
    INPUT_ACT: bool = False
    HAS_BIAS: bool = True
    NEED_DB: bool = True
    runs: int = 1
    itemsize: int = 2
    x_itemsize: int = 2
    w_itemsize: int = 4
    pix_per_split: int | None = None
    reduce_group: int | None = None

    @property
    def HO(self) -> int:
        return self.H // 2 if self.POOL else self.H

    @property
    def WO(self) -> int:
        return self.W // 2 if self.POOL else self.W

    @property
    def HX(self) -> int:
        return self.H // 2 if self.UPSAMPLE else self.H

    @property
    def WX(self) -> int:
        return self.W // 2 if self.UPSAMPLE else self.W

    def label(self) -> str:
        flags = "".join(f" {f}" for f, on in (("up", self.UPSAMPLE), ("pool", self.POOL), ("dz-in", self.GRAD_IS_DZ),
                                              ("dz-out", self.INPUT_ACT)) if on)
        runs = f" x{self.runs} runs" if self.runs > 1 else ""
        return f"N{self.N} {self.H}x{self.W} {self.CIN}->{self.COUT} k{self.KS}{flags}{runs}"


def _itemsize(t, default=2) -> int:
    if t is None:
        return default
    size = getattr(t, "element_size", None)
    return int(size()) if callable(size) else default


def _dtype_size(dtype, default=2) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size else default


def conv_shape(kind: str, args: dict) -> ConvShape:
    """The ConvShape of a conv_block launch from either
    - the kernel's named arguments (tensors or anything with .shape / .element_size(), and its
      constexprs; acai_fast.engine.launches records them), or
    - a launch-shape dict {N, H, W, CIN, COUT, KS, UPSAMPLE, ACT, POOL, dtype, weight_dtype, RUNS}
      (conv_block's `launch_shape`): the sign of z then comes from y where it can (no pool: the
      kernels' rule for slope >= 0), the input x is read in the compute dtype, and a dW launch's
      split count comes from its config (SPLITS).
    A ConvShape is returned as is."""
    if isinstance(args, ConvShape):
        return args
    if kind not in KINDS:
        raise ValueError(f"cost: unknown conv kernel kind {kind!r}; valid: {', '.join(KINDS)}")
    act = bool(args.get("ACT", True))
    if "Y_ptr" not in args and "G_ptr" not in args:  # a launch-shape dict
        pool = bool(args.get("POOL", False))
        isz = _dtype_size(args.get("dtype"))
        return ConvShape(
            N=int(args["N"]), H=int(args["H"]), W=int(args["W"]), CIN=int(args["CIN"]), COUT=int(args["COUT"]),
            KS=int(args.get("KS", 3)), UPSAMPLE=bool(args.get("UPSAMPLE", False)), POOL=pool, ACT=act,
            SIGN_FROM_OUT=act and not pool, SAVE_SIGN=kind == "fwd" and act and pool,
            GRAD_IS_DZ=kind != "fwd" and bool(args.get("GRAD_IS_DZ", False)),
            INPUT_ACT=kind == "dx" and bool(args.get("INPUT_ACT", False)), runs=int(args.get("RUNS", 1)),
            itemsize=isz, x_itemsize=isz, w_itemsize=_dtype_size(args.get("weight_dtype"), isz),
            reduce_group=None)
    if kind == "fwd":
        y = args.get("Y_ptr")
        x, w, runs_t = args.get("X_ptr"), args.get("W_ptr"), y
        itemsize = _itemsize(y)
        sign_from_out = False
    else:
        g = args.get("G_ptr")
        x = args.get("X_ptr") if kind == "dw" else args.get("DX_ptr")
        w = args.get("W_ptr") if kind == "dx" else None
        runs_t = g
        itemsize = _itemsize(g)
        sign_from_out = bool(args.get("SIGN_FROM_OUT", False))
    shape = getattr(runs_t, "shape", None)
    runs = int(shape[0]) if shape is not None and len(shape) == 5 else 1
    pps = args.get("PIX_PER_SPLIT")
    group = args.get("REDUCE_GROUP")
    return ConvShape(
        N=int(args["N"]), H=int(args["H"]), W=int(args["W"]), CIN=int(args["CIN"]), COUT=int(args["COUT"]),
        KS=int(args.get("KS", 3)), UPSAMPLE=bool(args.get("UPSAMPLE", False)), POOL=bool(args.get("POOL", False)),
        ACT=act, SIGN_FROM_OUT=sign_from_out, SAVE_SIGN=bool(args.get("SAVE_SIGN", False)),
        GRAD_IS_DZ=kind != "fwd" and bool(args.get("GRAD_IS_DZ", False)),
        INPUT_ACT=kind == "dx" and bool(args.get("INPUT_ACT", False)),
        HAS_BIAS=bool(args.get("HAS_BIAS", True)), NEED_DB=bool(args.get("NEED_DB", True)), runs=runs,
        itemsize=itemsize, x_itemsize=_itemsize(x, itemsize), w_itemsize=_itemsize(w, 4) if w is not None else 4,
        pix_per_split=int(pps) if pps is not None else None, reduce_group=int(group) if group is not None else None)


def reshape_epilogue(kind: str, shape: ConvShape) -> bool:
    """The launch's epilogue sums 2x2 windows of its fp32 tile (fwd with POOL, dx with UPSAMPLE),
    which takes more shared memory (see smem_estimate)."""
    return (kind == "fwd" and shape.POOL) or (kind == "dx" and shape.UPSAMPLE)


@dataclasses.dataclass
class LaunchCost:
    """The modelled cost of one launch. Times in us; `terms` holds every component:
    launch (gap + fixed), latency (the K-loop chain over the waves), compute (tensor cores or FMA),
    l2, hbm, tail (serial split reductions); `bound` names the largest of them."""
    kind: str
    ctas: int
    slots: int                # co-resident programs the GPU holds at once (SMs x programs per SM)
    waves: float              # ctas / slots (the last wave is partial when not an integer)
    flops: float              # issued, tile padding included
    useful_flops: float
    hbm_bytes: float          # minimum: every input read once, every output written once
    l2_bytes: float           # loads and stores of all programs (re-gathers included)
    smem: int                 # shared memory per program, as allocated (0: not a tiled kernel)
    time_us: float
    bound: str
    terms: dict
    config: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bound(terms: dict) -> str:
    """The term that sets the time: 'launch' when gap + fixed outweighs the rest."""
    body = {k: v for k, v in terms.items() if k not in ("launch", "tail")}
    main = max(body.values()) if body else 0.0
    if terms.get("tail", 0.0) > main and terms.get("tail", 0.0) >= terms["launch"]:
        return "tail"
    if terms["launch"] >= main + terms.get("tail", 0.0):
        return "launch"
    return max(body, key=body.get)


def _finish(kind, ctas, slots, flops, useful, hbm, l2, smem, terms, config="") -> LaunchCost:
    body = max(v for k, v in terms.items() if k not in ("launch", "tail"))
    time = terms["launch"] + body + terms.get("tail", 0.0)
    waves = ctas / slots if slots else float("inf")
    return LaunchCost(kind, int(ctas), int(slots), waves, float(flops), float(useful), float(hbm), float(l2),
                      int(smem), time, _bound(terms), {k: round(v, 4) for k, v in terms.items()}, config)


def conv_cost(kind: str, shape, config, gpu=None, constants: Constants = FIT) -> LaunchCost:
    """The modelled cost of one conv_block launch ("fwd", "dx" or "dw") with `config` on `gpu`.

    fwd/dx (implicit GEMM, rows = pixels, columns = Cout (fwd) / Cin (dx), reduction over
    KS*KS taps x the other channel count in BLOCK_K chunks; SPLIT_K = S cuts the tap x chunk loop
    into S ranges, fp32 partial tiles, the last program of each tile sums them in order):
      CTAs = ceil(M/BM) * ceil(Nc/BN) * S * runs; each does ceil(KS^2 ceil(Kc/BK) / S) K steps;
      L2 = A re-gathered per tap by every column tile + B (the weights, w_itemsize) re-streamed by
           every row tile + the outputs (+ the partials, written and read once, when S > 1);
      HBM = input, weights, outputs once.
      dx's A element is dz, rebuilt from G and the sign of z (itemsize + the sign's bytes: y's
      itemsize, or 1 for the int8 map) unless GRAD_IS_DZ (G is dz: itemsize alone); INPUT_ACT
      adds one read of x per output element (the epilogue's derivative of the input's activation).
    dw (reduction over the P = N*H*W pixels; one program per (tap group, Cin tile, Cout tile,
    split); TAPS = KS^2 loads dz once per pixel chunk for all taps; SPLITS pixel splits, today
    from the launch's PIX_PER_SPLIT; REDUCE_GROUP: two-level sum of the partials):
      CTAs = KS^2/TAPS * ceil(Cin/BCI) * ceil(Cout/BCO) * runs * splits;
      L2 = dz (G and the sign; G alone with GRAD_IS_DZ) re-read by every (tap group, Cin tile) + u
           re-read per tap by every Cout tile + the partials.
    time = gap + fixed + max(latency, compute, L2, HBM) + tail, where latency = ceil(waves) * K
    steps per program * step_us; compute = the busiest SM's issued FLOPs at mma_eff of its peak
    share (fp32 compute dtypes: the FMA peak); tail = the serial sum of the partials by the last
    program: splits * max(REDUCE_STEP_US, one partial tile at one SM's L2 bandwidth)."""
    gpu = get_gpu(gpu)
    s = conv_shape(kind, shape)
    c = config_dict(config)
    isz, xsz, wsz, R, KK = s.itemsize, s.x_itemsize, s.w_itemsize, s.runs, s.KS * s.KS
    reshape = reshape_epilogue(kind, s)
    smem = smem_estimate(kind, c, isz, reshape)
    per_sm = ctas_per_sm(kind, c, isz, gpu, reshape, s)
    slots = gpu.sms * per_sm
    peak = gpu.bf16_flops if isz <= 2 else gpu.fp32_flops
    sm_flops = peak / gpu.sms * constants.mma_eff
    # bytes of the sign of z per gathered gradient element (none when the gradient is dz already)
    sign_size = (isz if s.SIGN_FROM_OUT else 1) if s.ACT and not s.GRAD_IS_DZ else 0
    weight_bytes = R * KK * s.CIN * s.COUT * wsz
    tail = 0.0

    if kind in ("fwd", "dx"):
        BM, BN, BK = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split = max(1, c.get("SPLIT_K", 1) or 1)
        if kind == "fwd":
            M = s.N * s.HO * s.WO * 4 if s.POOL else s.N * s.H * s.W
            ncols, kc = s.COUT, s.CIN
            a_bytes_per_elem = xsz                              # x gathered per tap
            hbm = (R * s.N * s.HX * s.WX * s.CIN * xsz + weight_bytes + R * s.COUT * 4 * s.HAS_BIAS
                   + R * s.N * s.HO * s.WO * s.COUT * isz + R * s.N * s.H * s.W * s.COUT * s.SAVE_SIGN)
            out_bytes = R * s.N * s.HO * s.WO * s.COUT * isz + R * s.N * s.H * s.W * s.COUT * s.SAVE_SIGN
        else:
            M = s.N * s.H * s.W
            ncols, kc = s.CIN, s.COUT
            a_bytes_per_elem = isz + sign_size                  # dz rebuilt from G and the sign per tap
            ns = s.N  # the saved images may be fewer (NS); the sign map is at most the gradient's size
            dx_elems = R * s.N * s.HX * s.WX * s.CIN
            x_act = dx_elems * xsz * s.INPUT_ACT  # the epilogue's read of x, once per output element
            hbm = (R * s.N * s.HO * s.WO * s.COUT * isz + R * ns * s.H * s.W * s.COUT * sign_size
                   + weight_bytes + dx_elems * xsz + x_act)
            out_bytes = dx_elems * xsz + x_act
        tiles_m, tiles_n = -(-M // BM), -(-ncols // BN)
        k_steps = KK * -(-kc // BK)
        k_per = -(-k_steps // split)
        split = -(-k_steps // k_per)  # ranges actually non-empty
        chain = k_per
        ctas = tiles_m * tiles_n * split * R
        flops = 2.0 * BM * BN * BK * k_steps * tiles_m * tiles_n * R
        useful = 2.0 * M * ncols * KK * kc * R
        l2 = (tiles_n * R * KK * M * kc * a_bytes_per_elem      # A: every column tile gathers every tap
              + tiles_m * weight_bytes                          # B: every row tile streams the weights
              + out_bytes)
        if split > 1:
            partials = tiles_m * tiles_n * split * R * BM * BN * 4
            l2 += 2 * partials
            tail = split * max(REDUCE_STEP_US, BM * BN * 4 / gpu.sm_l2_bw * 1e6)
        step_flops = 2.0 * BM * BN * BK
    elif kind == "dw":
        BCI, BCO, BP = c["BLOCK_CI"], c["BLOCK_CO"], c["BLOCK_P"]
        taps = c.get("TAPS", 1) or 1
        if taps not in (1, KK) and KK > 1:
            raise ValueError(f"cost: TAPS={taps} must be 1 or KS*KS={KK}")
        taps = KK if taps > 1 else 1  # all taps per program (a 1x1 kernel has one), as conv_block runs it
        P = s.N * s.H * s.W
        if c.get("SPLITS"):  # conv_configs.dw_split_plan: the chunks dealt in whole-chunk ranges
            total_chunks = max(1, -(-P // BP))
            splits = min(int(c["SPLITS"]), total_chunks)
            pps = -(-total_chunks // splits) * BP  # the busiest split's pixels
        else:
            pps = s.pix_per_split or P
            splits = -(-P // pps)
        group = c.get("REDUCE_GROUP") or s.reduce_group or 0
        ci_tiles, co_tiles = -(-s.CIN // BCI), -(-s.COUT // BCO)
        tap_programs = KK // taps
        chunks = -(-pps // BP)
        ctas = tap_programs * ci_tiles * co_tiles * R * splits
        k_per = chunks * taps
        # the latency chain is one step per pixel chunk: a chunk's dz tile and its TAPS shifted u
        # tiles are loaded together (the pipeliner prefetches them as one iteration's loads), and its
        # TAPS independent dots are issue time (the compute term), not TAPS dependent waits
        chain = chunks
        flops = 2.0 * BCI * BCO * BP * taps * tap_programs * ci_tiles * co_tiles * R * splits * chunks
        useful = 2.0 * P * s.CIN * s.COUT * KK * R
        g_elems = P * s.COUT  # dz elements (G read at the pooled position, the sign at full size)
        hbm = (R * s.N * s.HX * s.WX * s.CIN * xsz + R * s.N * s.HO * s.WO * s.COUT * isz
               + R * g_elems * sign_size + R * KK * s.CIN * s.COUT * 4 + R * s.COUT * 4 * s.NEED_DB)
        l2 = (tap_programs * ci_tiles * R * g_elems * (isz + sign_size)   # dz per (tap group, Cin tile)
              + co_tiles * R * KK * P * s.CIN * xsz                        # u per tap, per Cout tile
              + R * KK * s.CIN * s.COUT * 4)                               # dW written
        if splits > 1:
            tile = taps * BCI * BCO * 4
            l2 += 2 * ctas * tile
            step = max(REDUCE_STEP_US, tile / gpu.sm_l2_bw * 1e6)
            if group and group < splits:
                tail = (group + -(-splits // group) + 1) * step  # two levels + one more ticket
            else:
                tail = splits * step
        step_flops = 2.0 * BCI * BCO * BP
    else:
        raise ValueError(f"cost: unknown conv kernel kind {kind!r}; valid: {', '.join(KINDS)}")

    if slots == 0:  # over the per-block shared memory: it would not launch (time inf, bound "no fit")
        cost = _finish(kind, ctas, 0, flops, useful, hbm, l2, smem,
                       dict(launch=LAUNCH_GAP_US + constants.fixed_us, latency=math.inf), describe_config(kind, c))
        cost.bound = "no fit"
        return cost
    waves = math.ceil(ctas / slots)
    busiest = math.ceil(ctas / gpu.sms)  # programs on the busiest SM
    terms = dict(
        launch=LAUNCH_GAP_US + constants.fixed_us,
        latency=waves * chain * constants.step_us,
        compute=busiest * k_per * step_flops / sm_flops * 1e6,
        l2=l2 / (gpu.l2_bw * constants.l2_eff) * 1e6,
        hbm=hbm / (gpu.hbm_bw * HBM_EFF) * 1e6,
        tail=tail)
    return _finish(kind, ctas, slots, flops, useful, hbm, l2, smem, terms, describe_config(kind, c))


def rank_configs(kind: str, shape, candidates: Iterable, gpu=None, constants: Constants = FIT, *,
                 compiled_spills: bool = True) -> list:
    """[(time_us, config, LaunchCost)] for the candidates that fit `gpu` (see `fits`; compiled_spills
    False: spills by the rule only, not by what conv_block's kernels did when compiled), fastest
    first (ties: the earlier candidate)."""
    gpu = get_gpu(gpu)
    s = conv_shape(kind, shape)
    ranked = []
    for i, cand in enumerate(candidates):
        if not fits(kind, cand, s.itemsize, gpu, reshape_epilogue(kind, s), s, compiled=compiled_spills):
            continue
        cost = conv_cost(kind, s, cand, gpu, constants)
        if math.isfinite(cost.time_us):
            ranked.append((cost.time_us, i, cand, cost))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(t, cand, cost) for t, _, cand, cost in ranked]


def best_config(kind: str, shape, candidates: Iterable, gpu=None, constants: Constants = FIT):
    """The modelled fastest of `candidates` (triton.Configs or dicts; returned as given) for a
    conv_block launch of `shape` (a ConvShape or the kernel's named arguments) on `gpu` (a GPU, a
    name in GPUS, or None: the H100), among those that fit: shared memory as Triton allocates it
    (`smem_estimate`) within the GPU's per-block limit and, in bf16/fp16, no expected register
    spills (`spills`). None when no candidate fits."""
    ranked = rank_configs(kind, shape, candidates, gpu, constants)
    return ranked[0][1] if ranked else None


# ------------------------------------------------------------------------------------------------
# Streaming launches: mix, losses, probe, Adam, PyTorch ops (bandwidth + gap)
# ------------------------------------------------------------------------------------------------


def stream_cost(kind: str, bytes_moved: float, ctas: int, gpu=None, *, iters_per_cta: int = 1,
                flops: float = 0.0, serial_us: float = 0.0, tail_us: float = 0.0,
                constants: Constants = FIT) -> LaunchCost:
    """A launch that streams `bytes_moved` through HBM with `ctas` programs: time = gap +
    max(HBM time at min(HBM_EFF x peak, programs x CTA_STREAM_BW), iters_per_cta x MEM_LATENCY_US,
    serial_us (a program's own chain of dependent steps)) + tail_us (a last-program reduction)."""
    gpu = get_gpu(gpu)
    bw = min(gpu.hbm_bw * HBM_EFF, max(1, ctas) * CTA_STREAM_BW)
    terms = dict(launch=LAUNCH_GAP_US, hbm=bytes_moved / bw * 1e6, latency=max(iters_per_cta * MEM_LATENCY_US,
                                                                               serial_us), tail=tail_us)
    slots = gpu.sms * gpu.max_ctas_per_sm
    return _finish(kind, ctas, slots, flops, flops, bytes_moved, bytes_moved, 0, terms)


def mix_cost(n: int, d: int, runs: int = 1, itemsize: int = 2, *, backward: bool = False, block_d: int = 1024,
             gpu=None) -> LaunchCost:
    """mix_fwd (alpha drawn in the kernel) or mix_bwd (accumulating into dz): one program per row
    pair and D chunk. fwd reads z, writes z_mix (2 N D elements); bwd reads g and dz, writes dz (3)."""
    ctas = (n + 1) // 2 * -(-d // block_d) * runs
    moved = (3 if backward else 2) * n * d * itemsize * runs
    return stream_cost("mix_bwd" if backward else "mix_fwd", moved, ctas, gpu,
                       tail_us=0.0 if backward else REDUCE_STEP_US)


def image_loss_cost(m: int, runs: int = 1, itemsize: int = 2, x_itemsize: int = 4, *, ctas: int | None = None,
                    block: int = 1024, gpu=None) -> LaunchCost:
    """image_loss_fwd over M pixels per run: reads x (fp32) and ae, writes d_ae and x_real; the
    last program sums the per-program partials (one vector load)."""
    ctas_per_run = ctas if ctas is not None else min(-(-m // block), 1024)
    iters = -(-m // (block * ctas_per_run))
    moved = m * runs * (x_itemsize + 3 * itemsize)
    return stream_cost("image_loss", moved, ctas_per_run * runs, gpu, iters_per_cta=iters, tail_us=REDUCE_STEP_US)


def critic_loss_cost(n: int, k: int, runs: int = 1, itemsize: int = 2, *, block_n: int | None = None,
                     block_k: int | None = None, gpu=None) -> LaunchCost:
    """critic_loss_fwd on two (N, K) maps per run: reads both, writes three (N, K) gradient maps."""
    block_k = block_k or min(1 << max(0, k - 1).bit_length(), 1024)
    block_n = block_n or max(1, min(1 << max(0, n - 1).bit_length(), 4096 // block_k))
    ctas_per_run = min(-(-n // block_n), 1024)
    iters = -(-n // (block_n * ctas_per_run)) * 2 * -(-k // block_k)
    moved = 5 * n * k * itemsize * runs
    return stream_cost("critic_loss", moved, ctas_per_run * runs, gpu, iters_per_cta=iters, tail_us=REDUCE_STEP_US)


def probe_cost(n: int, d: int, classes: int, runs: int = 1, itemsize: int = 2, *, rows_per_program: int | None = None,
               d_chunk: int | None = None, block_n: int = 32, block_c: int = 16, block_d: int = 64, gpu=None,
               constants: Constants = FIT) -> LaunchCost:
    """probe_loss: logits = z W^T + b, softmax cross-entropy, dW = g^T z, per run, fp32 "ieee" dots
    (FMA units). A program takes rows_per_program rows (default all N: one program per run) in
    BLOCK_N blocks; for each it walks D in BLOCK_D chunks for the logits, then its d_chunk features
    (default all D) for dW: a chain of ceil(rows/BLOCK_N) * (ceil(D/BLOCK_D) + ceil(d_chunk/BLOCK_D))
    dependent steps of step_us each. With several row programs the last one of each feature chunk
    sums their (classes x d_chunk) partials in order (the tail)."""
    gpu = get_gpu(gpu)
    rows = min(n, rows_per_program or n)
    d_chunk = min(d, d_chunk or d)
    row_programs, d_programs = -(-n // rows), -(-d // d_chunk)
    steps = -(-rows // block_n) * (-(-d // block_d) + -(-d_chunk // block_d))
    ctas = row_programs * d_programs * runs
    flops = 2.0 * n * block_c * d * (d_programs + 1) * runs
    moved = runs * (n * d * itemsize * d_programs + 2 * classes * d * 4 + n * 8)
    sm_fp32 = gpu.fp32_flops / gpu.sms
    serial = max(steps * constants.step_us, flops / ctas / sm_fp32 * 1e6)
    tail = row_programs * max(REDUCE_STEP_US, classes * d_chunk * 4 / gpu.sm_l2_bw * 1e6) if row_programs > 1 else 0.0
    return stream_cost("probe", moved, ctas, gpu, flops=flops, serial_us=serial, tail_us=tail)


ADAM_BYTES_PER_PARAM = 28  # fp32: read param, grad, m, v (16 B); write param, m, v (12 B)


def adam_cost(p: int, runs: int = 1, *, block: int = 4096, weight_copy_itemsize: int = 2, ctas: int | None = None,
              gpu=None) -> LaunchCost:
    """One Adam launch over flat fp32 param/grad/m/v buffers of P elements per run (acai_fast.ops.adam),
    BLOCK elements per program, also writing a copy of the weights in weight_copy_itemsize bytes
    per element (0: none): 28 + copy bytes per element, bandwidth-bound when enough programs stream."""
    ctas = ctas if ctas is not None else -(-p * runs // block)
    moved = p * runs * (ADAM_BYTES_PER_PARAM + weight_copy_itemsize)
    iters = max(1, -(-p * runs // (ctas * block)))
    return stream_cost("adam", moved, ctas, gpu, iters_per_cta=iters)


# PyTorch's multi-tensor apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh): 65,536-element
# chunks, one block per chunk; at most 36 tensors (4 lists: fused Adam) or 110 (1 list) and 320
# blocks per launch.
_MTA_CHUNK, _MTA_MAX_BLOCKS = 65536, 320
_MTA_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}


def multi_tensor_launches(numels: list[int], depth: int) -> list[tuple[int, int]]:
    """[(blocks, elements)] of each launch PyTorch's multi-tensor apply makes for tensors of these
    sizes (its loop: a launch when the tensor list or the block list is full, or at the end)."""
    launches, blocks, elems, tensors = [], 0, 0, 0
    for i, n in enumerate(numels):
        tensors += 1
        chunks = max(1, -(-n // _MTA_CHUNK))
        for ch in range(chunks):
            blocks += 1
            elems += min(_MTA_CHUNK, n - ch * _MTA_CHUNK)
            tensors_full = tensors == _MTA_MAX_TENSORS[depth] and ch == chunks - 1
            last = i == len(numels) - 1 and ch == chunks - 1
            if tensors_full or blocks == _MTA_MAX_BLOCKS or last:
                launches.append((blocks, elems))
                blocks, elems = 0, 0
                tensors = 0 if ch == chunks - 1 else 1
    return launches


def torch_fused_adam_costs(numels: list[int], gpu=None) -> list[LaunchCost]:
    """PyTorch's fused Adam (`_fused_adam_`, fp32) over tensors of these sizes: its launches."""
    return [stream_cost("adam(torch)", elems * ADAM_BYTES_PER_PARAM, blocks, gpu,
                        iters_per_cta=1) for blocks, elems in multi_tensor_launches(numels, 4)]


# ------------------------------------------------------------------------------------------------
# Calibration: the measured H100 anchors and the fit
# ------------------------------------------------------------------------------------------------

# ANCHORS.md (H100 80GB HBM3, Triton 3.6, CUDA graphs): a plain Triton implicit-GEMM 3x3 forward
# (NHWC bf16, bf16 weights, bias + leaky ReLU epilogue, no pool, no split-K), autotuned over tile
# configs: (batch, Cin, Cout, size) -> measured microseconds per launch inside a graph.
ANCHOR_CONV_FWD_H100 = [
    ((64, 16, 16, 32), 8.6),
    ((64, 32, 32, 16), 6.1),
    ((64, 64, 64, 32), 27.2),
    ((128, 64, 64, 32), 44.7),
    ((64, 128, 128, 16), 18.4),
    ((64, 256, 256, 8), 19.9),
    ((64, 256, 512, 4), 18.4),
    ((128, 128, 256, 2), 8.9),
    ((1024, 64, 64, 32), 319.0),
    ((1024, 256, 256, 8), 168.0),
]


# The candidates of the calibration: the tile configs conv_block.FWD_CONFIGS listed when the model
# was fitted (the anchor's autotuner searched "8 tile configs" it did not name; these are ours). Kept
# here so that the fit does not move when the package's lists change.
ANCHOR_CANDIDATES = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in (
    (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3),
    (32, 32, 64, 4, 3), (128, 16, 16, 4, 3), (64, 128, 32, 4, 3), (128, 128, 64, 8, 4), (256, 64, 32, 8, 3),
    (128, 256, 32, 8, 3))]


def anchor_shape(batch: int, cin: int, cout: int, size: int) -> ConvShape:
    """An anchor row's launch: 3x3, bf16 activations and weights, bias + leaky ReLU, no pool."""
    return ConvShape(N=batch, H=size, W=size, CIN=cin, COUT=cout, KS=3, itemsize=2, x_itemsize=2, w_itemsize=2)


def calibration(candidates=ANCHOR_CANDIDATES, constants: Constants = FIT, gpu="h100") -> list[dict]:
    """Per anchor row: the model's best over `candidates` (as an autotuner would pick) beside the
    measured time: [{row, measured_us, model_us, ratio, config, bound}]. The anchors timed a plain
    Triton conv, not conv_block's kernels: what those spilled when compiled does not apply."""
    rows = []
    for (b, ci, co, size), measured in ANCHOR_CONV_FWD_H100:
        ranked = rank_configs("fwd", anchor_shape(b, ci, co, size), candidates, gpu, constants,
                              compiled_spills=False)
        t, cand, cost = ranked[0]
        rows.append(dict(row=(b, ci, co, size), measured_us=measured, model_us=t, ratio=t / measured,
                         config=cost.config, bound=cost.bound))
    return rows


def rms_log_error(rows: list[dict]) -> float:
    """exp(rms of log(model / measured)): 1.0 is a perfect fit, 1.2 is ~20% typical error."""
    return math.exp(math.sqrt(sum(math.log(r["ratio"]) ** 2 for r in rows) / len(rows)))


def fit_constants(candidates=ANCHOR_CANDIDATES, start: Constants = FIT, rounds: int = 6) -> Constants:
    """The constants minimising rms_log_error over the anchors: a coordinate search on a
    log-spaced grid (each constant scaled by factors around its value, finer each round), from
    `start`. Deterministic; no SciPy needed."""
    best = start
    best_err = rms_log_error(calibration(candidates, best))
    names = [f.name for f in dataclasses.fields(Constants)]
    limits = dict(step_us=(0.05, 2.0), fixed_us=(0.0, 5.0), l2_eff=(0.05, 1.0), mma_eff=(0.1, 1.0))
    span = 2.0
    for _ in range(rounds):
        improved = True
        while improved:
            improved = False
            for name in names:
                for f in (span ** -1, span ** -0.5, span ** 0.5, span):
                    lo, hi = limits[name]
                    value = getattr(best, name) * f if getattr(best, name) > 0 else 0.05 * f
                    cand = dataclasses.replace(best, **{name: min(hi, max(lo, value))})
                    err = rms_log_error(calibration(candidates, cand))
                    if err < best_err - 1e-9:
                        best, best_err, improved = cand, err, True
        span = math.sqrt(span)
    return best
