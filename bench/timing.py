"""How bench/throughput.py measures a variant: the timed window of back-to-back steps, the launches
of one eager step, peak memory, NVML over the window, and the first step in fresh processes with
cold and then warm compile caches. One loop for single runs and arrays of runs alike.

    built = Built(fn, launch_counter(eager))     # fn(): one step (a graph replay, or eager)
    m = measure(lambda: built, device, args, sampler)   # times, first, gpu, peak, launches, note
    cold, warm, error = cold_then_warm([python, script, "--child", ...], timeout=300)
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import tempfile
import time

import torch

from _common import step_times
from acai_fast.engine.launches import counting_launches


@dataclasses.dataclass
class Built:
    """A variant ready to time: fn() runs one step; count() gives the launches of one eager step."""
    fn: object
    count: object = None
    keep: tuple = ()  # objects that must outlive the timing (trainer, graph, step)
    note: str | None = None  # how it ran, where that differs from the variant's description


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_runs(count, runs: int):
    """A LaunchCount of one run's step, times K (K identical runs one after another)."""
    def scale(counts):
        return collections.Counter({name: n * runs for name, n in counts.items()})
    return type(count)(scale(count.triton), scale(count.cuda_extension), scale(count.torch_ops))


def launch_counter(eager, runs: int = 1):
    """count() for Built: the launches of one eager() call (a real step), times `runs`."""
    def count():
        with counting_launches() as c:
            eager()
        return c if runs == 1 else times_runs(c, runs)
    return count


def measure(make, device: torch.device, args, sampler=None, max_seconds: float = 0.0) -> dict:
    """Time one variant: build it (make() -> Built) and run its first step (first_step_s), args.warmup
    untimed steps, then the timed window: >= args.steps back-to-back steps, stretched to
    args.min_seconds (at most args.max_steps) and, with max_seconds > 0, cut to about max_seconds
    (never under min(args.steps, 5) steps); then the peak memory and the launches of one eager step.
    On a GPU the caches are emptied and the peak reset before, and the variant's memory freed after."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        return _measure(make, device, args, sampler, max_seconds)
    finally:  # the variant (a local of _measure) is garbage now
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()


def _measure(make, device: torch.device, args, sampler, max_seconds: float) -> dict:
    sync(device)
    t0 = time.perf_counter()
    built = make()
    built.fn()
    sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.warmup):
        built.fn()
    sync(device)
    per_step = (time.perf_counter() - t1) / max(args.warmup, 1)
    steps = args.steps
    if args.min_seconds > 0 and per_step > 0:
        steps = max(steps, min(math.ceil(args.min_seconds / per_step), args.max_steps))
    if max_seconds > 0 and per_step > 0:
        steps = min(steps, max(math.floor(max_seconds / per_step), min(args.steps, 5)))
    start = sampler.clock() if sampler is not None else None
    times = step_times(built.fn, steps=steps, device=device)
    gpu = sampler.summary(start) if sampler is not None else {}
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    launches = built.count() if built.count is not None else None  # after timing: it trains a step
    sync(device)
    return dict(times=times, first=first, gpu=gpu, peak=peak, launches=launches, note=built.note)


def cold_then_warm(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[float | None, float | None,
                                                                                     str | None]:
    """(cold, warm, error): `cmd` (a child that prints {"first_step_s": ...} as its last line) run
    twice, in fresh processes sharing one new TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR: the first
    compiles into it, the second finds it full. The caches are removed afterwards."""
    cache = tempfile.mkdtemp(prefix="acai_bench_cache_")
    env = dict(os.environ, **(env or {}), TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
    times: list[float] = []
    error = None
    try:
        for _ in range(2):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                error = f"child failed: {proc.stderr.strip()[-300:]}"
                break
            times.append(json.loads(proc.stdout.strip().splitlines()[-1])["first_step_s"])
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    times += [None] * (2 - len(times))
    return times[0], times[1], error
