"""The fused engine (acai_fast.engine.fused_step) against the reference step (models/acai.py).

Both backends draw alpha from the same Philox stream, so from one seed they see the same alphas.
Step by step, the reference trainer is given the fused trainer's whole state (weights, Adam moments,
alpha stream) and both take the same batch: losses, every gradient and the Adam update must agree.
Re-syncing each step keeps the comparison robust: two independent trajectories drift apart through
Adam's sign-like first steps on near-zero gradients however exact the kernels are.
On the CPU every fused kernel runs under the Triton interpreter in fp32, on small spatial sizes that
keep each preset's layer structure (the interpreter needs seconds per step); on a GPU the same tests
run compiled, plus bf16 and CUDA-graph tests.
"""
import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.engine import count_launches
from acai_fast.trainer import resolve_backend, resolve_cuda_graph, resolve_dtype
from helpers import assert_close, assert_close_lowp

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

# The lines preset's structure (4 scales, 1 color) on 16x16 images down to a 1x1 latent, and an
# RGB preset's (3 scales, like svhn/cifar 32 -> 4) on 8x8 images; narrow, odd widths.
LINES_LIKE = dict(colors=1, image_size=16, latent_width=1, depth=2, latent=3, advdepth=3, batch=4)
RGB_LIKE = dict(colors=3, image_size=8, latent_width=1, depth=3, latent=2, advdepth=2, batch=3)


def make(config, backend, seed=0, **kwargs):
    return ACAITrainer(ACAIConfig(**config), backend=backend, device=DEVICE, seed=seed,
                       **({"dtype": "fp32"} if backend == "fused" else {}), **kwargs)


def batch(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, c, s = config["batch"], config["colors"], config["image_size"]
    x = torch.rand(n, c, s, s, generator=g) * 2 - 1
    return x.to(DEVICE), torch.randint(0, 10, (n,), generator=g).to(DEVICE)


def scaled_close(actual, expected, name, rtol=2e-4):
    """Within rtol of the tensor's own scale (fp32 sums in another order)."""
    scale = max(float(expected.detach().abs().max()), 1e-30)
    assert_close(actual, expected, atol=rtol * scale, rtol=rtol, name=name)


def compare_step(fused, ref, x, labels, step):
    """Give ref fused's state, take one step on both, compare losses, gradients and updates."""
    ref.load_state_dict(fused.state_dict())
    before = [p.detach().clone() for p in fused.model.parameters()]
    lf, lr = fused.step(x, labels), ref.step(x, labels)
    assert set(lf) == set(lr)
    for k in lr:
        scaled_close(lf[k].float(), lr[k].float(), f"step {step} {k}", rtol=1e-4)
    named_ref = dict(ref.model.named_parameters())
    lr_ = fused.config.lr
    for (name, pf), b in zip(fused.model.named_parameters(), before):
        pr = named_ref[name]
        assert pf.grad is not None and pf.grad.dtype == torch.float32, name
        scaled_close(pf.grad, pr.grad, f"step {step} {name}.grad")
        # Adam's update: exact where the gradient is well above the fp32 sum noise; elsewhere its
        # sign-like first moments may flip, bounded by 2 lr.
        well = pr.grad.abs() > 1e-3 * pr.grad.abs().max()
        d_f, d_r = (pf.detach() - b), (pr.detach() - b)
        assert_close(d_f[well], d_r[well], atol=1e-3 * lr_, rtol=0, name=f"step {step} {name} update")
        assert float((d_f - d_r).abs().max()) <= 2.01 * lr_, name
    for (name, pf), pr in zip(fused.probe.named_parameters(), ref.probe.parameters()):
        scaled_close(pf, pr, f"step {step} probe.{name}")
    assert torch.equal(fused.alpha_state, ref.alpha_state)


@pytest.mark.parametrize("config", [LINES_LIKE, RGB_LIKE], ids=["lines-like", "rgb-like"])
def test_fused_steps_equal_reference_steps(config):
    fused, ref = make(config, "fused"), make(config, "reference")
    for step in range(3):
        compare_step(fused, ref, *batch(config, seed=step), step)
    assert int(fused.alpha_state[1]) == 3 * config["batch"]


@pytest.mark.parametrize("advweight", (0.0, 0.5, 1.0))
def test_fused_equals_reference_for_every_advweight(advweight):
    config = {**RGB_LIKE, "advweight": advweight}
    fused, ref = make(config, "fused", seed=3), make(config, "reference", seed=3)
    for step in range(2):
        compare_step(fused, ref, *batch(config, seed=10 + step), step)


@pytest.mark.parametrize("n", (1, 2), ids=["single", "pair"])
def test_fused_tiny_batches(n):
    """N=2 mixes the two images: the row bookkeeping of the 2N/3N buffers. N=1 would mix an image
    with itself: both backends refuse it (mixing needs pairs), as does a config with batch 1."""
    if n == 1:
        with pytest.raises(ValueError, match="batch must be >= 2"):
            ACAIConfig(**{**RGB_LIKE, "batch": 1})
        x, labels = batch(RGB_LIKE)
        for backend in ("fused", "reference"):
            trainer = make(RGB_LIKE, backend)
            with pytest.raises(ValueError, match="at least 2 images"):
                trainer.step(x[:1], labels[:1])
            assert trainer.steps == 0 and int(trainer.alpha_state[1]) == 0  # nothing ran
        return
    config = {**RGB_LIKE, "batch": n}
    fused, ref = make(config, "fused"), make(config, "reference")
    compare_step(fused, ref, *batch(config), 0)


def test_fused_without_labels_leaves_the_probe_alone():
    fused = make(RGB_LIKE, "fused")
    probe = [p.detach().clone() for p in fused.probe.parameters()]
    losses = fused.step(batch(RGB_LIKE)[0])
    assert "probe_loss" not in losses
    assert all(torch.equal(a, b) for a, b in zip(probe, fused.probe.parameters()))


def test_checkpoints_cross_backends(tmp_path):
    """A fused checkpoint continues on either backend; the alpha stream carries over."""
    a = make(RGB_LIKE, "fused", seed=4)
    a.step(*batch(RGB_LIKE))
    a.save(tmp_path / "ck.pt")
    b = ACAITrainer.load(tmp_path / "ck.pt", device=DEVICE, backend="fused", dtype="fp32")
    c = ACAITrainer.load(tmp_path / "ck.pt", device=DEVICE, backend="reference")
    assert (b.backend, c.backend) == ("fused", "reference")
    assert torch.equal(a.alpha_state, b.alpha_state) and torch.equal(a.alpha_state, c.alpha_state)
    # Weights keep the fused engine's channels_last layout; values are those saved.
    assert b.encoder.blocks[1].weight.is_contiguous(memory_format=torch.channels_last)
    la, lb = a.step(*batch(RGB_LIKE, seed=5)), b.step(*batch(RGB_LIKE, seed=5))
    for k in la:
        assert torch.equal(la[k], lb[k]), k


def test_inference_is_backend_independent():
    """Evaluations run the fp32 reference networks whatever trained them (to the last bits: the
    fused engine's channels_last weights may make PyTorch pick another conv algorithm)."""
    fused, ref = make(RGB_LIKE, "fused"), make(RGB_LIKE, "reference")
    x, _ = batch(RGB_LIKE)
    assert_close(fused.encode(x), ref.encode(x), atol=1e-7, rtol=1e-5, name="encode")
    images = fused.interpolate(x, x.flip(0), steps=3)
    assert_close(images, ref.interpolate(x, x.flip(0), steps=3), atol=1e-7, rtol=1e-5, name="interpolate")


# ------------------------------------------------------------------------------------------------
# Launches: counted on the CPU (dry run: the kernels are counted, not interpreted), pinned
# ------------------------------------------------------------------------------------------------

# One fused step at the paper's batch of 64: 99 Triton launches (forward: 32 conv blocks + mix + 2
# losses; backward: 64), the probe's one launch (with labels), and one Adam launch over the flat
# buffers of every parameter (its step counts advance inside it; it was PyTorch's fused Adam + a
# step-count add before). cifar1024's RGB batch also pays one copy into channels_last (free inside
# a CUDA graph: the static input is channels_last). The target: <= 110 for lines.
PINNED = {("lines", True): 101, ("lines", False): 100, ("cifar1024", True): 84, ("cifar1024", False): 83}


@pytest.mark.parametrize("preset, labels", list(PINNED), ids=[f"{p}-{'labels' if lab else 'nolabels'}"
                                                              for p, lab in PINNED])
def test_launch_count_is_pinned(preset, labels):
    config = ACAIConfig.preset(preset)
    trainer = ACAITrainer(config, backend="fused", device=DEVICE, dtype="fp32")
    x = torch.rand(64, config.colors, 32, 32, device=DEVICE) * 2 - 1
    y = torch.randint(0, 10, (64,), device=DEVICE) if labels else None
    count_launches(trainer, x, y, dry_run=not HAS_GPU)  # one-time work (optimiser state) first
    count = count_launches(trainer, x, y, dry_run=not HAS_GPU)
    blocks = sum(len(net.blocks) for net in (trainer.encoder, trainer.decoder, trainer.critic))
    # forward: a conv per block + mix + 2 losses; backward: dx and dW per block (the critic's first
    # dx over the autoencoder's rows only), less the encoder's first dx, plus the mix; the probe; Adam.
    assert sum(count.triton.values()) == blocks + 3 + 2 * blocks - 1 + 1 + labels + 1
    # The input checks (image range, label range) run on the CPU every step (free there, on the
    # batch before it moves), on a GPU once per trainer: not part of the step's launches.
    cpu_only = sum(count.torch_ops.pop(op, 0) for op in ("min", "max", "aminmax", "isnan", "any"))
    assert cpu_only <= 3 and (cpu_only == 0 or not HAS_GPU)
    assert count.total == PINNED[(preset, labels)], count.summary()


# ------------------------------------------------------------------------------------------------
# Choices of backend, dtype and graphs
# ------------------------------------------------------------------------------------------------


def test_backend_dtype_and_graph_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_dtype(None, "reference", cpu) == torch.float32
    assert resolve_dtype("fp32", "fused", cpu) == torch.float32
    assert resolve_cuda_graph(None, "fused", cuda) is True  # the default for fused on a GPU
    assert resolve_cuda_graph(None, "reference", cuda) is False
    assert resolve_cuda_graph(None, "fused", cpu) is False
    with pytest.raises(ValueError, match="needs backend='fused'"):
        resolve_dtype("bf16", "reference", cuda)
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "fused", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cudnn", cpu)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        ACAITrainer(ACAIConfig(**RGB_LIKE), backend="reference", device="cpu", cuda_graph=True)


def test_fused_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    from acai_fast import _ext

    monkeypatch.setattr(_ext, "INTERPRET", False)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        resolve_backend("fused", torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fused_bf16_step_tracks_reference_on_gpu():
    """bf16 activations at the lines preset's size: each loss and gradient's error against the fp32
    reference is within 3x that of PyTorch's own bf16 step (autocast, same weights and alphas)
    plus a small floor (the flash-attention rule, with room for a whole network's compounding)."""
    config = ACAIConfig.preset("lines")
    fused = ACAITrainer(config, backend="fused", device="cuda", cuda_graph=False)
    ref = ACAITrainer(config, backend="reference", device="cuda")
    ref_bf16 = ACAITrainer(config, backend="reference", device="cuda")
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(64, 1, 32, 32, generator=g) * 2 - 1).cuda()
    labels = torch.randint(0, 10, (64,), generator=g).cuda()
    lf, lr = fused.step(x, labels), ref.step(x, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lb = ref_bf16.step(x, labels)
    for k in ("loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real"):
        assert_close_lowp(lf[k], lr[k], lb[k], name=k, factor=3.0, floor=1e-6 + 1e-3 * float(lr[k].abs()))
    named_ref, named_bf16 = dict(ref.model.named_parameters()), dict(ref_bf16.model.named_parameters())
    for name, pf in fused.model.named_parameters():
        pr, pb = named_ref[name], named_bf16[name]
        assert_close_lowp(pf.grad, pr.grad, pb.grad, name=f"{name}.grad", factor=3.0,
                          floor=1e-3 * float(pr.grad.abs().max()) + 1e-9)


@pytest.mark.gpu
def test_cuda_graph_steps_equal_eager_steps():
    """cuda_graph=True (the default): warm-up steps, a capture, then replays; the same losses and
    weights as the eager fused trainer on the same batches (both deterministic), labels on and off."""
    config = {**LINES_LIKE, "batch": 8, "image_size": 32, "latent_width": 2}
    eager = make(config, "fused", seed=2, cuda_graph=False)
    graphed = make(config, "fused", seed=2)
    assert graphed.cuda_graph
    for s in range(7):
        x, labels = batch(config, seed=10 + s)
        labels = labels if s != 5 else None
        le, lg = eager.step(x, labels), graphed.step(x, labels)
        for k in le:
            assert_close(lg[k], le[k], atol=1e-6, rtol=1e-5, name=f"step {s} {k}")
    assert not graphed.graphs.failed
    for (name, pe), pg in zip(eager.model.named_parameters(), graphed.model.parameters()):
        assert_close(pg, pe, atol=1e-6, rtol=1e-5, name=f"{name} after 7 steps")
    assert torch.equal(eager.alpha_state, graphed.alpha_state)


@pytest.mark.gpu
def test_cuda_graphs_replay_noise_drawing_models():
    """The trainer's noise generator is registered with its graphs: a denoising model replayed as a
    graph draws fresh noise every step and matches its eager twin step by step."""
    config = {**LINES_LIKE, "batch": 8, "image_size": 32, "latent_width": 2}
    eager = ACAITrainer(ACAIConfig(**config), backend="fused", device="cuda", seed=4, dtype="fp32",
                        model="denoising", cuda_graph=False)
    graphed = ACAITrainer(ACAIConfig(**config), backend="fused", device="cuda", seed=4, dtype="fp32",
                          model="denoising", cuda_graph=True)
    for s in range(6):
        x, labels = batch(config, seed=20 + s)
        le, lg = eager.step(x, labels), graphed.step(x, labels)
        for k in le:
            assert_close(lg[k], le[k], atol=1e-6, rtol=1e-5, name=f"step {s} {k}")
    assert not graphed.graphs.failed, graphed.graphs.failed


# ------------------------------------------------------------------------------------------------
# Every term on its own scale
#
# At the paper's init the critic's output is ~0, so the adversarial gradients (the critic's own and
# the autoencoder's through the critic) are tiny beside the reconstruction's: compared in the sum, a
# wrong row block or slice on that path would move the numbers by ~1e-11, inside the tolerance.
# Here each term's gradient is compared alone (the engine's documented `terms` argument zeroes the
# other terms' upstream gradients; the reference differentiates that term of models/acai.py), per
# parameter group, relative to the term's own largest gradient, at init and at a state where every
# term is O(1) (the critic's last layer scaled so that its outputs are ~1), for one run and for an
# array whose runs have different advweight and reg. Tolerance: the two sum the same fp32 products
# in different orders over at most a few thousand terms per element: relative error well under 1e-4
# of the term's scale (2e-4 allowed, as the step-by-step comparison above).
# ------------------------------------------------------------------------------------------------

TERMS = (("loss_ae", "ae"), ("loss_ae_disc", "ae"), ("loss_disc", "critic"), ("loss_disc_real", "critic"))


def _reference_of(trainer, k):
    """Run k of a fused trainer as a reference-backend trainer with the same state."""
    ref = ACAITrainer(trainer.configs[k], backend="reference", device=DEVICE, seed=trainer.settings[k]["seed"])
    ref.load_state_dict(trainer.run(k).state_dict())
    return ref


def _scale_critic_outputs_to_one(trainer, x):
    """Scale every run's last critic layer so that its mean |output| on x is ~1 (all terms O(1))."""
    name = f"critic.blocks.{len(trainer.models[0].critic.blocks) - 1}.weight"
    with torch.no_grad():
        for k in range(trainer.runs):
            out = trainer.models[k].critic(x[k] if trainer.is_array else x)
            trainer.stacked[name][k] *= 1.0 / max(float(out.abs().mean()), 1e-12)
        trainer.parameters.refresh_lowp()


def _compare_terms(fused, x, where):
    from acai_fast.models import Randomness
    runs = fused.runs
    xs = x if fused.is_array else x[None]
    x5 = xs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels_last per run
    refs = [_reference_of(fused, k) for k in range(runs)]
    start = fused.alpha_states.clone()
    for term, group in TERMS:
        fused.alpha_states.copy_(start)
        fused.engine.gradients(x5, terms={term})
        for k, ref in enumerate(refs):
            out = ref.model.objectives(xs[k], Randomness(start[k].clone(), torch.Generator(DEVICE)))
            weight = ref.config.advweight if term == "loss_ae_disc" else 1.0
            names = fused.parameters.groups[group]
            params = [dict(ref.model.named_parameters())[n] for n in names]
            expected = torch.autograd.grad(weight * out.logged[term], params, allow_unused=True)
            expected = [torch.zeros_like(p) if e is None else e for p, e in zip(params, expected)]
            scale = max(float(e.abs().max()) for e in expected)
            if weight == 0.0:
                scale = 1.0
            assert scale > 0, (where, term)
            for n, e in zip(names, expected):
                got = fused.parameters.stacked_grads[n][k]
                assert_close(got, e, atol=2e-4 * scale, rtol=0, name=f"{where} run {k} {term} -> {n}")
            other = "critic" if group == "ae" else "ae"
            for n in fused.parameters.groups[other]:  # the term reaches its own group only
                assert float(fused.parameters.stacked_grads[n][k].abs().max()) == 0.0, (where, term, n)
    fused.alpha_states.copy_(start)


@pytest.mark.parametrize("config, runs", [(LINES_LIKE, None),
                                          (RGB_LIKE, [{"seed": 0, "advweight": 0.2, "reg": 0.1},
                                                      {"seed": 5, "advweight": 1.0, "reg": 0.6}])],
                         ids=["one-run-lines-like", "array-rgb-like"])
def test_every_term_alone_equals_the_reference(config, runs):
    fused = ACAITrainer(ACAIConfig(**config), backend="fused", device=DEVICE, dtype="fp32", runs=runs)
    x, _ = batch(config)
    if runs is not None:
        x = torch.stack([x, x.flip(0)])
    _compare_terms(fused, x, "init")
    _scale_critic_outputs_to_one(fused, x)
    _compare_terms(fused, x, "O(1) critic")
