"""Bad input anywhere a user can reach it is a ValueError with a clear message before any work
starts, never a crash inside a kernel (property tests, hypothesis); on the command line, exit 2."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import main
from acai_fast.loop import fit
from helpers import TINY
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def trainers():
    """One reference trainer and one fused trainer (its kernels run under the Triton interpreter):
    validation runs before either backend's first launch, so nothing here ever computes a step."""
    made = {"reference": ACAITrainer(ACAIConfig(**TINY), backend="reference", device="cpu")}
    try:
        made["fused"] = ACAITrainer(ACAIConfig(**TINY), backend="fused", device="cpu", dtype="fp32")
    except ValueError:  # no triton: the fused backend cannot be built here
        pass
    return made


def untouched(trainer):
    """Nothing ran: no step counted, no alpha drawn."""
    return trainer.steps == 0 and int(trainer.alpha_state[1]) == 0


FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHER_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]


@SETTINGS
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=6),
       backend=st.sampled_from(["reference", "fused"]))
def test_wrong_shapes_are_rejected(trainers, shape, backend):
    assume(backend in trainers)
    assume(not (len(shape) == 4 and shape[0] >= 2 and shape[1:] == [1, 32, 32]))  # the one valid form
    assume(math.prod(shape) <= 2 ** 20)
    trainer = trainers[backend]
    with pytest.raises(ValueError):
        trainer.step(torch.zeros(shape))
    assert untouched(trainer)


@SETTINGS
@given(n=st.integers(0, 1), backend=st.sampled_from(["reference", "fused"]))
def test_batches_without_a_pair_are_rejected(trainers, n, backend):
    assume(backend in trainers)
    with pytest.raises(ValueError, match="at least|hold at least"):
        trainers[backend].step(torch.zeros(n, 1, 32, 32))
    assert untouched(trainers[backend])


@SETTINGS
@given(dtype=st.sampled_from(OTHER_DTYPES), backend=st.sampled_from(["reference", "fused"]))
def test_non_float_dtypes_are_rejected(trainers, dtype, backend):
    assume(backend in trainers)
    with pytest.raises(ValueError, match="floating-point"):
        trainers[backend].step(torch.zeros(4, 1, 32, 32, dtype=dtype))
    assert untouched(trainers[backend])


@SETTINGS
@given(dtype=st.sampled_from(FLOAT_DTYPES),
       lo=st.floats(-1e6, 1e6), hi=st.floats(-1e6, 1e6),
       poison=st.sampled_from([None, math.nan, math.inf, -math.inf]),
       where=st.integers(0, 4 * 32 * 32 - 1), backend=st.sampled_from(["reference", "fused"]))
def test_values_outside_minus_one_one_or_not_finite_are_rejected(trainers, dtype, lo, hi, poison, where,
                                                                backend):
    assume(backend in trainers)
    x = torch.linspace(min(lo, hi), max(lo, hi), 4 * 32 * 32, dtype=torch.float64)
    if poison is not None:
        x[where] = poison
    x = x.to(dtype).view(4, 1, 32, 32)
    xs = x.double()
    inside = bool(torch.isfinite(xs).all()) and float(xs.min()) >= -1 and float(xs.max()) <= 1
    assume(not inside)  # valid batches would train (slowly, on the interpreter): not this test's job
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        trainers[backend].step(x)
    assert untouched(trainers[backend])


@SETTINGS
@given(labels=st.one_of(
    st.lists(st.integers(-5, 20), min_size=0, max_size=9).map(lambda v: torch.tensor(v, dtype=torch.int64)),
    st.sampled_from([torch.zeros(4), torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, dtype=torch.complex64)]),
    st.just([0, 1, 2, 3])))
def test_bad_labels_are_rejected(trainers, labels):
    valid = (isinstance(labels, torch.Tensor) and labels.dim() == 1 and labels.shape[0] == 4
             and not labels.is_floating_point() and not labels.is_complex()
             and bool(((labels >= 0) & (labels < 10)).all()))
    assume(not valid)
    trainer = trainers["reference"]
    with pytest.raises(ValueError, match="labels"):
        trainer.step(torch.zeros(4, 1, 32, 32), labels)
    assert untouched(trainer)


CONFIG_VALUES = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                          st.text(max_size=3), st.none(), st.booleans())


def sane(config) -> bool:
    """What an accepted config must be: positive integer sizes (batch >= 2), a latent width that
    divides the image, finite non-negative weights, a positive learning rate, a known dataset."""
    ints = [config.colors, config.latent_width, config.depth, config.latent, config.nclass, config.image_size]
    plain_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    return (all(plain_int(v) and v >= 1 for v in ints) and plain_int(config.batch) and config.batch >= 2
            and plain_int(config.advdepth) and config.advdepth >= 0
            and config.image_size % config.latent_width == 0 and config.latent_width < config.image_size
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in (config.advweight, config.reg, config.lr))
            and config.lr > 0 and config.dataset in ("lines", "mnist", "svhn", "celeba", "cifar"))


@SETTINGS
@given(field=st.sampled_from(["colors", "latent_width", "depth", "latent", "advdepth", "advweight", "reg",
                              "lr", "batch", "nclass", "image_size", "dataset"]),
       value=CONFIG_VALUES)
def test_config_values_are_valid_or_a_value_error(field, value):
    try:
        config = ACAIConfig(**{**TINY, field: value})
    except ValueError as exc:
        assert f"ACAIConfig.{field}" in str(exc) or "ACAIConfig.latent_width" in str(exc), str(exc)
        return
    assert sane(config), (field, value)


def test_fit_rejects_empty_and_inconsistent_data(trainers, tmp_path):
    trainer = trainers["reference"]
    with pytest.raises(ValueError, match="empty dataset"):
        fit(trainer, (torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long)), kimg=1)
    with pytest.raises(ValueError, match="differ in length"):
        fit(trainer, (torch.zeros(12, 1, 32, 32), torch.zeros(5, dtype=torch.long)), kimg=1)
    with pytest.raises(ValueError, match="ran out after 0 images"):
        fit(trainer, iter([]), kimg=1, progress=False)
    with pytest.raises(ValueError, match="nan_policy"):
        fit(trainer, "lines", kimg=1, nan_policy="ignore")
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        fit(trainer, "lines", kimg=1, checkpoint_minutes=5)  # without out_dir
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # images in 0..255, the commonest mistake
        fit(trainer, (torch.full((12, 1, 32, 32), 255.0), None), kimg=1, progress=False)
    assert untouched(trainer)


@pytest.mark.parametrize("extra, message", [
    (["--batch", "1"], "batch must be >= 2"),
    (["--checkpoint-min", "0"], "must be > 0"),
    (["--nan-policy", "ignore"], "invalid choice"),
    (["--seed", "5", "--resume"], "conflicts with --resume"),
])
def test_command_line_mistakes_exit_2_with_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    if "--resume" in extra:
        ACAITrainer(ACAIConfig.preset("lines"), backend="reference", device="cpu", seed=0).save(out / "checkpoint.pt")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "lines", "--out", str(out), "--device", "cpu", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()  # nothing trained
