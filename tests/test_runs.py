"""Arrays of runs (acai_fast.trainer.RunArray, `ACAITrainer(config, runs=...)`): run k of an array
equals the single run with the same seed and settings (initial weights, alphas, updates, losses),
on the reference backend (a loop over runs: the oracle) and on the fused one (one launch per layer
for all runs; the Triton interpreter on the CPU); `run(k)` hands out that single trainer; an array
step makes as many launches as a single-run step."""
import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.engine import count_launches
from acai_fast.trainer import RunArray, run_settings
from helpers import TINY, assert_close

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
RGB_LIKE = dict(colors=3, image_size=8, latent_width=1, depth=3, latent=2, advdepth=2, batch=3)  # fused
RUNS = [{"seed": 0}, {"seed": 7, "advweight": 1.0, "reg": 0.5}, {"seed": 3, "advweight": 0.0}]


def batches(config, runs, step):
    g = torch.Generator().manual_seed(100 + step)
    n, c, s = config["batch"], config.get("colors", 1), config.get("image_size", 32)
    x = torch.rand(runs, n, c, s, s, generator=g) * 2 - 1
    return x.to(DEVICE), torch.randint(0, 10, (runs, n), generator=g).to(DEVICE)


def singles_for(config, runs, backend):
    base = ACAIConfig(**config)
    return [ACAITrainer(ACAIConfig(**{**config, **{k: r[k] for k in r if k != "seed"}}), backend=backend,
                        device=DEVICE, seed=r["seed"], **({"dtype": "fp32"} if backend == "fused" else {}))
            for r in run_settings(runs, base)]


@pytest.mark.parametrize("backend, config, steps", [("reference", TINY, 3), ("fused", RGB_LIKE, 2)])
def test_array_equals_single_runs(backend, config, steps):
    array = ACAITrainer(ACAIConfig(**config), backend=backend, device=DEVICE, runs=RUNS,
                        **({"dtype": "fp32"} if backend == "fused" else {}))
    assert isinstance(array, RunArray) and array.runs == 3
    singles = singles_for(config, RUNS, backend)
    for step in range(steps):
        x, labels = batches(config, 3, step)
        la = array.step(x, labels)
        for k, single in enumerate(singles):
            ls = single.step(x[k], labels[k])
            for name in ls:
                assert_close(la[name][k], ls[name], atol=1e-7, rtol=1e-5, name=f"step {step} run {k} {name}")
    for k, single in enumerate(singles):
        for name, p in single.model.named_parameters():
            assert_close(array.stacked[name][k], p, atol=1e-7, rtol=1e-5, name=f"run {k} {name}")
        for name, p in single.probe.named_parameters():
            assert_close(array.stacked[f"probe.{name}"][k], p, atol=1e-7, rtol=1e-5, name=f"run {k} probe")
        assert torch.equal(array.alpha_states[k], single.alpha_state)


def test_run_k_is_the_single_trainer(tmp_path):
    """run(k) continues exactly as the single run would: weights, Adam moments, alpha stream."""
    array = ACAITrainer(ACAIConfig(**TINY), backend="reference", device=DEVICE, runs=RUNS)
    singles = singles_for(TINY, RUNS, "reference")
    for step in range(2):
        x, labels = batches(TINY, 3, step)
        array.step(x, labels)
        for k, s in enumerate(singles):
            s.step(x[k], labels[k])
    one = array.run(1)
    assert one.config.advweight == 1.0 and one.config.reg == 0.5 and one.seed == 7 and one.steps == 2
    one.save(tmp_path / "run1.pt")
    loaded = ACAITrainer.load(tmp_path / "run1.pt", device=DEVICE)
    x, labels = batches(TINY, 3, 9)
    for t in (one, loaded):
        lt, ls = t.step(x[1], labels[1]), singles[1].step(x[1], labels[1]) if t is one else None
        if ls is not None:
            for name in ls:
                assert_close(lt[name], ls[name], atol=1e-7, rtol=1e-5, name=name)
    for (name, p1), p2 in zip(one.model.named_parameters(), singles[1].model.parameters()):
        assert_close(p1, p2, atol=1e-7, rtol=1e-5, name=f"after a step alone: {name}")


def test_per_run_learning_rates():
    """Runs with different lr: one Adam group per lr over the runs' slices of the stacked storage."""
    runs = [{"seed": 1, "lr": 1e-4}, {"seed": 1, "lr": 3e-4}]
    array = ACAITrainer(ACAIConfig(**TINY), backend="reference", device=DEVICE, runs=runs)
    singles = singles_for(TINY, runs, "reference")
    assert len(array.optimizer.param_groups) == 2
    for step in range(2):
        x, labels = batches(TINY, 2, step)
        x[1] = x[0]
        labels[1] = labels[0]
        array.step(x, labels if step else None)  # a step without labels leaves the probe alone
        for k, s in enumerate(singles):
            s.step(x[k], labels[k] if step else None)
    for k, s in enumerate(singles):
        for name, p in s.model.named_parameters():
            assert_close(array.stacked[name][k], p, atol=1e-7, rtol=1e-5, name=f"run {k} {name}")
    # Same seed and data, 3x the learning rate: the second run moved further.
    w0 = [ACAITrainer(ACAIConfig(**TINY), device=DEVICE, seed=1).model.encoder.blocks[1].weight]
    d0 = (array.stacked["encoder.blocks.1.weight"][0] - w0[0]).abs().mean()
    d1 = (array.stacked["encoder.blocks.1.weight"][1] - w0[0]).abs().mean()
    assert d1 > 2 * d0


@pytest.mark.parametrize("preset", ("lines", "cifar1024"))
def test_array_step_launches_like_a_single_step(preset):
    """One launch per layer for all runs: an array of 4 makes the launches of one run (counted on
    the CPU without running the kernels; fused Adam is one call for the whole array)."""
    config = ACAIConfig.preset(preset)
    single = ACAITrainer(config, backend="fused", device=DEVICE, dtype="fp32")
    array = ACAITrainer(config, backend="fused", device=DEVICE, dtype="fp32", runs=4)
    x = torch.rand(4, 64, config.colors, 32, 32, device=DEVICE) * 2 - 1
    y = torch.randint(0, 10, (4, 64), device=DEVICE)
    counts = []
    for t, xb, yb in ((single, x[0], y[0]), (array, x, y)):
        count_launches(t, xb, yb, dry_run=not HAS_GPU)
        c = count_launches(t, xb, yb, dry_run=not HAS_GPU)
        for op in ("min", "max", "aminmax", "isnan", "any", "clone"):  # CPU-side input checks, copies
            c.torch_ops.pop(op, None)
        counts.append(c)
    assert counts[0].triton == counts[1].triton
    assert counts[0].total == counts[1].total, (counts[0].summary(), counts[1].summary())


def test_bad_runs():
    config = ACAIConfig(**TINY)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        RunArray(config, device="cpu", runs=0)
    with pytest.raises(ValueError, match="keys among"):
        RunArray(config, device="cpu", runs=[{"depth": 8}])
    with pytest.raises(ValueError, match="advweight"):
        RunArray(config, device="cpu", runs=[{"advweight": -1.0}])
    array = RunArray(config, device="cpu", runs=2)
    with pytest.raises(ValueError, match=r"x of an array of 2 runs"):
        array.step(torch.zeros(6, 1, 32, 32))
    with pytest.raises(ValueError, match="run index"):
        array.run(2)


def test_from_runs_continues_single_trainers():
    """from_runs(trainers) is the inverse of run(k): an array built from trained single runs steps
    exactly as they do."""
    singles = singles_for(TINY, RUNS[:2], "reference")
    for step in range(2):
        x, labels = batches(TINY, 2, step)
        for k, s in enumerate(singles):
            s.step(x[k], labels[k])
    array = RunArray.from_runs(singles)
    assert array.steps == 2 and [s["seed"] for s in array.settings] == [0, 7]
    x, labels = batches(TINY, 2, 5)
    la = array.step(x, labels)
    for k, s in enumerate(singles):
        ls = s.step(x[k], labels[k])
        for name in ls:
            assert_close(la[name][k], ls[name], atol=1e-7, rtol=1e-5, name=f"run {k} {name}")
        for name, p in s.model.named_parameters():
            assert_close(array.stacked[name][k], p, atol=1e-7, rtol=1e-5, name=f"run {k} {name}")


def test_models_with_buffers_array_like_single_runs():
    """A VQ-VAE (its EMA codebook is a buffer, drawn at init): each run's buffers start from its own
    seed, move with its own EMA updates, and travel with run(k) and from_runs."""
    runs = [{"seed": 0}, {"seed": 5}]
    array = ACAITrainer(ACAIConfig(**TINY), backend="reference", device=DEVICE, model="vqvae", runs=runs)
    singles = [ACAITrainer(ACAIConfig(**TINY), backend="reference", device=DEVICE, model="vqvae", seed=s)
               for s in (0, 5)]
    for step in range(2):
        x, labels = batches(TINY, 2, step)
        la = array.step(x, labels)
        for k, s in enumerate(singles):
            ls = s.step(x[k], labels[k])
            for name in ls:
                assert_close(la[name][k], ls[name], atol=1e-7, rtol=1e-5, name=f"run {k} {name}")
    for k, s in enumerate(singles):
        for (name, b), b1 in zip(array.models[k].named_buffers(), s.model.buffers()):
            assert_close(b, b1, atol=1e-7, rtol=1e-5, name=f"run {k} buffer {name}")
    one = array.run(1)
    for (name, b), b1 in zip(one.model.named_buffers(), singles[1].model.buffers()):
        assert torch.equal(b, b1), name
    again = RunArray.from_runs(singles)
    for k, s in enumerate(singles):
        for b, b1 in zip(again.models[k].buffers(), s.model.buffers()):
            assert torch.equal(b, b1)
