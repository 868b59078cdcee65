"""The fused step (backend="fused") against the reference step (SPEC 2) on identical weights and
alphas: losses, every parameter gradient, the probe, the Adam update, alpha's generator state, and
checkpoints. On the CPU the fused ops run under the Triton interpreter in fp32. The interpreter
needs ~30 s for one step of even tiny Triton conv blocks, so one test runs every fused kernel (on
8x8 images) and the others keep the convs on the reference (conv_block's own tests cover the
Triton blocks layer by layer and chained) while the step's wiring, mix and losses stay fused; on a
GPU every test runs every kernel, and a GPU-marked test checks bf16."""
import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.ops.mix import philox_alpha_ref
from acai_fast.trainer import resolve_backend, resolve_dtype
from helpers import assert_close, assert_close_lowp

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

# Tiny networks (2 scales, narrow, odd widths) keep the interpreter quick.
TINY = dict(depth=4, latent=3, latent_width=8, advdepth=5, batch=6)


def pair(seed=0, device=DEVICE, dtype=None, triton_convs=HAS_GPU, **overrides):
    """A fused trainer and a reference trainer with the same weights, the reference drawing the
    alphas that the fused one's Philox state will draw."""
    config = ACAIConfig(**{**TINY, **overrides})
    fused = ACAITrainer(config, backend="fused", device=device, seed=seed, dtype=dtype)
    if not triton_convs:
        fused._set_conv_backend("reference")
    ref = ACAITrainer(config, backend="reference", device=device, seed=seed)
    state = fused.alpha_state.clone()
    ref.draw_alpha = lambda n: philox_alpha_ref(state, n).view(n, 1, 1, 1)
    return fused, ref


def batch(n, colors=1, seed=1, nclass=10, device=DEVICE, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, colors, size, size, generator=g) * 2 - 1
    return x.to(device), torch.randint(0, nclass, (n,), generator=g).to(device)


def compare_step(fused, ref, x, labels, *, atol, rtol):
    lf, lr = fused.step(x, labels), ref.step(x, labels)
    assert set(lf) == set(lr)
    for k in lr:
        assert_close(lf[k].float(), lr[k].float(), atol=atol, rtol=rtol, name=k)
    for name in ("encoder", "decoder", "critic", "probe"):
        for (pname, pf), pr in zip(getattr(fused, name).named_parameters(), getattr(ref, name).parameters()):
            assert pf.grad is not None, f"{name}.{pname} got no gradient"
            assert pf.grad.dtype == pr.dtype == torch.float32
            assert_close(pf.grad, pr.grad, atol=atol, rtol=rtol, name=f"{name}.{pname}.grad")
    return lf, lr


def test_every_fused_kernel_in_one_step():
    """Triton conv blocks (all three kernels, every flag combination of the networks), mix and
    both loss passes in one step, odd batch and 3 colors; 8x8 images keep the interpreter quick."""
    fused, ref = pair(triton_convs=True, colors=3, batch=3, image_size=8, latent_width=2)
    assert fused.encoder.backend == fused.decoder.backend == fused.critic.backend == "triton"
    compare_step(fused, ref, *batch(3, colors=3, size=8), atol=2e-6, rtol=2e-4)


@pytest.mark.parametrize("n, colors", [(6, 1), (3, 3), (1, 1)], ids=["lines-like", "odd-rgb", "single"])
def test_fused_step_matches_reference(n, colors):
    fused, ref = pair(colors=colors, batch=n)
    x, labels = batch(n, colors)
    compare_step(fused, ref, x, labels, atol=2e-6, rtol=2e-4)
    # Adam moved both the same way, and both generators advanced by n.
    for pf, pr in zip(fused.ae_params + fused.critic_params, ref.ae_params + ref.critic_params):
        assert_close(pf, pr, atol=1e-6, rtol=1e-5, name="parameter after Adam")
    assert int(fused.alpha_state[1]) == n
    # More steps from the updated weights (new alphas, the same on both sides), compared step by step.
    for step in range(2, 5):
        compare_step(fused, ref, *batch(n, colors, seed=step), atol=5e-6, rtol=5e-4)


def test_fused_step_latent_1x1():
    """latent_width 1: the mix and the critic maps are (N, C, 1, 1)."""
    fused, ref = pair(latent_width=1, depth=2, advdepth=3, latent=4, batch=4)
    compare_step(fused, ref, *batch(4), atol=2e-6, rtol=2e-4)


def test_fused_checkpoint_round_trip(tmp_path):
    a, _ = pair(seed=4, batch=3)
    a.step(*batch(3))
    a.save(tmp_path / "ck.pt")
    b = ACAITrainer.load(tmp_path / "ck.pt", device=DEVICE, backend="fused")
    # The same checkpoint continues on the reference backend (fp32 weights whatever trained them).
    c = ACAITrainer.load(tmp_path / "ck.pt", device=DEVICE, backend="reference")
    assert c.backend == "reference" and b.backend == "fused"
    assert torch.equal(a.alpha_state, b.alpha_state) and torch.equal(a.alpha_state, c.alpha_state)
    assert int(a.alpha_state[1]) == 3
    if not HAS_GPU:
        b._set_conv_backend("reference")
    la, lb = a.step(*batch(3, seed=5)), b.step(*batch(3, seed=5))
    for k in la:
        assert torch.equal(la[k], lb[k]), k


def test_inference_is_backend_independent():
    fused, ref = pair(batch=3)
    x, _ = batch(3)
    assert_close(fused.encode(x), ref.encode(x), atol=0, rtol=0, name="encode")
    images = fused.interpolate(x, x.flip(0), steps=3)
    assert_close(images, ref.interpolate(x, x.flip(0), steps=3), atol=0, rtol=0, name="interpolate")
    assert fused.encoder.backend == ("triton" if HAS_GPU else "reference")  # restored as it was


def test_backend_and_dtype_choices():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_dtype(None, "reference", cpu) == torch.float32
    assert resolve_dtype("fp32", "fused", cpu) == torch.float32
    with pytest.raises(ValueError, match="needs backend='fused'"):
        resolve_dtype("bf16", "reference", torch.device("cuda"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "fused", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cudnn", cpu)


def test_fused_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    from acai_fast import _ext

    monkeypatch.setattr(_ext, "INTERPRET", False)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        resolve_backend("fused", torch.device("cpu"))


@pytest.mark.gpu
def test_fused_bf16_step_tracks_reference_on_gpu():
    """bf16 activations at the lines preset's size: each loss and gradient's error against the fp32
    reference is within 3x that of PyTorch's own bf16 step (autocast, same weights and alphas)
    plus a small floor (the flash-attention rule, with room for a whole network's compounding)."""
    lines = dict(batch=64, depth=16, latent=16, latent_width=2, advdepth=0)
    fused, ref = pair(dtype="bf16", **lines)
    _, ref_bf16 = pair(**lines)
    x, labels = batch(64)
    lf, lr = fused.step(x, labels), ref.step(x, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lb = ref_bf16.step(x, labels)
    for k in ("loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real"):
        assert_close_lowp(lf[k], lr[k], lb[k], name=k, factor=3.0, floor=1e-6 + 1e-3 * float(lr[k].abs()))
    named = [*fused.encoder.named_parameters(), *fused.decoder.named_parameters(), *fused.critic.named_parameters()]
    for (name, pf), pr, pb in zip(named, ref.ae_params + ref.critic_params, ref_bf16.ae_params + ref_bf16.critic_params):
        assert_close_lowp(pf.grad, pr.grad, pb.grad, name=f"{name}.grad", factor=3.0,
                          floor=1e-3 * float(pr.grad.abs().max()) + 1e-9)


@pytest.mark.gpu
def test_cuda_graph_steps_equal_eager_steps():
    """cuda_graph=True: 3 eager warm-up steps, a capture, then replays; the same losses and weights
    as the eager fused trainer on the same batches (both deterministic), labels on and off."""
    config = ACAIConfig(**{**TINY, "batch": 8})
    eager = ACAITrainer(config, backend="fused", device="cuda", seed=2, dtype="fp32")
    graphed = ACAITrainer(config, backend="fused", device="cuda", seed=2, dtype="fp32", cuda_graph=True)
    for s in range(7):
        x, labels = batch(8, seed=10 + s)
        labels = labels if s != 5 else None
        le, lg = eager.step(x, labels), graphed.step(x, labels)
        for k in le:
            assert_close(lg[k], le[k], atol=1e-6, rtol=1e-5, name=f"step {s} {k}")
    assert len(graphed._graphs) == 1  # the label-free step of s=5 is still warming up
    for pe, pg in zip(eager.ae_params + eager.critic_params, graphed.ae_params + graphed.critic_params):
        assert_close(pg, pe, atol=1e-6, rtol=1e-5, name="weights after 7 steps")
    assert torch.equal(eager.alpha_state, graphed.alpha_state)


def test_cuda_graph_needs_fused_on_a_gpu():
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        ACAITrainer(ACAIConfig(**TINY), backend="reference", device="cpu", cuda_graph=True)
