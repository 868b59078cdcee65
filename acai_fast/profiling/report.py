"""`acai-fast profile` measured: a few profiled steps of a trainer, NVML samples of a short run, the
trace's top kernels and phase split, the utilisation plot, and the printed report."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from .sampler import GpuSampler
from .traces import format_phase_table, format_top_table, load_trace, phase, phase_split, top_kernels

log = logging.getLogger("acai_fast")


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
