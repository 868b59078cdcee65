"""Where the time goes: NVML sampling of the GPU in a background thread, step-phase markers, and
torch.profiler traces of training steps with their top kernels and phase split.

    with GpuSampler(interval_s=0.5, csv_path="run/gpu_samples.csv") as sampler:
        ...                                   # train; sampler.samples holds dicts of FIELDS
    report = profile_trainer(trainer, x, labels, steps=5, out_dir="prof")   # acai-fast profile

NVML comes from nvidia-ml-py (`pip install acai_fast[profile]`) or, without it, straight from the
driver's libnvidia-ml.so.1 through ctypes. Where neither works (no driver, no GPU: this CPU machine)
the sampler says so once (a logged warning and `sampler.reason`) and records nothing; it never
raises into the run. The reader is injectable (`GpuSampler(reader=callable)`) for tests.

Rooms: sampler.py (NVML, GpuSampler), traces.py (phase markers, top kernels, phase split),
report.py (the measured `acai-fast profile`), model.py (`acai-fast profile --model`).

Phases: the trainer marks its step with `phase(name)` (a torch.profiler.record_function named
"acai::<name>", free when no profiler runs): forward, backward (or forward_backward where one
schedule does both), probe, optimizer. `profile_trainer` wraps each profiled step in "acai::step"
and splits the step's time by those marks: on a GPU, the kernels' time by the phase whose host
interval launched them, and the GPU's idle time inside the step as "gaps"; on the CPU, the host time
of each phase and the rest of the step as "other (host)". Kernels replayed from a CUDA graph were
launched by the replay, so their time shows as "graph replay".
"""
from __future__ import annotations

from .model import (MODEL_COLUMNS, format_measured_vs_model, format_model_report, measured_vs_model, model_summary,
                    model_table, step_time_us, write_model_outputs)
from .report import ProfileReport, format_report, plot_profile, profile_trainer
from .sampler import (CSV_COLUMNS, FIELDS, GpuSampler, NvmlUnavailable, nvml_index, open_nvml,
                      summarize_samples)
from .traces import (PHASE_PREFIX, PHASES, format_phase_table, format_top_table, load_trace, phase,
                     phase_split, top_kernels)

__all__ = ["CSV_COLUMNS", "FIELDS", "MODEL_COLUMNS", "PHASES", "PHASE_PREFIX", "GpuSampler", "NvmlUnavailable",
           "ProfileReport", "format_measured_vs_model", "format_model_report", "format_phase_table",
           "format_report", "format_top_table", "load_trace", "measured_vs_model", "model_summary", "model_table",
           "nvml_index", "open_nvml", "phase", "phase_split", "plot_profile", "profile_trainer", "step_time_us",
           "summarize_samples", "top_kernels", "write_model_outputs"]
