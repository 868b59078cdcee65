"""The `acai-fast` command line: train, interpolate, evaluate.

    acai-fast train --preset lines --kimg 16 --out runs/lines
    acai-fast interpolate --checkpoint runs/lines/checkpoint.pt --out grid.png
    acai-fast evaluate --checkpoint runs/lines/checkpoint.pt
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import PRESETS, ACAIConfig

IMAGE_PRESETS = ("mnist32", "mnist256")  # presets whose data ships as IDX files (MNIST, Fashion-MNIST)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _device_arg(parser: argparse.ArgumentParser, args) -> str | None:
    import torch

    if args.device is None:
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available on this machine")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a device name: {args.device!r} (use cpu or cuda)")
    return args.device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acai-fast", description="Train and inspect ACAI autoencoders (Berthelot et al., ICLR 2019).")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model; evaluations go to OUT/metrics.jsonl",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", default="lines", choices=PRESETS, help="the paper's configuration")
    train.add_argument("--kimg", type=_positive_float, default=16384.0,
                       help="train on this many thousand (x1024) images in total (the paper: 16384)")
    train.add_argument("--out", required=True, help="output folder (metrics.jsonl, checkpoint.pt, interpolations.png)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--backend", default="auto",
                       help="reference: plain PyTorch fp32; fused: the Triton/CUDA kernels (a GPU); "
                            "auto: the fastest backend verified on this device")
    train.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                       help="activation dtype (default: bf16 for fused on a GPU, else fp32)")
    train.add_argument("--cuda-graph", action="store_true",
                       help="fused on a GPU: replay each step as one CUDA graph (after 3 eager steps)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, alphas and lines data")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--eval-kimg", type=_positive_float, default=64.0,
                       help="evaluate, checkpoint and draw every this many kimg")
    train.add_argument("--batch", type=int, default=None, help="override the preset's batch size (64)")
    train.add_argument("--data", default=None,
                       help="for mnist32/mnist256: folder holding the MNIST or Fashion-MNIST IDX .gz files")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    interp = sub.add_parser("interpolate", help="draw a grid of interpolations from a checkpoint",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interp.add_argument("--checkpoint", required=True)
    interp.add_argument("--out", required=True, help="PNG file to write")
    interp.add_argument("--pairs", type=int, default=16, help="rows: pairs of test images")
    interp.add_argument("--steps", type=int, default=16, help="columns: interpolation steps, ends included")
    interp.add_argument("--seed", type=int, default=1234, help="which test pairs")
    interp.add_argument("--data", default=None, help="IDX data folder for image presets (test split)")
    interp.add_argument("--device", default=None)

    evaluate = sub.add_parser("evaluate", help="print the evaluation metrics of a checkpoint as JSON",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", default=None, help="IDX data folder for image presets")
    evaluate.add_argument("--device", default=None)
    return parser


def _dataset_kind(config: ACAIConfig) -> str:
    return {"lines": "lines", "mnist": "idx"}.get(config.dataset, "unsupported")


def _load_idx(parser, folder, split):
    from .data import load_idx_dataset

    if folder is None:
        parser.error("this preset trains on MNIST-format data: pass --data FOLDER with the IDX .gz files")
    try:
        return load_idx_dataset(folder, split)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data: {exc}")


def _idx_evaluation(x_test, y_test):
    from .eval.probe import probe_accuracy

    def evaluate(trainer):
        return dict(probe_accuracy=probe_accuracy(trainer, x_test, y_test))
    return evaluate


def _load_trainer(parser, path, device):
    from .trainer import ACAITrainer

    try:
        return ACAITrainer.load(path, device=device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")


def cmd_train(parser, args) -> int:
    from .loop import json_line
    from .trainer import ACAITrainer

    device = _device_arg(parser, args)
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not args.resume:
        parser.error(f"{checkpoint} exists: pass --resume to continue it, or choose another --out")
    overrides = {} if args.batch is None else dict(batch=args.batch)
    try:
        config = ACAIConfig.preset(args.preset, **overrides)
        if args.resume and checkpoint.exists():
            trainer = ACAITrainer.load(checkpoint, device=device, backend=args.backend, dtype=args.dtype,
                                       cuda_graph=args.cuda_graph)
            if trainer.config != config:
                print(f"note: resuming with the checkpoint's configuration {trainer.config}", file=sys.stderr)
            print(f"resuming {checkpoint} at {trainer.nimg / 1024:.1f} kimg", file=sys.stderr)
        else:
            if args.resume:
                print(f"note: no checkpoint in {out}; starting a new run", file=sys.stderr)
            trainer = ACAITrainer(config, backend=args.backend, device=device, seed=args.seed,
                                  dtype=args.dtype, cuda_graph=args.cuda_graph)
    except ValueError as exc:
        parser.error(str(exc))

    kind = _dataset_kind(trainer.config)
    fit_args = dict(kimg=args.kimg, eval_kimg=args.eval_kimg, out_dir=out, progress=not args.no_progress)
    if kind == "lines":
        data = "lines"
        if args.data is not None:
            parser.error("--data is not used by the lines preset (its data is generated)")
    elif kind == "idx":
        x, y = _load_idx(parser, args.data, "train")
        x_test, y_test = _load_idx(parser, args.data, "test")
        data = (x, y)
        fit_args.update(evaluate=_idx_evaluation(x_test, y_test), preview=(x_test[:16], x_test[16:32]))
    else:
        parser.error(f"preset {args.preset}: its dataset (SVHN, CelebA or CIFAR-10) has no loader yet; "
                     f"supported: lines (built in), {', '.join(IMAGE_PRESETS)} (--data)")
    out.mkdir(parents=True, exist_ok=True)
    print(f"acai-fast: training {args.preset} on {trainer.device} (backend {trainer.backend}, "
          f"{str(trainer.dtype).replace('torch.', '')}) "
          f"to {args.kimg:g} kimg; outputs in {out}", file=sys.stderr)
    history = trainer.fit(data, **fit_args)
    if history:
        print(json_line(history[-1]))
    return 0


def cmd_interpolate(parser, args) -> int:
    import torch

    from .plotting import save_interpolation_grid

    if args.pairs < 1 or args.steps < 2:
        parser.error("--pairs must be >= 1 and --steps >= 2")
    trainer = _load_trainer(parser, args.checkpoint, _device_arg(parser, args))
    if _dataset_kind(trainer.config) == "lines":
        from .data.lines import draw_lines
        from .eval.lines import eval_pairs
        a, b = eval_pairs(args.pairs, args.seed)
        x_a, x_b = draw_lines(a), draw_lines(b)
    else:
        x, _ = _load_idx(parser, args.data, "test")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:2 * args.pairs]
        x_a, x_b = x[idx[:args.pairs]], x[idx[args.pairs:]]
    save_interpolation_grid(trainer.interpolate(x_a, x_b, steps=args.steps), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(parser, args) -> int:
    from .loop import json_line

    trainer = _load_trainer(parser, args.checkpoint, _device_arg(parser, args))
    result = dict(kimg=round(trainer.nimg / 1024, 3))
    if _dataset_kind(trainer.config) == "lines":
        from .eval.lines import evaluate_lines
        result.update(evaluate_lines(trainer))
    else:
        result.update(_idx_evaluation(*_load_idx(parser, args.data, "test"))(trainer))
    print(json_line(result))
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"train": cmd_train, "interpolate": cmd_interpolate, "evaluate": cmd_evaluate}[args.command]
    return command(parser, args)


if __name__ == "__main__":
    sys.exit(main())
