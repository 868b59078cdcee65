"""The paper's baselines and vae_acai (acai_fast/models): each objective against a hand-written
formula on a tiny batch, a few steps lower each model's reconstruction error on lines, checkpoints
round-trip and refuse another model, and `acai-fast train --model` with the hyper-parameter flags."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import main
from acai_fast.data.lines import angle_labels, draw_lines, random_angles
from acai_fast.models import MODELS, Randomness, build_model
from acai_fast.models.vqvae import EMA_DECAY, EMA_EPSILON, nearest_code
from acai_fast.ops.mix import philox_alpha_ref
from helpers import TINY, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_MODELS = ("baseline", "dropout", "denoising", "vae", "aae", "vqvae", "vae_acai")


def tiny_trainer(model, seed=0, **overrides):
    return ACAITrainer(ACAIConfig(**{**TINY, **overrides}), backend="reference", device="cpu", seed=seed,
                       model=model)


def lines(n=6, seed=1):
    """n training lines and their probe labels."""
    import numpy as np
    angles = random_angles(n, np.random.default_rng(seed))
    return draw_lines(angles), angle_labels(angles)


def same_randomness(trainer):
    """Copies of the trainer's random streams: what its next step will draw, without advancing it."""
    gen = torch.Generator().set_state(trainer.generator.get_state())
    return Randomness(trainer.alpha_state.clone(), gen)


def test_registry_holds_every_model():
    assert set(NEW_MODELS) | {"acai"} == set(MODELS)
    for name in MODELS:
        assert MODELS[name].name == name
    with pytest.raises(ValueError, match="unknown model 'nope'; valid models: acai, baseline"):
        build_model("nope", ACAIConfig(**TINY))
    with pytest.raises(ValueError, match="unknown model"):
        ACAITrainer(ACAIConfig(**TINY), device="cpu", model="vae-acai")


@pytest.mark.parametrize("name", NEW_MODELS)
def test_few_steps_lower_reconstruction_error(name):
    """From the paper's small init the decoder outputs ~0 (MSE ~0.9 on lines, mostly background -1);
    a few Adam steps at lr 1e-3 must bring the deterministic reconstruction decode(encode(x)) down."""
    trainer = tiny_trainer(name, lr=1e-3)
    x, labels = lines(24, seed=2)

    def recon_error():
        return float(F.mse_loss(trainer.decode(trainer.encode(x)), x))

    before = recon_error()
    for i in range(12):
        sl = slice(6 * (i % 4), 6 * (i % 4 + 1))
        losses = trainer.step(x[sl], labels[sl])
    after = recon_error()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert "probe_loss" in losses and "loss_ae" in losses
    assert after < 0.8 * before, (before, after)  # measured: 0.31-0.69 of before


@pytest.mark.parametrize("name", NEW_MODELS)
def test_checkpoint_round_trip_and_refuses_another_model(name, tmp_path):
    trainer = tiny_trainer(name, seed=3)
    x, labels = lines(18, seed=4)
    trainer.step(x[:6], labels[:6])
    trainer.step(x[6:12], labels[6:12])
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    loaded = ACAITrainer.load(path, device="cpu", backend="reference")
    assert loaded.model.name == name and loaded.config == trainer.config and loaded.steps == 2
    theirs = loaded.model.state_dict()
    for key, value in trainer.model.state_dict().items():  # buffers too (the VQ-VAE's EMA codebook)
        assert torch.equal(value, theirs[key]), key
    # The next step is the same: weights, Adam moments, noise and alpha streams all carried.
    ours, restored = trainer.step(x[12:], labels[12:]), loaded.step(x[12:], labels[12:])
    for key in ours:
        assert torch.equal(ours[key], restored[key]), key
    for (key, a), b in zip(trainer.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), key

    other = "vae" if name != "vae" else "baseline"
    with pytest.raises(ValueError, match=f"checkpoint holds model '{name}', not '{other}'"):
        tiny_trainer(other).load_state_dict(torch.load(path, weights_only=False))


def test_vqvae_checkpoint_carries_ema_state():
    state = tiny_trainer("vqvae").state_dict()["model"]
    assert state["codebook"].shape == (2 ** 14, 192)
    assert state["ema_count"].shape == (2 ** 14,) and state["ema_means"].shape == (2 ** 14, 192)


# ------------------------------------------------------------------ objectives by hand
def test_denoising_and_dropout_objectives():
    x, _ = lines(6, seed=5)
    trainer = tiny_trainer("denoising")
    m, gen = trainer.model, torch.Generator().set_state(trainer.generator.get_state())
    noise = torch.randn(x.shape, generator=gen)  # std 1.0 in [-1, 1] units
    expected = torch.mean((m.decoder(m.encoder(x + noise)) - x) ** 2)
    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.objectives["ae"], expected, atol=1e-7, rtol=1e-6, name="denoising objective")
    assert_close(out.latent, m.encoder(x), atol=0, rtol=0, name="probe reads the clean latent")

    trainer = tiny_trainer("dropout")
    m, gen = trainer.model, torch.Generator().set_state(trainer.generator.get_state())
    z = m.encoder(x)
    keep = torch.rand(z.shape, generator=gen) < 0.5
    expected = torch.mean((m.decoder(torch.where(keep, z / 0.5, 0.0)) - x) ** 2)
    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.objectives["ae"], expected, atol=1e-7, rtol=1e-6, name="dropout objective")
    assert 0.4 < keep.float().mean() < 0.6


def vae_by_hand(m, x, gen):
    """mu, the posterior's Normal, the Bernoulli log-likelihood and the KL, written out."""
    n = x.shape[0]
    h = m.encoder(x).reshape(n, -1)
    mu = h @ m.to_mu.weight.T + m.to_mu.bias
    logvar = h @ m.to_logvar.weight.T + m.to_logvar.bias
    sigma = torch.sqrt(torch.exp(logvar))
    z = mu + sigma * torch.randn(mu.shape, generator=gen)
    p = torch.sigmoid(m.decoder(z.reshape(n, *m.config.latent_shape)))
    target = (x + 1) / 2
    log_likelihood = torch.sum(target * torch.log(p) + (1 - target) * torch.log(1 - p)) / n
    kl = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum() / n
    return mu, 2 * p - 1, log_likelihood, kl


def perturbed_vae(name):
    trainer = tiny_trainer(name)
    with torch.no_grad():  # posterior far from the prior, so the KL term is not ~0
        trainer.model.to_mu.bias.normal_()
        trainer.model.to_logvar.bias.normal_(0, 0.5)
    return trainer


def test_vae_objective_kl_and_bernoulli_likelihood():
    trainer = perturbed_vae("vae")
    m = trainer.model
    x, _ = lines(6, seed=6)
    mu, _, ll, kl = vae_by_hand(m, x, torch.Generator().set_state(trainer.generator.get_state()))
    assert kl > 10  # the check is not vacuous
    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.logged["loss_ll"], ll, atol=1e-4, rtol=1e-5, name="Bernoulli log-likelihood")
    assert_close(out.logged["loss_kl"], kl, atol=1e-5, rtol=1e-5, name="KL")
    assert_close(out.objectives["ae"], kl - ll, atol=1e-4, rtol=1e-5, name="-ELBO (beta 1)")
    # encode is the posterior mean; decode squashes logits to 2 sigmoid - 1.
    assert_close(m.encode(x), mu.view(6, 3, 8, 8), atol=1e-6, rtol=1e-6, name="encode = mu")
    z = torch.randn(6, 3, 8, 8)
    assert_close(m.decode(z), 2 * torch.sigmoid(m.decoder(z)) - 1, atol=0, rtol=0, name="decode")
    assert list(m.param_groups()) == ["ae"]


def test_vae_acai_objectives():
    trainer = perturbed_vae("vae_acai")
    m, cfg = trainer.model, trainer.config
    x, _ = lines(6, seed=7)
    alpha = philox_alpha_ref(trainer.alpha_state.clone(), 6).view(6, 1, 1, 1)
    mu, ae, ll, kl = vae_by_hand(m, x, torch.Generator().set_state(trainer.generator.get_state()))
    mu = mu.view(6, 3, 8, 8)
    reverse = torch.tensor([5, 4, 3, 2, 1, 0])
    x_mix = 2 * torch.sigmoid(m.decoder(alpha * mu + (1 - alpha) * mu[reverse])) - 1
    critic_mix = m.critic(x_mix)
    critic_real = m.critic(ae + cfg.reg * (x - ae))
    ae_objective = (kl - ll) + cfg.advweight * 1024 * torch.mean(critic_mix ** 2)
    critic_objective = torch.mean((critic_mix - alpha.flatten()) ** 2) + torch.mean(critic_real ** 2)
    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.objectives["ae"], ae_objective, atol=1e-4, rtol=1e-5, name="vae_acai ae objective")
    assert_close(out.objectives["critic"], critic_objective, atol=1e-7, rtol=1e-5, name="critic objective")
    assert set(m.param_groups()) == {"ae", "critic"}


def test_aae_discriminator_loss_and_gradients():
    trainer = tiny_trainer("aae")
    m = trainer.model
    x, labels = lines(6, seed=8)
    gen = torch.Generator().set_state(trainer.generator.get_state())

    def discriminator(v):  # dense 100 -> leaky 0.2 -> dense 100 -> leaky 0.2 -> dense 1
        h = v.flatten(1)
        for layer in m.discriminator.hidden:
            a = h @ layer.weight.T + layer.bias
            h = torch.where(a > 0, a, 0.2 * a)
        return (h @ m.discriminator.out.weight.T + m.discriminator.out.bias).flatten()

    assert [layer.out_features for layer in m.discriminator.hidden] == [100, 100]
    z = m.encoder(x)
    prior = torch.randn(z.shape, generator=gen)
    d_latent, d_prior = torch.sigmoid(discriminator(z)), torch.sigmoid(discriminator(prior))
    disc_loss = -torch.mean(torch.log(1 - d_latent)) - torch.mean(torch.log(d_prior))
    ae_loss = torch.mean((m.decoder(z) - x) ** 2) - torch.mean(torch.log(d_latent))

    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.objectives["disc"], disc_loss, atol=1e-6, rtol=1e-5, name="discriminator loss")
    assert_close(out.objectives["ae"], ae_loss, atol=1e-6, rtol=1e-5, name="autoencoder loss")

    # Each objective trains its own group only (one step of the trainer from the same streams).
    disc_params = list(m.discriminator.parameters())
    ae_params = [*m.encoder.parameters(), *m.decoder.parameters()]
    disc_grads = torch.autograd.grad(disc_loss, disc_params, retain_graph=True)
    ae_grads = torch.autograd.grad(ae_loss, ae_params)
    trainer.step(x, labels)
    for i, (p, g) in enumerate(zip(disc_params, disc_grads)):
        assert_close(p.grad, g, atol=1e-7, rtol=1e-5, name=f"disc param {i} grad")
    for i, (p, g) in enumerate(zip(ae_params, ae_grads)):
        assert_close(p.grad, g, atol=1e-7, rtol=1e-5, name=f"ae param {i} grad")


def spread_codebook(trainer):
    """A codebook at the scale of the bottleneck's vectors, so that a batch uses many codes."""
    m = trainer.model
    x, _ = lines(64, seed=9)
    with torch.no_grad():
        h = m.to_latents(m.encoder(x).flatten(1)).reshape(-1, 192)
        m.codebook.copy_(h[torch.randint(0, len(h), (2 ** 14,), generator=torch.Generator().manual_seed(0))]
                         + 0.5 * h.std() * torch.randn(2 ** 14, 192, generator=torch.Generator().manual_seed(1)))
        m.ema_means.copy_(m.codebook)
    return m


def test_vqvae_nearest_code_is_the_nearest():
    """The chosen code's distance is the smallest, up to the rounding of nearest_code's fp32
    |h|^2 + |c|^2 - 2 h.c: with D = 7 products per sum and u = 2^-24, each of the three terms is off
    by at most ~D u (|h|^2 + |c|^2), so their sum by ~3 D u (...) = 1.3e-6 (|h|^2 + |c|^2), and two
    codes closer than that may swap; the slack 1e-5 (...) is ~8x that bound. (Comparing indices with
    torch.cdist's, which sums in another order with each CPU's kernels, fails on such a near-tie.)"""
    g = torch.Generator().manual_seed(0)
    h, codebook = torch.randn(50, 7, generator=g), torch.randn(300, 7, generator=g)
    chosen = nearest_code(h, codebook)
    exact = (h.double()[:, None] - codebook.double()[None]).square().sum(-1)  # (50, 300), float64
    rows = torch.arange(50)
    slack = 1e-5 * (h.double().square().sum(1) + codebook.double().square().sum(1)[chosen])
    assert (exact[rows, chosen] <= exact.min(1).values + slack).all()
    assert (chosen == exact.argmin(1)).float().mean() > 0.9  # (not vacuous: the nearest, bar ties)


def test_vqvae_straight_through_commitment_and_ema():
    trainer = tiny_trainer("vqvae")
    m = spread_codebook(trainer)
    x, _ = lines(6, seed=10)

    # Straight through: the decoder sees the codes, and the gradient w.r.t. the encoder's vectors h
    # is the gradient w.r.t. the codes.
    z = m.encoder(x).detach().requires_grad_()
    z_q, h, idx, codes = m.bottleneck(z)
    assert len(idx.unique()) > 10  # many codes in play
    assert_close(z_q, m.from_codes(codes.reshape(6, -1)).view_as(z), atol=1e-6, rtol=1e-6, name="forward")
    w = torch.randn(z_q.shape)
    grad_h, = torch.autograd.grad((z_q * w).sum(), h)
    leaf = codes.detach().clone().requires_grad_()
    grad_codes, = torch.autograd.grad((m.from_codes(leaf.reshape(6, -1)).view_as(z) * w).sum(), leaf)
    assert_close(grad_h, grad_codes, atol=1e-7, rtol=1e-6, name="straight-through gradient")
    assert grad_h.abs().max() > 0

    # The objective: reconstruction MSE + 10 * mean((h - stop_gradient(code))^2), by hand.
    cb0, count0, means0 = m.codebook.clone(), m.ema_count.clone(), m.ema_means.clone()
    h = m.to_latents(m.encoder(x).flatten(1)).reshape(-1, 192)  # (6 images * 10 latents, D)
    idx = nearest_code(h, cb0)  # the model's choice (tested above): cdist may break a near-tie otherwise
    decoded = m.decoder(m.from_codes(cb0[idx].reshape(6, -1)).view(6, 3, 8, 8))
    expected = torch.mean((decoded - x) ** 2) + 10 * torch.mean((h - cb0[idx]) ** 2)
    out = m.objectives(x, same_randomness(trainer))
    assert_close(out.objectives["ae"], expected, atol=1e-6, rtol=1e-5, name="VQ-VAE objective")
    assert not m.codebook.requires_grad  # a buffer: only the EMA moves it
    assert all(p is not m.codebook for group in m.param_groups().values() for p in group)

    # The EMA update (after_update) by hand, one vector at a time.
    m.after_update()
    counts, sums = torch.zeros(2 ** 14), torch.zeros(2 ** 14, 192)
    for i, k in enumerate(idx.tolist()):
        counts[k] += 1
        sums[k] += h[i].detach()
    count = EMA_DECAY * count0 + (1 - EMA_DECAY) * counts
    means = EMA_DECAY * means0 + (1 - EMA_DECAY) * sums
    n = count.sum()
    smoothed = (count + EMA_EPSILON) / (n + 2 ** 14 * EMA_EPSILON) * n
    assert_close(m.ema_count, count, atol=1e-9, rtol=1e-6, name="ema_count")
    assert_close(m.ema_means, means, atol=1e-7, rtol=1e-5, name="ema_means")
    assert_close(m.codebook, means / smoothed[:, None], atol=1e-5, rtol=1e-4, name="codebook")
    assert EMA_DECAY == 0.999 and abs(float(count.sum()) - 0.001 * 60) < 1e-6

    # The trainer applies it after every step, and only once per forward.
    before = m.codebook.clone()
    trainer.step(x)
    assert not torch.equal(before, m.codebook)
    after_step = m.codebook.clone()
    m.after_update()
    assert torch.equal(after_step, m.codebook)


# ------------------------------------------------------------------ command line
def test_cli_train_model_and_hyper_parameters(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "lines", "--model", "vae_acai", "--advweight", "0.25", "--reg", "0.3",
            "--advdepth", "6", "--depth", "4", "--latent", "2", "--lr", "2e-4", "--kimg", "0.03125",
            "--eval-kimg", "0.03125", "--batch", "16", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    expected = dict(model="vae_acai", advweight=0.25, reg=0.3, advdepth=6, depth=4, latent=2, lr=2e-4, batch=16)
    assert {k: record[k] for k in expected} == expected
    assert "mean_distance" in record and "loss_kl" in record and "loss_disc" in record
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["model_name"] == "vae_acai"
    assert {k: state["config"][k] for k in ("advweight", "reg", "advdepth", "depth", "latent", "lr")} == \
        dict(advweight=0.25, reg=0.3, advdepth=6, depth=4, latent=2, lr=2e-4)
    capsys.readouterr()

    # Resuming as another model is refused.
    with pytest.raises(SystemExit) as exc:
        main(args[:3] + ["vae"] + args[4:] + ["--resume"])
    assert exc.value.code == 2 and "vae_acai" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "nope"], "invalid choice"),
    (["--lr", "0"], "lr must be > 0"),
    (["--depth", "0"], "depth must be a positive integer"),
    (["--latent", "-2"], "latent must be a positive integer"),
    (["--advweight", "-1"], "advweight must be a finite number >= 0"),
    (["--reg", "nan"], "reg must be a finite number >= 0"),
    (["--advdepth", "-1"], "advdepth must be an integer >= 0"),
])
def test_cli_rejects_bad_hyper_parameters(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "x"), "--device", "cpu", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
