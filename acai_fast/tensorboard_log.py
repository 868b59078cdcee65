"""TensorBoard event files of a run (`acai-fast train --tensorboard`, `acai-fast sweep --tensorboard`).

Each evaluation record (a metrics.jsonl line) becomes scalars at global step = images trained on,
and the run's interpolation grid an image, written by torch.utils.tensorboard.SummaryWriter into
the run's own folder. A sweep's runs each have their folder under the sweep's, so
`tensorboard --logdir SWEEP_DIR` shows every run on one page, named after its settings.
Needs the tensorboard package: pip install 'acai_fast[tensorboard]'.
"""
from __future__ import annotations

import math
import os

import torch

# Keys of a record that describe the run rather than measure it: written once, as text.
SETTING_KEYS = ("model", "seed", "advweight", "reg", "lr", "advdepth", "depth", "latent", "batch")
COUNTER_KEYS = ("kimg", "nimg", "step")
# Measurements of the evaluation (test data); every other number is a training-interval mean.
EVAL_KEYS = ("mean_distance", "mean_smoothness", "probe_accuracy", "clustering_accuracy")


class TensorBoardLog:
    """Writes one run's records and interpolation grids as TensorBoard events into `folder`.

    resume_nimg: the image count a resumed run continues from; events the interrupted run wrote
    after it are dropped (SummaryWriter's purge_step), so a curve never doubles back.

    >>> with TensorBoardLog("runs/lines") as board:
    ...     board.write(record, trainer.interpolate(x_a, x_b))   # record: a metrics.jsonl line
    """

    def __init__(self, folder: str | os.PathLike, resume_nimg: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoard logging needs the tensorboard package: "
                              "pip install 'acai_fast[tensorboard]' (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_nimg + 1 if resume_nimg else None)
        self._described = False

    def write(self, record: dict, images: torch.Tensor | None = None) -> None:
        """One evaluation: `record`'s numbers as scalars ("eval/..." for the test metrics,
        "train/..." for the rest), its settings as text (once), and `images` (rows, steps, colors,
        H, W) in [-1, 1] as the "interpolations" grid."""
        from .plotting import interpolation_grid

        step = int(record["nimg"])
        if not self._described:
            settings = [f"| {k} | {record[k]} |" for k in SETTING_KEYS if k in record]
            if settings:
                self.writer.add_text("settings", "\n".join(["| setting | value |", "|---|---|"] + settings), step)
            self._described = True
        for key, value in record.items():
            if key in SETTING_KEYS or key in COUNTER_KEYS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{'eval' if key in EVAL_KEYS else 'train'}/{key}", value, step)
        if images is not None:
            grid = interpolation_grid(images)
            self.writer.add_image("interpolations", grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
