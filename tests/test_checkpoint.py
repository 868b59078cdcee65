"""Nothing lost: checkpoints written atomically and read as data, bad files refused in one line,
signals and non-finite losses handled, outputs checked before training, kill-and-resume exact."""
import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from acai_fast import ACAITrainer
from acai_fast.checkpoint import (FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint,
                                  temporary_path)
from acai_fast.cli import main
from acai_fast.loop import TrainingStopped
from acai_fast.run_control import StopSignals
from helpers import tiny_trainer, write_idx

ROOT = Path(__file__).resolve().parents[1]


def images(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def kimg(steps, batch=6):
    return steps * batch / 1024


def params_of(trainer):
    return {k: v.detach().clone() for k, v in [*trainer.model.state_dict().items(),
                                               *(("probe." + k, v) for k, v in trainer.probe.state_dict().items())]}


# ------------------------------------------------------------------------------------------------ the format


def test_everything_the_trainer_saves_loads_as_plain_data(tmp_path):
    trainer = tiny_trainer(seed=2)
    x, y = images(12)
    trainer.step(x[:6], y[:6])
    trainer.step(x[6:])  # a step without labels too
    trainer.save(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)  # no allow-listing needed
    assert state["version"] == FORMAT_VERSION and isinstance(state["package_version"], str)
    assert state["generator"].dtype == torch.uint8  # a torch.Generator's state is a ByteTensor
    assert state["alpha_state"].tolist() == trainer.alpha_state.tolist()
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert not temporary_path(tmp_path / "ck.pt").exists()
    restored = ACAITrainer.load(tmp_path / "ck.pt", device="cpu")
    assert torch.equal(restored.generator.get_state(), trainer.generator.get_state())
    assert (restored.steps, restored.nimg) == (2, 12)


class _RunsCode:
    """A pickle payload that would create MARKER if it were ever unpickled as code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp_path):
    """name -> (path, phrase the one-line error must contain)."""
    trainer = tiny_trainer()
    good = tmp_path / "good.pt"
    trainer.save(good)
    raw = good.read_bytes()
    marker = tmp_path / "code_ran"
    files = {
        "truncated": (raw[: len(raw) // 2], "truncated or corrupted"),
        "corrupted": (raw[:200] + bytes(1000) + raw[1200:], "truncated or corrupted"),
        "random bytes": (np.random.default_rng(0).bytes(4096), "not an acai_fast checkpoint"),
        "text": (b"this is not a checkpoint\n", "a text file"),
        "empty": (b"", "is empty"),
        "bare pickle that runs code": (pickle.dumps({"model": _RunsCode(marker)}), "bare Python pickle"),
    }
    paths = {}
    for name, (data, phrase) in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".pt")
        path.write_bytes(data)
        paths[name] = (path, phrase)
    crafted = tmp_path / "crafted.pt"  # a torch.save archive whose pickle calls os.system
    torch.save({"version": FORMAT_VERSION, "model_name": "acai", "model": _RunsCode(marker)}, crafted)
    paths["crafted torch archive that runs code"] = (crafted, "posix.system")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, foreign)
    paths["foreign"] = (foreign, "not an acai_fast checkpoint")
    newer = tmp_path / "newer.pt"
    state = trainer.state_dict()
    state.update(version=99, package_version="9.9")
    torch.save(state, newer)
    paths["wrong version"] = (newer, "format version 99 (written by acai_fast 9.9)")
    misfit = tmp_path / "misfit.pt"
    state = trainer.state_dict()
    state["model"]["encoder.blocks.0.weight"] = torch.zeros(7, 7)
    torch.save(state, misfit)
    paths["weights of another shape"] = (misfit, "do not fit")
    return paths, marker


def test_bad_files_give_one_clear_line_and_run_nothing(tmp_path):
    paths, marker = _bad_files(tmp_path)
    for name, (path, phrase) in paths.items():
        with pytest.raises(CheckpointError) as exc:
            ACAITrainer.load(path, device="cpu")
        message = str(exc.value)
        assert phrase in message, (name, message)
        assert "\n" not in message and len(message) < 400, (name, message)
    assert not marker.exists()  # no payload ran
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("command", ["evaluate", "interpolate"])
def test_cli_refuses_a_crafted_checkpoint_with_exit_2(tmp_path, capsys, command):
    paths, marker = _bad_files(tmp_path)
    argv = [command, "--checkpoint", str(paths["crafted torch archive that runs code"][0])]
    argv += ["--out", str(tmp_path / "grid.png")] if command == "interpolate" else []
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "refused" in err[-1] and "Traceback" not in "\n".join(err)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ writes


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    trainer = tiny_trainer()
    trainer.save(path)
    before = path.read_bytes()
    trainer.step(*images(6))

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match=r"disk is full; the previous checkpoint .* is intact"):
        trainer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not temporary_path(path).exists()
    if os.path.exists("/dev/full"):  # Linux: torch's own writer hitting a full device midway
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, open("/dev/full", "wb")))
        with pytest.raises(CheckpointError, match=r"the write failed, is the disk full\?.* is intact"):
            trainer.save(path)
        monkeypatch.undo()
        assert path.read_bytes() == before and not temporary_path(path).exists()
    assert ACAITrainer.load(path, device="cpu").steps == 0
    (tmp_path / "a_file").write_text("x")  # a folder that cannot be made
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint(trainer.state_dict(), tmp_path / "a_file" / "ck.pt")


_KILL_DURING_WRITE = """
import os, sys, time
from acai_fast import ACAIConfig, ACAITrainer
path = sys.argv[1]
trainer = ACAITrainer(ACAIConfig(depth=4, latent=3, latent_width=8, advdepth=5, batch=6),
                      backend="reference", device="cpu")
trainer.save(path)                      # the good checkpoint (step 0)
def stuck(fd):                          # the new file is written, not yet synced nor renamed
    print("writing", flush=True)
    time.sleep(120)
os.fsync = stuck
import torch
trainer.step(torch.zeros(6, 1, 32, 32))
trainer.save(path)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "ck.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DURING_WRITE, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        proc.kill()  # SIGKILL while the new checkpoint is half done
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert temporary_path(path).exists()  # the interrupted write, never read
    trainer = ACAITrainer.load(path, device="cpu")
    assert trainer.steps == 0
    trainer.save(path)  # the next save replaces the leftover
    assert not temporary_path(path).exists()


def test_output_folder_problems_are_reported_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    base = ["train", "--preset", "lines", "--kimg", "1", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--out", str(blocker / "run")])
    assert exc.value.code == 2 and "cannot be created" in capsys.readouterr().err

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 5000, 5000))
    with pytest.raises(SystemExit) as exc:
        main(base + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "free on its disk" in err and "MiB" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ faults


def _poison(trainer, at_step):
    """A fault from outside: the decoder's output is NaN during training step `at_step` (1-based)."""
    return trainer.decoder.register_forward_hook(
        lambda module, args, out: out * float("nan") if trainer.steps == at_step - 1 and module.training else None)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = tiny_trainer(seed=1)
    _poison(trainer, at_step=3)
    with pytest.raises(TrainingStopped) as exc:
        trainer.fit(images(), kimg=kimg(6), eval_kimg=kimg(2), out_dir=tmp_path, progress=False)
    message = str(exc.value)
    assert "non-finite loss_ae (nan) at step 3" in message and "(step 2) is kept" in message
    assert exc.value.exit_code == 1 and len(exc.value.history) == 1
    saved = ACAITrainer.load(tmp_path / "checkpoint.pt", device="cpu")
    assert saved.steps == 2
    assert all(torch.isfinite(v).all() for v in saved.model.state_dict().values())


def test_nonfinite_loss_skip_policy_skips_that_update_only(tmp_path):
    trainer = tiny_trainer(seed=1)
    _poison(trainer, at_step=3)
    history = trainer.fit(images(), kimg=kimg(5), eval_kimg=None, progress=False, nan_policy="skip")
    assert trainer.steps == 5 and history[-1]["skipped_steps"] == 1
    assert all(v == v for k, v in history[-1].items() if isinstance(v, float))  # no NaN averaged in
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    p = next(trainer.model.parameters())
    assert int(trainer.optimizer.state[p]["step"]) == 4  # Adam took 4 of the 5 steps


@pytest.fixture
def python_sigint():
    """SIGINT handled as Python's default (KeyboardInterrupt) for the test, whatever the launcher did:
    a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_finishes_the_step_writes_a_checkpoint_and_stops(tmp_path, python_sigint, monkeypatch):
    # The two signals are sent back to back; on a machine stalled for a second between them the
    # second would count as a human's second Ctrl-C: the test widens the debounce window.
    monkeypatch.setattr(StopSignals, "DEBOUNCE_S", 60.0)
    trainer = tiny_trainer(seed=4)
    x, y = images()

    def batches():
        for i in range(100):
            if i == 2:  # during step 3: SIGINT, and the copy torchrun forwards a moment later
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            yield x[6 * (i % 5):6 * (i % 5) + 6], y[6 * (i % 5):6 * (i % 5) + 6]
    with pytest.raises(TrainingStopped) as exc:
        trainer.fit(batches(), kimg=kimg(50), eval_kimg=None, out_dir=tmp_path, progress=False)
    assert exc.value.exit_code == 128 + signal.SIGINT
    assert "stopped by SIGINT after step 3" in str(exc.value)
    assert ACAITrainer.load(tmp_path / "checkpoint.pt", device="cpu").steps == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_a_second_ctrl_c_exits_at_once(tmp_path, python_sigint):
    trainer = tiny_trainer(seed=4)

    def second_ctrl_c(module, args):
        if trainer.steps == 2:
            time.sleep(1.1)  # a human's second Ctrl-C, not torchrun's forwarded copy
            os.kill(os.getpid(), signal.SIGINT)
    x, y = images()

    def batches():
        for i in range(100):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield x[:6], y[:6]
    trainer.encoder.register_forward_pre_hook(second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(batches(), kimg=kimg(50), eval_kimg=None, out_dir=tmp_path, progress=False)
    assert trainer.steps == 2  # the step in progress did not finish
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------------------------ kill and resume


def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, capsys):
    """`acai-fast train` (reference backend, CPU) in a subprocess, stopped by SIGTERM between
    evaluations; --resume continues it; the parameters equal an uninterrupted run's exactly."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    write_idx(data, "train", 48, rng)
    write_idx(data, "t10k", 36, rng)
    batch = 8

    def argv(out, steps, *extra):
        return ["train", "--preset", "mnist32", "--data", str(data), "--batch", str(batch), "--kimg",
                str(steps * batch / 1024), "--eval-kimg", str(2 * batch / 1024), "--out", str(out),
                "--device", "cpu", "--backend", "reference", "--no-progress", *extra]

    stopped = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acai_fast.cli", *argv(stopped, 1000)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (stopped / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the first evaluation (step 2) has written a checkpoint: handlers are up
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM after step" in err and "--resume" in err
    interrupted_at = torch.load(stopped / "checkpoint.pt", weights_only=True)["steps"]
    assert 2 <= interrupted_at < 1000
    target = interrupted_at + 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess's thread count: the same float summation order
    try:
        assert main(argv(stopped, target, "--resume")) == 0
        assert main(argv(tmp_path / "straight", target)) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    resumed = ACAITrainer.load(stopped / "checkpoint.pt", device="cpu")
    straight = ACAITrainer.load(tmp_path / "straight" / "checkpoint.pt", device="cpu")
    assert resumed.steps == straight.steps == target
    a, b = params_of(resumed), params_of(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    assert torch.equal(resumed.alpha_state, straight.alpha_state)
