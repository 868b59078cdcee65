"""The sub-commands that read a trained checkpoint: `interpolate` (a grid or a GIF), `evaluate` (the
metrics as JSON), `encode` (a data set's latents to .npz) and `export` (the networks as torch.export
programs; acai_fast.export)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (DATA_HELP, PROGRESS_HELP, add_test_fraction, checkpoint_file, device_arg, load_trainer,
                     output_file, output_folder, positive_int)
from .data_options import dataset_kind, load_split, own_images, own_splits, probe_evaluation


def add_interpolate_evaluate_parsers(sub) -> None:
    """`acai-fast interpolate` and `acai-fast evaluate`."""
    interp = sub.add_parser("interpolate", help="draw a grid of interpolations from a checkpoint, or between "
                                                "two images of yours (--between), as a PNG and/or a GIF",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interp.add_argument("--checkpoint", required=True,
                        help="a checkpoint file, or the run folder holding checkpoint.pt")
    interp.add_argument("--out", default=None, help="PNG file to write: one row of interpolations per pair")
    interp.add_argument("--between", nargs=2, default=None, metavar=("A", "B"),
                        help="two image files of yours (PNG, JPEG, ...) to interpolate between, instead of "
                             "test pairs (prepared as --data images: centre square, 32x32, the model's colours)")
    interp.add_argument("--gif", default=None,
                        help="GIF file to write: the interpolation animated back and forth (each frame one "
                             "step of every pair, 4x enlarged)")
    interp.add_argument("--pairs", type=int, default=16, help="rows: pairs of test images")
    interp.add_argument("--steps", type=int, default=16, help="columns: interpolation steps, ends included")
    interp.add_argument("--seed", type=int, default=1234, help="which test pairs")
    interp.add_argument("--data", default=None, help=DATA_HELP + "; the test split is used")
    add_test_fraction(interp)
    interp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    evaluate = sub.add_parser("evaluate", help="print the evaluation metrics of a checkpoint as JSON",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint file, or the run folder holding checkpoint.pt; the metrics are also "
                               "written beside it, as CHECKPOINT_evaluation.json")
    evaluate.add_argument("--data", default=None, help=DATA_HELP)
    add_test_fraction(evaluate)
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--restarts", type=int, default=1000,
                          help="image presets: K-means initialisations of the clustering accuracy (default: "
                               "1000, the paper's)")
    evaluate.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def cmd_interpolate(parser, args) -> int:
    import torch

    from ..plotting import save_interpolation_gif, save_interpolation_grid

    if args.pairs < 1 or args.steps < 2:
        parser.error("--pairs must be >= 1 and --steps >= 2")
    if args.out is None and args.gif is None:
        parser.error("give --out PNG (a picture) and/or --gif GIF (an animation)")
    for option, path in (("--out", args.out), ("--gif", args.gif)):  # before any work
        if path is not None:
            output_file(parser, option, path)
    trainer = load_trainer(parser, args.checkpoint, device_arg(parser, args))
    if args.between is not None:  # two images of the user's
        from ..data.images import load_image_files
        try:
            x = load_image_files(args.between, trainer.config.colors)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--between: {exc}")
        x_a, x_b = x[:1], x[1:]
    elif dataset_kind(trainer.config) == "lines":
        from ..data.lines import draw_lines
        from ..eval.lines import eval_pairs
        a, b = eval_pairs(args.pairs, args.seed)
        x_a, x_b = draw_lines(a), draw_lines(b)
    else:
        own = own_images(parser, args, trainer.config)  # --data: your own images' test split
        x = own.split("test")[0] if own is not None else load_split(parser, trainer.config, args.data, "test")[0]
        pairs = min(args.pairs, len(x) // 2)
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:2 * pairs]
        x_a, x_b = x[idx[:pairs]], x[idx[pairs:]]
    images = trainer.interpolate(x_a, x_b, steps=args.steps)
    for path, save in ((args.out, save_interpolation_grid), (args.gif, save_interpolation_gif)):
        if path is not None:
            save(images, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_evaluate(parser, args) -> int:
    from ..run_control import json_line

    trainer = load_trainer(parser, args.checkpoint, device_arg(parser, args))
    checkpoint = checkpoint_file(parser, args.checkpoint)
    path = checkpoint.with_name(checkpoint.stem + "_evaluation.json")
    output_file(parser, "--checkpoint: the evaluation's JSON", path)  # before the (long) evaluation
    result = dict(kimg=round(trainer.nimg / 1024, 3))
    if dataset_kind(trainer.config) == "lines":
        from ..eval.lines import evaluate_lines
        result.update(evaluate_lines(trainer))
    else:
        result.update(_image_evaluation(parser, args, trainer))
    line = json_line(result)
    path.write_text(line + "\n")
    print(line)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _image_evaluation(parser, args, trainer) -> dict:
    """Probe and clustering accuracy on the test split (SPEC.md section 5): the linear probe's test
    accuracy; K-means (--restarts) on the latents of up to 60,000 training images, Hungarian-matched
    test accuracy."""
    from ..eval.cluster import evaluate_clustering

    if args.restarts < 1:
        parser.error(f"--restarts must be >= 1, got {args.restarts}")
    own = own_images(parser, args, trainer.config)  # --data: your own images, their test split
    if own is not None:
        x_train, y_train, x_test, y_test = own_splits(parser, own, trainer.config, train=False)
        if y_test is None:
            print(f"note: {own.source} has no labels (no class subfolders or labels array): no probe or "
                  f"clustering accuracy", file=sys.stderr)
            return {}
    else:
        x_test, y_test = load_split(parser, trainer.config, args.data, "test", pixels=True)
        if y_test is None:
            print("note: CelebA has no labels: no probe or clustering accuracy", file=sys.stderr)
            return {}
        x_train, y_train = load_split(parser, trainer.config, args.data, "train", pixels=True, limit=60000)
    from ..data import to_unit_range

    result = probe_evaluation(to_unit_range(x_test), y_test)(trainer)
    clustering = evaluate_clustering(trainer, x_train, y_train, x_test, y_test, restarts=args.restarts,
                                     progress=not args.no_progress)
    result.update(clustering_accuracy=clustering["accuracy"], clustering_train_accuracy=clustering["train_accuracy"],
                  clustering_restarts=args.restarts, clustering_inertia=clustering["inertia"])
    return result


def add_encode_export_parsers(sub) -> None:
    from ..export import FORMATS

    enc = sub.add_parser("encode", help="write the latents of a data set (your images or the paper's) to an .npz "
                                        "file, with labels and file names where known")
    enc.add_argument("--checkpoint", required=True, help="a checkpoint file, or the run folder holding checkpoint.pt")
    enc.add_argument("--data", default=None, help=DATA_HELP)
    add_test_fraction(enc)
    enc.add_argument("--split", default="all", choices=("all", "train", "test"),
                     help="which images: all (your images: every file, is_test marks the test split; the "
                          "paper's: train then test), train or test")
    enc.add_argument("--out", required=True,
                     help=".npz file to write: latents (N, D), latent_maps (N, latent, w, w), labels, classes, "
                          "names, is_test (numpy.load reads it without pickles)")
    enc.add_argument("--batch", type=positive_int, default=1024, help="images per encoder pass on the device")
    enc.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    enc.add_argument("--no-progress", action="store_true", help="no progress report")

    exp = sub.add_parser("export", help="write the encoder and decoder as torch.export programs that run "
                                        "without acai_fast (torch only)")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint file, or the run folder holding checkpoint.pt")
    exp.add_argument("--out", required=True, help="folder for encoder.pt2, decoder.pt2 and export.json")
    exp.add_argument("--format", default="export", choices=FORMATS,
                     help="export: torch.export programs (TorchScript for a network it cannot trace); "
                          "torchscript: torch.jit.trace")


def cmd_encode(parser, args) -> int:
    import torch

    from ..export import encode_dataset, save_latents

    if Path(args.out).suffix != ".npz":
        parser.error(f"--out {args.out}: the latents file must end in .npz")
    out = output_file(parser, "--out", args.out)  # before any work
    checkpoint = checkpoint_file(parser, args.checkpoint)
    trainer = load_trainer(parser, checkpoint, device_arg(parser, args))
    labels = classes = names = is_test = None
    own = own_images(parser, args, trainer.config)
    if own is not None:  # your images: every file (or a split), with its name and label
        idx = own.indices(args.split)
        images, source = own.images[idx], own.source
        labels = own.labels[idx] if own.labels is not None else None
        classes, names, is_test = own.classes, [own.names[i] for i in idx], own.is_test[idx]
    elif dataset_kind(trainer.config) == "lines":
        parser.error("--data: a lines model's images are generated; give your own images (a folder or .npz) to "
                     "encode")
    else:  # the paper's data set: train then test (CelebA's test split is its training set)
        from ..data import dataset_of_preset

        celeba = dataset_of_preset(trainer.config.dataset) == "celeba"  # one split: its training images
        parts = ["train"] if celeba else [p for p in ("train", "test") if args.split in ("all", p)]
        loaded = [load_split(parser, trainer.config, args.data, p, pixels=True) for p in parts]
        images = torch.cat([x for x, _ in loaded])
        if all(y is not None for _, y in loaded):
            labels = torch.cat([y for _, y in loaded])
        is_test = torch.cat([torch.full((len(x),), p == "test") for p, (x, _) in zip(parts, loaded)])
        source = str(args.data)
    print(f"acai-fast: encoding {len(images)} images of {source} ({args.split}) with {checkpoint} on "
          f"{trainer.device}", file=sys.stderr)
    latents = encode_dataset(trainer, images, batch_size=args.batch, progress=not args.no_progress)
    save_latents(out, latents, labels=labels, classes=classes, names=names, is_test=is_test,
                 checkpoint=str(checkpoint), model=trainer.model.name, kimg=round(trainer.nimg / 1024, 3),
                 data=source, split=args.split)
    print(f"wrote {out}: latents {tuple(latents.flatten(1).shape)}, latent_maps {tuple(latents.shape)}"
          f"{', labels' if labels is not None else ''}{', names' if names is not None else ''}", file=sys.stderr)
    return 0


def cmd_export(parser, args) -> int:
    from ..export import export_networks

    out = output_folder(parser, "--out", args.out)  # before any work
    checkpoint = checkpoint_file(parser, args.checkpoint)
    trainer = load_trainer(parser, checkpoint, "cpu")  # exported on the CPU, in fp32
    info = export_networks(trainer, out, format=args.format, checkpoint=str(checkpoint))
    for name, entry in info["files"].items():
        print(f"wrote {out / entry['file']} ({entry['format']}): {info[name]['input']} -> {info[name]['output']}",
              file=sys.stderr)
    print(f"wrote {out / 'export.json'}; load with torch.export.load(path).module()", file=sys.stderr)
    return 0
