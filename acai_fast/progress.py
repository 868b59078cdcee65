"""Progress reports that read well wherever they go: one helper for every loop of the package.

    from acai_fast.progress import progress
    with progress(total=n, desc="train", unit="img") as bar:
        for x in batches:
            ...
            bar.update(len(x))
            bar.set_postfix(loss_ae=f"{loss:.4g}")      # an evaluation: a line of its own in a log

On a terminal (the stream's isatty()) it is a tqdm bar, redrawn in place. Anywhere else (a log file
`acai-fast train ... > log 2>&1`, a pipe, a notebook, a CI job) it writes plain lines, never
carriage returns: one line when set_postfix() reports an evaluation, when the description changes,
at most every `interval_s` seconds (default 30) while the count moves, and a last one at close()
if the count moved since. A line reads

    train: 48% 46.1k/96.0k img, 270 img/s, 2:51 elapsed, ~3:05 left, loss_ae=0.0571

(the rate is the one since the previous line). `enabled=False` writes nothing but what write() is
given. The floor under everything: it imports nothing of acai_fast, so any module may use it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

INTERVAL_S = 30.0  # a plain-line report at most this often (besides evaluations and description changes)
_PERCENT_ONLY = "{desc} {percentage:3.0f}%|{bar}| [{elapsed} elapsed, {remaining} left]"


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (progress bars there; plain lines anywhere else)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(total: float | None = None, *, desc: str = "", unit: str = "it", unit_scale: bool = False,
             initial: float = 0, enabled: bool = True, counts: bool = True, stream: TextIO | None = None,
             interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic):
    """A progress report of `total` units (see the module docstring): a tqdm bar on a terminal,
    PlainProgress lines elsewhere, nothing but write()'s messages when not `enabled`.

    desc: what progresses (the line's first word); unit, unit_scale: as tqdm's (unit_scale=True
        writes 46.1k); initial: units already done (a resumed run); counts=False: show the percentage
        and times only (a total of weighted work units, not of anything a reader counts);
    stream: where it goes (default: sys.stderr at the time of the call); interval_s, clock: how
        often a plain line is written while the count moves, by which clock (tests inject one).
    Both kinds have update(n), set_postfix(dict or **kw), set_description(text), write(message,
    file=None), close() and work as context managers."""
    stream = sys.stderr if stream is None else stream
    if enabled and is_terminal(stream):
        from tqdm import tqdm

        extra = {} if counts else dict(bar_format=_PERCENT_ONLY)
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, file=stream,
                    dynamic_ncols=True, **extra)
    return PlainProgress(total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, enabled=enabled,
                         counts=counts, stream=stream, interval_s=interval_s, clock=clock)


class PlainProgress:
    """The report for a log: whole lines, no carriage returns (see the module docstring)."""

    def __init__(self, total=None, *, desc="", unit="it", unit_scale=False, initial=0, enabled=True,
                 counts=True, stream=None, interval_s=INTERVAL_S, clock=time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = initial
        self.enabled, self.counts = enabled, counts
        self.stream = sys.stderr if stream is None else stream
        self.interval_s, self.clock = interval_s, clock
        self.postfix = ""
        self._start = self._last_t = clock()
        self._initial = self._last_n = initial
        self._closed = False

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self._last_t >= self.interval_s:
            self._report()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Values shown after the counts (an evaluation's losses): written at once, as its own line."""
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        self._report()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        if desc != self.desc:
            self.desc = desc
            self._report()

    def write(self, message: str, file: TextIO | None = None, end: str = "\n") -> None:
        """A message of its own (written even when the report is disabled, as tqdm.write does)."""
        stream = self.stream if file is None else file
        stream.write(message + end)
        stream.flush()

    def close(self) -> None:
        if not self._closed:
            if self.n != self._last_n:
                self._report()
            self._closed = True

    def line(self) -> str:
        """The report as one line (what _report writes)."""
        now = self.clock()
        elapsed, since = now - self._start, now - self._last_t
        head = [f"{100 * self.n / self.total:.0f}%"] if self.total else []
        if self.counts:
            count = _amount(self.n, self.unit_scale)
            if self.total:
                count += "/" + _amount(self.total, self.unit_scale)
            head.append(f"{count} {self.unit}")
        parts = [" ".join(head)] if head else []
        if self.counts and since > 0 and self.n > self._last_n:
            parts.append(f"{_amount((self.n - self._last_n) / since, self.unit_scale)} {self.unit}/s")
        parts.append(f"{_clock_time(elapsed)} elapsed")
        done = self.n - self._initial
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{_clock_time(elapsed * (self.total - self.n) / done)} left")
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _report(self) -> None:
        if self.enabled and not self._closed:
            self.write(self.line())
        self._last_t, self._last_n = self.clock(), self.n


def _amount(value: float, scale: bool) -> str:
    """46100 -> '46.1k' with scale (tqdm's unit_scale), else an integer or a short float."""
    if scale:
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= factor:
                return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"


def _clock_time(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss (tqdm's style)."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
