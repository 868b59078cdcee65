"""What every training loop shares about a run (acai_fast.loop.fit for one trainer, acai_fast.sweep's
arrays of runs): the files it writes (a metrics line that describes the run, the checkpoint, the
interpolation preview), the check of its output folder before the first step, how often it looks
up from its steps (CONTROL_EVERY_GPU), and how it is stopped (StopSignals, TrainingStopped).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

from .checkpoint import CheckpointError, check_output_folder

# Control points (read the losses back, agree with the other ranks on stopping or checkpointing):
# every step on the CPU, where reading a loss costs nothing; every CONTROL_EVERY_GPU steps on a GPU,
# where each read-back waits for the queue (at ~1 ms per step a signal is answered within ~0.1 s).
CONTROL_EVERY_GPU = 64


def write_outputs(trainer, out: Path, record: dict, preview) -> None:
    """Append `record` to out/metrics.jsonl, write out/checkpoint.pt and out/interpolations.png.
    torchrun: every rank calls it (the checkpoint gathers every rank's random streams); rank 0 writes."""
    main = trainer.distributed is None or trainer.distributed.is_main
    if main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json_line(record) + "\n")
    trainer.save(out / "checkpoint.pt")
    if preview is not None and main:
        from .plotting import save_interpolation_grid
        save_interpolation_grid(trainer.interpolate(*preview), out / "interpolations.png")


def run_settings(trainer) -> dict:
    """What trained the run, on every metrics line so that each line describes itself: the model
    and the hyper-parameters a user may vary (acai-fast train --model --advweight --reg --advdepth
    --depth --latent --lr --batch)."""
    cfg = trainer.config
    model = getattr(getattr(trainer, "model", None), "name", None)
    return dict(model=model, advweight=cfg.advweight, reg=cfg.reg, advdepth=cfg.advdepth,
                depth=cfg.depth, latent=cfg.latent, lr=cfg.lr, batch=cfg.batch)


def json_line(record: dict) -> str:
    """One strict-JSON line: NaN (an undefined metric, e.g. smoothness) is written as null."""
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})


# ------------------------------------------------------------------------------------------------
# Nothing lost: stopping on a signal or a non-finite loss, output checks (issue 12)
# ------------------------------------------------------------------------------------------------


class TrainingStopped(Exception):
    """Training (fit(), a sweep's arrays) stopped before its kimg: by SIGINT/SIGTERM (after writing a checkpoint, with out_dir)
    or by a non-finite loss under nan_policy="stop" (nothing more written: the last good checkpoint
    stays). str(): one line for the user; exit_code: what the CLI exits with (128 + the signal, or
    1); step: the trainer's step count; history: the evaluation records made before the stop."""

    def __init__(self, message: str, exit_code: int, step: int, history: list | None = None):
        super().__init__(message)
        self.exit_code, self.step, self.history = exit_code, step, history if history is not None else []


def check_outputs(trainer, out: Path) -> None:
    """Before training: can `out` take the run's files? Rank 0 checks that the folder can be created
    and written and that its disk holds two checkpoints (the old one stays until the new one is
    written); under torchrun every rank calls this and learns the verdict. CheckpointError if not."""
    dist = trainer.distributed
    error = None
    if dist is None or dist.is_main:
        params = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
        need = 2 * (3 * 4 * params + 2 ** 20)  # fp32 weights + Adam's two moments, twice, + slack
        try:
            check_output_folder(out, need)
        except CheckpointError as exc:
            error = exc
    if dist is not None:
        (failed,) = dist.agree(error is not None)
        if failed and error is None:
            error = CheckpointError(f"rank 0 cannot write the output folder {out}")
    if error is not None:
        raise error


class StopSignals:
    """While installed, SIGINT and SIGTERM ask the training loop (fit(), a sweep's arrays) to stop
    after the current step (it then writes a checkpoint and raises TrainingStopped). A second SIGINT more than DEBOUNCE_S after the first
    raises KeyboardInterrupt at once (one Ctrl-C reaches a torchrun worker twice, from the terminal
    and forwarded by torchrun, milliseconds apart). Main thread only; restore() puts the previous
    handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    DEBOUNCE_S = 1.0

    def __init__(self, enabled: bool = True, announce: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.announce = announce
        self.signum = 0
        self._first = 0.0
        self._previous: dict = {}

    def install(self) -> None:
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first = signum, now
            if self.announce:
                print(f"\nacai-fast: {signal.Signals(signum).name}: finishing this step, then writing a "
                      f"checkpoint (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and now - self._first > self.DEBOUNCE_S:
            self.restore()
            raise KeyboardInterrupt
