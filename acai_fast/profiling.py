"""Where the time goes: NVML sampling of the GPU in a background thread, step-phase markers, and
torch.profiler traces of training steps with their top kernels and phase split.

    with GpuSampler(interval_s=0.5, csv_path="run/gpu_samples.csv") as sampler:
        ...                                   # train; sampler.samples holds dicts of FIELDS
    report = profile_trainer(trainer, x, labels, steps=5, out_dir="prof")   # acai-fast profile

NVML comes from nvidia-ml-py (`pip install acai_fast[profile]`) or, without it, straight from the
driver's libnvidia-ml.so.1 through ctypes. Where neither works (no driver, no GPU: this CPU machine)
the sampler says so once (a logged warning and `sampler.reason`) and records nothing; it never
raises into the run. The reader is injectable (`GpuSampler(reader=callable)`) for tests.

Phases: the trainer marks its step with `phase(name)` (a torch.profiler.record_function named
"acai::<name>", free when no profiler runs): forward, backward (or forward_backward where one
schedule does both), probe, optimizer. `profile_trainer` wraps each profiled step in "acai::step"
and splits the step's time by those marks: on a GPU, the kernels' time by the phase whose host
interval launched them, and the GPU's idle time inside the step as "gaps"; on the CPU, the host time
of each phase and the rest of the step as "other (host)". Kernels replayed from a CUDA graph were
launched by the replay, so their time shows as "graph replay".
"""
from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("acai_fast")

# What one NVML sample holds (a missing reading is None: e.g. utilisation under MIG, power on some boards).
FIELDS = ("gpu_util_pct", "mem_util_pct", "mem_used_mib", "mem_total_mib", "power_w", "sm_clock_mhz",
          "temperature_c")
CSV_COLUMNS = ("unix_time", "elapsed_s") + FIELDS
PHASE_PREFIX = "acai::"
PHASES = ("forward", "backward", "forward_backward", "probe", "optimizer")


# ------------------------------------------------------------------------------------------------
# Phase markers (used by the trainer; cost: two no-op dispatcher calls when no profiler runs)
# ------------------------------------------------------------------------------------------------


def phase(name: str):
    """Context manager marking a phase of the training step in profiler traces: "acai::<name>"."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


# ------------------------------------------------------------------------------------------------
# NVML readers: callables returning one sample (a dict of FIELDS)
# ------------------------------------------------------------------------------------------------


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (no nvidia-ml-py and no libnvidia-ml, no driver, no GPU)."""


def nvml_index(device=None) -> int:
    """NVML's index of a torch CUDA device: CUDA_VISIBLE_DEVICES renumbers torch's devices, NVML sees
    them all. (A UUID in CUDA_VISIBLE_DEVICES is not mapped: NVML index 0 is used then.)"""
    index = torch.device(device).index if device is not None and torch.device(device).index is not None else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if index < len(visible) and visible[index].strip().isdigit():
        return int(visible[index])
    return index


def _safe(fn):
    try:
        return fn()
    except Exception:  # one unsupported reading (NVML_ERROR_NOT_SUPPORTED) leaves its field empty
        return None


class _PynvmlReader:
    """NVML through nvidia-ml-py (module pynvml)."""

    def __init__(self, index: int):
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable("nvidia-ml-py is not installed (pip install 'acai_fast[profile]')") from exc
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
        except Exception as exc:  # pynvml.NVMLError_*: no library, no driver, no such device
            raise NvmlUnavailable(f"NVML (nvidia-ml-py) failed: {exc}") from exc
        self.nvml = pynvml
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.source = "nvidia-ml-py"

    def __call__(self) -> dict:
        nv, h = self.nvml, self.handle
        util = _safe(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = _safe(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power = _safe(lambda: nv.nvmlDeviceGetPowerUsage(h))
        return dict(gpu_util_pct=util.gpu if util else None, mem_util_pct=util.memory if util else None,
                    mem_used_mib=mem.used / 2 ** 20 if mem else None,
                    mem_total_mib=mem.total / 2 ** 20 if mem else None,
                    power_w=power / 1e3 if power is not None else None,
                    sm_clock_mhz=_safe(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                    temperature_c=_safe(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))

    def close(self) -> None:
        _safe(self.nvml.nvmlShutdown)


class _CUtilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _CMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _CtypesReader:
    """NVML straight from the driver's libnvidia-ml.so.1 (no Python package needed): the same calls."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self, index: int):
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as exc:
            raise NvmlUnavailable(f"libnvidia-ml.so.1 not found (no NVIDIA driver): {exc}") from exc
        ret = lib.nvmlInit_v2()
        if ret != 0:
            raise NvmlUnavailable(f"nvmlInit_v2 returned error {ret}")
        self.lib, self.handle = lib, ctypes.c_void_p()
        ret = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self.handle))
        if ret != 0:
            lib.nvmlShutdown()
            raise NvmlUnavailable(f"nvmlDeviceGetHandleByIndex_v2({index}) returned error {ret}")
        buf = ctypes.create_string_buffer(96)
        self.name = buf.value.decode() if lib.nvmlDeviceGetName(self.handle, buf, 96) == 0 else "unknown"
        self.source = "libnvidia-ml (ctypes)"

    def _uint(self, fn, *args):
        v = ctypes.c_uint()
        return v.value if fn(self.handle, *args, ctypes.byref(v)) == 0 else None

    def __call__(self) -> dict:
        lib, util, mem = self.lib, _CUtilization(), _CMemory()
        has_util = lib.nvmlDeviceGetUtilizationRates(self.handle, ctypes.byref(util)) == 0
        has_mem = lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(mem)) == 0
        power = self._uint(lib.nvmlDeviceGetPowerUsage)
        return dict(gpu_util_pct=util.gpu if has_util else None, mem_util_pct=util.memory if has_util else None,
                    mem_used_mib=mem.used / 2 ** 20 if has_mem else None,
                    mem_total_mib=mem.total / 2 ** 20 if has_mem else None,
                    power_w=power / 1e3 if power is not None else None,
                    sm_clock_mhz=self._uint(lib.nvmlDeviceGetClockInfo, ctypes.c_int(self.NVML_CLOCK_SM)),
                    temperature_c=self._uint(lib.nvmlDeviceGetTemperature, ctypes.c_int(self.NVML_TEMPERATURE_GPU)))

    def close(self) -> None:
        self.lib.nvmlShutdown()


def open_nvml(device=None):
    """An NVML reader of `device` (torch CUDA device or index; default 0): nvidia-ml-py when installed,
    else libnvidia-ml through ctypes. Raises NvmlUnavailable with every reason when neither works."""
    index = nvml_index(device)
    reasons = []
    for cls in (_PynvmlReader, _CtypesReader):
        try:
            return cls(index)
        except NvmlUnavailable as exc:
            reasons.append(str(exc))
    raise NvmlUnavailable("; ".join(reasons))


# ------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------


def summarize_samples(samples: list[dict]) -> dict:
    """Means of utilisation, power and SM clock and the peak memory of `samples` (None where no
    sample has the reading): the columns the benchmark and the metrics lines show."""
    def values(key):
        return [s[key] for s in samples if s.get(key) is not None]

    def mean(key):
        v = values(key)
        return round(sum(v) / len(v), 2) if v else None

    mem = values("mem_used_mib")
    return dict(gpu_util_mean=mean("gpu_util_pct"), gpu_mem_util_mean=mean("mem_util_pct"),
                gpu_power_w_mean=mean("power_w"), gpu_sm_clock_mhz_mean=mean("sm_clock_mhz"),
                gpu_temperature_c_max=max(values("temperature_c"), default=None),
                gpu_mem_used_mib_max=round(max(mem), 1) if mem else None, gpu_samples=len(samples))


class GpuSampler:
    """Samples NVML (or `reader`) every `interval_s` seconds in a background thread.

    reader: a zero-argument callable returning a dict of FIELDS (default: `open_nvml(device)`), with
        an optional close(); for tests, any function. If opening NVML fails, `available` is False,
        `reason` says why (logged once, as a warning) and nothing is recorded.
    csv_path: every sample is also appended to this CSV (header CSV_COLUMNS when the file is new),
        flushed as it is written so that a killed run keeps its samples.
    clock: the monotonic clock of the sample times and of the schedule (`time_s` in each sample;
        default time.monotonic); tests inject a fake one and drive the sampler by hand (below).
    A reader that raises stops the sampling (reason recorded, logged once), never the caller.

    Use as a context manager, or start()/stop(). start() takes the first sample at once (in the
    caller's thread: a run shorter than one interval still has one, a failing reader shows at once),
    then a background thread calls take_sample() on the schedule it returns: readings at
    t0 + k * interval_s, a late one followed by the next on time (no burst of catch-up readings).
    start(background=False) opens the reader and the CSV without a thread: the caller calls
    take_sample() itself. `begin_interval()` / `end_interval()` give the summary of the samples
    between two calls: the hook `acai_fast.loop.fit(monitor=...)` calls."""

    def __init__(self, interval_s: float = 0.5, *, reader: Callable[[], dict] | None = None, device=None,
                 csv_path: str | os.PathLike | None = None, clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.device = device
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.clock = clock
        self.samples: list[dict] = []
        self.reason: str | None = None  # why nothing is (or no longer) recorded
        self.gpu_name: str | None = None
        self.source: str | None = None
        self._reader = reader
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # set while not started, and by stop()
        self._stop.set()
        self._lock = threading.Lock()
        self._file = None
        self._writer = None
        self._t0 = 0.0
        self._unix0 = 0.0
        self._next_t = 0.0
        self._interval_start = 0

    @property
    def available(self) -> bool:
        return self._reader is not None and self.reason is None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, background: bool = True) -> "GpuSampler":
        """Open the reader (and the CSV), take the first sample, then (background) sample in a
        thread until stop(). Started already: nothing more."""
        if self.running or not self._stop.is_set():
            return self
        if self._reader is None:
            try:
                self._reader = open_nvml(self.device)
            except NvmlUnavailable as exc:
                self._off(f"no NVML: {exc}")
                return self
        self.gpu_name = getattr(self._reader, "name", None)
        self.source = getattr(self._reader, "source", "injected reader")
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            self._file = open(self.csv_path, "a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(CSV_COLUMNS)
                self._file.flush()
        self._stop.clear()
        self._t0, self._unix0 = self.clock(), time.time()
        self._next_t = self._t0
        delay = self.take_sample()
        if background and delay is not None:
            self._thread = threading.Thread(target=self._run, args=(delay,), name="acai-gpu-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (within one interval at most), close the CSV and NVML. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 3 * self.interval_s))
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
        close = getattr(self._reader, "close", None)
        if close is not None and self.reason is None:
            _safe(close)

    def _off(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.warning("GPU sampling off: %s", reason)

    def take_sample(self) -> float | None:
        """Read once and record the sample (and its CSV row); returns the seconds to wait until the
        next reading on the schedule t0 + k * interval_s (0 when late: the schedule restarts from
        now, no burst of catch-up readings), or None when the reader failed (sampling is over:
        reason recorded and logged once) or the sampler is stopped."""
        if not self.available or self._stop.is_set():
            return None
        try:
            values = self._reader()
        except Exception as exc:  # a failing reader ends the sampling, never the run
            self._off(f"the reader failed: {type(exc).__name__}: {exc}")
            return None
        now = self.clock()
        sample = dict(time_s=now, elapsed_s=now - self._t0, unix_time=self._unix0 + (now - self._t0))
        sample.update({k: values.get(k) for k in FIELDS})
        with self._lock:
            self.samples.append(sample)
            if self._writer is not None:
                self._writer.writerow([_csv_value(sample[k]) for k in CSV_COLUMNS])
                self._file.flush()
        self._next_t += self.interval_s
        delay = self._next_t - self.clock()
        if delay < 0:  # fell behind (a slow reading): the schedule restarts from now
            self._next_t, delay = self.clock(), 0.0
        return delay

    def _run(self, delay: float) -> None:
        while not self._stop.wait(delay):
            delay = self.take_sample()
            if delay is None:
                return

    def window(self, start: float, end: float | None = None) -> list[dict]:
        """The samples taken between clock times start and end (default: now)."""
        end = self.clock() if end is None else end
        with self._lock:
            return [s for s in self.samples if start <= s["time_s"] <= end]

    def summary(self, start: float | None = None, end: float | None = None) -> dict:
        """summarize_samples of the window (default: every sample); {} when nothing can be recorded."""
        if not self.available:
            return {}
        with self._lock:
            samples = list(self.samples)
        if start is not None or end is not None:
            lo, hi = start if start is not None else -math.inf, end if end is not None else math.inf
            samples = [s for s in samples if lo <= s["time_s"] <= hi]
        return summarize_samples(samples)

    def begin_interval(self) -> None:
        with self._lock:
            self._interval_start = len(self.samples)

    def end_interval(self) -> dict:
        """Summary of the samples since begin_interval(): gpu_util_mean, gpu_power_w_mean, ...
        ({} without NVML, so that a CPU run's metrics lines stay as they are)."""
        if not self.available:
            return {}
        with self._lock:
            samples = self.samples[self._interval_start:]
        return summarize_samples(samples)

    def write_json(self, path: str | os.PathLike) -> None:
        with self._lock:
            samples = list(self.samples)
        payload = dict(gpu=self.gpu_name, source=self.source, reason=self.reason, interval_s=self.interval_s,
                       summary=summarize_samples(samples) if self.available else {}, samples=samples)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def _csv_value(v):
    return "" if v is None else (round(v, 6) if isinstance(v, float) else v)


# ------------------------------------------------------------------------------------------------
# Traces: top kernels and the split of the step
# ------------------------------------------------------------------------------------------------

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def load_trace(path: str | os.PathLike) -> list[dict]:
    """The complete ('X') events of a Chrome trace written by torch.profiler."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _is_gpu_trace(events) -> bool:
    return any(e.get("cat") in DEVICE_CATS for e in events)


def _self_times(events) -> list[tuple[dict, float]]:
    """(event, self time) of the CPU ops: duration minus their direct children's on the same thread."""
    out = []
    by_thread: dict = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, children's time]
        for e in ops:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done = stack.pop()
                out.append((done[0], done[0]["dur"] - done[1]))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        out += [(ev, ev["dur"] - child) for ev, child in stack]
    return out


def top_kernels(events: list[dict], n: int = 15) -> list[dict]:
    """The n kernels (GPU trace: device kernels, copies and memsets by device time) or CPU ops (CPU
    trace: by self time) that took the longest in total: name, calls, total_us, mean_us, percent."""
    if _is_gpu_trace(events):
        timed = [(e, e["dur"]) for e in events if e.get("cat") in DEVICE_CATS]
    else:
        timed = _self_times(events)
    rows: dict[str, list] = {}
    for e, t in timed:
        r = rows.setdefault(e["name"], [0, 0.0])
        r[0] += 1
        r[1] += t
    total = sum(t for _, t in rows.values()) or 1.0
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][1])[:n]
    return [dict(name=name, calls=calls, total_us=round(t, 2), mean_us=round(t / calls, 2),
                 percent=round(100 * t / total, 2)) for name, (calls, t) in ranked]


def _annotations(events, name=None):
    return [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(PHASE_PREFIX)
            and (name is None or e["name"] == name)]


def _innermost_phase(ts: float, phases: list[dict]) -> str | None:
    best = None
    for p in phases:
        if p["ts"] <= ts <= p["ts"] + p["dur"] and (best is None or p["dur"] < best["dur"]):
            best = p
    return best["name"][len(PHASE_PREFIX):] if best is not None else None


def _union_length(intervals) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def phase_split(events: list[dict]) -> dict:
    """The profiled steps' time split by phase, per step (microseconds) and in percent.

    GPU trace: each kernel's device time goes to the innermost phase whose host interval contains
    its launch (matched by correlation id); kernels launched by a CUDA graph replay go to "graph
    replay"; "gaps" is the GPU's idle time between the step's first kernel start and last kernel end.
    CPU trace: each phase's host time (nested phases counted once, in the innermost), and "other
    (host)" for the rest of the step. Returns dict(device, steps, step_us, phases={name: us},
    percent={name: %})."""
    steps = _annotations(events, PHASE_PREFIX + "step")
    marks = [e for e in _annotations(events) if e["name"] != PHASE_PREFIX + "step"]
    if not steps:
        return dict(device=None, steps=0, step_us=None, phases={}, percent={})
    split: dict[str, float] = {}
    if _is_gpu_trace(events):
        launches = {e["args"].get("correlation"): e for e in events
                    if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
        busy, spans = [], []
        for step in steps:
            lo, hi = step["ts"], step["ts"] + step["dur"]
            kernels = []
            for k in events:
                if k.get("cat") not in DEVICE_CATS:
                    continue
                launch = launches.get(k.get("args", {}).get("correlation"))
                if launch is None or not lo <= launch["ts"] <= hi:
                    continue
                kernels.append(k)
                if "graph" in launch["name"].lower():
                    name = "graph replay"
                else:
                    name = _innermost_phase(launch["ts"], marks) or "other"
                split[name] = split.get(name, 0.0) + k["dur"]
            if kernels:
                start = min(k["ts"] for k in kernels)
                end = max(k["ts"] + k["dur"] for k in kernels)
                spans.append(end - start)
                busy.append(_union_length((k["ts"], k["ts"] + k["dur"]) for k in kernels))
        split["gaps"] = sum(spans) - sum(busy)
        step_total = sum(spans)
        device = "cuda"
    else:
        step_total = sum(s["dur"] for s in steps)
        inner = 0.0
        for m in marks:
            # innermost time of this mark: its duration minus the marks directly inside it
            children = [c for c in marks if c is not m and m["ts"] <= c["ts"] and
                        c["ts"] + c["dur"] <= m["ts"] + m["dur"] and c["dur"] < m["dur"]]
            own = m["dur"] - _union_length((c["ts"], c["ts"] + c["dur"]) for c in children)
            name = m["name"][len(PHASE_PREFIX):]
            split[name] = split.get(name, 0.0) + own
            inner += own
        split["other (host)"] = max(step_total - inner, 0.0)
        device = "cpu"
    n = len(steps)
    per_step = {k: round(v / n, 2) for k, v in split.items()}
    denom = sum(split.values()) or 1.0
    return dict(device=device, steps=n, step_us=round(step_total / n, 2), phases=per_step,
                percent={k: round(100 * v / denom, 2) for k, v in split.items()})


def format_top_table(rows: list[dict], device: str) -> str:
    what = "kernel (GPU time)" if device == "cuda" else "CPU op (self time)"
    width = max([len(what)] + [min(len(r["name"]), 70) for r in rows])
    lines = [f"{what:<{width}} {'calls':>6} {'total ms':>9} {'mean us':>9} {'%':>6}"]
    for r in rows:
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        lines.append(f"{name:<{width}} {r['calls']:>6} {r['total_us'] / 1e3:>9.3f} {r['mean_us']:>9.1f} "
                     f"{r['percent']:>6.1f}")
    return "\n".join(lines)


def format_phase_table(split: dict) -> str:
    if not split.get("steps"):
        return "no acai::step marks in the trace"
    where = "GPU time" if split["device"] == "cuda" else "host time"
    lines = [f"phase ({where}, per step)   ms/step       %"]
    for k, v in sorted(split["phases"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<26} {v / 1e3:>7.3f} {split['percent'][k]:>7.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The profile command's logic
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProfileReport:
    device: str
    trace: str
    top: list[dict]
    split: dict
    step_ms: list[float]
    gpu: dict
    png: str | None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def profile_trainer(trainer, x: torch.Tensor, labels: torch.Tensor | None = None, *, steps: int = 5,
                    warmup: int = 5, out_dir: str | os.PathLike = "profile", sample_seconds: float = 2.0,
                    interval_s: float = 0.05, top: int = 15, reader=None, plot: bool = True) -> ProfileReport:
    """Profile `steps` training steps of `trainer` on (x, labels) after `warmup` unprofiled ones
    (compilation, autotuning, graph capture), then keep stepping for `sample_seconds` without the
    profiler while NVML samples the GPU. Writes in out_dir: trace.json (Chrome trace: open in
    https://ui.perfetto.dev or chrome://tracing), gpu_samples.csv (on a GPU), profile.json (top
    kernels, phase split, per-step times, GPU summary) and utilisation.png. The trainer trains."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(trainer.device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sampler = GpuSampler(interval_s, reader=reader, device=device,
                         csv_path=out / "gpu_samples.csv" if on_gpu or reader is not None else None)
    marks = {}
    step_ms = []
    with sampler:
        t = sampler.clock()
        marks["warmup"] = t
        for _ in range(warmup):
            trainer.step(x, labels)
        _sync(device)
        marks["profiled"] = sampler.clock()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                with phase("step"):
                    trainer.step(x, labels)
                _sync(device)
                step_ms.append((time.perf_counter() - t0) * 1e3)
        marks["sampled"] = sampler.clock()
        end = marks["sampled"] + (sample_seconds if sampler.available else 0.0)
        while sampler.clock() < end:
            for _ in range(8 if on_gpu else 1):  # on a GPU a few steps per check: the queue stays short
                trainer.step(x, labels)
            _sync(device)
        marks["end"] = sampler.clock()
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = load_trace(trace)
    top_rows = top_kernels(events, top)
    split = phase_split(events)
    gpu = dict(available=sampler.available, reason=sampler.reason, name=sampler.gpu_name,
               sampled_window=sampler.summary(marks["sampled"], marks["end"]))
    png = None
    if plot:
        png = str(out / "utilisation.png")
        plot_profile(sampler.samples, marks, split, png, title=_title(trainer), note=sampler.reason)
    report = ProfileReport(device=device.type, trace=str(trace), top=top_rows, split=split, step_ms=step_ms,
                           gpu=gpu, png=png)
    (out / "profile.json").write_text(json.dumps(dataclasses.asdict(report), indent=1) + "\n")
    return report


def _title(trainer) -> str:
    cfg = trainer.config
    return (f"{getattr(trainer, 'backend', '?')} step, depth {cfg.depth}, latent {cfg.latent_shape}, "
            f"batch {cfg.batch}, on {trainer.device}")


def plot_profile(samples: list[dict], marks: dict, split: dict, path, *, title: str = "",
                 note: str | None = None) -> None:
    """utilisation.png: GPU utilisation and power over time (the phases of the run shaded), and the
    split of the profiled step's time."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6.5), gridspec_kw=dict(height_ratios=[3, 2]))
    t0 = marks.get("warmup", 0.0)
    if samples:
        t = [s["time_s"] - t0 for s in samples]
        ax.plot(t, [s["gpu_util_pct"] for s in samples], label="GPU utilisation (%)", color="tab:blue")
        ax.plot(t, [s["mem_util_pct"] for s in samples], label="memory-bus utilisation (%)", color="tab:cyan")
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        power = [s["power_w"] for s in samples]
        if any(p is not None for p in power):
            ax2 = ax.twinx()
            ax2.plot(t, power, color="tab:red", label="power (W)")
            ax2.set_ylabel("W", color="tab:red")
        names = ["warmup", "profiled", "sampled", "end"]
        for (a, b), color in zip(zip(names, names[1:]), ("0.9", "tab:orange", "tab:green")):
            if a in marks and b in marks:
                ax.axvspan(marks[a] - t0, marks[b] - t0, alpha=0.12, color=color, label=f"{a} steps")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("seconds")
    else:
        ax.text(0.5, 0.5, f"no GPU samples\n({note or 'none recorded'})", ha="center", va="center",
                wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(title)
    phases = split.get("phases", {})
    if phases:
        names = sorted(phases, key=lambda k: -phases[k])
        bx.barh(names, [phases[k] / 1e3 for k in names], color="tab:purple")
        where = "GPU time" if split.get("device") == "cuda" else "host time (CPU run)"
        bx.set_xlabel(f"ms per step ({where}, mean of {split['steps']} profiled steps)")
        bx.invert_yaxis()
    else:
        bx.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: ProfileReport) -> str:
    """What `acai-fast profile` prints: the step times, the top kernels, the phase split, the files."""
    ms = sorted(report.step_ms)
    lines = []
    if report.device != "cuda":
        lines.append("CPU run: the CPU step's operators and host time (no GPU here); GPU kernels show "
                     "only on a GPU")
    lines.append(f"{len(ms)} profiled steps: median {ms[len(ms) // 2]:.3f} ms (min {ms[0]:.3f}, max {ms[-1]:.3f}), "
                 f"wall time with the profiler on")
    lines += ["", format_top_table(report.top, report.device), "", format_phase_table(report.split)]
    gpu = report.gpu
    if gpu.get("available"):
        s = gpu.get("sampled_window") or {}
        lines.append(f"\nNVML ({gpu.get('name')}), steps without the profiler: utilisation {s.get('gpu_util_mean')} %, "
                     f"power {s.get('gpu_power_w_mean')} W, SM clock {s.get('gpu_sm_clock_mhz_mean')} MHz, "
                     f"memory {s.get('gpu_mem_used_mib_max')} MiB ({s.get('gpu_samples')} samples)")
    else:
        lines.append(f"\nNVML: {gpu.get('reason')}")
    lines.append(f"trace: {report.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if report.png:
        lines.append(f"picture: {report.png}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The modelled profile (`acai-fast profile --model GPU`): every launch of a traced step as the cost
# model (acai_fast.ops.cost) sees it on a GPU; rows from acai_fast.engine.launches.model_launches
# ------------------------------------------------------------------------------------------------

MODEL_COLUMNS = ("index", "layer", "pass", "kernel", "shape", "config", "config_source", "ctas", "waves",
                 "gflop", "useful_gflop", "hbm_mb", "l2_mb", "smem_kb", "us", "bound")


def model_table(rows: list[dict]) -> list[dict]:
    """Modelled launches in display units (MODEL_COLUMNS): GFLOP, MB, KB, microseconds."""
    return [dict(index=r["index"], layer=r["layer"], **{"pass": r["pass"]}, kernel=r["kernel"], shape=r["shape"],
                 config=r["config"], config_source=r["config_source"], ctas=r["ctas"], waves=r["waves"],
                 gflop=round(r["flops"] / 1e9, 4), useful_gflop=round(r["useful_flops"] / 1e9, 4),
                 hbm_mb=round(r["hbm_bytes"] / 1e6, 3), l2_mb=round(r["l2_bytes"] / 1e6, 3),
                 smem_kb=round(r["smem"] / 1024, 1), us=round(r["time_us"], 2), bound=r["bound"]) for r in rows]


def step_time_us(rows: list[dict]) -> dict:
    """A modelled step's time with the weight gradients on a side stream (rows' "stream"), in us:
    serial: every launch after the other, one stream;
    critical: the two streams' schedule (a side launch starts when the side stream is free and
      everything queued before it on the main stream is done; the main stream waits for the side
      stream before the probe and Adam, where the engine joins them);
    shared: what launches running side by side still share: no more than one GPU of programs at a
      time (each launch's time x min(1, waves)), and the L2, HBM and tensor-core throughputs (the
      sums of the launches' l2 / hbm / compute terms: each is the time that resource alone needs);
    step = max(critical, shared): overlap is credited only where the GPU has room for it."""
    serial = main = side = occupancy = 0.0
    resources = dict(l2=0.0, hbm=0.0, compute=0.0)
    for r in rows:
        t = r["time_us"]
        if not math.isfinite(t):
            continue
        serial += t
        occupancy += t * min(1.0, r.get("waves") or 1.0)
        for k in resources:
            resources[k] += (r.get("terms") or {}).get(k, 0.0)
        if r.get("stream") == "side":
            side = max(side, main) + t
        else:
            if r["pass"] in ("probe", "adam"):
                main = max(main, side)  # the engine joins the side stream before the probe and Adam
            main += t
    critical = max(main, side)
    shared = max(occupancy, *resources.values())
    return dict(serial_us=serial, critical_us=critical, shared_us=shared, step_us=max(critical, shared))


def model_summary(rows: list[dict], *, model_to_wall: float, peak_flops: float | None = None) -> dict:
    """Totals of a modelled step: launches, modelled us (`step_time_us`: the two-stream schedule;
    serial_us: one launch after the other), ~wall us (modelled / model_to_wall), FLOPs (issued,
    useful), HBM and L2 bytes, us by bound and by pass (serial sums), launches that do not fit the
    GPU (no_fit: left out of the times, which are then those of the launches that fit), and the
    FLOP floor (useful FLOPs at `peak_flops`)."""
    fit = [r for r in rows if math.isfinite(r["time_us"])]  # a launch over the GPU's limits: inf

    def by(key):
        out: dict[str, float] = {}
        for r in fit:
            out[r[key]] = out.get(r[key], 0.0) + r["time_us"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    times = step_time_us(rows)
    total = times["step_us"]
    useful = sum(r["useful_flops"] for r in rows)
    return dict(launches=len(rows), model_us=total, serial_us=times["serial_us"],
                critical_us=times["critical_us"], shared_us=times["shared_us"],
                wall_us=total / model_to_wall, model_to_wall=model_to_wall,
                flops=sum(r["flops"] for r in rows), useful_flops=useful,
                hbm_bytes=sum(r["hbm_bytes"] for r in rows), l2_bytes=sum(r["l2_bytes"] for r in rows),
                by_bound=by("bound"), by_pass=by("pass"), no_fit=sum(r["bound"] == "no fit" for r in rows),
                flop_floor_us=useful / peak_flops * 1e6 if peak_flops else None)


def format_model_report(rows: list[dict], summary: dict, *, title: str, top: int = 10) -> str:
    """What `acai-fast profile --model` prints: every launch in order, the totals, the largest."""
    table = model_table(rows)
    widths = dict(index=3, layer=17, **{"pass": 11}, shape=34, config=32)
    head = (f"{'#':>3} {'layer':<17} {'pass':<11} {'shape':<34} {'config':<32} {'CTAs':>6} {'waves':>6} "
            f"{'GFLOP':>7} {'HBM MB':>7} {'L2 MB':>8} {'us':>8}  bound")

    def line(r):
        cut = {k: (str(r[k]) if len(str(r[k])) <= w else str(r[k])[:w - 1] + "~") for k, w in widths.items()}
        return (f"{r['index']:>3} {cut['layer'] or '-':<17} {cut['pass']:<11} {cut['shape']:<34} {cut['config']:<32} "
                f"{r['ctas']:>6} {r['waves']:>6.2f} {r['gflop']:>7.3f} {r['hbm_mb']:>7.2f} {r['l2_mb']:>8.1f} "
                f"{r['us']:>8.1f}  {r['bound']}")

    s = summary
    fits = f" (the {s['launches'] - s['no_fit']} that fit this GPU)" if s["no_fit"] else ""
    out = [f"{title}",
           f"MODEL, not a measurement: {s['launches']} launches, {s['model_us'] / 1e3:.3f} ms per step modelled{fits} "
           f"(~{s['wall_us'] / 1e3:.3f} ms wall at the model-to-wall factor {s['model_to_wall']}: wall ~ model / "
           f"{s['model_to_wall']}; weight gradients on a side stream: {s['serial_us'] / 1e3:.3f} ms on one "
           f"stream); "
           f"{s['useful_flops'] / 1e9:.2f} GFLOP useful ({s['flops'] / 1e9:.2f} issued), "
           f"{s['hbm_bytes'] / 1e6:.1f} MB HBM, {s['l2_bytes'] / 1e6:.1f} MB L2"
           + (f"; FLOP floor {s['flop_floor_us'] / 1e3:.3f} ms" if s.get("flop_floor_us") else ""),
           "", head]
    out += [line(r) for r in table]
    if s["no_fit"]:
        out.append(f"\n{s['no_fit']} launch(es) marked 'no fit': their configs need more shared memory (as "
                   f"cost.smem_estimate bounds what Triton allocates) than this GPU allows per block: they would "
                   f"fail to launch; the step's time above leaves them out")
    share = lambda us: f"{us / 1e3:8.3f} ms {100 * us / (s['serial_us'] or 1):5.1f}%"  # noqa: E731
    out += ["", "(by bound and by pass: one-stream sums)", "by bound:  " + ";  ".join(f"{k} {share(v).strip()}" for k, v in s["by_bound"].items()),
            "by pass:   " + ";  ".join(f"{k} {share(v).strip()}" for k, v in s["by_pass"].items()),
            "", f"largest {min(top, len(table))} launches:"]
    out += [line(r) for r in sorted(table, key=lambda r: -r["us"] if math.isfinite(r["us"]) else 0.0)[:top]]
    out.append("\nbounds: launch = the ~1 us graph gap + fixed cost; latency = the K loop's chain of "
               "dependent steps over the waves; compute = tensor-core/FMA time; l2 / hbm = bytes at the "
               "fitted bandwidths; tail = serial split reductions (acai_fast/ops/cost.py)")
    return "\n".join(out)


def write_model_outputs(rows: list[dict], summary: dict, meta: dict, *, json_path=None, csv_path=None) -> None:
    """The modelled profile as JSON ({meta, summary, launches (with every term)}) and/or CSV (one
    row per launch, MODEL_COLUMNS)."""
    if json_path is not None:
        launches = [dict(t, terms=r["terms"]) for t, r in zip(model_table(rows), rows)]
        clean = json.loads(json.dumps(dict(meta=meta, summary=summary, launches=launches),
                                      default=str).replace("Infinity", "null"))
        Path(json_path).write_text(json.dumps(clean, indent=1) + "\n")
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MODEL_COLUMNS)
            writer.writeheader()
            writer.writerows(model_table(rows))


def measured_vs_model(events: list[dict], model_rows: list[dict], steps: int) -> list[dict]:
    """Per kernel, the measured GPU time of a profile (trace events of `steps` steps) beside the
    modelled time of one step: [{kernel, calls, measured_us, model_calls, model_us}] per step.
    Matched by name (a measured kernel whose name starts with the modelled kernel's name; best
    effort: PyTorch's fused ops show under their CUDA kernels' names and stay unmatched)."""
    measured = {r["name"]: r for r in top_kernels(events, n=10 ** 6)}
    model: dict[str, list] = {}
    for r in model_rows:
        model.setdefault(r["kernel"], []).append(r["time_us"])
    out, used = [], set()
    for kernel, times in model.items():
        hits = [name for name in measured if name.startswith(kernel) and name not in used]
        used.update(hits)
        calls = sum(measured[n]["calls"] for n in hits) / steps
        us = sum(measured[n]["total_us"] for n in hits) / steps
        out.append(dict(kernel=kernel, calls=calls, measured_us=us if hits else None, model_calls=len(times),
                        model_us=sum(times)))
    for name, r in measured.items():
        if name not in used:
            out.append(dict(kernel=name, calls=r["calls"] / steps, measured_us=r["total_us"] / steps,
                            model_calls=0, model_us=None))
    return sorted(out, key=lambda r: -max(r["measured_us"] or 0.0, r["model_us"] or 0.0))


def format_measured_vs_model(rows: list[dict], gpu_name: str) -> str:
    lines = [f"measured beside modelled ({gpu_name}), per step; the model excludes host and graph overheads",
             f"{'kernel':<48} {'calls':>6} {'measured us':>12} {'model calls':>11} {'model us':>9} {'model/meas':>10}"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 48 else r["kernel"][:45] + "..."
        meas = f"{r['measured_us']:.1f}" if r["measured_us"] is not None else "-"
        mod = f"{r['model_us']:.1f}" if r["model_us"] is not None else "-"
        ratio = f"{r['model_us'] / r['measured_us']:.2f}" if r["measured_us"] and r["model_us"] is not None else "-"
        lines.append(f"{name:<48} {r['calls']:>6.1f} {meas:>12} {r['model_calls']:>11} {mod:>9} {ratio:>10}")
    return "\n".join(lines)
