"""The plain-PyTorch ACAI steps bench/throughput.py times acai_fast against: SPEC.md section 2 as a
user would write it (PlainACAIStep: one run), and K runs at once the two ways PyTorch users do it
(VmapACAIStep: torch.func.stack_module_state + vmap; GroupedACAIStep: HFTA's grouped convolutions).
tests/test_bench.py holds PlainACAIStep equal to the trainer's reference step, and each run of the
K-run steps equal to PlainACAIStep run alone (in float64: the algebra, not the rounding).

Every step computes in the parameters' dtype (fp32 here; float64 in that test) and, with bf16,
under torch.autocast (K-run vmap: bf16 casts inside the vmapped function); the losses in at least
fp32 (`upcast`).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from acai_fast import ACAIConfig
from acai_fast.networks import he_modified_std
from flops import Conv, network_layers


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32: bf16/fp16 -> fp32 (the losses of an autocast step), fp32 and float64 as
    they are (t.float() would round a float64 step's values to fp32)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ------------------------------------------------------------------------------------------------
# One run (SPEC.md section 2)
# ------------------------------------------------------------------------------------------------


def plain_chain(layers: list[Conv]) -> nn.Sequential:
    """nn.Sequential of [Upsample] Conv2d [LeakyReLU(0.2)] [AvgPool2d(2)], initialised as the paper
    (weights ~ N(0, 1/sqrt(1.04 k^2 cin)), zero biases)."""
    mods = []
    for layer in layers:
        if layer.up:
            mods.append(nn.Upsample(scale_factor=2, mode="nearest"))
        conv = nn.Conv2d(layer.cin, layer.cout, layer.k, padding=layer.k // 2)
        nn.init.normal_(conv.weight, 0.0, he_modified_std(layer.cin * layer.k ** 2))
        nn.init.zeros_(conv.bias)
        mods.append(conv)
        if layer.act:
            mods.append(nn.LeakyReLU(0.2))
        if layer.pool:
            mods.append(nn.AvgPool2d(2))
    return nn.Sequential(*mods)


def plain_networks(config: ACAIConfig, seed: int) -> tuple[nn.Module, ...]:
    """(encoder, decoder, critic, probe) of one plain-PyTorch run, on the CPU, drawn from `seed`
    (the same weights for the same seed: the array baselines start from PlainACAIStep's)."""
    layers = network_layers(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = plain_chain(layers["encoder"])
        decoder = plain_chain(layers["decoder"])
        critic = plain_chain(layers["critic"])
        probe = nn.Linear(config.latent_dims, config.nclass)
        nn.init.xavier_uniform_(probe.weight)
        nn.init.zeros_(probe.bias)
    return encoder, decoder, critic, probe


class PlainACAIStep:
    """SPEC.md section 2 as a user would write it in plain PyTorch: nn.Conv2d chains, the losses as
    expressions, one torch.autograd.grad per objective over its own parameters, the probe on the
    detached latent, and one fused torch Adam over every parameter (Adam is elementwise: the same
    as the SPEC's separate optimisers). bf16: torch.autocast; channels_last: weights and input;
    capturable: Adam's step count on the device (for CUDA graphs). Alpha is drawn with torch.rand
    (graph-safe on the default CUDA generator) unless given."""

    def __init__(self, config: ACAIConfig, device, *, seed: int = 0, bf16: bool = False,
                 channels_last: bool = False, capturable: bool = False):
        self.config, self.device, self.bf16 = config, torch.device(device), bf16
        self.encoder, self.decoder, self.critic, self.probe = plain_networks(config, seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for net in (self.encoder, self.decoder, self.critic):
            net.to(device=self.device, memory_format=fmt)
        self.probe.to(self.device)
        self.memory_format = fmt
        self.ae_params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.critic_params = list(self.critic.parameters())
        self.probe_params = list(self.probe.parameters())
        self.optimizer = torch.optim.Adam(self.ae_params + self.critic_params + self.probe_params, lr=config.lr,
                                          betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=capturable)

    def load_from(self, trainer) -> "PlainACAIStep":
        """Copy the weights of an ACAITrainer (same preset): tests compare the two steps."""
        with torch.no_grad():
            for mine, theirs in ((self.encoder, trainer.encoder), (self.decoder, trainer.decoder),
                                 (self.critic, trainer.critic), (self.probe, trainer.probe)):
                for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
                    p.copy_(q)
        return self

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None,
             alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg, n = self.config, x.shape[0]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.encoder(x)
            ae = self.decoder(z)
            if alpha is None:
                alpha = 0.5 - (torch.rand(n, 1, 1, 1, device=x.device) - 0.5).abs()
            alpha = alpha.view(n, 1, 1, 1)
            z_mix = alpha * z + (1 - alpha) * z.flip(0)  # item i mixed with item N-1-i
            x_mix = self.decoder(z_mix)
            c_mix = upcast(self.critic(x_mix)).mean((1, 2, 3))
            c_real = upcast(self.critic(ae + cfg.reg * (x - ae))).mean((1, 2, 3))
            loss_ae = F.mse_loss(upcast(ae), upcast(x))
        loss_ae_disc = c_mix.square().mean()
        loss_disc = (c_mix - alpha.flatten()).square().mean()
        loss_disc_real = c_real.square().mean()
        ae_objective = loss_ae + cfg.advweight * loss_ae_disc
        critic_objective = loss_disc + loss_disc_real
        grads = torch.autograd.grad(ae_objective, self.ae_params, retain_graph=True)
        grads += torch.autograd.grad(critic_objective, self.critic_params)
        losses = dict(loss_ae=loss_ae.detach(), loss_ae_disc=loss_ae_disc.detach(), loss_disc=loss_disc.detach(),
                      loss_disc_real=loss_disc_real.detach())
        params = self.ae_params + self.critic_params
        if labels is not None:
            logits = self.probe(upcast(z.detach()).flatten(1))
            probe_loss = F.cross_entropy(logits, labels)
            grads += torch.autograd.grad(probe_loss, self.probe_params)
            params = params + self.probe_params
            losses["probe_loss"] = probe_loss.detach()
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        return losses


# ------------------------------------------------------------------------------------------------
# K runs at once in plain PyTorch (the --array baselines): torch.func.vmap, and HFTA's grouped convs
# ------------------------------------------------------------------------------------------------


def per_run(value, default: float, runs: int, device) -> torch.Tensor:
    """A hyper-parameter of each run as a (K,) tensor of the default dtype (fp32; float64 in the test of
    the algebra): None -> `default` for every run."""
    t = torch.full((runs,), float(default)) if value is None else \
        torch.as_tensor(value, dtype=torch.get_default_dtype())
    if tuple(t.shape) != (runs,):
        raise ValueError(f"expected one value per run ({runs}), got shape {tuple(t.shape)}")
    return t.to(device)


def draw_alpha(runs: int, n: int, device) -> torch.Tensor:
    """alpha = 0.5 - |u - 0.5| per run and image, (K, N): torch.rand, graph-safe on a CUDA device."""
    return 0.5 - (torch.rand(runs, n, device=device) - 0.5).abs()


def array_losses(loss_ae, c_mix, c_real, alpha, advweight, probe=None):
    """The SPEC losses of K runs from their (K,) reconstruction losses and (K, N) critic means, and
    the two objectives summed over the runs (run k's parameters appear only in run k's terms, so the
    gradient of the sum is each run's own gradient)."""
    losses = dict(loss_ae=loss_ae, loss_ae_disc=c_mix.square().mean(1),
                  loss_disc=(c_mix - alpha).square().mean(1), loss_disc_real=c_real.square().mean(1))
    ae_objective = (losses["loss_ae"] + advweight * losses["loss_ae_disc"]).sum()
    critic_objective = (losses["loss_disc"] + losses["loss_disc_real"]).sum()
    return losses, ae_objective, critic_objective


def per_run_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, N, classes) logits, (K, N) labels -> (K,) mean cross-entropy of each run."""
    k, n = labels.shape
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(k, n).mean(1)


def assign_grads(params, grads) -> None:
    """p.grad = g, laid out as p. Needed: torch's fused Adam reads a gradient's memory in its
    parameter's element order, ignoring the strides (measured here, torch 2.13 CPU: a transposed
    gradient updated the wrong elements), and the probe's gradient through baddbmm or vmap comes
    transposed."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def array_update(step, loss_ae, c_mix, c_real, alpha, labels, logits) -> dict[str, torch.Tensor]:
    """The rest of a K-run step from its (K,) reconstruction losses and (K, N) critic means: each
    objective's gradient over its own parameters (array_losses), the probe's per-run cross-entropy on
    logits() (K, N, classes) of the detached latent when there are labels, one fused Adam step over
    step.ae_params, critic_params and probe_params. Returns the (K,) losses, detached."""
    losses, ae_objective, critic_objective = array_losses(loss_ae, c_mix, c_real, alpha, step.advweight)
    grads = torch.autograd.grad(ae_objective, step.ae_params, retain_graph=True)
    grads += torch.autograd.grad(critic_objective, step.critic_params)
    params = step.ae_params + step.critic_params
    if labels is not None:
        probe_loss = per_run_cross_entropy(logits(), labels)
        grads += torch.autograd.grad(probe_loss.sum(), step.probe_params)
        params = params + step.probe_params
        losses["probe_loss"] = probe_loss
    assign_grads(params, grads)
    step.optimizer.step()
    return {name: v.detach() for name, v in losses.items()}


class VmapACAIStep:
    """K PlainACAIStep runs the way PyTorch's docs ensemble models: the runs' networks stacked by
    torch.func.stack_module_state (each parameter (K, ...)), the forward of every run as one
    torch.func.vmap over functional_call of the plain networks, each objective's gradient by ordinary
    autograd through the vmap, one fused torch Adam over the stacked parameters (elementwise: each
    run's own Adam). Run k starts from PlainACAIStep(seed=seeds[k])'s weights; alpha (K, N) per run
    (torch.rand unless given); advweight and reg per run ((K,) or None: the config's).

    bf16: the weights and the networks' inputs are cast to bf16 inside the vmapped function, so every
    conv, activation, pool and upsample runs in bf16 and the losses in fp32, as under autocast
    (measured here, torch 2.13 CPU: torch.autocast does not reach inside torch.func.vmap, so the
    convolutions stayed fp32). channels_last: each run's slice of the weights and inputs."""

    def __init__(self, config: ACAIConfig, device, seeds, *, bf16: bool = False, channels_last: bool = False,
                 capturable: bool = False, advweight=None, reg=None):
        self.config, self.device, self.runs = config, torch.device(device), len(seeds)
        self.dtype = torch.bfloat16 if bf16 else None
        self.channels_last = channels_last
        nets = [plain_networks(config, s) for s in seeds]
        self.templates = [copy.deepcopy(net).to("meta") for net in nets[0]]  # structure only
        self.params = []  # per network (encoder, decoder, critic, probe): name -> (K, ...) leaf
        for i in range(4):
            stacked, _ = stack_module_state([run[i] for run in nets])  # these networks have no buffers
            self.params.append({name: self._layout(t.detach().to(self.device)).requires_grad_()
                                for name, t in stacked.items()})
        self.advweight = per_run(advweight, config.advweight, self.runs, self.device)
        self.reg = per_run(reg, config.reg, self.runs, self.device)
        self.ae_params = [*self.params[0].values(), *self.params[1].values()]
        self.critic_params = list(self.params[2].values())
        self.probe_params = list(self.params[3].values())
        self.optimizer = torch.optim.Adam(self.ae_params + self.critic_params + self.probe_params, lr=config.lr,
                                          betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=capturable)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        """(K, C, H, W, ...) with each run's slice channels_last when asked (a 5-D tensor)."""
        if self.channels_last and t.dim() == 5:
            return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return t

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x (K, N, C, H, W) in this step's layout (done once, outside the timed step)."""
        return self._layout(x.to(self.device))

    def _net(self, i: int, params: dict, h: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            params = {k: v.to(self.dtype) for k, v in params.items()}
            h = h.to(self.dtype)
        return functional_call(self.templates[i], params, (h,))

    def _forward(self, pe, pd, pc, x, alpha, reg):
        """One run (vmapped over K): its latent, reconstruction loss and critic means."""
        z = self._net(0, pe, x)
        ae = self._net(1, pd, z)
        a = alpha.view(-1, 1, 1, 1)
        x_mix = self._net(1, pd, a * z + (1 - a) * z.flip(0))  # item i mixed with item N-1-i
        c_mix = upcast(self._net(2, pc, x_mix)).mean((1, 2, 3))
        c_real = upcast(self._net(2, pc, ae + reg * (x - ae))).mean((1, 2, 3))
        return z, F.mse_loss(upcast(ae), upcast(x)), c_mix, c_real

    def _probe(self, pp, z):
        return functional_call(self.templates[3], pp, (z,))

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None,
             alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of every run: x (K, N, C, H, W), labels (K, N) or None; losses as (K,) tensors."""
        if alpha is None:
            alpha = draw_alpha(self.runs, x.shape[1], x.device)
        pe, pd, pc, pp = self.params
        z, loss_ae, c_mix, c_real = vmap(self._forward)(pe, pd, pc, x, alpha, self.reg)
        return array_update(self, loss_ae, c_mix, c_real, alpha, labels,
                            lambda: vmap(self._probe)(pp, upcast(z.detach()).flatten(2)))  # (K, N, classes)

    def run_parameters(self, k: int) -> list[torch.Tensor]:
        """Run k's parameters in PlainACAIStep's order (ae_params, critic_params, probe_params)."""
        return [p[k] for p in self.ae_params + self.critic_params + self.probe_params]


class GroupedACAIStep:
    """K runs fused the way HFTA does it (Wang et al., "Horizontally Fused Training Array", MLSys
    2021): every conv of the K runs is one grouped convolution (weight (K*Cout, Cin, k, k), input
    (N, K*Cin, H, W), groups=K: run k owns channel block k), leaky ReLU, pooling and upsampling run
    on the merged channels, the mixing, losses and probe per run on (N, K, C, H, W) views, the K
    probes as one batched matmul (baddbmm, HFTA's fused Linear), autograd over the merged
    parameters, one fused torch Adam (elementwise: each run's own). bf16: torch.autocast;
    channels_last: weights and input. Run k starts from PlainACAIStep(seed=seeds[k])'s weights;
    alpha (K, N) per run (torch.rand unless given); advweight and reg per run.

    x comes merged, (N, K*C, H, W) (`prepare` turns (K, N, C, H, W) into it once, outside the timed
    step): an HFTA data loader writes each run's batch into its channel block directly."""

    def __init__(self, config: ACAIConfig, device, seeds, *, bf16: bool = False, channels_last: bool = False,
                 capturable: bool = False, advweight=None, reg=None):
        self.config, self.device, self.bf16, self.runs = config, torch.device(device), bf16, len(seeds)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layers = network_layers(config)
        nets = [plain_networks(config, s) for s in seeds]
        self.params = []  # per network: [w0, b0, w1, b1, ...], each run's block stacked along dim 0
        for i in range(3):
            merged = []
            for convs in zip(*[[m for m in run[i] if isinstance(m, nn.Conv2d)] for run in nets]):
                w = torch.cat([c.weight.detach() for c in convs]).to(self.device, memory_format=self.memory_format)
                b = torch.cat([c.bias.detach() for c in convs]).to(self.device)
                merged += [w.requires_grad_(), b.requires_grad_()]
            self.params.append(merged)
        self.probe_params = [torch.stack([run[3].weight.detach() for run in nets]).to(self.device).requires_grad_(),
                             torch.stack([run[3].bias.detach() for run in nets]).to(self.device).requires_grad_()]
        self.advweight = per_run(advweight, config.advweight, self.runs, self.device)
        self.reg = per_run(reg, config.reg, self.runs, self.device).view(1, -1, 1, 1, 1)
        self.ae_params = self.params[0] + self.params[1]
        self.critic_params = self.params[2]
        self.optimizer = torch.optim.Adam(self.ae_params + self.critic_params + self.probe_params, lr=config.lr,
                                          betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=capturable)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(K, N, C, H, W) -> (N, K*C, H, W) in this step's memory format."""
        k, n, c, h, w = x.shape
        return x.to(self.device).transpose(0, 1).reshape(n, k * c, h, w).contiguous(memory_format=self.memory_format)

    def _chain(self, name: str, params: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        for layer, w, b in zip(self.layers[name], params[0::2], params[1::2]):
            if layer.up:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.conv2d(h, w, b, padding=layer.k // 2, groups=self.runs)
            if layer.act:
                h = F.leaky_relu(h, 0.2)
            if layer.pool:
                h = F.avg_pool2d(h, 2)
        return h

    def _per_run(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(1, (self.runs, -1))  # (N, K*C, H, W) -> (N, K, C, H, W), a view

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None,
             alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of every run: x (N, K*C, H, W) (see prepare), labels (K, N) or None; alpha (K, N)."""
        k, n = self.runs, x.shape[0]
        if alpha is None:
            alpha = draw_alpha(k, n, x.device)
        enc, dec, crit = self.params
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self._chain("encoder", enc, x)
            ae = self._chain("decoder", dec, z)
            a = alpha.t().reshape(n, k, 1, 1, 1)
            zk = self._per_run(z)
            z_mix = (a * zk + (1 - a) * zk.flip(0)).flatten(1, 2)  # item i mixed with item N-1-i, per run
            x_mix = self._chain("decoder", dec, z_mix)
            aek, xk = self._per_run(ae), self._per_run(x)
            x_real = (aek + self.reg * (xk - aek)).flatten(1, 2)
            c_mix = upcast(self._per_run(self._chain("critic", crit, x_mix))).mean((2, 3, 4)).t()  # (K, N)
            c_real = upcast(self._per_run(self._chain("critic", crit, x_real))).mean((2, 3, 4)).t()
            loss_ae = (upcast(aek) - upcast(xk)).square().mean((0, 2, 3, 4))  # (K,)

        def logits():  # the K probes as one batched matmul: (K, N, latent dims) -> (K, N, classes)
            zf = upcast(self._per_run(z.detach())).transpose(0, 1).flatten(2)
            w, b = self.probe_params
            return torch.baddbmm(b.unsqueeze(1), zf, w.transpose(1, 2))
        return array_update(self, loss_ae, c_mix, c_real, alpha, labels, logits)

    def run_parameters(self, k: int) -> list[torch.Tensor]:
        """Run k's parameters in PlainACAIStep's order (ae_params, critic_params, probe_params)."""
        return [p.unflatten(0, (self.runs, -1))[k] for p in self.ae_params + self.critic_params] + \
            [p[k] for p in self.probe_params]
