"""`acai-fast sweep` (seeds x hyper-parameters as arrays of runs; acai_fast.sweep) and `acai-fast
reproduce TASK` (the paper's tables; acai_fast.reproduce)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import PRESETS, ACAIConfig
from .common import (DATA_HELP, PROGRESS_HELP, add_tensorboard_argument, add_test_fraction, device_arg,
                     output_folder, positive_float)
from .data_options import own_images, own_splits


def add_reproduce_parsers(sub) -> None:
    """`acai-fast reproduce TASK`: the paper's tables (acai_fast.reproduce). Each task is a
    sub-command of `reproduce` with its own function; lines: `_add_reproduce_lines`."""
    reproduce = sub.add_parser("reproduce", help="reproduce a table of the paper (lines, ...)")
    tasks = reproduce.add_subparsers(dest="task", required=True)
    _add_reproduce_lines(tasks)
    _add_reproduce_downstream(tasks)


def _add_reproduce_lines(tasks) -> None:
    lines = tasks.add_parser("lines", help="the lines table: every model trained and scored as the paper",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lines.add_argument("--models", default="all",
                       help="all, or a comma-separated list of acai, baseline, dropout, denoising, vae, aae, "
                            "vqvae, vae_acai")
    lines.add_argument("--kimg", type=positive_float, default=16384.0,
                       help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
    lines.add_argument("--runs", type=int, default=3, help="runs (seeds) per model; the table shows mean +- std")
    lines.add_argument("--eval-kimg", type=positive_float, default=64.0,
                       help="evaluate every this many kimg (only the last 20 evaluations are run: the "
                            "per-run median reads those)")
    lines.add_argument("--out", required=True, help="folder for lines_table.md, the PNGs and runs/")
    lines.add_argument("--backend", default="auto", help="auto, reference or fused, for every model")
    lines.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    lines.add_argument("--seed", type=int, default=0, help="run r of each model has seed SEED + r")
    lines.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def cmd_reproduce_lines(parser, args) -> int:
    import torch

    from ..reproduce.lines import check_arguments, reproduce_lines
    from ..trainer import resolve_backend

    device = device_arg(parser, args)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        models = check_arguments(args.models, args.kimg, args.runs, args.eval_kimg)
        resolve_backend(args.backend, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except ValueError as exc:
        parser.error(str(exc))
    output_folder(parser, "--out", args.out)  # before any work
    print(f"acai-fast: reproducing the lines table: {', '.join(models)}; {args.runs} run(s) x "
          f"{args.kimg:g} kimg each; outputs in {args.out}", file=sys.stderr)
    reproduce_lines(args.out, models, kimg=args.kimg, runs=args.runs, eval_kimg=args.eval_kimg,
                    backend=args.backend, device=device, seed=args.seed, progress=not args.no_progress)
    print((Path(args.out) / "lines_table.md").read_text())
    return 0


def _add_reproduce_downstream(tasks) -> None:
    """`reproduce probe` and `reproduce cluster` (acai_fast.reproduce.downstream): the same options."""
    what = dict(probe="the linear-probe table: test accuracy of a linear classifier on the latent",
                cluster="the clustering table: K-means accuracy of the whitened latents")
    for task in ("probe", "cluster"):
        p = tasks.add_parser(task, help=what[task] + ", every model trained as the paper",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--dataset", required=True, choices=("mnist", "svhn", "cifar10"),
                       help="the paper's data set; with your own images as --data, the networks' family "
                            "(mnist: grey; svhn, cifar10: colour)")
        p.add_argument("--latent", type=int, required=True,
                       help="latent dims: 32 or 256 (mnist, svhn), 256 or 1024 (cifar10)")
        p.add_argument("--data", default=None, help=DATA_HELP)
        add_test_fraction(p)
        p.add_argument("--out", required=True, help=f"folder for {task}_PRESET_table.md, the JSON, the PNG and runs/")
        p.add_argument("--models", default="all", help="all, or a comma-separated list of models (acai, ...)")
        p.add_argument("--kimg", type=positive_float, default=16384.0,
                       help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
        p.add_argument("--runs", type=int, default=1, help="runs (seeds) per model; the table shows mean +- std")
        p.add_argument("--eval-kimg", type=positive_float, default=64.0,
                       help="evaluate the probe every this many kimg (only the last 20 evaluations run)")
        if task == "cluster":
            p.add_argument("--restarts", type=int, default=1000,
                           help="K-means initialisations (default: 1000, the paper's)")
        p.add_argument("--backend", default="auto", help="auto, reference or fused, for every model")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--seed", type=int, default=0, help="run r of each model has seed SEED + r")
        p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def cmd_reproduce_downstream(parser, args) -> int:
    import torch

    from ..data import data_folder
    from ..reproduce.downstream import check_arguments, load_data, preset_for, reproduce_downstream
    from ..trainer import resolve_backend

    device = device_arg(parser, args)
    restarts = getattr(args, "restarts", 1000)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        _, models = check_arguments(args.task, args.dataset, args.latent, args.models, args.kimg, args.runs,
                                    args.eval_kimg, restarts)
        resolve_backend(args.backend, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        folder = data_folder(args.data)
    except ValueError as exc:
        parser.error(str(exc))
    preset = preset_for(args.dataset, args.latent)
    own = own_images(parser, args, ACAIConfig.preset(preset))  # your own images: --dataset/--latent pick the networks
    overrides, data_name = {}, None
    if own is not None:
        from ..reproduce.downstream import DownstreamData
        if own.nclass is None:
            parser.error(f"--data {own.source}: reproduce {args.task} needs labels (class subfolders, or a labels "
                         f"array in the .npz)")
        overrides, data_name = dict(nclass=own.nclass), Path(own.source).name
        data = DownstreamData(*own_splits(parser, own, ACAIConfig.preset(preset, **overrides)))
    else:
        try:
            data = load_data(args.dataset, folder)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--data: {exc}")
    output_folder(parser, "--out", args.out)  # after --data is read (bad data leaves no folder), before training
    print(f"acai-fast: reproducing the {args.task} table on {preset}: {', '.join(models)}; {args.runs} run(s) x "
          f"{args.kimg:g} kimg each; outputs in {args.out}", file=sys.stderr)
    reproduce_downstream(args.task, args.dataset, args.latent, data, args.out, models=models, kimg=args.kimg,
                         runs=args.runs, eval_kimg=args.eval_kimg, restarts=restarts, backend=args.backend,
                         device=device, seed=args.seed, progress=not args.no_progress, config_overrides=overrides,
                         data_name=data_name)
    print((Path(args.out) / f"{args.task}_{preset}_table.md").read_text())
    return 0


def cmd_reproduce(parser, args) -> int:
    return {"lines": cmd_reproduce_lines, "probe": cmd_reproduce_downstream,
            "cluster": cmd_reproduce_downstream}[args.task](parser, args)


# ------------------------------------------------------------------------------------------------
# `acai-fast sweep` (acai_fast.sweep)
# ------------------------------------------------------------------------------------------------


def _seed_list(text: str) -> list[int]:
    """`0-3`, `0,2,5` or `0-3,8` -> the seeds."""
    seeds = []
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"expected seeds like 0-3 or 0,2,5, got {text!r}")
        low, high = int(low), int(high) if sep else int(low)
        if high < low or high - low >= 100_000:
            raise argparse.ArgumentTypeError(f"seed range {part.strip()!r}: write low-high with at most "
                                             f"100000 seeds")
        seeds.extend(range(low, high + 1))
    return seeds


def _number_list(text: str) -> list[float]:
    """`0,0.5,1` -> [0.0, 0.5, 1.0]."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="train seeds x hyper-parameters as arrays of runs; one folder per run, "
                                      "summary.md/.csv and plots", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sw.add_argument("--preset", default="lines", choices=PRESETS, help="the paper's configuration")
    sw.add_argument("--seeds", type=_seed_list, required=True, help="seeds: a range 0-3, a list 0,2,5, or both")
    for name, what in (("advweight", "lambda, the critic term's weight"), ("reg", "gamma, the critic's real-data mixing"),
                       ("lr", "Adam learning rate")):
        sw.add_argument(f"--{name}", type=_number_list, default=None,
                        help=f"{what}: comma-separated values to sweep (default: the preset's)")
    from ..models import MODELS
    sw.add_argument("--model", default="acai", choices=list(MODELS), help="what every run trains")
    sw.add_argument("--kimg", type=positive_float, default=16384.0,
                    help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
    sw.add_argument("--eval-kimg", type=positive_float, default=64.0,
                    help="evaluate, checkpoint and draw every run every this many kimg")
    sw.add_argument("--out", required=True, help="folder of the sweep: one folder per run, summary.md, summary.csv, PNGs")
    sw.add_argument("--array", type=int, default=None,
                    help="runs trained together as one array (default: as many as the GPU's free memory holds "
                         "by a per-run estimate, at most 64; on the CPU 4)")
    sw.add_argument("--backend", default="auto", help="auto, reference or fused")
    sw.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sw.add_argument("--resume", action="store_true",
                    help="continue the sweep in OUT: finished runs are skipped, the others continue from "
                         "their checkpoints")
    add_tensorboard_argument(sw)
    sw.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    sw.add_argument("--data", default=None, help=DATA_HELP)
    add_test_fraction(sw)
    sw.add_argument("--batch", type=int, default=None, help="images per step of each run (default: the preset's, 64)")
    sw.add_argument("--depth", type=int, default=None,
                    help="width of the first encoder/decoder level (default: the preset's)")
    sw.add_argument("--latent", type=int, default=None, help="latent channels (default: the preset's)")
    sw.add_argument("--advdepth", type=int, default=None,
                    help="critic width (default: the preset's, 0: the encoder's depth)")
    sw.add_argument("--pairs", type=int, default=256,
                    help="lines: test pairs per evaluation (default: 256, the paper's)")


def cmd_sweep(parser, args) -> int:
    from ..distributed import init_from_env
    from ..sweep import SweepArgumentError, sweep

    device = device_arg(parser, args)
    try:  # torchrun: each rank trains its share of the runs (None when this process runs alone)
        distributed = args.distributed = init_from_env(device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.resume and not Path(args.out).is_dir():  # a typo must not start a new sweep
        parser.error(f"--resume: {args.out} is not a folder: nothing to continue (leave --resume out to "
                     f"start a sweep there)")
    output_folder(parser, "--out", args.out)  # before any work (loading data)
    overrides = {k: getattr(args, k) for k in ("batch", "depth", "latent", "advdepth") if getattr(args, k) is not None}
    data = args.data
    try:
        config = ACAIConfig.preset(args.preset, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    own = own_images(parser, args, config)  # your own images: loaded once, every run trains on them
    if own is not None:
        if own.nclass is not None:
            overrides["nclass"] = own.nclass
        data = own_splits(parser, own, dataclasses.replace(config, **overrides))
    main_rank = distributed is None or distributed.is_main
    if main_rank:
        ranks = f" over {distributed.world_size} processes" if distributed is not None else ""
        print(f"acai-fast: sweep of {args.model} on {args.preset}{ranks}, {args.kimg:g} kimg per run; outputs in "
              f"{args.out}", file=sys.stderr)
    try:
        sweep(args.preset, args.seeds, advweight=args.advweight, reg=args.reg, lr=args.lr, model=args.model,
              kimg=args.kimg, eval_kimg=args.eval_kimg, out=args.out, array=args.array, backend=args.backend,
              device=device, resume=args.resume, progress=not args.no_progress, tensorboard=args.tensorboard,
              data=data, overrides=overrides, pairs=args.pairs, distributed=distributed)
    except SweepArgumentError as exc:
        parser.error(str(exc))
    if main_rank:
        print((Path(args.out) / "summary.md").read_text())
    return 0
