"""Shared benchmark helpers: CUDA-event timing, median/p20/p80, CUDA-graph capture, environment
record and JSON output. Small on purpose; every bench/bench_<op>.py may import it
(`python bench/bench_x.py` puts bench/ on sys.path, so `import _common` works).

    times = cuda_time(fn, warmup=10, reps=30, inner=10)   # ms per call, one value per repeat
    times = step_times(fn, steps=100, device=dev)         # ms of each of 100 back-to-back calls
    median, p20, p80 = summarize(times)
    replay = cuda_graph(fn)                               # fn captured once; replay() re-runs it
    write_json(path, dict(environment=environment(), results=[...]))
    write_csv(path, rows)                                 # rows: list of flat dicts
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch


def require_cuda(script: str) -> None:
    """Exit with a clear message (status 1) when there is no CUDA GPU to time on."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
                 f"nothing was measured")


def percentile(values, q: float) -> float:
    """q in [0, 1], linear interpolation between the two nearest ranks (numpy's default)."""
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(times) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of timings."""
    return percentile(times, 0.5), percentile(times, 0.2), percentile(times, 0.8)


def cuda_time(fn, *, warmup: int = 10, reps: int = 30, inner: int = 10) -> list[float]:
    """Milliseconds per call of fn(), one value per repeat: `inner` back-to-back calls between two
    CUDA events (so the event overhead of microsecond kernels is amortised), after `warmup` calls
    (compilation, autotuning, allocator warm-up). The L2 cache is not flushed: layers of a training
    step run back to back on warm caches too."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return times


def step_times(fn, *, steps: int, device) -> list[float]:
    """Milliseconds of each of `steps` back-to-back calls of fn(), as a training loop runs them.

    On a GPU one CUDA event is recorded before the first call and after each call, with no host
    synchronisation in between (the host may run ahead of the GPU, as in training), and call k's
    time is the GPU-timeline gap between events k and k+1. On the CPU (synchronous) each call is
    timed with perf_counter."""
    if torch.device(device).type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for e in events[1:]:
            fn()
            e.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def cuda_graph(fn, *, setup=None, warmup: int = 3, pool=None):
    """Capture fn() into a CUDA graph and return its replay function.

    setup() (optional) runs first, on the capture stream and outside the capture: e.g. the forward
    pass whose backward fn() is (autograd runs each backward op on its forward op's stream, so the
    forward must be on the capturing stream). fn() is run `warmup` times before the capture so that
    lazy initialisation, Triton compilation and autotuning stay out of the graph. pool (from
    torch.cuda.graph_pool_handle()): share one memory pool between graphs that are always replayed
    in the order they were captured, never concurrently (K sequential runs' steps).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if setup is not None:
            setup()
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    root = pathlib.Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit, dirty=bool(dirty) if commit else None)


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """GPU name, library versions, git commit and a UTC timestamp for the JSON record."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return dict(
        gpu=torch.cuda.get_device_name() if cuda else None,
        gpu_capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,
        python=platform.python_version(), host=platform.node(),
        cpu=_cpu_name(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), **git_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def write_json(path, payload: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(path, rows: list[dict]) -> None:
    """rows (flat dicts) as CSV, the union of their keys as columns in first-seen order."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
