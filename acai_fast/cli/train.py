"""`acai-fast train`: a new run, or one continued from its checkpoint (--resume, whose options may not
contradict it), trained by acai_fast.loop.fit on the lines generator, the paper's data or your images."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import PRESETS, ACAIConfig
from .common import (DATA_HELP, PROGRESS_HELP, add_tensorboard_argument, add_test_fraction, device_arg,
                     output_folder, positive_float)
from .data_options import dataset_kind, load_split, own_images, own_splits, probe_evaluation


def add_parser(sub) -> None:
    """`acai-fast train` and its options."""
    train = sub.add_parser("train", help="train a model; evaluations go to OUT/metrics.jsonl",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", default=None, choices=PRESETS,
                       help="the paper's configuration (default: lines; with --resume: the checkpoint's, and "
                            "another one is an error)")
    train.add_argument("--kimg", type=positive_float, default=16384.0,
                       help="train on this many thousand (x1024) images in total (default: 16384, the paper's)")
    train.add_argument("--out", required=True, help="output folder (metrics.jsonl, checkpoint.pt, interpolations.png)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--backend", default="auto",
                       help="reference: plain PyTorch fp32; fused: the Triton/CUDA kernels (a GPU); "
                            "auto: the fastest backend verified on this device")
    train.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                       help="activation dtype (default: bf16 for fused on a GPU, else fp32)")
    train.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each fused step as one CUDA graph after 3 eager steps (default: on "
                            "for the fused backend on a GPU; --no-cuda-graph for debugging)")
    train.add_argument("--seed", type=int, default=None,
                       help="seed of the weights, alphas and data order (default 0; with --resume the "
                            "checkpoint's: a different one is an error)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--eval-kimg", type=positive_float, default=64.0,
                       help="evaluate, checkpoint and draw every this many kimg")
    train.add_argument("--batch", type=int, default=None,
                       help="the GLOBAL batch: images per step over all processes (under torchrun split "
                            "evenly, >= 2 per process); default: the preset's, 64")
    train.add_argument("--data", default=None, help=DATA_HELP)
    add_test_fraction(train)
    train.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    _add_fault_arguments(train)
    train.add_argument("--profile", action="store_true",
                       help="sample the GPU with NVML for the whole run (OUT/gpu_samples.csv) and add each "
                            "interval's mean utilisation and power to its metrics line")
    _add_model_arguments(train)
    add_tensorboard_argument(train)


def _add_model_arguments(train) -> None:
    """`train --model NAME` and the paper's hyper-parameters a user may vary (each default: the
    preset's value); validated by ACAIConfig, recorded in the checkpoint and on every metrics line."""
    from ..models import MODELS

    train.add_argument("--model", default=None, choices=list(MODELS),
                       help="what to train: acai, the paper's baselines or vae_acai (default: acai; "
                            "with --resume: the checkpoint's)")
    train.add_argument("--advweight", type=float, default=None,
                       help="lambda: weight of the critic term (default: the preset's, 0.5)")
    train.add_argument("--reg", type=float, default=None,
                       help="gamma: the critic's real-data mixing (default: the preset's, 0.2)")
    train.add_argument("--advdepth", type=int, default=None,
                       help="critic width (default: the preset's, 0: the encoder's depth)")
    train.add_argument("--depth", type=int, default=None,
                       help="width of the first encoder/decoder level (default: the preset's)")
    train.add_argument("--latent", type=int, default=None, help="latent channels (default: the preset's)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's, 1e-4)")


def _model_overrides(args) -> dict:
    names = ("advweight", "reg", "advdepth", "depth", "latent", "lr")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _add_fault_arguments(train) -> None:
    """Timed checkpoints and what a non-finite loss does (acai_fast.loop.fit). SIGINT/SIGTERM
    always finish the step, write a checkpoint and exit; a second Ctrl-C exits at once."""
    train.add_argument("--checkpoint-min", type=positive_float, default=30.0,
                       help="also write OUT/checkpoint.pt every this many minutes (atomically: the "
                            "previous one stays whole until the new one is written)")
    train.add_argument("--nan-policy", default="stop", choices=("stop", "skip"),
                       help="on a non-finite loss: stop (naming the step and the loss; the last good "
                            "checkpoint is kept) or skip that step's update and go on")


def _image_batches(trainer, x, y):
    """Training batches for fit(): the whole set moved to the trainer's device once, as uint8
    (acai_fast.data.DeviceBatches); under torchrun each process takes its share of a global batch."""
    from ..data import DeviceBatches

    dist = trainer.distributed
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    local = trainer.config.batch if dist is None else dist.local_batch(trainer.config.batch)
    return DeviceBatches(x, y, batch=local, seed=trainer.seed, device=trainer.device,
                         start_step=trainer.steps, rank=rank, world_size=world)


def _tensorboard_log(parser, args, out: Path, trainer):
    """train --tensorboard: the run's TensorBoardLog (rank 0 writes; None without the flag)."""
    if not args.tensorboard or (args.distributed is not None and not args.distributed.is_main):
        return None
    from ..tensorboard_log import TensorBoardLog
    try:
        return TensorBoardLog(out, resume_nimg=trainer.nimg)
    except ImportError as exc:
        parser.error(f"--tensorboard: {exc}")


PRESET_FIELDS = ("dataset", "colors", "latent_width", "image_size", "depth", "latent")  # what a preset sets


def preset_name(config: ACAIConfig) -> str:
    """The preset `config` was made from, where its preset fields are exactly one's (the probe's
    classes aside: your own images set them), else e.g. "a mnist configuration"."""
    for name in PRESETS:
        wanted = ACAIConfig.preset(name)
        if all(getattr(wanted, f) == getattr(config, f) for f in PRESET_FIELDS):
            return name
    return f"a {config.dataset} configuration"


def _check_resume(parser, args, trainer, checkpoint: Path) -> None:
    """train --resume: the checkpoint decides what is trained. An option given on the command line
    that contradicts it (the preset, the model, the seed, a hyper-parameter) is refused in one line
    (exit 2) instead of being silently ignored; options left out take the checkpoint's values."""
    cfg = trainer.config
    keep = "leave it out to continue the run as it was trained"
    if args.preset is not None:
        explicit = {k: v for k, v in _model_overrides(args).items() if k in PRESET_FIELDS}
        wanted = ACAIConfig.preset(args.preset, **explicit)
        differ = [f"{f} {getattr(wanted, f)} vs {getattr(cfg, f)}" for f in PRESET_FIELDS
                  if getattr(wanted, f) != getattr(cfg, f)]
        if differ:
            parser.error(f"--preset {args.preset} conflicts with --resume: {checkpoint} holds a "
                         f"{trainer.model.name} run on {preset_name(cfg)} ({', '.join(differ)}); {keep}")
    if args.model is not None and args.model != trainer.model.name:
        parser.error(f"--model {args.model} conflicts with --resume: {checkpoint} holds a {trainer.model.name!r} "
                     f"model; {keep}")
    if args.seed is not None and args.seed != trainer.seed:
        parser.error(f"--seed {args.seed} conflicts with --resume: {checkpoint} was trained "
                     f"with seed {trainer.seed} (leave --seed out to continue it)")
    given = dict(_model_overrides(args), **({} if args.batch is None else dict(batch=args.batch)))
    for name, value in given.items():
        if value != getattr(cfg, name):
            parser.error(f"--{name} {value:g} conflicts with --resume: {checkpoint} was trained with {name} "
                         f"{getattr(cfg, name):g}; {keep}")


def cmd_train(parser, args) -> int:
    from ..checkpoint import CheckpointError
    from ..distributed import init_from_env
    from ..run_control import check_outputs, json_line
    from ..trainer import ACAITrainer

    device = device_arg(parser, args)
    try:  # torchrun: join the job (None when this process runs alone)
        distributed = args.distributed = init_from_env(device)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    if args.resume and not out.is_dir():  # a typo must not start a new run
        parser.error(f"--resume: {out} {'is not a folder' if out.exists() else 'does not exist'}: nothing "
                     f"to continue (leave --resume out to start a new run there)")
    if checkpoint.exists() and not args.resume:
        parser.error(f"{checkpoint} exists: pass --resume to continue it, or choose another --out")
    overrides = {} if args.batch is None else dict(batch=args.batch)
    overrides.update(_model_overrides(args))
    try:
        config = ACAIConfig.preset(args.preset or "lines", **overrides)
        output_folder(parser, "--out", out)  # valid arguments: before any work (loading data, building)
        own = None  # your own images (--data FOLDER or .npz): their classes size a new run's probe
        if not (args.resume and checkpoint.exists()):
            own = own_images(parser, args, config)
            if own is not None and own.nclass is not None:
                config = dataclasses.replace(config, nclass=own.nclass)
        if args.resume and checkpoint.exists():
            trainer = ACAITrainer.load(checkpoint, device=device, backend=args.backend, dtype=args.dtype,
                                       cuda_graph=args.cuda_graph, distributed=distributed,
                                       skip_nonfinite=args.nan_policy == "skip")
            _check_resume(parser, args, trainer, checkpoint)
            print(f"resuming {checkpoint} ({trainer.model.name} on {preset_name(trainer.config)}, seed "
                  f"{trainer.seed}) at {trainer.nimg / 1024:.1f} kimg", file=sys.stderr)
        else:
            if args.resume:
                print(f"note: no checkpoint in {out}; starting a new run", file=sys.stderr)
            trainer = ACAITrainer(config, backend=args.backend, device=device,
                                  seed=0 if args.seed is None else args.seed, distributed=distributed,
                                  skip_nonfinite=args.nan_policy == "skip",
                                  dtype=args.dtype, cuda_graph=args.cuda_graph, model=args.model or "acai")
    except ValueError as exc:
        parser.error(str(exc))

    kind = dataset_kind(trainer.config)
    fit_args = dict(kimg=args.kimg, eval_kimg=args.eval_kimg, out_dir=out, progress=not args.no_progress,
                    checkpoint_minutes=args.checkpoint_min, nan_policy=args.nan_policy)
    if kind == "lines":
        data = "lines"
        if args.data is not None:
            parser.error("--data is not used by the lines preset (its data is generated)")
    else:  # an image dataset: uint8 on the device, the probe trained on its labels (as the paper)
        own = own if own is not None else own_images(parser, args, trainer.config)
        if own is not None:  # your own images: float32 in [-1, 1] on the device
            x, y, x_test, y_test = own_splits(parser, own, trainer.config)
            if own.nclass is not None and own.nclass != trainer.config.nclass:
                parser.error(f"--data: {own.nclass} classes, but {checkpoint}'s probe has {trainer.config.nclass}: "
                             f"these are not the images it was trained on")
        else:
            x, y = load_split(parser, trainer.config, args.data, "train", pixels=True)
            x_test, y_test = load_split(parser, trainer.config, args.data, "test")
        data = _image_batches(trainer, x, y)
        if y_test is not None:  # CelebA has no labels: no probe to score
            fit_args.update(evaluate=probe_evaluation(x_test, y_test))
        half = min(16, x_test.shape[0] // 2)  # rows of interpolations.png
        fit_args.update(preview=(x_test[:half], x_test[half:2 * half]))
    try:  # before any step: the folder can be created and written, its disk holds the checkpoints
        check_outputs(trainer, out)
    except CheckpointError as exc:
        parser.error(f"--out: {exc}")
    if distributed is not None and distributed.is_main:
        print(f"acai-fast: torchrun job of {distributed.world_size} processes ({distributed.backend}); "
              f"global batch {trainer.config.batch}, {distributed.local_batch(trainer.config.batch)} per "
              f"process; rank 0 evaluates and writes", file=sys.stderr)
    if distributed is None or distributed.is_main:
        print(f"acai-fast: training {trainer.model.name} on {args.preset or preset_name(trainer.config)} on "
              f"{trainer.device} (backend "
              f"{trainer.backend}, {str(trainer.dtype).replace('torch.', '')}) "
              f"to {args.kimg:g} kimg; outputs in {out}", file=sys.stderr)
    board = _tensorboard_log(parser, args, out, trainer)  # --tensorboard: events beside metrics.jsonl
    if board is not None:
        fit_args.update(tensorboard=board)
    if args.profile:
        from ..profiling import GpuSampler

        rank = getattr(trainer, "rank", 0)  # each torchrun rank samples its own GPU into its own file
        samples_csv = out / ("gpu_samples.csv" if rank == 0 else f"gpu_samples_rank{rank}.csv")
        with GpuSampler(0.5, device=trainer.device, csv_path=samples_csv) as sampler:
            history = trainer.fit(data, monitor=sampler, **fit_args)
        if not sampler.available:
            print(f"note: --profile recorded no GPU samples ({sampler.reason})", file=sys.stderr)
    else:
        history = trainer.fit(data, **fit_args)
    if board is not None:
        board.close()
    if history and (distributed is None or distributed.is_main):
        print(json_line(history[-1]))
    return 0
