"""The `acai-fast` command line: `main` and the table of sub-commands; each group of sub-commands has
its own module (train; inspect: interpolate, evaluate, encode, export; sweeps: sweep, reproduce;
profile), what they share is in common (the parser's manners, paths, threads) and data_options (--data).

    acai-fast train --preset lines --kimg 16 --out runs/lines
    acai-fast interpolate --checkpoint runs/lines/checkpoint.pt --out grid.png
    acai-fast evaluate --checkpoint runs/lines/checkpoint.pt
    acai-fast profile --preset lines --batch 64 --steps 5 --out prof   # trace, top kernels, phase split
    acai-fast profile --model h100 --preset cifar1024 --batch 1024     # every launch, modelled (no GPU)
    acai-fast train --preset svhn32 --data DIR --out runs/svhn32       # or ACAI_FAST_DATA=DIR
    acai-fast evaluate --checkpoint runs/svhn32/checkpoint.pt --data DIR   # probe + clustering accuracy
    acai-fast reproduce probe|cluster --dataset mnist --latent 32 --data DIR --out OUT
    acai-fast sweep --preset lines --seeds 0-3 --advweight 0,0.5,1 --kimg 4096 --out sweeps/lambda

`python -m acai_fast.cli ...` (as torchrun runs it) is the same command.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import inspect, profile, sweeps, train
from .common import (CPU_THREADS, DATA_HELP, EXAMPLES, PROGRESS_HELP, CommandParser, HelpFormatter, commands,
                     finish_parser, run_command, set_threads, version_line)
from .train import preset_name

__all__ = ["main", "build_parser", "COMMANDS", "commands", "CommandParser", "HelpFormatter", "CPU_THREADS",
           "EXAMPLES", "DATA_HELP", "PROGRESS_HELP", "preset_name"]

COMMANDS = {  # sub-command -> its function (parser, args) -> exit status
    "train": train.cmd_train, "interpolate": inspect.cmd_interpolate, "evaluate": inspect.cmd_evaluate,
    "profile": profile.cmd_profile, "reproduce": sweeps.cmd_reproduce, "sweep": sweeps.cmd_sweep,
    "encode": inspect.cmd_encode, "export": inspect.cmd_export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="acai-fast", description="Train and inspect ACAI autoencoders (Berthelot et al., ICLR 2019).",
        epilog="example:\n  acai-fast train --preset lines --kimg 96 --eval-kimg 16 --out runs/lines --device cpu\n"
               "each command's options: acai-fast COMMAND --help")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the versions of acai_fast, PyTorch and Python, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(sub)  # (in the order `acai-fast --help` lists them)
    inspect.add_interpolate_evaluate_parsers(sub)
    profile.add_parser(sub)
    sweeps.add_reproduce_parsers(sub)
    sweeps.add_sweep_parser(sub)
    inspect.add_encode_export_parsers(sub)
    return finish_parser(parser)  # (last: every sub-command is built)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `acai-fast` alone: what it can do, not an error about a missing argument
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    parser = args.command_parser  # errors name the sub-command: `acai-fast train: error: ...`
    set_threads(args)
    return run_command(COMMANDS[args.command], parser, args)
