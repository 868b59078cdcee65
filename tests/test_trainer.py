"""The ACAI step (SPEC 2) against a hand-written one, gradient isolation, alpha, checkpoints, and a
short training run."""
import copy

import pytest
import torch
import torch.nn.functional as F

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.eval.lines import evaluate_lines
from acai_fast.ops.mix import philox_alpha_ref
from helpers import TINY, assert_close, tiny_trainer  # TINY: 32 -> 8 latent width, narrow layers



def batch(n=6, seed=1, nclass=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, nclass, (n,), generator=g)


def hand_written_grads(trainer, x, labels, alpha):
    """SPEC 2 written out directly: two separate objectives on copies of the networks, each
    backpropagated with autograd on its own, with the batch reversal spelled as an index."""
    enc, dec, critic, probe = (copy.deepcopy(m) for m in (trainer.encoder, trainer.decoder,
                                                           trainer.critic, trainer.probe))
    cfg = trainer.config
    n = x.shape[0]
    reverse = torch.tensor([n - 1 - i for i in range(n)])

    z = enc(x)
    ae = dec(z)
    x_mix = dec(alpha * z + (1 - alpha) * z[reverse])
    ae_objective = F.mse_loss(ae, x) + cfg.advweight * torch.mean(critic(x_mix) ** 2)
    ae_objective.backward()
    ae_grads = [p.grad.clone() for p in [*enc.parameters(), *dec.parameters()]]

    critic.zero_grad()
    loss_disc = torch.mean((critic(x_mix.detach()) - alpha.flatten()) ** 2)
    ae_d = ae.detach()
    loss_disc_real = torch.mean(critic(ae_d + cfg.reg * (x - ae_d)) ** 2)
    (loss_disc + loss_disc_real).backward()
    critic_grads = [p.grad.clone() for p in critic.parameters()]

    probe_loss = F.cross_entropy(probe(z.detach()), labels)
    probe_loss.backward()
    probe_grads = [p.grad.clone() for p in probe.parameters()]
    return ae_grads, critic_grads, probe_grads


def same_alpha(trainer, n):
    """The alphas the trainer's next step will draw: 0.5 - |u - 0.5| from its Philox stream."""
    return philox_alpha_ref(trainer.alpha_state.clone(), n).view(n, 1, 1, 1)


def test_step_gradients_match_hand_written_step():
    trainer = tiny_trainer()
    x, labels = batch()
    alpha = same_alpha(trainer, x.shape[0])
    ae_g, critic_g, probe_g = hand_written_grads(trainer, x, labels, alpha)
    before = [p.detach().clone() for p in trainer.ae_params]
    trainer.step(x, labels)
    for i, (p, g) in enumerate(zip(trainer.ae_params, ae_g)):
        assert_close(p.grad, g, atol=1e-7, rtol=1e-5, name=f"ae param {i} grad")
    for i, (p, g) in enumerate(zip(trainer.critic_params, critic_g)):
        assert_close(p.grad, g, atol=1e-7, rtol=1e-5, name=f"critic param {i} grad")
    for i, (p, g) in enumerate(zip(trainer.probe.parameters(), probe_g)):
        assert_close(p.grad, g, atol=1e-7, rtol=1e-5, name=f"probe param {i} grad")
    # One Adam step from the trainer's own gradients (checked above against the hand-written ones;
    # feeding the hand-written ones instead would let a gradient element within rounding noise of
    # 0 flip the sign of Adam's first step, ~lr * sign(g)). Same gradients, same formula: the two
    # differ by the rounding of the update (a few ulp of p): rtol 1e-6 and a floor far below lr.
    reference = [b.clone().requires_grad_() for b in before]
    opt = torch.optim.Adam(reference, lr=trainer.config.lr, betas=(0.9, 0.999), eps=1e-8)
    for r, p in zip(reference, trainer.ae_params):
        r.grad = p.grad.clone()
    opt.step()
    for i, (p, r) in enumerate(zip(trainer.ae_params, reference)):
        assert_close(p, r, atol=1e-9, rtol=1e-6, name=f"ae param {i} after Adam")


def test_losses_are_the_spec_losses():
    trainer = tiny_trainer()
    x, labels = batch()
    alpha = same_alpha(trainer, x.shape[0]).flatten()
    with torch.no_grad():
        z = trainer.encoder(x)
        ae = trainer.decoder(z)
        a = alpha.view(-1, 1, 1, 1)
        c_mix = trainer.critic(trainer.decoder(a * z + (1 - a) * z.flip(0)))
        c_real = trainer.critic(ae + 0.2 * (x - ae))
    losses = trainer.step(x, labels)
    assert set(losses) == {"loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real", "probe_loss", "probe_accuracy"}
    assert float(losses["loss_ae"]) == pytest.approx(float(((ae - x) ** 2).mean()), rel=1e-6)
    assert float(losses["loss_ae_disc"]) == pytest.approx(float((c_mix ** 2).mean()), rel=1e-5)
    assert float(losses["loss_disc"]) == pytest.approx(float(((c_mix - alpha) ** 2).mean()), rel=1e-5)
    assert float(losses["loss_disc_real"]) == pytest.approx(float((c_real ** 2).mean()), rel=1e-5)
    assert "probe_loss" not in tiny_trainer().step(x)  # no labels, no probe


def _params_after_one_step(**overrides):
    trainer = tiny_trainer(**overrides)
    trainer.step(*batch())
    return ([p.detach().clone() for p in trainer.ae_params],
            [p.detach().clone() for p in trainer.critic_params])


def test_critic_update_ignores_the_autoencoder_objective():
    """advweight only scales the autoencoder's adversarial term: the critic must not see it."""
    ae_a, critic_a = _params_after_one_step(advweight=0.5)
    ae_b, critic_b = _params_after_one_step(advweight=5.0)
    assert all(torch.equal(a, b) for a, b in zip(critic_a, critic_b))
    assert not all(torch.equal(a, b) for a, b in zip(ae_a, ae_b))


def test_autoencoder_update_ignores_the_critic_objective():
    """reg only enters loss_disc_real (a critic-only term): the autoencoder must not see it."""
    ae_a, critic_a = _params_after_one_step(reg=0.2)
    ae_b, critic_b = _params_after_one_step(reg=0.9)
    assert all(torch.equal(a, b) for a, b in zip(ae_a, ae_b))
    assert not all(torch.equal(a, b) for a, b in zip(critic_a, critic_b))


def test_alpha_range_and_distribution():
    trainer = tiny_trainer()
    alpha = trainer.draw_alpha(20000)
    assert alpha.shape == (20000, 1, 1, 1)
    assert alpha.min() >= 0 and alpha.max() <= 0.5
    assert alpha.mean().item() == pytest.approx(0.25, abs=0.01)
    assert (alpha < 0.25).float().mean().item() == pytest.approx(0.5, abs=0.02)  # uniform on [0, 0.5]


def test_mixing_pairs_item_i_with_item_n_minus_1_minus_i():
    """With the decoder's input recorded, the mixed latents are alpha*z[i] + (1-alpha)*z[N-1-i]."""
    trainer = tiny_trainer()
    x, _ = batch(n=5)
    alpha = same_alpha(trainer, 5)
    seen = []
    hook = trainer.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    trainer.step(x)
    hook.remove()
    z, z_mix = seen  # decoder runs on z, then on z_mix
    for i in range(5):
        assert_close(z_mix[i], alpha[i] * z[i] + (1 - alpha[i]) * z[4 - i], atol=1e-6, rtol=1e-6,
                     name=f"z_mix[{i}]")


def test_save_load_then_step_matches_uninterrupted(tmp_path):
    a = tiny_trainer(seed=3)
    for s in range(3):
        a.step(*batch(seed=s))
    a.save(tmp_path / "ck.pt")
    b = ACAITrainer.load(tmp_path / "ck.pt", device="cpu")
    assert (b.nimg, b.steps, b.config) == (a.nimg, a.steps, a.config)
    la, lb = a.step(*batch(seed=9)), b.step(*batch(seed=9))
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    for name in ("encoder", "decoder", "critic", "probe"):
        for (n, pa), pb in zip(getattr(a, name).named_parameters(), getattr(b, name).parameters()):
            assert torch.equal(pa, pb), f"{name}.{n}"
    assert not (tmp_path / "ck.pt.tmp").exists()


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ACAITrainer.load(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an acai_fast checkpoint"):
        ACAITrainer.load(tmp_path / "other.pt")


def test_bad_inputs_raise_clear_errors():
    trainer = tiny_trainer()
    x, labels = batch()
    with pytest.raises(ValueError, match=r"shape \(N, 1, 32, 32\)"):
        trainer.step(x[:, :, :16])
    with pytest.raises(ValueError, match="floating-point"):
        trainer.step(x.long())
    with pytest.raises(ValueError, match="labels must lie in"):
        trainer.step(x, labels + 10)
    with pytest.raises(ValueError, match="1-D tensor of 6"):
        trainer.step(x, labels[:3])
    with pytest.raises(ValueError, match="unknown backend"):
        ACAITrainer(ACAIConfig(**TINY), backend="cudnn", device="cpu")
    with pytest.raises(ValueError, match="z must have shape"):
        trainer.decode(torch.zeros(2, 3, 4, 4))


def test_interpolate_ends_are_reconstructions():
    trainer = tiny_trainer()
    x_a, _ = batch(n=4, seed=1)
    x_b, _ = batch(n=4, seed=2)
    images = trainer.interpolate(x_a, x_b, steps=5)
    assert images.shape == (4, 5, 1, 32, 32)
    assert_close(images[:, 0], trainer.decode(trainer.encode(x_a)), atol=1e-6, rtol=1e-5, name="start")
    assert_close(images[:, -1], trainer.decode(trainer.encode(x_b)), atol=1e-6, rtol=1e-5, name="end")


def test_short_lines_training_learns(tmp_path):
    """32 steps on the lines preset: loss_ae falls and Mean Distance beats the untrained model's."""
    trainer = ACAITrainer(ACAIConfig.preset("lines"), device="cpu", seed=0)
    untrained = evaluate_lines(trainer, pairs=32)
    history = trainer.fit("lines", kimg=2, eval_kimg=0.5, out_dir=tmp_path, progress=False,
                          evaluate=lambda t: evaluate_lines(t, pairs=32))
    assert [r["kimg"] for r in history] == [0.5, 1.0, 1.5, 2.0]
    assert history[-1]["loss_ae"] < 0.7 * history[0]["loss_ae"]
    assert history[-1]["mean_distance"] < 0.5 * untrained["mean_distance"]
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "interpolations.png").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_fit_resumes_where_it_stopped(tmp_path):
    """Train 2x3 steps with a save/load in between == 6 steps straight (data, alpha, Adam state)."""
    def run(stop_after):
        t = tiny_trainer(seed=5, batch=8)
        t.fit("lines", kimg=stop_after * 8 / 1024, eval_kimg=None, progress=False)
        return t

    straight = run(6)
    half = run(3)
    half.save(tmp_path / "ck.pt")
    resumed = ACAITrainer.load(tmp_path / "ck.pt", device="cpu")
    resumed.fit("lines", kimg=6 * 8 / 1024, eval_kimg=None, progress=False)
    assert resumed.steps == straight.steps == 6
    for pa, pb in zip(straight.encoder.parameters(), resumed.encoder.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_gradients_reach_adam_in_the_parameters_layout():
    """A weight whose .data a user re-laid out (channels_last) still gets the reference update: the
    trainer copies it back into its flat buffer and Adam reads the gradient in the buffer's layout.
    The channels_last weight runs another conv kernel, so the gradients differ by rounding: the
    updates are compared as in test_trainer_fused.compare_step: exact where the gradient is well
    above that noise, within 2 lr elsewhere (Adam's first step is ~lr * sign(g))."""
    a, b = tiny_trainer(seed=2), tiny_trainer(seed=2)
    w = b.encoder.blocks[1].weight
    w.data = w.data.contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in a.model.parameters()]
    x, labels = batch()
    a.step(x, labels)
    b.step(x, labels)
    assert b.encoder.blocks[1].weight.grad.stride() == w.stride()
    lr = a.config.lr
    for (name, pa), pb, p0 in zip(a.model.named_parameters(), b.model.parameters(), before):
        assert_close(pb.grad, pa.grad, atol=1e-4 * float(pa.grad.abs().max()), rtol=1e-4, name=f"{name}.grad")
        well = pa.grad.abs() > 1e-3 * pa.grad.abs().max()
        assert_close((pb - p0)[well], (pa - p0)[well], atol=1e-3 * lr, rtol=0, name=f"{name} update")
        assert float((pb - pa).detach().abs().max()) <= 2.01 * lr, name
