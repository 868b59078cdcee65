"""Whole-step throughput of acai_fast against plain-PyTorch ACAI steps, in one process, one command.

Variants (each one full SPEC.md section 2 step: encoder once, decoder twice, critic twice, every
gradient, Adam over encoder+decoder, critic and the linear probe):
  eager_fp32   plain PyTorch written here (PlainACAIStep: nn.Conv2d chains, autograd.grad per
               objective, one fused torch Adam), fp32                      (= ANCHORS "eager fp32")
  eager_bf16   the same under torch.autocast(bfloat16), channels_last weights and inputs
  graph_bf16   eager_bf16 captured whole into one CUDA graph by hand (capturable fused Adam; alpha
               from torch.rand on the default CUDA generator, which graph capture supports)
  compile      eager_bf16's step under torch.compile (--compile; --compile-mode, default max-autotune:
               ANCHORS measured ~200 s of compiling per case)
  fused        ACAITrainer(backend="fused", cuda_graph=False): the Triton/CUDA kernels, eager launches
  fused_graph  ACAITrainer(backend="fused"): the default fast trainer (one CUDA-graph replay per step)
  reference    ACAITrainer(backend="reference") (not in the default set: the repository's own oracle)
The plain steps are in bench/baselines.py, the layer shapes and the FLOP and byte counts in
bench/flops.py, the timing loop in bench/timing.py, the table, JSON, CSV and plot in bench/report.py.

Per variant: ms/step (median, p20, p80 over >= --steps back-to-back steps after --warmup, CUDA-event
timing; the window is stretched to --min-seconds so that NVML gets samples), images/s, TFLOP/s and
GB/s from the analytic counts below, launches per step (acai_fast.engine.count_launches on one eager
step: Triton launches, CUDA-extension calls and aten ops that compute; a graph replays the same
kernels), peak GPU memory (torch.cuda.max_memory_allocated), time to the first step in this process
and, in fresh processes, cold (empty Triton/Inductor caches) and warm (the same caches again), and
NVML's GPU utilisation, power, SM clock and memory over the timed window. The table shows speed-ups
against eager_fp32 and against the best plain-PyTorch variant of the same preset and batch. Fused
variants also get `model ms`: their step as the cost model (acai_fast/ops/cost.py) sees it on this
GPU or --model's (one step traced as a dry run; a model, not a measurement).

FLOPs per step (analytic, from the layer shapes; equal to torch.utils.flop_counter on one step):
  conv: F = 2 N H W Cout Cin k^2 at the conv's resolution (after any upsample); forward F, input
  gradient F, weight gradient F. The step: forward of encoder (N), decoder (2N), critic (2N);
  backward: encoder dW all + dX all but the first layer (x needs none); decoder dW + dX (2N);
  critic dX of every layer for the autoencoder objective (N, through x_mix), critic dW all + dX all
  but the first for the critic objective (2N); probe 2 N D C forward + 2 N D C for its weight.
Bytes per step (a floor model for a fully fused schedule, at the variant's activation size s):
  each conv reads its input and writes its output once per pass (forward, dX, dW) at s bytes per
  element; each parameter costs 32 B (fp32 gradient written, Adam reads p, g, m, v, writes p, m, v).

On a machine without a GPU (or --device cpu) the same comparison runs on the CPU at small sizes and
says so: CPU numbers say nothing about GPU speed. The fused kernels run on a CPU only under the
Triton interpreter (very slow), so fused is skipped there unless --fused-cpu; every skipped variant
is recorded with its reason.

Arrays of runs (--array K1,K2,...; issue 14's benchmark): K same-shaped runs (seeds seed .. seed+K-1),
each on its own batch of --batches images (default 64, the paper's), one step of all K runs timed as one
step. images/s counts every run (K x batch / step time); TFLOP/s is K x the FLOPs above; launches are
those of one eager step of all K runs (sequential variants: K x one run's); peak memory holds all K.
  fused_array       ACAITrainer(config, backend="fused", runs=K): acai_fast.trainer.RunArray with the
                    default fused settings (CUDA graphs on a GPU), one launch per layer for all runs
  fused_sequential  K single fused trainers (fused_graph above), stepped one after another
  vmap              VmapACAIStep: torch.func.stack_module_state + vmap over the plain networks
                    (PyTorch's own way), bf16, in one hand-captured CUDA graph (eager where the
                    capture fails; the row's note says so)
  grouped           GroupedACAIStep: HFTA's way, each conv of the K runs one grouped conv (groups=K),
                    bf16 channels_last, in one hand-captured CUDA graph
  plain_sequential  K graph_bf16 steps (a graph each, one shared memory pool), one after another
Both K-run plain steps compute each run's SPEC step (both objectives, Adam over the run's own
parameters, its own alphas): tests/test_bench.py checks one step of each, run by run, against
PlainACAIStep with the same weights and alphas. The table adds speed-ups against plain_sequential
and fused_sequential at the same K; each timed window is cut to about --array-max-seconds. On the
CPU the three plain variants run eagerly (vmap in the contiguous layout: see build_array) and the
fused ones are skipped unless --fused-cpu.

    python bench/throughput.py                                   # GPU: lines, mnist256, cifar1024 at 64, 1024
    python bench/throughput.py --quick --json out.json --csv out.csv --plot out.png   # ~2 min on an H100
    python bench/throughput.py --device cpu --presets lines --batches 8 --steps 3 --json out.json
    python bench/throughput.py --array 1,4,16,64 --json arrays.json --csv arrays.csv --plot arrays.png   # GPU
    python bench/throughput.py --array 1,2 --device cpu --batches 2 --steps 2 --json arrays.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

if "--fused-cpu" in sys.argv[1:]:  # the Triton interpreter is chosen when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import cuda_graph, environment, summarize  # noqa: E402
from baselines import GroupedACAIStep, PlainACAIStep, VmapACAIStep  # noqa: E402
from flops import step_bytes, step_flops  # noqa: E402
from report import Column, Report, add_speedups, output_problem, rate, speedup  # noqa: E402
from timing import Built, cold_then_warm, launch_counter, measure, sync, times_runs  # noqa: E402

from acai_fast import ACAIConfig, ACAITrainer, _ext  # noqa: E402
from acai_fast.config import PRESETS  # noqa: E402
from acai_fast.engine import count_launches  # noqa: E402
from acai_fast.profiling import GpuSampler  # noqa: E402

VARIANTS = ("eager_fp32", "eager_bf16", "graph_bf16", "compile", "fused", "fused_graph", "reference")
DEFAULT_VARIANTS = VARIANTS[:-1]  # compile runs only with --compile (recorded as skipped otherwise)
PLAIN = ("eager_fp32", "eager_bf16", "graph_bf16", "compile", "reference")  # plain PyTorch
CPU_NOTE = ("CPU numbers: measured on the CPU, at small sizes, to keep the benchmark from rotting; they "
            "say nothing about speed on a GPU")
GPU_DEFAULTS = dict(presets="lines,mnist256,cifar1024", batches="64,1024", steps=100, warmup=10,
                    min_seconds=1.0, first_step="first")
QUICK = dict(presets="lines,cifar1024", batches="64,1024", steps=100, warmup=5, min_seconds=0.3)
CPU_DEFAULTS = dict(presets="lines", batches="8", steps=5, warmup=1, min_seconds=0.0, first_step="none")
ARRAY_VARIANTS = ("fused_array", "fused_sequential", "vmap", "grouped", "plain_sequential")
ARRAY_GPU_DEFAULTS = dict(presets="lines", batches="64", steps=100, warmup=10, min_seconds=1.0, first_step="none",
                          array_max_seconds=3.0)
ARRAY_CPU_DEFAULTS = dict(CPU_DEFAULTS, array_max_seconds=0.0)
OUTPUTS = ("json", "csv", "plot")  # the options naming files to write


# ------------------------------------------------------------------------------------------------
# Cases and results: one run (runs None) or an array of K runs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    batch: int  # images per run
    variant: str
    runs: int | None = None  # K (--array); None: the single-run comparison

    def row(self) -> dict:
        k = {} if self.runs is None else dict(runs=self.runs)
        return dict(preset=self.preset, batch=self.batch, **k, variant=self.variant)


# Result fields of one kind of case only: the single-run comparison's byte model and fresh-process
# first steps; an array's note (how it ran where that differs from its variant's description).
SINGLE_ONLY = ("gflop_forward", "gflop_backward", "gb_per_step", "gbps", "first_step_cold_s", "first_step_warm_s")
ARRAY_ONLY = ("note",)


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    note: str | None = None
    ms_median: float | None = None  # one step (of all K runs)
    ms_p20: float | None = None
    ms_p80: float | None = None
    steps_timed: int | None = None
    images_per_s: float | None = None  # of all runs together: K * batch / step time
    gflop_per_step: float | None = None  # K x step_flops
    gflop_forward: float | None = None
    gflop_backward: float | None = None
    tflops: float | None = None
    gb_per_step: float | None = None
    gbps: float | None = None
    launches: int | None = None  # of one eager step (of all K runs)
    launches_detail: str | None = None
    model_ms: float | None = None  # fused variants: the cost model's step (acai_fast.ops.cost), see modelled_ms
    peak_mem_mib: float | None = None
    first_step_s: float | None = None  # construction (graph captures included) and the first step
    first_step_cold_s: float | None = None
    first_step_warm_s: float | None = None
    gpu: dict = dataclasses.field(default_factory=dict)  # NVML summary of the timed window

    def row(self) -> dict:
        other = ARRAY_ONLY if self.case.runs is None else SINGLE_ONLY
        d = self.case.row()
        d.update({k: v for k, v in dataclasses.asdict(self).items() if k not in ("case", "gpu", *other)})
        d.update(self.gpu)
        return d


def why_not(variant: str, device: torch.device, args) -> str | None:
    """The reason `variant` (single-run or array) cannot (or will not) run here, or None."""
    if variant in ("fused_array", "fused_sequential"):
        variant = "fused_graph" if device.type == "cuda" else "fused"
    if variant == "compile" and not args.compile:
        return "not asked for: pass --compile (slow: ANCHORS measured ~200 s of compiling per case)"
    if device.type != "cuda":
        if variant in ("graph_bf16", "fused_graph"):
            return "CUDA graphs need a CUDA GPU"
        if variant == "fused":
            if not args.fused_cpu:
                return ("the fused kernels run on a CPU only under the Triton interpreter (minutes per "
                        "step at full size); pass --fused-cpu to time that anyway")
            if not (_ext.HAS_TRITON and _ext.INTERPRET):
                return "--fused-cpu needs triton and TRITON_INTERPRET=1 set before acai_fast is imported"
    elif variant.startswith("fused") and not _ext.HAS_TRITON:
        return "triton is not installed"
    return None


def batch_data(config: ACAIConfig, batch: int, device: torch.device, seed: int, runs: int | None = None):
    """x in [-1, 1] and labels: (N, C, H, W) and (N,), or with runs (K, N, C, H, W) and (K, N): each
    run its own batch."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if runs is None else (runs, batch)
    x = torch.rand(*lead, config.colors, config.image_size, config.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, config.nclass, lead, generator=g)
    return x.to(device), labels.to(device)


# ------------------------------------------------------------------------------------------------
# The variants, built ready to time
# ------------------------------------------------------------------------------------------------


def build(case: Case, device: torch.device, x: torch.Tensor, labels: torch.Tensor, args) -> Built:
    """Construct the variant and everything it needs (CUDA graphs are captured here); an array's
    run k has seed args.seed + k and x[k], labels[k]."""
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    if case.runs is not None:
        return build_array(case, config, device, x, labels, args)
    v = case.variant
    if v in ("fused", "fused_graph", "reference"):
        backend = "reference" if v == "reference" else "fused"
        trainer = ACAITrainer(config, backend=backend, device=device, seed=args.seed,
                              cuda_graph=None if v == "fused_graph" else False)
        return Built(lambda: trainer.step(x, labels), lambda: count_launches(trainer, x, labels), (trainer,))
    bf16 = v != "eager_fp32"
    step = PlainACAIStep(config, device, seed=args.seed, bf16=bf16, channels_last=bf16,
                         capturable=v == "graph_bf16")
    eager = functools.partial(step.step, x.contiguous(memory_format=step.memory_format), labels)
    if v == "graph_bf16":
        replay = cuda_graph(eager)  # 3 eager steps on a side stream, then the capture
        return Built(replay, launch_counter(eager), (step, replay))
    if v == "compile":
        compiled = torch.compile(step.step, mode=args.compile_mode)
        return Built(functools.partial(compiled, *eager.args), None, (step, compiled))
    return Built(eager, launch_counter(eager), (step,))


def graph_or_eager(make, device: torch.device) -> Built:
    """make() -> (step, eager): eager() runs one step of all runs. On a GPU the step is captured in
    one CUDA graph by hand; where the capture fails, a fresh step runs eagerly and the note says why."""
    step, eager = make()
    if device.type != "cuda":
        return Built(eager, launch_counter(eager), (step,), "eager: CUDA graphs need a CUDA GPU")
    try:
        replay = cuda_graph(eager)
        return Built(replay, launch_counter(eager), (step, replay))
    except Exception as exc:
        torch.cuda.synchronize(device)
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        step, eager = make()  # a failed capture may leave the first step half-updated
        return Built(eager, launch_counter(eager), (step,), f"eager: CUDA-graph capture failed ({reason})")


def build_array(case: Case, config: ACAIConfig, device: torch.device, x, labels, args) -> Built:
    """The K-run variants (the module docstring's "Arrays of runs"), x (K, N, ...), labels (K, N)."""
    runs, v, on_gpu = case.runs, case.variant, device.type == "cuda"
    seeds = [args.seed + k for k in range(runs)]
    if v in ("fused_array", "fused_sequential"):
        from acai_fast.engine.graphs import WARMUP_STEPS
        if v == "fused_array":
            trainers = [ACAITrainer(config, backend="fused", device=device, seed=args.seed, runs=runs)]
            inputs = [(x, labels)]
            count = lambda: count_launches(trainers[0], x, labels)  # noqa: E731
        else:
            trainers = [ACAITrainer(config, backend="fused", device=device, seed=s) for s in seeds]
            inputs = list(zip(x.unbind(), labels.unbind()))
            count = lambda: times_runs(count_launches(trainers[0], *inputs[0]), runs)  # noqa: E731

        def fn():
            for t, (xk, yk) in zip(trainers, inputs):
                t.step(xk, yk)
        if trainers[0].graphs is None:
            return Built(fn, count, tuple(trainers), "eager: CUDA graphs need a CUDA GPU")
        for _ in range(WARMUP_STEPS + 1):  # the trainers' eager warm-up steps and their captures
            fn()
        failed = {f for t in trainers for f in t.graphs.failed.values()}
        return Built(fn, count, tuple(trainers), f"eager: CUDA-graph capture failed ({failed.pop()[:200]})"
                     if failed else None)
    if v == "plain_sequential":  # the single-run graph_bf16 variant, K of them one after another
        steps = [PlainACAIStep(config, device, seed=s, bf16=True, channels_last=True, capturable=on_gpu)
                 for s in seeds]
        xs = [xk.contiguous(memory_format=torch.channels_last) for xk in x.unbind()]
        eagers = [functools.partial(st.step, xk, yk) for st, xk, yk in zip(steps, xs, labels.unbind())]
        count = launch_counter(eagers[0], runs)
        if not on_gpu:
            return Built(lambda: [e() for e in eagers], count, tuple(steps), "eager: CUDA graphs need a CUDA GPU")
        pool = torch.cuda.graph_pool_handle()  # replayed in capture order: one pool for all K graphs
        replays = [cuda_graph(e, pool=pool) for e in eagers]
        return Built(lambda: [r() for r in replays], count, (steps, replays))
    cls = dict(vmap=VmapACAIStep, grouped=GroupedACAIStep)[v]
    # On the CPU vmap keeps the contiguous layout: torch's CPU bf16 conv backward refuses the
    # channels_last weight of a one-channel output layer at K=1 (measured, torch 2.13: "slow_conv2d:
    # grad_weight must be contiguous"; lines' last decoder conv).
    channels_last = on_gpu or v != "vmap"

    def make():
        step = cls(config, device, seeds, bf16=True, channels_last=channels_last, capturable=on_gpu)
        return step, functools.partial(step.step, step.prepare(x), labels)
    return graph_or_eager(make, device)


# ------------------------------------------------------------------------------------------------
# One case measured; the first step in fresh processes
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _model_ms(preset: str, batch: int, runs: int, gpu: str, device_type: str, seed: int) -> float:
    from acai_fast.engine.launches import model_step

    on_gpu = device_type == "cuda"
    config = ACAIConfig.preset(preset, batch=batch)
    trainer = ACAITrainer(config, backend="fused", device=device_type, seed=seed, cuda_graph=False,
                          dtype="bf16" if on_gpu else "fp32", runs=runs if runs > 1 else None)
    x, labels = batch_data(config, batch, trainer.device, seed, runs if runs > 1 else None)
    rows = model_step(trainer, x, labels, gpu, dtype=None if on_gpu else torch.bfloat16)
    return sum(r["time_us"] for r in rows) / 1e3


def modelled_ms(case: Case, device: torch.device, args) -> float | None:
    """The `model ms` column: the fused step of a fused variant as acai_fast.ops.cost models it (bf16,
    in a CUDA graph) on --model's GPU, by default this GPU when the model knows it (on a CPU: only
    with --model): one step traced as a dry run (no kernel runs); fused_sequential: K single runs.
    A model, not a measurement (wall ~ model / cost.MODEL_TO_WALL); None where it cannot be made."""
    from acai_fast.ops import cost

    if not case.variant.startswith("fused") or not _ext.HAS_TRITON:
        return None
    gpu = args.model or (next((k for k, g in cost.GPUS.items() if g == cost.gpu_for_device(device)), None)
                         if device.type == "cuda" else None)
    if gpu is None or (device.type != "cuda" and not _ext.INTERPRET):
        return None
    runs = case.runs or 1
    if case.variant == "fused_sequential":
        return runs * _model_ms(case.preset, case.batch, 1, gpu, device.type, args.seed)
    return _model_ms(case.preset, case.batch, runs, gpu, device.type, args.seed)


def run_case(case: Case, device: torch.device, args, sampler: GpuSampler | None) -> Result:
    """Measure one case (timing.measure) into a Result: skipped with the reason, failed with the
    error (the other cases still run), or its times, rates, launches, memory and first step."""
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    k = case.runs or 1
    flops = step_flops(config, case.batch)
    common = dict(gflop_per_step=k * flops["total"] / 1e9)
    nbytes = None
    if case.runs is None:
        act_bytes = 4 if case.variant in ("eager_fp32", "reference") or device.type != "cuda" else 2
        nbytes = step_bytes(config, case.batch, act_bytes)
        common.update(gflop_forward=flops["forward"] / 1e9, gflop_backward=flops["backward"] / 1e9,
                      gb_per_step=nbytes / 1e9)
    common.update(model_ms=modelled_ms(case, device, args))
    reason = why_not(case.variant, device, args)
    if reason is not None:
        return Result(case, status="skipped", reason=reason, **common)
    x, labels = batch_data(config, case.batch, device, args.seed, case.runs)
    try:
        m = measure(lambda: build(case, device, x, labels, args), device, args, sampler,
                    max_seconds=(args.array_max_seconds or 0.0) if case.runs else 0.0)
    except Exception as exc:  # a failing variant (e.g. out of memory at a large K) is reported
        return Result(case, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}", **common)
    med, p20, p80 = summarize(m["times"])
    launches = m["launches"]
    return Result(case, note=m["note"], ms_median=med, ms_p20=p20, ms_p80=p80, steps_timed=len(m["times"]),
                  images_per_s=k * case.batch / med * 1e3, tflops=k * flops["total"] / (med * 1e-3) / 1e12,
                  gbps=nbytes / (med * 1e-3) / 1e9 if nbytes else None,
                  launches=launches.total if launches else None,
                  launches_detail=launches.summary() if launches else None, peak_mem_mib=m["peak"],
                  first_step_s=m["first"], gpu=m["gpu"], **common)


def child_first_step(spec: str, device: torch.device, seed: int) -> int:
    """--child PRESET:BATCH:VARIANT: construct the variant, run one step, print its wall time as JSON."""
    preset, batch, variant = spec.split(":")
    case = Case(preset, int(batch), variant)
    config = ACAIConfig.preset(preset, batch=case.batch)
    x, labels = batch_data(config, case.batch, device, seed)
    args = argparse.Namespace(seed=seed, compile_mode=os.environ.get("ACAI_BENCH_COMPILE_MODE", "max-autotune"))
    sync(device)
    t0 = time.perf_counter()
    build(case, device, x, labels, args).fn()
    sync(device)
    print(json.dumps(dict(first_step_s=time.perf_counter() - t0)))
    return 0


def first_step_cold_warm(case: Case, device: torch.device, args,
                         python: str = sys.executable) -> tuple[float | None, float | None, str | None]:
    """(cold, warm, error) of `case`'s first step: `python` this script --child ..., twice, with
    one new compile cache (timing.cold_then_warm)."""
    cmd = [python, str(pathlib.Path(__file__).resolve()), "--device", str(device), "--seed", str(args.seed),
           "--child", f"{case.preset}:{case.batch}:{case.variant}"] + (["--fused-cpu"] if args.fused_cpu else [])
    return cold_then_warm(cmd, args.first_step_timeout, dict(ACAI_BENCH_COMPILE_MODE=args.compile_mode))


# ------------------------------------------------------------------------------------------------
# Speed-ups and the two reports
# ------------------------------------------------------------------------------------------------


def speedups(results: list[Result]) -> list[dict]:
    """Flat rows with the speed-up columns: single runs against eager_fp32 and the fastest plain
    variant (best_plain_variant) of the same preset and batch; arrays against plain_sequential and
    fused_sequential of the same preset, batch and K."""
    rows = [r.row() for r in results]
    if results and results[0].case.runs is not None:
        return add_speedups(rows, ("preset", "batch", "runs"),
                            dict(plain_sequential=("plain_sequential",), fused_sequential=("fused_sequential",)))
    return add_speedups(rows, ("preset", "batch"), dict(eager_fp32=("eager_fp32",), best_plain=PLAIN))


def _timing_columns(variant_width: int) -> list[Column]:
    return [Column("variant", "variant", variant_width, left=True), Column("ms/step", "ms_median", 9, ".3f"),
            Column("p20", "ms_p20", 8, ".3f"), Column("p80", "ms_p80", 8, ".3f"),
            Column("img/s", "images_per_s", 9, ".0f"), Column("TFLOP/s", "tflops", 8, rate)]


NVML_COLUMNS = [Column("util%", "gpu_util_mean", 5, ".0f"), Column("W", "gpu_power_w_mean", 5, ".0f")]
MODEL_FOOTER = ("model ms: fused variants' step as the cost model (acai_fast/ops/cost.py) sees it on --model's GPU "
                "(default: this GPU, if the model knows it), bf16 in a CUDA graph: a MODEL, not a measurement "
                "(wall ~ model / 0.73, acai-fast profile --model shows every launch)")
SINGLE = Report(
    "results",
    [Column("preset", "preset", 10, left=True), Column("batch", "batch", 5), *_timing_columns(12),
     Column("GB/s", "gbps", 7, ".1f"), Column("launch", "launches", 6, "d"), Column("model ms", "model_ms", 8, ".3f"),
     Column("peak MiB", "peak_mem_mib", 8, ".0f"), Column("1st s", "first_step_s", 6, ".2f"), Column("cold s", "first_step_cold_s", 6, ".1f"),
     Column("warm s", "first_step_warm_s", 6, ".1f"), *NVML_COLUMNS,
     Column("x fp32", "speedup_vs_eager_fp32", 7, speedup), Column("x best", "speedup_vs_best_plain", 7, speedup)],
    keys=3,
    footer=[f"x fp32: speed-up against eager_fp32; x best: against the fastest plain-PyTorch variant "
            f"({', '.join(PLAIN)}) of the same preset and batch. ms/step: median of the timed steps.",
            MODEL_FOOTER],
    variants=VARIANTS, plot_value="ms_median", plot_label="ms per training step (median)",
    tick=lambda preset, batch: f"{preset}\nbatch {batch}")
ARRAYS = Report(
    "arrays",
    [Column("preset", "preset", 10, left=True), Column("batch", "batch", 5), Column("K", "runs", 3),
     *_timing_columns(16), Column("launch", "launches", 7, "d"), Column("model ms", "model_ms", 8, ".3f"),
     Column("peak MiB", "peak_mem_mib", 8, ".0f"),
     Column("1st s", "first_step_s", 6, ".2f"), *NVML_COLUMNS,
     Column("x plain", "speedup_vs_plain_sequential", 7, speedup),
     Column("x fused", "speedup_vs_fused_sequential", 7, speedup)],
    keys=4,
    footer=["K runs of `batch` images each per step; ms/step: median time of one step of all K runs; img/s: "
            "K x batch / ms; TFLOP/s: K x step_flops / ms; launch: launches of one eager step of all K runs; "
            "x plain / x fused: images/s against plain_sequential / fused_sequential at the same K.",
            MODEL_FOOTER],
    variants=ARRAY_VARIANTS, plot_value="images_per_s", plot_label="images/s, all runs together",
    tick=lambda preset, batch, runs: f"{preset}, K={runs}\n{batch} img/run", legend_cols=3)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments: one line on stderr, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--presets", default=None, help=f"comma-separated, of {','.join(PRESETS)} "
                   f"(default GPU: {GPU_DEFAULTS['presets']}; CPU: {CPU_DEFAULTS['presets']})")
    p.add_argument("--batches", default=None, help=f"default GPU: {GPU_DEFAULTS['batches']} (with --array: "
                   f"{ARRAY_GPU_DEFAULTS['batches']} per run); CPU: {CPU_DEFAULTS['batches']}")
    p.add_argument("--variants", default=None, help=f"subset of {','.join(VARIANTS)} (default "
                   f"{','.join(DEFAULT_VARIANTS)}); with --array, of {','.join(ARRAY_VARIANTS)} (default: all)")
    p.add_argument("--array", default=None, help="comma-separated array sizes K (e.g. 1,4,16,64): time arrays of K "
                   "runs (see 'Arrays of runs' above; default presets lines, batch 64 per run on a GPU) instead of "
                   "the single-run comparison")
    p.add_argument("--array-max-seconds", type=float, default=None,
                   help="with --array: cut each timed window to about this long (default GPU 3, CPU no cut)")
    p.add_argument("--steps", type=int, default=None, help="timed steps at least (default GPU 100, CPU 5)")
    p.add_argument("--min-seconds", type=float, default=None,
                   help="stretch the timed window to this long (NVML samples; default GPU 1.0, CPU 0)")
    p.add_argument("--max-steps", type=int, default=20000, help="cap of the stretched window")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default GPU 10, CPU 1)")
    p.add_argument("--quick", action="store_true", help="lines and cifar1024 at 64 and 1024, short windows (~2 min)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for --compile")
    p.add_argument("--fused-cpu", action="store_true", help="on the CPU, time fused under the Triton interpreter")
    p.add_argument("--model", default=None, choices=("h100", "h200", "a100"),
                   help="the GPU of the 'model ms' column (default: this GPU when the cost model knows it; on a "
                        "CPU the column is filled only with --model, which needs TRITON_INTERPRET=1)")
    p.add_argument("--first-step", choices=("none", "first", "all"), default=None,
                   help="cold/warm first step in fresh processes: none, first (the default fast trainer at "
                        "the first preset and batch; GPU default) or all cases")
    p.add_argument("--first-step-timeout", type=float, default=300.0)
    p.add_argument("--nvml-interval", type=float, default=0.05, help="NVML sampling interval, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write environment, arguments and results here")
    p.add_argument("--csv", default=None, help="one row per result (environment repeated in each)")
    p.add_argument("--plot", default=None, help="PNG of the step times as bars")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine (use --device cpu)")
    if args.array is not None:
        if args.quick or args.compile:
            p.error("--quick and --compile belong to the single-run benchmark, not to --array")
        try:
            args.array = [int(k) for k in args.array.split(",") if k]
        except ValueError:
            p.error(f"--array: comma-separated integers, got {args.array!r}")
        if not args.array or min(args.array) < 1:
            p.error("--array: array sizes must be >= 1")
        defaults = dict(ARRAY_GPU_DEFAULTS if device.type == "cuda" else ARRAY_CPU_DEFAULTS)
        valid, default_variants = ARRAY_VARIANTS, ARRAY_VARIANTS
    else:
        defaults = dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
        valid, default_variants = VARIANTS, DEFAULT_VARIANTS
    if args.quick and device.type == "cuda":
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in (args.variants or ",".join(default_variants)).split(",") if v]
    if args.compile and "compile" not in args.variants:
        args.variants.append("compile")
    bad = set(args.variants) - set(valid)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; valid{' with --array' if args.array else ''}: {', '.join(valid)}")
    args.presets = [s for s in args.presets.split(",") if s]
    bad = set(args.presets) - set(PRESETS)
    if bad:
        p.error(f"unknown presets {sorted(bad)}; valid: {', '.join(PRESETS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches: comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batches must be >= 1, --steps >= 1, --warmup >= 0")
    for name in OUTPUTS:  # before any work: a result that cannot be written is an hour lost
        path = getattr(args, name)
        problem = output_problem(path) if path and not args.child else None
        if problem:
            p.error(f"--{name} {path}: {problem}")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if args.child:
        return child_first_step(args.child, device, args.seed)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    env = environment()
    where = f"{env['gpu']} (sm_{env['gpu_capability']})" if on_gpu else \
        f"CPU: {env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads"
    print(f"acai_fast throughput on {where}; torch {env['torch']}, triton {env['triton']}, "
          f"commit {(env['commit'] or '?')[:10]}{' (dirty)' if env['dirty'] else ''}", flush=True)
    if not on_gpu:
        print(f"*** {CPU_NOTE} ***", flush=True)
    cases = [Case(p, b, v, k) for p in args.presets for b in args.batches for k in (args.array or [None])
             for v in args.variants]
    fast = "fused_graph" if "fused_graph" in args.variants else ("fused" if "fused" in args.variants else None)
    cold_cases = set()
    if args.array:
        pass  # an array's first step is timed in-process only
    elif args.first_step == "all":
        cold_cases = set(cases)
    elif args.first_step == "first" and fast is not None:
        cold_cases = {Case(args.presets[0], args.batches[0], fast)}

    sampler = GpuSampler(args.nvml_interval, device=device) if on_gpu else None
    results: list[Result] = []
    t_start = time.perf_counter()
    with sampler if sampler is not None else contextlib.nullcontext():
        for i, case in enumerate(cases):
            runs = "" if case.runs is None else f" K={case.runs}"
            print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t_start:6.0f} s] {case.preset} batch {case.batch}"
                  f"{runs} {case.variant} ...", file=sys.stderr, flush=True)
            r = run_case(case, device, args, sampler)
            if case in cold_cases and r.status == "ok":
                cold, warm, error = first_step_cold_warm(case, device, args)
                r = dataclasses.replace(r, first_step_cold_s=cold, first_step_warm_s=warm,
                                        reason=f"first step cold/warm: {error}" if error else r.reason)
            results.append(r)
            if r.status == "ok":
                print(f"    {r.ms_median:.3f} ms/step [{r.ms_p20:.3f}, {r.ms_p80:.3f}] over {r.steps_timed} steps, "
                      f"{r.images_per_s:.0f} img/s" + (f" ({r.note})" if r.note else ""), file=sys.stderr, flush=True)
            else:
                print(f"    {r.status}: {r.reason}", file=sys.stderr, flush=True)
    rows = speedups(results)
    report = ARRAYS if args.array else SINGLE
    print(report.table(rows, cpu_note=CPU_NOTE if not on_gpu else None), flush=True)
    if sampler is not None and not sampler.available:
        print(f"NVML: {sampler.reason}", flush=True)
    hidden = ("child",) if args.array else ("child", "array", "array_max_seconds")
    payload = dict(device=device.type, note=CPU_NOTE if not on_gpu else None, environment=env,
                   nvml=dict(available=bool(sampler and sampler.available), source=sampler and sampler.source,
                             reason=sampler.reason if sampler else "CPU run"),
                   arguments={k: v for k, v in vars(args).items() if k not in hidden},
                   flop_model=__doc__.split("FLOPs per step")[1].split("On a machine")[0].strip())
    if args.array:
        payload["array_model"] = __doc__.split("Arrays of runs")[1].split("    python bench")[0].strip()
    title = "acai_fast arrays of runs: images/s" if args.array else "acai_fast step time"
    report.write(rows, payload, json_path=args.json, csv_path=args.csv, plot_path=args.plot, env=env,
                 device=device.type, title=f"{title}, {where}\ntorch {env['torch']}, {env['timestamp'][:10]}"
                 + ("\nCPU NUMBERS (not a GPU)" if not on_gpu else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
