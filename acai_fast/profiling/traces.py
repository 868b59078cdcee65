"""Step-phase markers (`phase`, used by the trainer and the engine) and torch.profiler traces: the
top kernels by time and the split of a step into its phases, GPU idle gaps included."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("acai_fast")


PHASE_PREFIX = "acai::"
PHASES = ("forward", "backward", "forward_backward", "probe", "optimizer")


# ------------------------------------------------------------------------------------------------
# Phase markers (used by the trainer; cost: two no-op dispatcher calls when no profiler runs)
# ------------------------------------------------------------------------------------------------


def phase(name: str):
    """Context manager marking a phase of the training step in profiler traces: "acai::<name>"."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


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
