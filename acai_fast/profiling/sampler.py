"""NVML readers (nvidia-ml-py, or the driver's libnvidia-ml.so.1 through ctypes) and the GPU
sampler: one sample of FIELDS every interval in a background thread (or driven by hand), CSV rows,
per-interval summaries. Without NVML it says so once and records nothing; it never raises into a run."""
from __future__ import annotations

import csv
import ctypes
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
