"""gpus: the GPUs the project targets, as data, and what fits on one of them: a kernel config's
shared memory as Triton allocates it, its registers and spills (the rule, and what real sm_80 / sm_90
compiles reported: compiled_spills.json), co-resident programs per SM, and `fits`, the rule every
config the project chooses passes. The cost model (cost.py) prices launches on these GPUs; the
config chooser (conv_configs.py) and the compile check (tests/test_compile_targets.py) read the
limits here. Sizes in bytes. A `shape` argument is a launch's cost.ConvShape (its INPUT_ACT and
UPSAMPLE flags are read); nothing here imports cost.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# GPUs as data
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPU:
    """What the model needs of a GPU. Sources: NVIDIA's A100 / H100 / H200 datasheets and the CUDA
    C Programming Guide's compute-capability tables (shared memory, registers, warps, blocks)."""
    name: str
    arch: str                 # "sm80", "sm90": the tuned-table and compile target
    sms: int                  # streaming multiprocessors
    clock_ghz: float          # boost SM clock (cycles -> time for the per-SM bandwidths below)
    bf16_flops: float         # dense bf16 tensor-core peak, FLOP/s (no sparsity)
    fp32_flops: float         # fp32 FMA peak without tensor cores, FLOP/s (the "ieee" fp32 dots)
    hbm_bw: float             # HBM bandwidth, B/s (datasheet)
    l2_bw: float              # L2 read bandwidth, B/s: nominal (5120 B/clk x clock); the fit scales it
    l2_bytes: int             # L2 capacity
    smem_per_block: int       # shared memory one CTA may opt in to, B
    smem_per_sm: int          # shared memory of one SM, B (CTAs on an SM share it)
    regs_per_sm: int = 65536  # 32-bit registers per SM
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32

    @property
    def sm_l2_bw(self) -> float:
        """One SM's L2 read bandwidth, B/s: 64 B per clock (an SM's L1 <-> L2 port). Bounds a
        single program reading split partials."""
        return 64 * self.clock_ghz * 1e9


GPUS = {
    # A100 SXM4 80GB: 108 SMs at 1.41 GHz, 312 TFLOP/s bf16, 19.5 fp32, 2.039 TB/s HBM2e, 40 MB L2;
    # 164 KB shared memory per SM, 163 KB (166,912 B) per block opt-in.
    "a100": GPU("A100 SXM 80GB", "sm80", sms=108, clock_ghz=1.41, bf16_flops=312e12, fp32_flops=19.5e12,
                hbm_bw=2.039e12, l2_bw=5120 * 1.41e9, l2_bytes=40 << 20,
                smem_per_block=166_912, smem_per_sm=167_936),
    # H100 SXM5 80GB: 132 SMs at 1.98 GHz, 989 TFLOP/s bf16 dense, 67 fp32, 3.35 TB/s HBM3, 50 MB L2;
    # 228 KB shared memory per SM, 227 KB (232,448 B) per block opt-in.
    "h100": GPU("H100 SXM 80GB", "sm90", sms=132, clock_ghz=1.98, bf16_flops=989e12, fp32_flops=67e12,
                hbm_bw=3.35e12, l2_bw=5120 * 1.98e9, l2_bytes=50 << 20,
                smem_per_block=232_448, smem_per_sm=233_472),
    # H200 SXM 141GB: the H100's die (same SMs, clocks, L2, shared memory) with 4.8 TB/s HBM3e.
    "h200": GPU("H200 SXM 141GB", "sm90", sms=132, clock_ghz=1.98, bf16_flops=989e12, fp32_flops=67e12,
                hbm_bw=4.8e12, l2_bw=5120 * 1.98e9, l2_bytes=50 << 20,
                smem_per_block=232_448, smem_per_sm=233_472),
}


def get_gpu(gpu) -> GPU:
    """A GPU from a GPU, a name in GPUS ("a100", "h100", "h200") or None (the H100)."""
    if gpu is None:
        return GPUS["h100"]
    if isinstance(gpu, GPU):
        return gpu
    key = str(gpu).lower()
    if key not in GPUS:
        raise ValueError(f"cost: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def gpu_for_device(device=None) -> GPU | None:
    """The modelled GPU closest to a CUDA device (by name, then compute capability), None when it is
    not an A100/H100/H200-class part (sm_80 / sm_90)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    name = props.name.upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return GPUS[key.lower()]
    return {(9, 0): GPUS["h100"], (8, 0): GPUS["a100"]}.get((props.major, props.minor))



SMEM_RESERVED = 1024      # shared memory the driver reserves per CTA (sm_80 and later)


# ------------------------------------------------------------------------------------------------
# Configs, shared memory as Triton allocates it, registers and spills, occupancy
# ------------------------------------------------------------------------------------------------

KINDS = ("fwd", "dx", "dw")


def config_dict(config) -> dict:
    """A kernel config as one flat dict {BLOCK_*, SPLIT_K, ..., num_warps, num_stages} from a
    triton.Config, the package's stand-in dict or a flat dict."""
    if isinstance(config, dict):
        if "kwargs" in config:
            return {**config["kwargs"], "num_warps": config.get("num_warps", 4),
                    "num_stages": config.get("num_stages", 3)}
        return {"num_warps": 4, "num_stages": 3, **config}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def describe_config(kind: str, config) -> str:
    """A short label: '128x64x32 w4 s3', 'CI16 CO64 P128 w4 s3', with split keys when set."""
    c = config_dict(config)
    if kind == "dw":
        s = f"CI{c['BLOCK_CI']} CO{c['BLOCK_CO']} P{c['BLOCK_P']}"
        for key, tag in (("TAPS", "taps"), ("SPLITS", "splits"), ("REDUCE_GROUP", "group")):
            if c.get(key, 1) not in (1, None, 0):
                s += f" {tag}{c[key]}"
    elif kind in KINDS:
        s = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
        if c.get("SPLIT_K", 1) > 1:
            s += f" splitk{c['SPLIT_K']}"
    else:
        s = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK"))
    return f"{s} w{c['num_warps']} s{c['num_stages']}"


def smem_estimate(kind: str, config, itemsize: int, reshape_epilogue: bool | None = None, *,
                  w_itemsize: int = 4, arch: str | None = None) -> int:
    """Shared memory (B) a conv kernel config takes per CTA (Triton's dynamic allocation + the
    1 KB of static shared memory the cubin reserves on sm_90): an upper bound over sm_80 and sm_90,
    every layer variant and the operand dtypes the kernels read, checked against 854 compiles (every
    candidate of the config lists x fp32/bf16 x sm_80/sm_90 x each layer variant the presets launch,
    tests/compile_targets.json; Triton 3.9): never below, median 0.8x (dx, fwd) / 0.65x (dW).
    With s = num_stages and tiles in elements:
      fwd/dx: (s - 1) * (BM*BK * a + BK*BN * 4)   the pipelined A tile (a: the compute dtype's size;
                                                  4 for a split-K fwd, which may read an fp32 image
                                                  batch) and weight tile (fp32 master weights)
              + (BM*BK + BK*BN) * 2 in bf16         the bf16 operand tiles sm_90's wgmma reads
              + dx: s * BM*BK * itemsize            dz rebuilt from dL/dy and the sign of z: a
                                                  second A-shaped pipeline (pool: the sign map)
              split-K: at least BM*BN*4             the fp32 partial tile staged for its store
      dw:     ((s - 1) * (TAPS*BCI + BCO) + (BCI + BCO) + s * BCO) * BP * itemsize
              (the pipelined u and dz tiles, one of each staged for the MMA, and dz's sign tiles).
    Measured, the 2x2 epilogues (fwd's pool, dx's upsample sum) reuse the pipeline's buffers:
    reshape_epilogue is accepted and changes nothing. itemsize: the compute dtype's (2 for bf16, 4
    for fp32); w_itemsize: the weights' as fwd/dx read them (4: fp32 master weights, 2: a bf16
    copy; measured with 4 only); arch: "sm80" leaves out the wgmma staging and the static 1 KB
    (None: the larger, sm_90's). Re-measure with `python tests/test_compile_targets.py
    --measure` when the kernels change (its tests check this against every recorded compile)."""
    c = config_dict(config)
    stages = max(1, c["num_stages"])
    static = 0 if arch == "sm80" else STATIC_SMEM
    if kind == "dw":
        taps = c.get("TAPS", 1) or 1
        bp, bci, bco = c["BLOCK_P"], c["BLOCK_CI"], c["BLOCK_CO"]
        return ((stages - 1) * (taps * bci + bco) + (bci + bco) + stages * bco) * bp * itemsize + static
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    split = (c.get("SPLIT_K", 1) or 1) > 1
    a_size = 4 if kind == "fwd" and split else itemsize
    smem = (stages - 1) * (bm * bk * a_size + bk * bn * max(w_itemsize, itemsize))
    if itemsize <= 2 and arch != "sm80":
        smem += (bm * bk + bk * bn) * 2
    if kind == "dx":
        smem += stages * bm * bk * itemsize
    if split:
        smem = max(smem, bm * bn * 4)
    return smem + static


STATIC_SMEM = 1024  # static shared memory in the cubins Triton builds for sm_90 (cuobjdump; 0 on sm_80)


# Register pressure: the elements of register tiles each thread holds (accumulators, and the tiles
# loaded through per-element pointers and masks). Calibrated on what ptxas reported (sm_90, bf16):
# dW CI32xCO64xP128 w4 spills (128 B: 176 elements by this count), CI16xCO64xP128 w4 does not (152),
# CI32xCO64xP128 w8 does not (88); no fwd/dx config of the heuristic spills in bf16 (at most 128).
SPILL_LIMIT = {"fwd": 192, "dx": 192, "dw": 160}
# Configs reported to spill in bf16 (aot.py / tests/test_compile_targets.py), beyond the rule:
# (kind, BLOCK_*..., num_warps) -> where it was seen.
KNOWN_SPILLS = {("dw", 32, 64, 128, 4): "sm_90 bf16: 128 B of spills (issue 18)"}


def register_elements(kind: str, config, shape=None) -> float:
    """Per-thread elements of register tiles (see SPILL_LIMIT).
    fwd/dx: (BM*BN accumulator + BM*BK gathered A + BK*BN weight tile) / threads; a dx launch whose
    epilogue applies its input's activation (shape.INPUT_ACT) also holds the x tile it loads there
    beside the accumulator: + (BM/4 with UPSAMPLE, else BM) * BN / threads (compiled, bf16: dx
    128x256x32 w8 s3 with it spills 16-24 B on sm_90 (304 by this count; 208 with UPSAMPLE, which
    did not), 128x128x64 w8 s4 does not (192), nor does any other config the presets choose);
    dw: (TAPS*BCI*BCO accumulators + BP*BCO * 2 (dz from G and the sign) + BP*BCI u) / threads (with
    TAPS = KS*KS the shifted u tiles are loaded and used one tap at a time: one is live)."""
    c = config_dict(config)
    threads = 32 * c["num_warps"]
    if kind == "dw":
        taps = c.get("TAPS", 1) or 1
        return (taps * c["BLOCK_CI"] * c["BLOCK_CO"] + c["BLOCK_P"] * (2 * c["BLOCK_CO"] + c["BLOCK_CI"])) / threads
    elems = c["BLOCK_M"] * c["BLOCK_N"] + c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]
    if kind == "dx" and shape is not None and shape.INPUT_ACT:
        elems += (c["BLOCK_M"] // 4 if shape.UPSAMPLE else c["BLOCK_M"]) * c["BLOCK_N"]
    return elems / threads


@functools.lru_cache(maxsize=None)
def measured_spills() -> dict:
    """{arch: set of config keys} of the bf16 conv configs that spilled registers when compiled
    (acai_fast/ops/compiled_spills.json, written by tests/test_compile_targets.py from real sm_80 /
    sm_90 compiles: bf16_spills, every candidate in each layer variant (--measure), and
    traced_spills, the chooser's picks in the variants they launch in (--measure-traced); read-only
    data, like the tuned tables)."""
    path = Path(__file__).with_name("compiled_spills.json")
    if not path.is_file():
        return {}
    out: dict[str, set] = {}
    data = json.loads(path.read_text())
    for entry in data.get("bf16_spills", []) + data.get("traced_spills", []):
        out.setdefault(entry["arch"], set()).add(spill_key(entry["kind"], entry["config"]))
    return out


def spill_key(kind: str, config) -> tuple:
    """What decides a conv config's registers: its tiles, warps, stages, all-taps dW, split-K."""
    c = config_dict(config)
    names = ("BLOCK_CI", "BLOCK_CO", "BLOCK_P") if kind == "dw" else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    extra = (c.get("TAPS", 1) or 1) > 1 if kind == "dw" else (c.get("SPLIT_K", 1) or 1) > 1
    return (kind, *(c[k] for k in names), c["num_warps"], c["num_stages"], extra)


def spills(kind: str, config, arch: str | None = None, shape=None, *,
           compiled: bool = True) -> bool:
    """True when a config spills registers in bf16: it spilled when compiled for `arch` ("sm80",
    "sm90"; None: for either) in any layer variant per `measured_spills`, is listed in KNOWN_SPILLS,
    or exceeds the register rule (SPILL_LIMIT; with the launch's shape its epilogue's tiles count
    too, see register_elements). compiled=False: the rule and KNOWN_SPILLS only (another kernel than
    conv_block's, e.g. the plain Triton conv of the calibration anchors)."""
    c = config_dict(config)
    names = ("BLOCK_CI", "BLOCK_CO", "BLOCK_P") if kind == "dw" else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    key = (kind, *(c[k] for k in names), c["num_warps"])
    measured = measured_spills() if compiled else {}
    archs = [arch] if arch is not None else list(measured)
    if any(spill_key(kind, config) in measured.get(a, ()) for a in archs):
        return True
    return key in KNOWN_SPILLS or register_elements(kind, config, shape) > SPILL_LIMIT[kind]


def registers_per_thread(kind: str, config, shape=None) -> int:
    """Estimated 32-bit registers per thread: 32 for indices and pointers + the register tiles,
    capped at 255 (beyond that ptxas spills)."""
    return min(255, 32 + math.ceil(register_elements(kind, config, shape)))


def ctas_per_sm(kind: str, config, itemsize: int, gpu: GPU, reshape_epilogue: bool | None = None,
                shape=None) -> int:
    """Co-resident programs per SM: the least of what shared memory (as allocated, + the 1 KB the
    driver reserves), registers (allocated per warp in units of 256), warps (64 per SM) and the
    32-CTA limit allow. 0 when one program does not fit the per-block shared memory."""
    c = config_dict(config)
    smem = smem_estimate(kind, config, itemsize, reshape_epilogue)
    if smem > gpu.smem_per_block:
        return 0
    warps = c["num_warps"]
    by_smem = gpu.smem_per_sm // (smem + SMEM_RESERVED)
    regs_per_warp = math.ceil(registers_per_thread(kind, config, shape) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * warps)
    return max(0, min(by_smem, by_regs, gpu.max_warps_per_sm // warps, gpu.max_ctas_per_sm))


def fits(kind: str, config, itemsize: int, gpu, reshape_epilogue: bool | None = None,
         shape=None, *, compiled: bool = True) -> bool:
    """The config launches on this GPU: its shared memory (as allocated) is within the per-block
    limit and, for 2-byte compute dtypes, it is not expected to spill registers (with the launch's
    shape, its epilogue counted: see register_elements)."""
    gpu = get_gpu(gpu)
    if smem_estimate(kind, config, itemsize, reshape_epilogue) > gpu.smem_per_block:
        return False
    return not (itemsize <= 2 and spills(kind, config, gpu.arch, shape, compiled=compiled))
