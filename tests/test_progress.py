"""acai_fast.progress: bars on a terminal, plain lines (no carriage returns) in a log, on a fake clock;
and every progress report of the package goes through it (no tqdm of its own anywhere else)."""
import io
import pathlib
import re

import pytest
import torch

import acai_fast
from acai_fast.progress import PlainProgress, is_terminal, progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_at_evaluations_and_every_interval():
    log, clock = io.StringIO(), FakeClock()
    bar = progress(1000, desc="train", unit="img", stream=log, interval_s=30, clock=clock)
    assert isinstance(bar, PlainProgress)
    for _ in range(9):  # 9 updates, 2 s apart: 18 s, no line yet
        clock.t += 2
        bar.update(10)
    assert log.getvalue() == ""
    clock.t += 12  # 30 s since the start: the next update writes a line
    bar.update(10)
    assert log.getvalue() == "train: 10% 100/1000 img, 3.33 img/s, 0:30 elapsed, ~4:30 left\n"
    clock.t += 10
    bar.update(100)
    bar.set_postfix({"loss_ae": "0.0571"})  # an evaluation: its own line at once
    assert log.getvalue().splitlines()[-1] == ("train: 20% 200/1000 img, 10 img/s, 0:40 elapsed, ~2:40 left, "
                                               "loss_ae=0.0571")
    bar.set_description("train (array 2)")
    bar.write("a message of its own")
    clock.t += 5
    bar.update(800)
    bar.close()
    bar.close()  # once only
    lines = log.getvalue().splitlines()
    assert lines[-3:] == ["train (array 2): 20% 200/1000 img, 0:40 elapsed, ~2:40 left, loss_ae=0.0571",
                          "a message of its own",
                          "train (array 2): 100% 1000/1000 img, 160 img/s, 0:45 elapsed, loss_ae=0.0571"]
    assert "\r" not in log.getvalue() and len(lines) == 5


def test_plain_lines_options():
    log, clock = io.StringIO(), FakeClock()
    with progress(2 ** 20, desc="sweep", unit="img", unit_scale=True, initial=2 ** 19, counts=False, stream=log,
                  clock=clock) as bar:
        clock.t += 60
        bar.update(2 ** 18)
    assert log.getvalue() == "sweep: 75%, 1:00 elapsed, ~1:00 left\n"  # percent and times only
    log = io.StringIO()
    with progress(None, unit="img", unit_scale=True, stream=log, clock=clock) as bar:  # no total, no desc
        clock.t += 1
        bar.update(46_100)
    assert log.getvalue() == "46.1k img, 46.1k img/s, 0:01 elapsed\n"
    log = io.StringIO()
    with progress(10, stream=log, enabled=False, clock=clock) as bar:  # off: only write()'s messages
        clock.t += 100
        bar.update(10)
        bar.set_postfix(a=1)
        bar.write("kept")
    assert log.getvalue() == "kept\n"
    with pytest.raises(ValueError, match="interval_s"):
        PlainProgress(10, interval_s=0)


def test_a_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    screen = Terminal()
    assert is_terminal(screen) and not is_terminal(io.StringIO())
    with progress(100, desc="train", unit="img", stream=screen) as bar:
        assert isinstance(bar, tqdm)
        bar.update(50)
    assert "\r" in screen.getvalue() and "train" in screen.getvalue()

    class Closed(io.StringIO):
        def isatty(self):
            raise ValueError("I/O operation on closed file")
    assert not is_terminal(Closed()) and not is_terminal(object())


def test_fit_writes_a_line_per_evaluation_into_a_log(capsys):
    """`acai-fast train ... > log 2>&1`: the training loop's report, redirected, has no carriage
    returns and one line per evaluation (capsys' stderr is not a terminal)."""
    from acai_fast import ACAIConfig, ACAITrainer

    torch.set_num_threads(1)
    config = ACAIConfig.preset("lines", batch=2, depth=2, latent=2, advdepth=2)
    trainer = ACAITrainer(config, backend="reference", device="cpu")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    trainer.fit(iter([x] * 3), kimg=6 / 1024, eval_kimg=2 / 1024, evaluate=lambda t: {}, handle_signals=False)
    err = capsys.readouterr().err
    assert "\r" not in err
    evaluations = [line for line in err.splitlines() if line.startswith("train: ")]
    assert len(evaluations) == 3 and all("loss_ae=" in line for line in evaluations)
    assert evaluations[-1].startswith("train: 100% 6/6 img")


def test_every_progress_report_goes_through_the_helper():
    """One behaviour everywhere: no module but acai_fast/progress.py imports tqdm."""
    package = pathlib.Path(acai_fast.__file__).parent
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M))
    assert users == ["progress.py"], users
