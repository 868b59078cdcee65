"""What every sub-command of `acai-fast` shares: the parser's manners (a mistake is one line, help
shows each default once and an example), argument types, --threads, checks of the paths a command
reads or writes (before any work), and how a command's end is reported (run_command)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROGRESS_HELP = ("no progress report (without it: a bar on a terminal; in a redirected log, one plain line per "
                 "evaluation or every 30 s)")
DATA_HELP = ("folder of the preset's dataset (default: $ACAI_FAST_DATA): the MNIST IDX files, SVHN .mat "
             "files, CIFAR-10 python batches or .tar.gz, or CelebA's img_align_celeba/ (or a subfolder "
             "named after the dataset); or your own images: any other folder of PNG/JPEG files (labels "
             "from its first-level subfolders, if any) or an .npy/.npz uint8 array (N, H, W[, C]) with "
             "optional labels, centre-cropped and resized to 32x32 (README: 'Your own images')")


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


def finish_parser(parser: CommandParser) -> CommandParser:
    """What every sub-command shares, added after they are built: --threads, an example at the end
    of its help, and itself as args.command_parser (its errors name it: `acai-fast train: error`)."""
    for name, sub in commands(parser).items():
        sub.set_defaults(command_parser=sub)
        if sub.epilog is None and name in EXAMPLES:
            sub.epilog = "example:\n" + "\n".join("  " + line for line in EXAMPLES[name].splitlines())
        if not any("--threads" in action.option_strings for action in sub._actions):
            sub.add_argument("--threads", type=positive_int, default=None,
                             help=f"CPU threads of PyTorch's kernels (default: {CPU_THREADS} on the CPU, "
                                  f"which holds up on a busy machine, or $OMP_NUM_THREADS when set; a GPU "
                                  f"run keeps PyTorch's own choice)")
    return parser


# ------------------------------------------------------------------------------------------------
# Argument types and the options several commands share
# ------------------------------------------------------------------------------------------------

def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_test_fraction(p) -> None:
    p.add_argument("--test-fraction", type=fraction, default=0.1,
                   help="your own images (--data): the share held out as the test split (a fixed seeded "
                        "draw; 0: test on the training images)")


def add_tensorboard_argument(p) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each evaluation's scalars and interpolation grid as TensorBoard events "
                        "into OUT (tensorboard --logdir OUT; needs pip install 'acai_fast[tensorboard]')")


def device_arg(parser: argparse.ArgumentParser, args) -> str | None:
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


def set_threads(args) -> None:
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


def version_line() -> str:
    import platform

    import torch

    from .. import __version__, cuda_extension_available
    return (f"acai-fast {__version__} (PyTorch {torch.__version__}, Python {platform.python_version()}, "
            f"CUDA extension {'built' if cuda_extension_available() else 'not built'})")


# ------------------------------------------------------------------------------------------------
# The paths a command reads or writes, checked before any work; how a command ends
# ------------------------------------------------------------------------------------------------

def checkpoint_file(parser, path) -> Path:
    """--checkpoint: a checkpoint file, or a run folder holding checkpoint.pt (exit 2 when that
    folder has none)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.pt").is_file():
            parser.error(f"--checkpoint: {path} is a folder without a checkpoint.pt")
        return path / "checkpoint.pt"
    return path


def output_file(parser, option: str, path) -> Path:
    """A file a sub-command will write, checked before any work: it is not a folder and its folder
    exists and takes a new file (acai_fast.checkpoint.check_output_file; one line, exit 2, otherwise)."""
    from ..checkpoint import CheckpointError, check_output_file

    try:
        return check_output_file(path)
    except CheckpointError as exc:
        parser.error(f"{option} {exc}")


def output_folder(parser, option: str, path) -> Path:
    """A folder a sub-command will write into, created and checked before any work (one line, exit
    2, when it cannot be created or written)."""
    from ..checkpoint import CheckpointError, check_output_folder

    try:
        check_output_folder(path)
    except CheckpointError as exc:
        parser.error(f"{option}: {exc}")
    return Path(path)


def load_trainer(parser, path, device):
    from ..trainer import ACAITrainer

    path = checkpoint_file(parser, path)
    try:
        return ACAITrainer.load(path, device=device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--checkpoint: {exc}")


def run_command(command, parser, args) -> int:
    """Run a sub-command. A training stopped on purpose (SIGINT/SIGTERM, a non-finite loss) or a
    checkpoint that could not be written ends with one line and its exit code, not a traceback; a
    second Ctrl-C exits 130 at once. A torchrun process group (args.distributed) is left at the end."""
    from ..checkpoint import CheckpointError
    from ..run_control import TrainingStopped

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
