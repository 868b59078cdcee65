"""The `acai-fast` command line: train, interpolate, evaluate.

    acai-fast train --preset lines --kimg 16 --out runs/lines
    acai-fast interpolate --checkpoint runs/lines/checkpoint.pt --out grid.png
    acai-fast evaluate --checkpoint runs/lines/checkpoint.pt
    acai-fast profile --preset lines --batch 64 --steps 5 --out prof   # trace, top kernels, phase split
    acai-fast profile --model h100 --preset cifar1024 --batch 1024     # every launch, modelled (no GPU)
    acai-fast train --preset svhn32 --data DIR --out runs/svhn32       # or ACAI_FAST_DATA=DIR
    acai-fast evaluate --checkpoint runs/svhn32/checkpoint.pt --data DIR   # probe + clustering accuracy
    acai-fast reproduce probe|cluster --dataset mnist --latent 32 --data DIR --out OUT
    acai-fast sweep --preset lines --seeds 0-3 --advweight 0,0.5,1 --kimg 4096 --out sweeps/lambda
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .config import PRESETS, ACAIConfig

PROGRESS_HELP = ("no progress report (without it: a bar on a terminal; in a redirected log, one plain line per "
                 "evaluation or every 30 s)")
DATA_HELP = ("folder of the preset's dataset (default: $ACAI_FAST_DATA): the MNIST IDX files, SVHN .mat "
             "files, CIFAR-10 python batches or .tar.gz, or CelebA's img_align_celeba/ (or a subfolder "
             "named after the dataset); or your own images: any other folder of PNG/JPEG files (labels "
             "from its first-level subfolders, if any) or an .npy/.npz uint8 array (N, H, W[, C]) with "
             "optional labels, centre-cropped and resized to 32x32 (README: 'Your own images')")


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


# ------------------------------------------------------------------------------------------------
# The parser's manners: a mistake is one line, help shows each default once and an example
# ------------------------------------------------------------------------------------------------

# CPU threads of a CPU run when neither --threads nor OMP_NUM_THREADS says otherwise. Measured on a
# 2-core machine kept busy by other jobs (README, "CPU threads"): the quick start ran at 11-32
# images/s on one thread and 3.6-5.8 on two (PyTorch's default there); quiet, two win 262 to 174.
CPU_THREADS = 1

EXAMPLES = {  # each sub-command's --help ends with these
    "train": "acai-fast train --preset lines --kimg 96 --eval-kimg 16 --out runs/lines --device cpu\n"
             "acai-fast train --preset lines --kimg 192 --out runs/lines --resume       # continue it\n"
             "acai-fast train --preset svhn32 --data ~/data/svhn --out runs/svhn32",
    "interpolate": "acai-fast interpolate --checkpoint runs/lines --out grid.png --pairs 8 --steps 12\n"
                   "acai-fast interpolate --checkpoint runs/photos --between a.jpg b.png --out row.png --gif row.gif",
    "evaluate": "acai-fast evaluate --checkpoint runs/lines\n"
                "acai-fast evaluate --checkpoint runs/svhn32 --data ~/data/svhn --restarts 100",
    "profile": "acai-fast profile --preset lines --batch 64 --steps 5 --out prof",
    "reproduce lines": "acai-fast reproduce lines --out results/lines --models acai,vae --kimg 1024 --runs 3",
    "reproduce probe": "acai-fast reproduce probe --dataset mnist --latent 32 --data ~/data/mnist --out results",
    "reproduce cluster": "acai-fast reproduce cluster --dataset mnist --latent 32 --data ~/data/mnist --out results",
    "sweep": "acai-fast sweep --preset lines --seeds 0-3 --advweight 0,0.5,1 --kimg 4096 --out sweeps/lambda",
    "encode": "acai-fast encode --checkpoint runs/svhn32 --data my_photos/ --out latents.npz",
    "export": "acai-fast export --checkpoint runs/svhn32 --out exported/",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help followed by its default once: "(default: X)" is added unless the help
    already speaks of its default or there is none to show (None, False, a required option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's manners: a mistake is one line, `PROG: error: MESSAGE (see PROG
    --help)`, not ten lines of usage first; every (sub-)command gets HelpFormatter (also where the
    caller asked for argparse's own formatters) and remembers its sub-commands (commands())."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        if formatter_class in (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
            formatter_class = HelpFormatter
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.subcommands = None

    def add_subparsers(self, **kwargs):
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def commands(parser: CommandParser, prefix: str = "") -> dict[str, CommandParser]:
    """Every sub-command's parser by name ("train", "reproduce lines", ...), the leaves only."""
    found = {}
    for name, sub in (parser.subcommands.choices if parser.subcommands is not None else {}).items():
        found.update(commands(sub, f"{prefix}{name} ") if sub.subcommands is not None else {prefix + name: sub})
    return found


def _finish_parser(parser: CommandParser) -> CommandParser:
    """What every sub-command shares, added after they are built: --threads, an example at the end
    of its help, and itself as args.command_parser (its errors name it: `acai-fast train: error`)."""
    for name, sub in commands(parser).items():
        sub.set_defaults(command_parser=sub)
        if sub.epilog is None and name in EXAMPLES:
            sub.epilog = "example:\n" + "\n".join("  " + line for line in EXAMPLES[name].splitlines())
        if not any("--threads" in action.option_strings for action in sub._actions):
            sub.add_argument("--threads", type=_positive_int, default=None,
                             help=f"CPU threads of PyTorch's kernels (default: {CPU_THREADS} on the CPU, "
                                  f"which holds up on a busy machine, or $OMP_NUM_THREADS when set; a GPU "
                                  f"run keeps PyTorch's own choice)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _set_threads(args) -> None:
    """--threads N, else CPU_THREADS for a run on the CPU unless $OMP_NUM_THREADS is set (PyTorch
    then follows it); a GPU run keeps PyTorch's default."""
    import os

    import torch

    threads = getattr(args, "threads", None)
    if threads is None:
        device = getattr(args, "device", None)
        on_cpu = str(device).startswith("cpu") if device is not None else not torch.cuda.is_available()
        if not on_cpu or os.environ.get("OMP_NUM_THREADS"):
            return
        threads = CPU_THREADS
    torch.set_num_threads(threads)


def _version() -> str:
    import platform

    import torch

    from . import __version__, cuda_extension_available
    return (f"acai-fast {__version__} (PyTorch {torch.__version__}, Python {platform.python_version()}, "
            f"CUDA extension {'built' if cuda_extension_available() else 'not built'})")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="acai-fast", description="Train and inspect ACAI autoencoders (Berthelot et al., ICLR 2019).",
        epilog="example:\n  acai-fast train --preset lines --kimg 96 --eval-kimg 16 --out runs/lines --device cpu\n"
               "each command's options: acai-fast COMMAND --help")
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the versions of acai_fast, PyTorch and Python, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model; evaluations go to OUT/metrics.jsonl",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", default=None, choices=PRESETS,
                       help="the paper's configuration (default: lines; with --resume: the checkpoint's, and "
                            "another one is an error)")
    train.add_argument("--kimg", type=_positive_float, default=16384.0,
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
    train.add_argument("--eval-kimg", type=_positive_float, default=64.0,
                       help="evaluate, checkpoint and draw every this many kimg")
    train.add_argument("--batch", type=int, default=None,
                       help="the GLOBAL batch: images per step over all processes (under torchrun split "
                            "evenly, >= 2 per process); default: the preset's, 64")
    train.add_argument("--data", default=None, help=DATA_HELP)
    _add_test_fraction(train)
    train.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    _add_fault_arguments(train)
    train.add_argument("--profile", action="store_true",
                       help="sample the GPU with NVML for the whole run (OUT/gpu_samples.csv) and add each "
                            "interval's mean utilisation and power to its metrics line")

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
    _add_test_fraction(interp)
    interp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    evaluate = sub.add_parser("evaluate", help="print the evaluation metrics of a checkpoint as JSON",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint file, or the run folder holding checkpoint.pt; the metrics are also "
                               "written beside it, as CHECKPOINT_evaluation.json")
    evaluate.add_argument("--data", default=None, help=DATA_HELP)
    _add_test_fraction(evaluate)
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--restarts", type=int, default=1000,
                          help="image presets: K-means initialisations of the clustering accuracy (default: "
                               "1000, the paper's)")
    evaluate.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    _add_model_arguments(train)
    _add_tensorboard_argument(train)
    _add_profile_parser(sub)
    _add_reproduce_parsers(sub)
    _add_sweep_parser(sub)
    _add_encode_export_parsers(sub)
    return _finish_parser(parser)  # (last: every sub-command is built)


def _add_profile_parser(sub) -> None:
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


def _add_model_arguments(train) -> None:
    """`train --model NAME` and the paper's hyper-parameters a user may vary (each default: the
    preset's value); validated by ACAIConfig, recorded in the checkpoint and on every metrics line."""
    from .models import MODELS

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
    train.add_argument("--checkpoint-min", type=_positive_float, default=30.0,
                       help="also write OUT/checkpoint.pt every this many minutes (atomically: the "
                            "previous one stays whole until the new one is written)")
    train.add_argument("--nan-policy", default="stop", choices=("stop", "skip"),
                       help="on a non-finite loss: stop (naming the step and the loss; the last good "
                            "checkpoint is kept) or skip that step's update and go on")


def _dataset_kind(config: ACAIConfig) -> str:
    """"lines" (generated) or "image" (a dataset read from --data)."""
    return "lines" if config.dataset == "lines" else "image"


# CelebA's "test" split is its training set (as in the paper's code): pictures need only a few.
_TEST_LIMIT = {"celeba": 2048}


def _load_images(parser, config: ACAIConfig, folder, split, *, pixels=False, limit=None):
    """The preset's dataset `split` from --data (or $ACAI_FAST_DATA): (float32 images in [-1, 1], or
    the stored uint8 pixels with pixels=True; int64 labels, None for CelebA). A missing folder or a
    missing or malformed file exits with status 2 and one line naming it."""
    from .data import data_folder, dataset_of_preset, load_dataset, load_pixels

    name = dataset_of_preset(config.dataset)
    try:
        root = data_folder(folder)
    except ValueError as exc:
        parser.error(f"this preset trains on {name}: {exc}")
    if limit is None and split == "test":
        limit = _TEST_LIMIT.get(name)
    try:
        return (load_pixels if pixels else load_dataset)(name, root, split, limit=limit)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data: {exc}")


def _image_batches(trainer, x, y):
    """Training batches for fit(): the whole set moved to the trainer's device once, as uint8
    (acai_fast.data.DeviceBatches); under torchrun each process takes its share of a global batch."""
    from .data import DeviceBatches

    dist = trainer.distributed
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    local = trainer.config.batch if dist is None else dist.local_batch(trainer.config.batch)
    return DeviceBatches(x, y, batch=local, seed=trainer.seed, device=trainer.device,
                         start_step=trainer.steps, rank=rank, world_size=world)


# ------------------------------------------------------------------------------------------------
# Your own images (--data FOLDER or FILE.npz; acai_fast.data.images)
# ------------------------------------------------------------------------------------------------

def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_test_fraction(p) -> None:
    p.add_argument("--test-fraction", type=_fraction, default=0.1,
                   help="your own images (--data): the share held out as the test split (a fixed seeded "
                        "draw; 0: test on the training images)")


def _own_images(parser, args, config: ACAIConfig):
    """--data (else $ACAI_FAST_DATA) as your own images, prepared in `config`'s colours (an
    acai_fast.data.ImageSet), or None when it names the paper's dataset files or is not set. A
    folder holding the paper's official file names is the paper's data; any other folder, or an
    .npy/.npz file, is yours. Unreadable data, or a lines preset given images, exits 2."""
    import os

    from .data import is_own_data, load_images
    from .data.datasets import DATA_ENV

    path = args.data if args.data is not None else os.environ.get(DATA_ENV) or None
    if path is None or not is_own_data(path):
        return None
    if config.dataset == "lines":
        parser.error(f"--data {path}: the lines preset generates its data; your own images need an image "
                     f"preset (mnist32, mnist256: grey; svhn32, celeba32, cifar256, ...: colour)")
    try:
        return load_images(path, config.colors, test_fraction=args.test_fraction,
                           progress=not getattr(args, "no_progress", False))
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data: {exc}")


def _own_splits(parser, own, config: ACAIConfig, *, train: bool = True):
    """(x_train, y_train, x_test, y_test) of your images for a model of `config`: its probe must
    hold their classes; training needs one batch of training images."""
    x, y = own.split("train")
    x_test, y_test = own.split("test")
    if own.nclass is not None and own.nclass > config.nclass:
        parser.error(f"--data: {own.nclass} classes ({', '.join(own.classes[:4])}{', ...' if own.nclass > 4 else ''}), "
                     f"but the model's probe has {config.nclass} (config.nclass); train on these images "
                     f"to get a probe for them")
    if train and len(x) < config.batch:
        parser.error(f"--data: the training split holds {len(x)} images, fewer than one batch of "
                     f"{config.batch} (lower --batch or --test-fraction, or add images)")
    return x, y, x_test, y_test


def _idx_evaluation(x_test, y_test):
    from .eval.probe import probe_accuracy

    def evaluate(trainer):
        return dict(probe_accuracy=probe_accuracy(trainer, x_test, y_test))
    return evaluate


def _checkpoint_file(parser, path) -> Path:
    """--checkpoint: a checkpoint file, or a run folder holding checkpoint.pt (exit 2 when that
    folder has none)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.pt").is_file():
            parser.error(f"--checkpoint: {path} is a folder without a checkpoint.pt")
        return path / "checkpoint.pt"
    return path


def _output_file(parser, option: str, path) -> Path:
    """A file a sub-command will write, checked before any work: it is not a folder and its folder
    exists and takes a new file (acai_fast.checkpoint.check_output_file; one line, exit 2, otherwise)."""
    from .checkpoint import CheckpointError, check_output_file

    try:
        return check_output_file(path)
    except CheckpointError as exc:
        parser.error(f"{option} {exc}")


def _output_folder(parser, option: str, path) -> Path:
    """A folder a sub-command will write into, created and checked before any work (one line, exit
    2, when it cannot be created or written)."""
    from .checkpoint import CheckpointError, check_output_folder

    try:
        check_output_folder(path)
    except CheckpointError as exc:
        parser.error(f"{option}: {exc}")
    return Path(path)


def _load_trainer(parser, path, device):
    from .trainer import ACAITrainer

    path = _checkpoint_file(parser, path)
    try:
        return ACAITrainer.load(path, device=device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")


_PRESET_FIELDS = ("dataset", "colors", "latent_width", "image_size", "depth", "latent")  # what a preset sets


def preset_name(config: ACAIConfig) -> str:
    """The preset `config` was made from, where its preset fields are exactly one's (the probe's
    classes aside: your own images set them), else e.g. "a mnist configuration"."""
    for name in PRESETS:
        wanted = ACAIConfig.preset(name)
        if all(getattr(wanted, f) == getattr(config, f) for f in _PRESET_FIELDS):
            return name
    return f"a {config.dataset} configuration"


def _check_resume(parser, args, trainer, checkpoint: Path) -> None:
    """train --resume: the checkpoint decides what is trained. An option given on the command line
    that contradicts it (the preset, the model, the seed, a hyper-parameter) is refused in one line
    (exit 2) instead of being silently ignored; options left out take the checkpoint's values."""
    cfg = trainer.config
    keep = "leave it out to continue the run as it was trained"
    if args.preset is not None:
        explicit = {k: v for k, v in _model_overrides(args).items() if k in _PRESET_FIELDS}
        wanted = ACAIConfig.preset(args.preset, **explicit)
        differ = [f"{f} {getattr(wanted, f)} vs {getattr(cfg, f)}" for f in _PRESET_FIELDS
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
    from .checkpoint import CheckpointError
    from .distributed import init_from_env
    from .loop import check_outputs, json_line
    from .trainer import ACAITrainer

    device = _device_arg(parser, args)
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
        _output_folder(parser, "--out", out)  # valid arguments: before any work (loading data, building)
        own = None  # your own images (--data FOLDER or .npz): their classes size a new run's probe
        if not (args.resume and checkpoint.exists()):
            own = _own_images(parser, args, config)
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

    kind = _dataset_kind(trainer.config)
    fit_args = dict(kimg=args.kimg, eval_kimg=args.eval_kimg, out_dir=out, progress=not args.no_progress,
                    checkpoint_minutes=args.checkpoint_min, nan_policy=args.nan_policy)
    if kind == "lines":
        data = "lines"
        if args.data is not None:
            parser.error("--data is not used by the lines preset (its data is generated)")
    else:  # an image dataset: uint8 on the device, the probe trained on its labels (as the paper)
        own = own if own is not None else _own_images(parser, args, trainer.config)
        if own is not None:  # your own images: float32 in [-1, 1] on the device
            x, y, x_test, y_test = _own_splits(parser, own, trainer.config)
            if own.nclass is not None and own.nclass != trainer.config.nclass:
                parser.error(f"--data: {own.nclass} classes, but {checkpoint}'s probe has {trainer.config.nclass}: "
                             f"these are not the images it was trained on")
        else:
            x, y = _load_images(parser, trainer.config, args.data, "train", pixels=True)
            x_test, y_test = _load_images(parser, trainer.config, args.data, "test")
        data = _image_batches(trainer, x, y)
        if y_test is not None:  # CelebA has no labels: no probe to score
            fit_args.update(evaluate=_idx_evaluation(x_test, y_test))
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
        from .profiling import GpuSampler

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


def cmd_profile(parser, args) -> int:
    import torch

    from .profiling import format_report, profile_trainer
    from .trainer import ACAITrainer

    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.model is not None:
        return _profile_model(parser, args)
    if args.json is not None or args.csv is not None:
        parser.error("--json and --csv write the modelled launches: use them with --model GPU")
    if args.out is None:
        parser.error("--out FOLDER is required for a measured profile (or --model h100|h200|a100 for a "
                     "modelled one, no GPU needed)")
    device = _device_arg(parser, args)
    if args.steps < 1 or args.warmup < 0 or args.sample_seconds < 0 or args.top < 1:
        parser.error("--steps and --top must be >= 1, --warmup and --sample-seconds >= 0")
    _output_folder(parser, "--out", args.out)  # before any work
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
    from .engine.launches import model_launches, trace_launches
    from .ops import cost
    from .profiling import format_measured_vs_model, load_trace, measured_vs_model

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

    from . import _ext

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

    from .engine.launches import model_launches, trace_launches
    from .ops import cost
    from .profiling import format_model_report, model_summary, write_model_outputs
    from .trainer import ACAITrainer

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


def cmd_interpolate(parser, args) -> int:
    import torch

    from .plotting import save_interpolation_gif, save_interpolation_grid

    if args.pairs < 1 or args.steps < 2:
        parser.error("--pairs must be >= 1 and --steps >= 2")
    if args.out is None and args.gif is None:
        parser.error("give --out PNG (a picture) and/or --gif GIF (an animation)")
    for option, path in (("--out", args.out), ("--gif", args.gif)):  # before any work
        if path is not None:
            _output_file(parser, option, path)
    trainer = _load_trainer(parser, args.checkpoint, _device_arg(parser, args))
    if args.between is not None:  # two images of the user's
        from .data.images import load_image_files
        try:
            x = load_image_files(args.between, trainer.config.colors)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--between: {exc}")
        x_a, x_b = x[:1], x[1:]
    elif _dataset_kind(trainer.config) == "lines":
        from .data.lines import draw_lines
        from .eval.lines import eval_pairs
        a, b = eval_pairs(args.pairs, args.seed)
        x_a, x_b = draw_lines(a), draw_lines(b)
    else:
        own = _own_images(parser, args, trainer.config)  # --data: your own images' test split
        x = own.split("test")[0] if own is not None else _load_images(parser, trainer.config, args.data, "test")[0]
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
    from .loop import json_line

    trainer = _load_trainer(parser, args.checkpoint, _device_arg(parser, args))
    checkpoint = _checkpoint_file(parser, args.checkpoint)
    path = checkpoint.with_name(checkpoint.stem + "_evaluation.json")
    _output_file(parser, "--checkpoint: the evaluation's JSON", path)  # before the (long) evaluation
    result = dict(kimg=round(trainer.nimg / 1024, 3))
    if _dataset_kind(trainer.config) == "lines":
        from .eval.lines import evaluate_lines
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
    from .eval.cluster import evaluate_clustering

    if args.restarts < 1:
        parser.error(f"--restarts must be >= 1, got {args.restarts}")
    own = _own_images(parser, args, trainer.config)  # --data: your own images, their test split
    if own is not None:
        x_train, y_train, x_test, y_test = _own_splits(parser, own, trainer.config, train=False)
        if y_test is None:
            print(f"note: {own.source} has no labels (no class subfolders or labels array): no probe or "
                  f"clustering accuracy", file=sys.stderr)
            return {}
    else:
        x_test, y_test = _load_images(parser, trainer.config, args.data, "test", pixels=True)
        if y_test is None:
            print("note: CelebA has no labels: no probe or clustering accuracy", file=sys.stderr)
            return {}
        x_train, y_train = _load_images(parser, trainer.config, args.data, "train", pixels=True, limit=60000)
    from .data import to_unit_range

    result = _idx_evaluation(to_unit_range(x_test), y_test)(trainer)
    clustering = evaluate_clustering(trainer, x_train, y_train, x_test, y_test, restarts=args.restarts,
                                     progress=not args.no_progress)
    result.update(clustering_accuracy=clustering["accuracy"], clustering_train_accuracy=clustering["train_accuracy"],
                  clustering_restarts=args.restarts, clustering_inertia=clustering["inertia"])
    return result


def _add_reproduce_parsers(sub) -> None:
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
    lines.add_argument("--kimg", type=_positive_float, default=16384.0,
                       help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
    lines.add_argument("--runs", type=int, default=3, help="runs (seeds) per model; the table shows mean +- std")
    lines.add_argument("--eval-kimg", type=_positive_float, default=64.0,
                       help="evaluate every this many kimg (only the last 20 evaluations are run: the "
                            "per-run median reads those)")
    lines.add_argument("--out", required=True, help="folder for lines_table.md, the PNGs and runs/")
    lines.add_argument("--backend", default="auto", help="auto, reference or fused, for every model")
    lines.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    lines.add_argument("--seed", type=int, default=0, help="run r of each model has seed SEED + r")
    lines.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def cmd_reproduce_lines(parser, args) -> int:
    import torch

    from .reproduce.lines import check_arguments, reproduce_lines
    from .trainer import resolve_backend

    device = _device_arg(parser, args)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        models = check_arguments(args.models, args.kimg, args.runs, args.eval_kimg)
        resolve_backend(args.backend, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except ValueError as exc:
        parser.error(str(exc))
    _output_folder(parser, "--out", args.out)  # before any work
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
        _add_test_fraction(p)
        p.add_argument("--out", required=True, help=f"folder for {task}_PRESET_table.md, the JSON, the PNG and runs/")
        p.add_argument("--models", default="all", help="all, or a comma-separated list of models (acai, ...)")
        p.add_argument("--kimg", type=_positive_float, default=16384.0,
                       help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
        p.add_argument("--runs", type=int, default=1, help="runs (seeds) per model; the table shows mean +- std")
        p.add_argument("--eval-kimg", type=_positive_float, default=64.0,
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

    from .data import data_folder
    from .reproduce.downstream import check_arguments, load_data, preset_for, reproduce_downstream
    from .trainer import resolve_backend

    device = _device_arg(parser, args)
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
    _output_folder(parser, "--out", args.out)  # before any work (loading the data set)
    preset = preset_for(args.dataset, args.latent)
    own = _own_images(parser, args, ACAIConfig.preset(preset))  # your own images: --dataset/--latent pick the networks
    overrides, data_name = {}, None
    if own is not None:
        from .reproduce.downstream import DownstreamData
        if own.nclass is None:
            parser.error(f"--data {own.source}: reproduce {args.task} needs labels (class subfolders, or a labels "
                         f"array in the .npz)")
        overrides, data_name = dict(nclass=own.nclass), Path(own.source).name
        data = DownstreamData(*_own_splits(parser, own, ACAIConfig.preset(preset, **overrides)))
    else:
        try:
            data = load_data(args.dataset, folder)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--data: {exc}")
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
# `acai-fast sweep` and `--tensorboard` (acai_fast.sweep, acai_fast.tensorboard_log)
# ------------------------------------------------------------------------------------------------


def _add_tensorboard_argument(p) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each evaluation's scalars and interpolation grid as TensorBoard events "
                        "into OUT (tensorboard --logdir OUT; needs pip install 'acai_fast[tensorboard]')")


def _tensorboard_log(parser, args, out: Path, trainer):
    """train --tensorboard: the run's TensorBoardLog (rank 0 writes; None without the flag)."""
    if not args.tensorboard or (args.distributed is not None and not args.distributed.is_main):
        return None
    from .tensorboard_log import TensorBoardLog
    try:
        return TensorBoardLog(out, resume_nimg=trainer.nimg)
    except ImportError as exc:
        parser.error(f"--tensorboard: {exc}")


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


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="train seeds x hyper-parameters as arrays of runs; one folder per run, "
                                      "summary.md/.csv and plots", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sw.add_argument("--preset", default="lines", choices=PRESETS, help="the paper's configuration")
    sw.add_argument("--seeds", type=_seed_list, required=True, help="seeds: a range 0-3, a list 0,2,5, or both")
    for name, what in (("advweight", "lambda, the critic term's weight"), ("reg", "gamma, the critic's real-data mixing"),
                       ("lr", "Adam learning rate")):
        sw.add_argument(f"--{name}", type=_number_list, default=None,
                        help=f"{what}: comma-separated values to sweep (default: the preset's)")
    from .models import MODELS
    sw.add_argument("--model", default="acai", choices=list(MODELS), help="what every run trains")
    sw.add_argument("--kimg", type=_positive_float, default=16384.0,
                    help="train each run on this many thousand (x1024) images (default: 16384, the paper's)")
    sw.add_argument("--eval-kimg", type=_positive_float, default=64.0,
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
    _add_tensorboard_argument(sw)
    sw.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    sw.add_argument("--data", default=None, help=DATA_HELP)
    _add_test_fraction(sw)
    sw.add_argument("--batch", type=int, default=None, help="images per step of each run (default: the preset's, 64)")
    sw.add_argument("--depth", type=int, default=None,
                    help="width of the first encoder/decoder level (default: the preset's)")
    sw.add_argument("--latent", type=int, default=None, help="latent channels (default: the preset's)")
    sw.add_argument("--advdepth", type=int, default=None,
                    help="critic width (default: the preset's, 0: the encoder's depth)")
    sw.add_argument("--pairs", type=int, default=256,
                    help="lines: test pairs per evaluation (default: 256, the paper's)")


def cmd_sweep(parser, args) -> int:
    from .distributed import init_from_env
    from .sweep import SweepArgumentError, sweep

    device = _device_arg(parser, args)
    try:  # torchrun: each rank trains its share of the runs (None when this process runs alone)
        distributed = args.distributed = init_from_env(device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.resume and not Path(args.out).is_dir():  # a typo must not start a new sweep
        parser.error(f"--resume: {args.out} is not a folder: nothing to continue (leave --resume out to "
                     f"start a sweep there)")
    _output_folder(parser, "--out", args.out)  # before any work (loading data)
    overrides = {k: getattr(args, k) for k in ("batch", "depth", "latent", "advdepth") if getattr(args, k) is not None}
    data = args.data
    try:
        config = ACAIConfig.preset(args.preset, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    own = _own_images(parser, args, config)  # your own images: loaded once, every run trains on them
    if own is not None:
        if own.nclass is not None:
            overrides["nclass"] = own.nclass
        data = _own_splits(parser, own, dataclasses.replace(config, **overrides))
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


# ------------------------------------------------------------------------------------------------
# `acai-fast encode` and `acai-fast export`: latents and networks out (acai_fast.export)
# ------------------------------------------------------------------------------------------------


def _add_encode_export_parsers(sub) -> None:
    from .export import FORMATS

    enc = sub.add_parser("encode", help="write the latents of a data set (your images or the paper's) to an .npz "
                                        "file, with labels and file names where known")
    enc.add_argument("--checkpoint", required=True, help="a checkpoint file, or the run folder holding checkpoint.pt")
    enc.add_argument("--data", default=None, help=DATA_HELP)
    _add_test_fraction(enc)
    enc.add_argument("--split", default="all", choices=("all", "train", "test"),
                     help="which images: all (your images: every file, is_test marks the test split; the "
                          "paper's: train then test), train or test")
    enc.add_argument("--out", required=True,
                     help=".npz file to write: latents (N, D), latent_maps (N, latent, w, w), labels, classes, "
                          "names, is_test (numpy.load reads it without pickles)")
    enc.add_argument("--batch", type=_positive_int, default=1024, help="images per encoder pass on the device")
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

    from .export import encode_dataset, save_latents

    if Path(args.out).suffix != ".npz":
        parser.error(f"--out {args.out}: the latents file must end in .npz")
    out = _output_file(parser, "--out", args.out)  # before any work
    checkpoint = _checkpoint_file(parser, args.checkpoint)
    trainer = _load_trainer(parser, checkpoint, _device_arg(parser, args))
    labels = classes = names = is_test = None
    own = _own_images(parser, args, trainer.config)
    if own is not None:  # your images: every file (or a split), with its name and label
        idx = own.indices(args.split)
        images, source = own.images[idx], own.source
        labels = own.labels[idx] if own.labels is not None else None
        classes, names, is_test = own.classes, [own.names[i] for i in idx], own.is_test[idx]
    elif _dataset_kind(trainer.config) == "lines":
        parser.error("--data: a lines model's images are generated; give your own images (a folder or .npz) to "
                     "encode")
    else:  # the paper's data set: train then test (CelebA's test split is its training set)
        from .data import dataset_of_preset

        celeba = dataset_of_preset(trainer.config.dataset) == "celeba"  # one split: its training images
        parts = ["train"] if celeba else [p for p in ("train", "test") if args.split in ("all", p)]
        loaded = [_load_images(parser, trainer.config, args.data, p, pixels=True) for p in parts]
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
    from .export import export_networks

    out = _output_folder(parser, "--out", args.out)  # before any work
    checkpoint = _checkpoint_file(parser, args.checkpoint)
    trainer = _load_trainer(parser, checkpoint, "cpu")  # exported on the CPU, in fp32
    info = export_networks(trainer, out, format=args.format, checkpoint=str(checkpoint))
    for name, entry in info["files"].items():
        print(f"wrote {out / entry['file']} ({entry['format']}): {info[name]['input']} -> {info[name]['output']}",
              file=sys.stderr)
    print(f"wrote {out / 'export.json'}; load with torch.export.load(path).module()", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `acai-fast` alone: what it can do, not an error about a missing argument
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    parser = args.command_parser  # errors name the sub-command: `acai-fast train: error: ...`
    _set_threads(args)
    command = {"train": cmd_train, "interpolate": cmd_interpolate, "evaluate": cmd_evaluate,
               "profile": cmd_profile, "reproduce": cmd_reproduce, "sweep": cmd_sweep, "encode": cmd_encode,
               "export": cmd_export}[args.command]
    return _run(command, parser, args)


def _run(command, parser, args) -> int:
    """Run a sub-command. A training stopped on purpose (SIGINT/SIGTERM, a non-finite loss) or a
    checkpoint that could not be written ends with one line and its exit code, not a traceback; a
    second Ctrl-C exits 130 at once. A torchrun process group (args.distributed) is left at the end."""
    from .checkpoint import CheckpointError
    from .loop import TrainingStopped

    try:
        return command(parser, args)
    except TrainingStopped as exc:
        print(f"acai-fast: {exc}", file=sys.stderr)
        return exc.exit_code
    except CheckpointError as exc:  # e.g. the disk filled up during training
        print(f"acai-fast: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("acai-fast: interrupted at once (a second Ctrl-C); the last complete checkpoint is kept",
              file=sys.stderr)
        return 130
    finally:
        distributed = getattr(args, "distributed", None)
        if distributed is not None:
            distributed.close()


if __name__ == "__main__":
    sys.exit(main())
