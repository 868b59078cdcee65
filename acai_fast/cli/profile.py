"""`acai-fast profile`: a measured profile of a few training steps on this machine (acai_fast.profiling),
or with --model GPU every launch of one step as the cost model sees it on that GPU (no GPU needed)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import PRESETS, ACAIConfig
from .common import device_arg, output_folder


def add_parser(sub) -> None:
    """`acai-fast profile`: a torch.profiler trace of a few training steps (acai_fast.profiling)."""
    prof = sub.add_parser("profile", help="profile training steps: Chrome trace, top kernels, phase split, "
                                          "GPU utilisation picture", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prof.add_argument("--preset", default="lines", choices=PRESETS, help="the paper's configuration")
    prof.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's, 64)")
    prof.add_argument("--backend", default="auto", help="auto, reference or fused")
    prof.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                      help="activation dtype (default: bf16 for fused on a GPU, else fp32)")
    prof.add_argument("--no-cuda-graph", action="store_true",
                      help="fused on a GPU: eager launches instead of graph replays (the phase split then "
                           "sees forward/backward/optimizer; inside a replay it sees one graph)")
    prof.add_argument("--steps", type=int, default=5, help="profiled steps")
    prof.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (compilation, graph capture)")
    prof.add_argument("--sample-seconds", type=float, default=3.0,
                      help="then train this long without the profiler while NVML samples the GPU")
    prof.add_argument("--top", type=int, default=15, help="rows of the top-kernel table")
    prof.add_argument("--out", default=None, help="folder for trace.json, profile.json, utilisation.png "
                                                   "(required for a measured profile)")
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batch")
    prof.add_argument("--model", default=None, choices=("h100", "h200", "a100"),
                      help="no GPU needed: trace one step on this machine (a dry run: kernels recorded, not run) "
                           "and print every launch as the cost model (acai_fast/ops/cost.py) sees it on this GPU: "
                           "shape, config, CTAs, FLOPs, bytes, modelled us and what bounds it. A model, not a "
                           "measurement")
    prof.add_argument("--runs", type=int, default=1, help="an array of this many runs trained as one")
    prof.add_argument("--configs", default="chooser", choices=("chooser", "heuristic", "model"),
                      help="--model: each conv launch's config: what the package picks on that GPU (its tuned "
                           "table, else its chooser), the shape heuristic, or the cost model's best")
    prof.add_argument("--json", default=None, help="--model: also write the modelled launches to this JSON file")
    prof.add_argument("--csv", default=None, help="--model: also write the modelled launches to this CSV file")


def cmd_profile(parser, args) -> int:
    import torch

    from ..profiling import format_report, profile_trainer
    from ..trainer import ACAITrainer

    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.model is not None:
        return _profile_model(parser, args)
    if args.json is not None or args.csv is not None:
        parser.error("--json and --csv write the modelled launches: use them with --model GPU")
    if args.out is None:
        parser.error("--out FOLDER is required for a measured profile (or --model h100|h200|a100 for a "
                     "modelled one, no GPU needed)")
    device = device_arg(parser, args)
    if args.steps < 1 or args.warmup < 0 or args.sample_seconds < 0 or args.top < 1:
        parser.error("--steps and --top must be >= 1, --warmup and --sample-seconds >= 0")
    output_folder(parser, "--out", args.out)  # before any work
    try:
        config = ACAIConfig.preset(args.preset, **({} if args.batch is None else dict(batch=args.batch)))
        trainer = ACAITrainer(config, backend=args.backend, device=device, seed=args.seed, dtype=args.dtype,
                              cuda_graph=False if args.no_cuda_graph else None)
    except ValueError as exc:
        parser.error(str(exc))
    gen = torch.Generator().manual_seed(args.seed)  # the step's time does not depend on the pixels
    x = torch.rand(config.batch, config.colors, config.image_size, config.image_size, generator=gen) * 2 - 1
    labels = torch.randint(0, config.nclass, (config.batch,), generator=gen)
    x, labels = x.to(trainer.device), labels.to(trainer.device)
    cpu = "" if trainer.device.type == "cuda" else " (a CPU run: it profiles the CPU step, not a GPU)"
    print(f"acai-fast: profiling {args.preset} batch {config.batch} on {trainer.device}, backend "
          f"{trainer.backend}{', CUDA graphs' if trainer.cuda_graph else ''}{cpu}; outputs in {args.out}",
          file=sys.stderr)
    report = profile_trainer(trainer, x, labels, steps=args.steps, warmup=args.warmup, out_dir=args.out,
                             sample_seconds=args.sample_seconds, top=args.top)
    print(format_report(report))
    if trainer.device.type == "cuda" and getattr(trainer, "engine", None) is not None:
        _print_measured_vs_model(trainer, x, labels, report, args.steps)
    return 0


def _print_measured_vs_model(trainer, x, labels, report, steps: int) -> None:
    """On a GPU: each kernel's measured time beside the cost model's (the configs that ran, traced
    on one more eager step of the trainer). Best effort: matched by kernel name."""
    from ..engine.launches import model_launches, trace_launches
    from ..ops import cost
    from ..profiling import format_measured_vs_model, load_trace, measured_vs_model

    gpu = cost.gpu_for_device(trainer.device)
    if gpu is None:
        import torch

        print(f"\n(no cost model of {torch.cuda.get_device_name(trainer.device)}: modelled GPUs are "
              f"{', '.join(cost.GPUS)})")
        return
    rows = model_launches(trace_launches(trainer, x, labels, dry_run=False), gpu, configs="traced")
    print("\n" + format_measured_vs_model(measured_vs_model(load_trace(report.trace), rows, steps), gpu.name))


def _profile_model(parser, args) -> int:
    """`acai-fast profile --model GPU`: one step traced as a dry run (on the CPU under the Triton
    interpreter, or on this machine's GPU without running a kernel), every launch costed for GPU."""
    import os
    import subprocess

    import torch

    from .. import _ext

    if not _ext.HAS_TRITON:
        parser.error("--model traces the fused engine's Triton launches: it needs triton "
                     "(pip install 'acai_fast[triton]')")
    for flag in ("--json", "--csv"):
        path = getattr(args, flag[2:])
        if path is not None and not Path(path).parent.is_dir():
            parser.error(f"{flag} {path}: folder {Path(path).parent} does not exist")
    on_gpu = torch.cuda.is_available() and not _ext.INTERPRET and args.device != "cpu"
    if not on_gpu and not _ext.INTERPRET:  # the kernels were set up for a GPU: trace in a fresh process
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = [a for a in sys.argv[1:]] if sys.argv[1:2] == ["profile"] else None
        if argv is None:
            parser.error("--model on a machine without a GPU needs TRITON_INTERPRET=1 in the environment")
        code = "import sys; from acai_fast.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *argv], env=env).returncode

    from ..engine.launches import model_launches, trace_launches
    from ..ops import cost
    from ..profiling import format_model_report, model_summary, write_model_outputs
    from ..trainer import ACAITrainer

    gpu = cost.get_gpu(args.model)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
    try:
        config = ACAIConfig.preset(args.preset, **({} if args.batch is None else dict(batch=args.batch)))
        trainer = ACAITrainer(config, backend="fused", device="cuda" if on_gpu else "cpu", seed=args.seed,
                              dtype=dtype if on_gpu else torch.float32, cuda_graph=False,
                              runs=args.runs if args.runs > 1 else None)
    except ValueError as exc:
        parser.error(str(exc))
    lead = (args.runs,) if args.runs > 1 else ()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(*lead, config.batch, config.colors, config.image_size, config.image_size, generator=gen) * 2 - 1
    labels = torch.randint(0, config.nclass, (*lead, config.batch), generator=gen)
    x, labels = x.to(trainer.device), labels.to(trainer.device)
    print(f"acai-fast: tracing one {args.preset} step (batch {config.batch}{f', {args.runs} runs' if lead else ''}) "
          f"as a dry run on {trainer.device}; modelling it on an {gpu.name}", file=sys.stderr)
    trace = trace_launches(trainer, x, labels, dry_run=True, dtype=None if on_gpu else dtype)
    rows = model_launches(trace, gpu, configs=args.configs)
    peak = gpu.bf16_flops if dtype == torch.bfloat16 else gpu.fp32_flops
    summary = model_summary(rows, model_to_wall=cost.MODEL_TO_WALL, peak_flops=peak)
    title = (f"{args.preset}, batch {config.batch}{f', {args.runs} runs as one array' if lead else ''}, "
             f"{str(dtype).replace('torch.', '')} activations, fp32 master weights, on an {gpu.name} "
             f"(conv configs: {args.configs}), fused engine in a CUDA graph")
    print(format_model_report(rows, summary, title=title, top=args.top))
    meta = dict(preset=args.preset, batch=config.batch, runs=args.runs, gpu=args.model, gpu_name=gpu.name,
                dtype=str(dtype).replace("torch.", ""), configs=args.configs, constants=dataclasses.asdict(cost.FIT),
                launch_gap_us=cost.LAUNCH_GAP_US, model_to_wall=cost.MODEL_TO_WALL, modelled=True)
    write_model_outputs(rows, summary, meta, json_path=args.json, csv_path=args.csv)
    return 0
