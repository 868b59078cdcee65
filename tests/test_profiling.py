"""acai_fast.profiling: the NVML sampler (against an injected reader, and the real "no NVML" path of
this machine), the trace analysis (top kernels, phase split) on synthetic GPU traces and a real CPU
trace, `acai-fast profile` and `acai-fast train --profile` on the CPU, and fit(monitor=...)."""
import csv
import json
import logging
import threading
import time

import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import main
from acai_fast.loop import fit
from acai_fast.profiling import (CSV_COLUMNS, FIELDS, GpuSampler, NvmlUnavailable, format_phase_table,
                                 format_report, format_top_table, open_nvml, phase_split, profile_trainer,
                                 summarize_samples, top_kernels)
from helpers import write_idx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: one intra-op thread (conftest.py)


HAS_NVML = True
try:
    open_nvml()
except NvmlUnavailable:
    HAS_NVML = False


class FakeReader:
    """Counts its calls; sample k has gpu_util_pct = k, power_w = 100 + k; raises after `fail_after`."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self.closed = False
        self.name, self.source = "Fake GPU", "fake"

    def __call__(self):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("the GPU fell off the bus")
        k = self.calls
        self.calls += 1
        return dict(gpu_util_pct=k, mem_util_pct=1, mem_used_mib=1000.0 + k, mem_total_mib=80000.0,
                    power_w=100.0 + k, sm_clock_mhz=1980, temperature_c=40 + k)

    def close(self):
        self.closed = True


class FakeClock:
    """A clock the test moves: the sampler's schedule and sample times without wall-clock time."""

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def wait_until(condition, what, limit_s=60.0):
    """Poll `condition` until it holds; fail after limit_s. Not a timing assertion: a loaded machine
    only makes this wait longer, and the limit is there so that a broken sampler fails, not hangs."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {limit_s} s waiting for {what}"
        time.sleep(0.005)


def test_sampler_schedule_and_csv_on_a_fake_clock(tmp_path):
    """The schedule (readings due at t0 + k * interval; after a late one the next is one interval
    later, no burst of catch-up readings), the samples' times and the CSV, driven by hand on a fake
    clock: wait the returned delay, then read; each reading takes `latency` seconds of the clock."""
    path = tmp_path / "gpu_samples.csv"
    clock = FakeClock()
    latency = iter([0.0, 0.1, 0.1, 1.2, 0.1, 0.0])  # reading 3 stalls past its successor's due time

    class SlowReader(FakeReader):
        def __call__(self):
            clock.t += next(latency)
            return super().__call__()

    reader = SlowReader()
    sampler = GpuSampler(0.5, reader=reader, csv_path=path, clock=clock).start(background=False)
    assert not sampler.running and sampler.available and reader.calls == 1  # start() read once, at t0
    delays, delay = [], 0.5
    for _ in range(5):
        clock.t += delay
        delay = sampler.take_sample()
        delays.append(delay)
    # Due at t0 + 0.5, + 1.0, + 1.5 (read at +1.5, done at +2.7: late, so the schedule restarts from
    # +2.7), then +3.2, +3.7.
    assert delays == pytest.approx([0.4, 0.4, 0.0, 0.4, 0.5])
    times = [s["time_s"] for s in sampler.samples]
    assert times == pytest.approx([1000.0, 1000.6, 1001.1, 1002.7, 1002.8, 1003.2])
    assert [s["elapsed_s"] for s in sampler.samples] == pytest.approx([t - 1000.0 for t in times])
    n = len(sampler.samples)
    assert n == reader.calls == 6
    sampler.stop()
    assert reader.closed and sampler.take_sample() is None and reader.calls == n  # nothing after stop()
    # CSV: the header, then one row per sample with the reader's values in order.
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == n + 1
    col = {name: i for i, name in enumerate(CSV_COLUMNS)}
    assert [int(r[col["gpu_util_pct"]]) for r in rows[1:]] == list(range(n))
    assert [float(r[col["power_w"]]) for r in rows[1:]] == [100.0 + k for k in range(n)]
    assert [float(r[col["elapsed_s"]]) for r in rows[1:]] == pytest.approx([t - 1000.0 for t in times])
    # A second run appends without a second header.
    GpuSampler(0.5, reader=FakeReader(), csv_path=path, clock=clock).start(background=False).stop()
    rows = list(csv.reader(path.open()))
    assert sum(tuple(r) == CSV_COLUMNS for r in rows) == 1 and len(rows) == n + 2


def test_sampler_thread_samples_and_stops_cleanly():
    """The background thread samples until stop(); afterwards it is gone and nothing is read. (No
    assertion on how fast: it waits for three readings however loaded the machine is.)"""
    reader = FakeReader()
    with GpuSampler(0.01, reader=reader) as sampler:
        assert sampler.running and sampler.available
        wait_until(lambda: reader.calls >= 3, "three readings")
    assert not sampler.running
    assert not any(t.name == "acai-gpu-sampler" for t in threading.enumerate())
    assert reader.closed
    n = len(sampler.samples)
    assert n == reader.calls >= 3
    assert sampler.take_sample() is None and reader.calls == n
    times = [s["time_s"] for s in sampler.samples]
    assert times == sorted(times)


def test_sampler_intervals_and_summary():
    reader, clock = FakeReader(), FakeClock()
    sampler = GpuSampler(0.01, reader=reader, clock=clock).start(background=False)
    for _ in range(2):
        clock.t += 0.01
        sampler.take_sample()
    sampler.begin_interval()  # samples 0-2 before; 3-6 in the interval
    for _ in range(4):
        clock.t += 0.01
        sampler.take_sample()
    sampler.stop()
    out = sampler.end_interval()
    n = len(sampler.samples)
    assert n == 7 and out["gpu_samples"] == 4  # only the interval's samples, not the earlier ones
    assert out["gpu_util_mean"] == pytest.approx((3 + 4 + 5 + 6) / 4)  # sample k has gpu_util_pct k
    assert out["gpu_power_w_mean"] == pytest.approx(100 + out["gpu_util_mean"])
    assert out["gpu_mem_used_mib_max"] == 1000.0 + 6
    assert out["gpu_temperature_c_max"] == 40 + 6 and out["gpu_sm_clock_mhz_mean"] == 1980
    assert set(FIELDS) <= set(sampler.samples[0])
    assert sampler.summary()["gpu_samples"] == n
    assert sampler.summary(1000.02, 1000.045)["gpu_samples"] == 3  # samples at 1000.02, .03, .04
    assert summarize_samples([])["gpu_util_mean"] is None


def test_failing_reader_stops_sampling_not_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger="acai_fast"):
        sampler = GpuSampler(0.005, reader=FakeReader(fail_after=3), clock=FakeClock()).start(background=False)
        assert sampler.take_sample() is not None and sampler.take_sample() is not None
        assert sampler.take_sample() is None  # the fourth reading raises: sampling is over
        assert sampler.take_sample() is None
        sampler.stop()
        # The same in the background thread: it ends by itself after the third reading.
        with GpuSampler(0.005, reader=FakeReader(fail_after=3)) as threaded:
            wait_until(lambda: not threaded.running, "the thread to end")
    for s in (sampler, threaded):
        assert len(s.samples) == 3
        assert "fell off the bus" in s.reason and not s.available
        assert s.end_interval() == {}
    assert sum("GPU sampling off" in r.message for r in caplog.records) == 2  # once per sampler


@pytest.mark.skipif(HAS_NVML, reason="this machine has NVML: the no-NVML path is for machines without a GPU")
def test_real_sampler_without_nvml_says_so_once(tmp_path, caplog):
    path = tmp_path / "gpu_samples.csv"
    with caplog.at_level(logging.WARNING, logger="acai_fast"):
        with GpuSampler(0.01, csv_path=path) as sampler:
            time.sleep(0.05)
            assert not sampler.running
        sampler.stop()
    assert not sampler.available and "NVML" in sampler.reason
    assert sampler.samples == [] and sampler.end_interval() == {} and sampler.summary() == {}
    assert not path.exists()
    assert sum("GPU sampling off" in r.message for r in caplog.records) == 1
    with pytest.raises(NvmlUnavailable, match="NVML"):
        open_nvml()


# ------------------------------------------------------------------------------------------------
# Trace analysis on synthetic traces (the GPU path, without a GPU)
# ------------------------------------------------------------------------------------------------


def _x(cat, name, ts, dur, **args):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=1, tid=1, args=args)


def gpu_trace():
    return [
        _x("user_annotation", "acai::step", 0, 100),
        _x("user_annotation", "acai::forward", 0, 40),
        _x("user_annotation", "acai::backward", 40, 40),
        _x("user_annotation", "acai::optimizer", 80, 15),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
        _x("cuda_driver", "cuLaunchKernel", 50, 2, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 85, 2, correlation=3),
        _x("kernel", "conv_fwd", 20, 10, correlation=1),
        _x("kernel", "conv_bwd", 60, 20, correlation=2),
        _x("kernel", "adam", 90, 5, correlation=3),
        # a second step, replayed from a CUDA graph: two kernels of one graph launch
        _x("user_annotation", "acai::step", 200, 50),
        _x("cuda_runtime", "cudaGraphLaunch", 201, 3, correlation=9),
        _x("kernel", "conv_fwd", 210, 10, correlation=9),
        _x("kernel", "conv_bwd", 222, 8, correlation=9),
        # launched outside any step: ignored by the split, counted by the top list
        _x("cuda_runtime", "cudaLaunchKernel", 300, 1, correlation=5),
        _x("gpu_memset", "Memset (Device)", 301, 1, correlation=5),
    ]


def test_phase_split_gpu_trace():
    split = phase_split(gpu_trace())
    assert split["device"] == "cuda" and split["steps"] == 2
    # step 1 kernels: forward 10, backward 20, optimizer 5; span 20..95 = 75 with 35 busy -> 40 idle
    # step 2: graph replay 18 over span 210..230 = 20 -> 2 idle.  Per step: halves of the sums.
    assert split["phases"] == {"forward": 5.0, "backward": 10.0, "optimizer": 2.5, "graph replay": 9.0,
                               "gaps": 21.0}
    assert split["step_us"] == pytest.approx((75 + 20) / 2)
    assert sum(split["percent"].values()) == pytest.approx(100, abs=0.05)
    assert "graph replay" in format_phase_table(split)


def test_top_kernels_gpu_trace():
    top = top_kernels(gpu_trace(), n=2)
    assert [(r["name"], r["calls"], r["total_us"]) for r in top] == [("conv_bwd", 2, 28.0), ("conv_fwd", 2, 20.0)]
    assert top[0]["mean_us"] == 14.0 and top[0]["percent"] == pytest.approx(100 * 28 / 54, abs=0.01)
    assert "kernel (GPU time)" in format_top_table(top, "cuda")


def test_cpu_self_times_and_split():
    events = [
        _x("user_annotation", "acai::step", 0, 200),
        _x("user_annotation", "acai::forward", 0, 100),
        _x("cpu_op", "aten::conv2d", 5, 90),
        _x("cpu_op", "aten::convolution", 10, 80),
        _x("cpu_op", "aten::mkldnn_convolution", 15, 60),
        _x("user_annotation", "acai::backward", 100, 80),
        _x("cpu_op", "aten::convolution_backward", 110, 50),
    ]
    top = {r["name"]: r["total_us"] for r in top_kernels(events)}
    assert top == {"aten::mkldnn_convolution": 60, "aten::convolution_backward": 50, "aten::convolution": 20,
                   "aten::conv2d": 10}
    split = phase_split(events)
    assert split["device"] == "cpu"
    assert split["phases"] == {"forward": 100, "backward": 80, "other (host)": 20}


# ------------------------------------------------------------------------------------------------
# The commands on the CPU
# ------------------------------------------------------------------------------------------------


def test_profile_command_cpu(tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(["profile", "--preset", "lines", "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--out", str(out), "--top", "5"])
    captured = capsys.readouterr()
    assert code == 0
    assert "CPU run" in captured.out and "a CPU run" in captured.err
    trace = json.loads((out / "trace.json").read_text())  # loads as JSON
    names = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {"acai::step", "acai::forward", "acai::backward", "acai::probe", "acai::optimizer"} <= names
    report = json.loads((out / "profile.json").read_text())
    assert report["device"] == "cpu" and len(report["top"]) == 5 and len(report["step_ms"]) == 2
    assert report["split"]["steps"] == 2
    assert {"forward", "backward", "optimizer", "probe"} <= set(report["split"]["phases"])
    assert sum(report["split"]["percent"].values()) == pytest.approx(100, abs=0.05)
    assert any("convolution" in r["name"] for r in report["top"])
    assert "CPU op (self time)" in captured.out and "forward" in captured.out
    assert report["gpu"]["available"] is False
    assert (out / "utilisation.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_monitor_adds_interval_means(tmp_path):
    """fit(monitor=...) adds each interval's summary to its record. The sampler is driven by the
    steps (two readings per step, on a fake clock), so each interval's samples are known exactly."""
    trainer = ACAITrainer(ACAIConfig.preset("lines", batch=2), backend="reference", device="cpu")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    path = tmp_path / "gpu_samples.csv"
    clock = FakeClock()
    sampler = GpuSampler(0.005, reader=FakeReader(), csv_path=path, clock=clock).start(background=False)

    def batches():  # readings 1-2 during step 1, 3-4 during step 2 (reading 0: start())
        for _ in range(2):
            for _ in range(2):
                clock.t += 0.005
                sampler.take_sample()
            yield x

    with sampler:  # (started already: only stop() at the end)
        history = fit(trainer, batches(), kimg=4 / 1024, eval_kimg=2 / 1024, out_dir=tmp_path,
                      evaluate=lambda t: {}, progress=False, monitor=sampler)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(lines) == 2
    assert [r["gpu_samples"] for r in lines] == [2, 2]  # begin_interval() came after reading 0
    assert [r["gpu_util_mean"] for r in lines] == [1.5, 3.5]  # each interval's own samples only
    for record in lines:
        assert record["gpu_power_w_mean"] == pytest.approx(100 + record["gpu_util_mean"])
    assert len(list(csv.reader(path.open()))) == len(sampler.samples) + 1 == 6


def _write_idx(folder, prefix, n):
    """A tiny MNIST-format data set (IDX .gz): the cheapest preset to train from the command line."""
    write_idx(folder, prefix, n, rng=0)


@pytest.mark.skipif(HAS_NVML, reason="checks the no-NVML behaviour of train --profile")
def test_train_profile_flag_cpu(tmp_path, capsys):
    _write_idx(tmp_path, "train", 8)
    _write_idx(tmp_path, "t10k", 32)  # the preview draws test images 0-31
    out = tmp_path / "run"
    code = main(["train", "--preset", "mnist32", "--data", str(tmp_path), "--kimg", str(4 / 1024),
                 "--eval-kimg", str(2 / 1024), "--batch", "2", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--profile"])
    assert code == 0
    assert "no GPU samples" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("loss_ae" in r and "gpu_util_mean" not in r for r in records)
    assert not (out / "gpu_samples.csv").exists()


def test_profile_trainer_with_a_reader(tmp_path):
    """The GPU-sampling half of profile_trainer (a fake NVML on the CPU): the unprofiled window's
    summary, the samples' CSV and the utilisation picture drawn from samples."""
    trainer = ACAITrainer(ACAIConfig.preset("lines", batch=2), backend="reference", device="cpu")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    reader = FakeReader()
    step = trainer.step

    def step_with_readings(*args):
        """A step that lasts until the sampler's thread has begun two more readings: the first of
        them finished inside the step, so the sampled window holds a sample however loaded the
        machine is (no assertion on how fast the thread is)."""
        calls = reader.calls
        out = step(*args)
        wait_until(lambda: reader.calls >= calls + 2, "two readings during a step")
        return out

    trainer.step = step_with_readings
    report = profile_trainer(trainer, x, None, steps=1, warmup=0, out_dir=tmp_path, sample_seconds=0.05,
                             interval_s=0.005, reader=reader)
    assert report.gpu["available"] and report.gpu["name"] == "Fake GPU"
    assert report.gpu["sampled_window"]["gpu_samples"] >= 1
    assert trainer.steps >= 2  # the profiled step, then steps while sampling (on the CPU: one at a time)
    assert len(list(csv.reader((tmp_path / "gpu_samples.csv").open()))) >= 3
    assert (tmp_path / "utilisation.png").read_bytes()[:4] == b"\x89PNG"
    assert "NVML (Fake GPU)" in format_report(report)


@pytest.mark.gpu
def test_profile_gpu_fused_step(tmp_path):
    """On a GPU: the trace has kernels, the split sees the fused schedule, NVML samples if present."""
    trainer = ACAITrainer(ACAIConfig.preset("lines", batch=8), backend="fused", device="cuda", cuda_graph=False)
    x = torch.rand(8, 1, 32, 32, device="cuda") * 2 - 1
    labels = torch.randint(0, 10, (8,), device="cuda")
    report = profile_trainer(trainer, x, labels, steps=2, warmup=3, out_dir=tmp_path, sample_seconds=0.5)
    assert report.device == "cuda" and report.split["device"] == "cuda" and report.split["steps"] == 2
    assert report.split["phases"]["forward_backward"] > 0 and report.split["phases"]["gaps"] >= 0
    assert report.split["phases"].get("optimizer", 0) > 0
    assert report.top and report.top[0]["total_us"] > 0
    if HAS_NVML:
        assert report.gpu["available"] and report.gpu["sampled_window"]["gpu_samples"] >= 1
