"""Whole-step throughput of the ACAI trainer against its plain-PyTorch baselines, in one process.

Variants (ANCHORS.md's columns), each a full SPEC step (encoder once, decoder twice, critic twice,
both Adam updates, the probe):
  eager_fp32   the reference trainer as it is
  eager_bf16   the same under torch.autocast(bfloat16) with channels_last weights and inputs
  graph_bf16   eager_bf16 captured whole into one CUDA graph (capturable fused Adam; alpha drawn from
               the default CUDA generator, which graph capture supports)
  fused        ACAITrainer(backend="fused"): Triton conv blocks, fused mix and losses, bf16 activations
  fused_graph  the same with cuda_graph=True (each step one CUDA-graph replay after 3 eager steps)

Per variant: ms/step (median, p20, p80 over repeats of `--steps` steps, CUDA-event timing after
warm-up), images/s, achieved TFLOP/s from torch's FLOP counter on one eager step, peak GPU memory, and
the first (cold) step's wall time. Usage:
    python bench/throughput.py [--presets lines,cifar1024] [--batches 64,1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from _common import cuda_time, environment, require_cuda, summarize, write_json

from acai_fast import ACAIConfig, ACAITrainer

VARIANTS = ("eager_fp32", "eager_bf16", "graph_bf16", "fused", "fused_graph")


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    variant: str


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    images_per_s: float | None = None
    tflops: float | None = None
    gflop_per_step: float | None = None
    peak_mem_mib: float | None = None
    first_step_s: float | None = None
    skipped: str | None = None


def make_step(case: Case, seed: int = 0):
    """A zero-argument callable running one training step of `case` on fixed GPU batches."""
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    fused = case.variant.startswith("fused")
    trainer = ACAITrainer(config, backend="fused" if fused else "reference", device="cuda", seed=seed,
                          cuda_graph=case.variant == "fused_graph")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(case.batch, config.colors, 32, 32, device="cuda", generator=g) * 2 - 1
    labels = torch.randint(0, config.nclass, (case.batch,), device="cuda", generator=g)
    if case.variant == "eager_fp32" or fused:
        return lambda: trainer.step(x, labels), trainer

    # bf16 variants: channels_last everywhere, autocast around the step.
    for net in (trainer.encoder, trainer.decoder, trainer.critic):
        net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return trainer.step(x, labels)

    if case.variant == "eager_bf16":
        return eager, trainer

    # graph_bf16: capturable optimisers, alpha from the graph-safe default generator.
    for name, params in (("opt_ae", trainer.ae_params), ("opt_critic", trainer.critic_params),
                         ("opt_probe", list(trainer.probe.parameters()))):
        setattr(trainer, name, torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                                fused=True, capturable=True))
    trainer.draw_alpha = lambda n: 0.5 - (torch.rand(n, 1, 1, 1, device="cuda") - 0.5).abs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return graph.replay, trainer


def count_gflop(case: Case) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = make_step(Case(case.preset, case.batch, "eager_fp32"))
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def run_case(case: Case, steps: int, repeats: int, gflop: float) -> Result:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step, _ = make_step(case)
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms, p20, p80 = summarize(cuda_time(step, warmup=5, reps=repeats, inner=steps))
    return Result(case, ms_median=ms, ms_p20=p20, ms_p80=p80,
                  images_per_s=case.batch / ms * 1e3, tflops=gflop / ms, gflop_per_step=gflop,
                  peak_mem_mib=torch.cuda.max_memory_allocated() / 2 ** 20, first_step_s=first)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="lines,mnist256,cifar1024")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    require_cuda("bench/throughput.py")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    torch.backends.cudnn.benchmark = True
    results = []
    for preset in args.presets.split(","):
        for batch in map(int, args.batches.split(",")):
            gflop = count_gflop(Case(preset, batch, "eager_fp32"))
            for variant in variants:
                case = Case(preset, batch, variant)
                try:
                    r = run_case(case, args.steps, args.repeats, gflop)
                except Exception as exc:  # a failing variant is reported, the others still run
                    r = Result(case, skipped=f"{type(exc).__name__}: {exc}")
                results.append(r)
                if r.skipped:
                    print(f"{preset:>10} {batch:>5} {variant:>11}  skipped: {r.skipped}", flush=True)
                else:
                    base = next((b for b in results if b.ms_median and b.case.variant == "eager_fp32"
                                 and (b.case.preset, b.case.batch) == (preset, batch)), None)
                    speedup = base.ms_median / r.ms_median if base else float("nan")
                    print(f"{preset:>10} {batch:>5} {variant:>11}  {r.ms_median:8.3f} ms "
                          f"[{r.ms_p20:.3f}, {r.ms_p80:.3f}]  {r.images_per_s:9.0f} img/s  "
                          f"{r.tflops:6.1f} TFLOP/s  {r.peak_mem_mib:8.0f} MiB  first {r.first_step_s:5.1f} s  "
                          f"x{speedup:.2f} vs eager fp32", flush=True)
    if args.json:
        rows = [dict(dataclasses.asdict(r.case), **{k: v for k, v in dataclasses.asdict(r).items() if k != "case"})
                for r in results]
        write_json(args.json, dict(environment=environment(), arguments=vars(args), results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
