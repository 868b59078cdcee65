"""Every number of SPEC.md, pinned by a literal in this file, never read from the code under test:
change one in the package (the leaky slope, the init, lr, Adam's betas or eps, the batch, lambda,
gamma, kimg, a preset, a parameter count, the alpha range, the probe label) and a test here fails.

The networks are checked against a forward pass written out with torch.nn.functional; Adam
against its formula over several steps (a first step does not depend on the betas)."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import build_parser
from acai_fast.data import angle_labels, to_unit_range
from acai_fast.data.celeba import prepare_celeba
from acai_fast.eval.lines import REFERENCE_LINES, evaluate_lines, smoothness_scores
from acai_fast.loop import fit
from acai_fast.networks import build_networks, count_parameters
from acai_fast.ops.mix import philox_alpha_ref
from helpers import assert_close

SLOPE = 0.2  # SPEC 1: leaky ReLU everywhere
TINY = dict(depth=4, latent=3, latent_width=8, advdepth=5)  # scales = log2(32 / 8) = 2


# ------------------------------------------------------------------------------------------------ section 1


def _blocks(net):
    return [(b.weight, b.bias) for b in net.blocks]


def spec_encoder(x, params, scales):
    """SPEC 1, written out: conv1x1; per scale two lrelu conv3x3 and a 2x2 average pool; a lrelu
    conv3x3; a conv3x3 to the latent, no activation."""
    it = iter(params)
    w, b = next(it)
    assert w.shape[2:] == (1, 1)
    h = F.conv2d(x, w, b)
    for _ in range(scales):
        for _ in range(2):
            w, b = next(it)
            h = F.leaky_relu(F.conv2d(h, w, b, padding=1), SLOPE)
        h = F.avg_pool2d(h, 2, 2)
    w, b = next(it)
    h = F.leaky_relu(F.conv2d(h, w, b, padding=1), SLOPE)
    w, b = next(it)
    return F.conv2d(h, w, b, padding=1)


def spec_decoder(z, params, scales):
    """SPEC 1: per scale two lrelu conv3x3 then a nearest 2x upsample; a lrelu conv3x3 to depth;
    a conv3x3 to the colours with no activation (no tanh)."""
    it = iter(params)
    h = z
    for _ in range(scales):
        for _ in range(2):
            w, b = next(it)
            h = F.leaky_relu(F.conv2d(h, w, b, padding=1), SLOPE)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
    w, b = next(it)
    h = F.leaky_relu(F.conv2d(h, w, b, padding=1), SLOPE)
    w, b = next(it)
    return F.conv2d(h, w, b, padding=1)


def test_networks_compute_the_spec_layers_with_slope_0_2():
    torch.manual_seed(0)
    nets = build_networks(ACAIConfig(**TINY))
    with torch.no_grad():  # non-zero biases so that every bias is exercised
        for net in (nets["encoder"], nets["decoder"], nets["critic"]):
            for _, b in _blocks(net):
                b.normal_(0, 0.1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        z = nets["encoder"](x)
        assert z.shape == (3, 3, 8, 8)
        assert_close(z, spec_encoder(x, _blocks(nets["encoder"]), 2), atol=1e-6, rtol=1e-5, name="encoder")
        y = nets["decoder"](z)
        assert_close(y, spec_decoder(z, _blocks(nets["decoder"]), 2), atol=1e-6, rtol=1e-5, name="decoder")
        c = nets["critic"](y)
        expected = spec_encoder(y, _blocks(nets["critic"]), 2).mean(dim=(1, 2, 3))  # one scalar per image
        assert_close(c, expected, atol=1e-6, rtol=1e-5, name="critic")
    assert nets["critic"].blocks[0].weight.shape[0] == 5  # advdepth


def test_init_std_is_one_over_sqrt_1_04_fan_in():
    """std = 1 / sqrt((1 + 0.2^2) * k*k*in_channels), biases 0: measured on the big cifar1024 layers
    (>= 200k weights each: the sample std is within 0.2% of the true one; 0.1 instead of 0.2 moves it
    by 1.5%, a fan_in over the output channels by a factor sqrt(2))."""
    torch.manual_seed(1)
    nets = build_networks(ACAIConfig.preset("cifar1024"))
    checked = 0
    for net in (nets["encoder"], nets["decoder"], nets["critic"]):
        for w, b in _blocks(net):
            w = w.detach()
            assert torch.count_nonzero(b) == 0
            if w.numel() < 200_000:
                continue
            cout, cin, kh, kw = w.shape
            std = 1.0 / math.sqrt((1 + 0.2 ** 2) * kh * kw * cin)
            assert float(w.std()) == pytest.approx(std, rel=0.006), (tuple(w.shape), float(w.std()), std)
            assert abs(float(w.mean())) < 5 * std / math.sqrt(w.numel())
            checked += 1
    assert checked >= 6


# SPEC 1, "Parameter counts (exact, for checking)": encoder, decoder, critic.
PARAMETER_COUNTS = {
    "lines": (627_472, 313_985, 627_472),
    "mnist32": (150_146, 75_265, 150_146),
    "mnist256": (166_288, 83_329, 166_288),
    "svhn256": (2_434_704, 1_219_203, 2_434_704),
    "cifar256": (2_434_704, 1_219_203, 2_434_704),
    "cifar1024": (2_655_936, 1_329_795, 2_655_936),
}


@pytest.mark.parametrize("preset", list(PARAMETER_COUNTS))
def test_parameter_counts(preset):
    nets = build_networks(ACAIConfig.preset(preset))
    counts = tuple(count_parameters(nets[k]) for k in ("encoder", "decoder", "critic"))
    assert counts == PARAMETER_COUNTS[preset]


# ------------------------------------------------------------------------------------------------ section 3

# SPEC 3: preset -> colors, latent_width, depth, latent, latent dims.
PRESET_TABLE = {
    "lines": (1, 2, 16, 16, 64),
    "mnist32": (1, 4, 16, 2, 32), "mnist256": (1, 4, 16, 16, 256),
    "svhn32": (3, 4, 64, 2, 32), "svhn256": (3, 4, 64, 16, 256),
    "celeba32": (3, 4, 64, 2, 32), "celeba256": (3, 4, 64, 16, 256),
    "cifar256": (3, 4, 64, 16, 256), "cifar1024": (3, 4, 64, 64, 1024),
}


@pytest.mark.parametrize("preset", list(PRESET_TABLE))
def test_preset_table_and_section_2_hyper_parameters(preset):
    c = ACAIConfig.preset(preset)
    assert (c.colors, c.latent_width, c.depth, c.latent, c.latent_dims) == PRESET_TABLE[preset]
    assert c.latent * c.latent_width ** 2 == PRESET_TABLE[preset][4]
    assert c.critic_depth == c.depth  # advdepth defaults to depth
    assert (c.batch, c.advweight, c.reg, c.lr) == (64, 0.5, 0.2, 1e-4)
    assert c.image_size == 32


def test_defaults_of_the_config_the_loop_and_the_command_line():
    c = ACAIConfig()
    assert (c.batch, c.advweight, c.reg, c.lr) == (64, 0.5, 0.2, 1e-4)
    args = build_parser().parse_args(["train", "--out", "x"])
    assert args.kimg == 16384 and args.eval_kimg == 64  # 2^24 images; an evaluation every 64 kimg
    assert args.batch is None and args.preset is None  # None: the preset's 64; lines (a new run) or the checkpoint's
    params = inspect.signature(fit).parameters
    assert params["kimg"].default == 16384 and params["eval_kimg"].default == 64
    assert 16384 * 1024 == 2 ** 24 and 16384 * 1024 // 64 == 262_144  # the SPEC's arithmetic


# ------------------------------------------------------------------------------------------------ section 2


def _trainer(seed=0, **overrides):
    return ACAITrainer(ACAIConfig(**{**TINY, "batch": 6, **overrides}), backend="reference", device="cpu",
                       seed=seed)


def _batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_lambda_0_5_and_gamma_0_2_enter_the_step_as_the_spec_says():
    trainer = _trainer()
    x, labels = _batch()
    n = x.shape[0]
    alpha = philox_alpha_ref(trainer.alpha_state.clone(), n).view(n, 1, 1, 1)
    enc, dec, critic = trainer.encoder, trainer.decoder, trainer.critic
    z = enc(x)
    ae = dec(z)
    x_mix = dec(alpha * z + (1 - alpha) * z[torch.arange(n - 1, -1, -1)])
    ae_objective = ((ae - x) ** 2).mean() + 0.5 * (critic(x_mix) ** 2).mean()
    ae_params = [*enc.parameters(), *dec.parameters()]
    expected_ae = torch.autograd.grad(ae_objective, ae_params)
    ae_d = ae.detach()
    disc_real = (critic(ae_d + 0.2 * (x - ae_d)) ** 2).mean()
    disc = ((critic(x_mix.detach()) - alpha.flatten()) ** 2).mean()
    expected_critic = torch.autograd.grad(disc + disc_real, list(critic.parameters()))
    losses = trainer.step(x, labels)
    assert float(losses["loss_disc_real"]) == pytest.approx(float(disc_real.detach()), rel=1e-5)
    for i, (p, g) in enumerate(zip(ae_params, expected_ae)):
        assert_close(p.grad, g, atol=1e-8, rtol=1e-5, name=f"autoencoder grad {i}")
    for i, (p, g) in enumerate(zip(critic.parameters(), expected_critic)):
        assert_close(p.grad, g, atol=1e-8, rtol=1e-5, name=f"critic grad {i}")


def _adam(param, grads, lr=1e-4, b1=0.9, b2=0.999, eps=1e-8):
    """Adam's formula (Kingma and Ba; PyTorch's form: eps added to sqrt(v_hat)), in float64."""
    m = torch.zeros_like(param, dtype=torch.float64)
    v = torch.zeros_like(m)
    p = param.double().clone()
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


def test_adam_lr_betas_eps_over_several_steps():
    """The trainer's optimiser on gradients of the size of eps with changing signs and sizes:
    after 5 steps each of lr, beta1, beta2 and eps visibly changes the result."""
    trainer = _trainer()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.data.zero_()  # displacements are then exact in fp32
    scales = [1e-8, -3e-8, 4e-6, 2e-8, -1e-8]
    for s in scales:
        for p in params:
            p.grad = torch.full_like(p, s)
        trainer.optimizer.step()
    expected = _adam(torch.zeros(1), [torch.tensor([s]) for s in scales])
    for mutated in (dict(lr=1e-3), dict(b1=0.5), dict(b2=0.99), dict(eps=1e-7)):  # the test can tell
        other = _adam(torch.zeros(1), [torch.tensor([s]) for s in scales], **mutated)
        assert abs(float(other - expected)) > 1e-3 * abs(float(expected)), mutated
    for p in params:
        assert torch.allclose(p.detach().double(), expected.expand_as(p), rtol=1e-5, atol=0)


def test_training_steps_apply_adam_with_the_paper_constants():
    """Three real steps: each parameter moves exactly as Adam(1e-4, 0.9, 0.999, 1e-8) moves it
    from the gradients the step produced. Tolerance from the error analysis, against the float64
    formula fed the same gradients: the fp32 parameter is rounded once per step (at most half an
    ulp, <= 2^-24 |p|: three steps, bounded by 4 x 2^-24 max |p| with room for the rest), and
    Adam's fp32 arithmetic on the update itself (a dozen roundings, ~1e-6 of it: rtol 1e-5). (The
    former fixed atol 2e-8 was below one rounding of a weight of size ~1: 6e-8.)"""
    trainer = _trainer(seed=3)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    start = [p.detach().clone() for p in params]
    grads = [[] for _ in params]
    for s in range(3):
        trainer.step(*_batch(seed=10 + s))
        for i, p in enumerate(params):
            grads[i].append(p.grad.detach().clone())
    for i, (p, p0) in enumerate(zip(params, start)):
        expected = _adam(p0, grads[i])
        storage = 4 * 2 ** -24 * float(torch.maximum(p0.abs(), p.detach().abs()).max())
        assert_close(p.detach() - p0, (expected - p0.double()).float(), atol=storage, rtol=1e-5,
                     name=f"parameter {i} after 3 steps")


def test_alpha_is_uniform_on_0_to_half():
    trainer = _trainer()
    alpha = trainer.draw_alpha(200_000).flatten().double()
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 0.5
    assert float(alpha.max()) > 0.4995 and float(alpha.min()) < 0.0005
    assert float(alpha.mean()) == pytest.approx(0.25, abs=0.002)
    # Kolmogorov-Smirnov distance to U[0, 0.5]: 200k draws put it near 0.002
    sorted_alpha = alpha.sort().values
    ecdf = torch.arange(1, len(alpha) + 1, dtype=torch.float64) / len(alpha)
    assert float((ecdf - sorted_alpha / 0.5).abs().max()) < 0.006


def test_logged_rmse_is_sqrt_loss_ae_times_127_5():
    trainer = _trainer()
    x, labels = _batch(n=12)
    record = trainer.fit((x, labels), kimg=12 / 1024, eval_kimg=None, progress=False)[-1]
    assert record["rmse"] == pytest.approx(math.sqrt(record["loss_ae"]) * 127.5, rel=1e-12)
    assert record["nimg"] == 12 and record["step"] == 2


# ------------------------------------------------------------------------------------------------ sections 3-4


def test_pixels_scale_x_times_2_over_255_minus_1():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_unit_range(pixels)
    expected = pixels.float() * (2.0 / 255) - 1.0
    assert torch.equal(x, expected) and float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_celeba_crop_is_the_central_146_square():
    """36 px off the top and bottom, 16 off the left and right of 218x178: a white 146x146 square
    there (black elsewhere) becomes a fully white 32x32 image; one pixel further in, black shows."""
    pixels = torch.zeros(2, 3, 218, 178, dtype=torch.uint8)
    pixels[0, :, 36:218 - 36, 16:178 - 16] = 255
    pixels[1, :, 37:218 - 36, 16:178 - 16] = 255  # the first cropped row black
    out = prepare_celeba(pixels)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[0], torch.ones(3, 32, 32))
    assert float(out[1].min()) < 0.99


def test_probe_labels_are_ten_angle_bins():
    rng = np.random.default_rng(0)
    angles = np.concatenate([rng.random(10_000) * 2 * np.pi,
                             np.arange(10) * (2 * np.pi - 1e-6) / 10 + 1e-9,  # just inside each bin
                             np.arange(1, 10) * (2 * np.pi - 1e-6) / 10 - 1e-9])  # just below the next
    expected = np.minimum(np.floor(10 * angles / (2 * np.pi - 1e-6)), 9).astype(np.int64)
    assert angle_labels(angles).tolist() == expected.tolist()
    assert set(expected.tolist()) == set(range(10))


def test_lines_evaluation_constants():
    params = inspect.signature(evaluate_lines).parameters
    assert params["pairs"].default == 256 and params["steps"].default == 16  # 512 test lines, 16 steps
    assert REFERENCE_LINES == 10_000
    abrupt = np.array([[0.0] * 8 + [1.0] * 8])
    linear = np.linspace(0, 1, 16)[None]
    assert smoothness_scores(abrupt)[0] == pytest.approx(1 - 1 / 15)
    assert smoothness_scores(linear)[0] == pytest.approx(0, abs=1e-12)
    assert np.isnan(smoothness_scores(np.full((1, 16), 2.0))[0])  # total < 1e-4: undefined
