"""A sweep under torchrun: rank r trains runs[r::world_size] on its own GPU, and rank 0 waits for
every run folder to say its run is done before it writes the summary (reading the folders: ranks'
shares can differ by a whole array, hours, longer than any collective's timeout)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from ..run_control import TrainingStopped
from .folders import is_done
from .plan import Run

POLL_SECONDS = 1.0  # how often rank 0 looks whether the other ranks' runs are done


def rank_share(runs: Sequence[Run], rank: int, world_size: int) -> list[Run]:
    """The runs rank `rank` of a torchrun job of `world_size` trains: runs[rank::world_size] (every
    run exactly once over the ranks; shares differ by at most one run)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank!r} of {world_size!r}")
    return list(runs[rank::world_size])


def wait_for_other_ranks(out: Path, runs: Sequence[Run], run_img: int, stop, bar) -> None:
    """Rank 0, its own share trained: wait until every run's folder in `out` says it is done; a
    signal (stop: the sweep's acai_fast.run_control.StopSignals) stops the wait with TrainingStopped."""
    bar.set_description("waiting for the other ranks' runs")
    while not all(is_done(out / r.name, run_img) for r in runs):
        if stop.signum:
            raise TrainingStopped("sweep stopped by a signal while waiting for the other ranks; "
                                  "continue with --resume (resume=True)", 128 + int(stop.signum), 0)
        time.sleep(POLL_SECONDS)
