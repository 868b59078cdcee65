"""Whole-step throughput of acai_fast against plain-PyTorch ACAI steps, in one process, one command.

Variants (each one full SPEC.md section 2 step: encoder once, decoder twice, critic twice, every
gradient, Adam over encoder+decoder, critic and the linear probe):
  eager_fp32   plain PyTorch written here (PlainACAIStep: nn.Conv2d chains, autograd.grad per
               objective, one fused torch Adam), fp32                      (= ANCHORS "eager fp32")
  eager_bf16   the same under torch.autocast(bfloat16), channels_last weights and inputs
  graph_bf16   eager_bf16 captured whole into one CUDA graph by hand (capturable fused Adam; alpha
               from torch.rand on the default CUDA generator, which graph capture supports)
  compile      eager_bf16's step under torch.compile (--compile; --compile-mode, default max-autotune:
               ANCHORS measured ~200 s of compiling per case)
  fused        ACAITrainer(backend="fused", cuda_graph=False): the Triton/CUDA kernels, eager launches
  fused_graph  ACAITrainer(backend="fused"): the default fast trainer (one CUDA-graph replay per step)
  reference    ACAITrainer(backend="reference") (not in the default set: the repository's own oracle)

Per variant: ms/step (median, p20, p80 over >= --steps back-to-back steps after --warmup, CUDA-event
timing; the window is stretched to --min-seconds so that NVML gets samples), images/s, TFLOP/s and
GB/s from the analytic counts below, launches per step (acai_fast.engine.count_launches on one eager
step: Triton launches, CUDA-extension calls and aten ops that compute; a graph replays the same
kernels), peak GPU memory (torch.cuda.max_memory_allocated), time to the first step in this process
and, in fresh processes, cold (empty Triton/Inductor caches) and warm (the same caches again), and
NVML's GPU utilisation, power, SM clock and memory over the timed window. The table shows speed-ups
against eager_fp32 and against the best plain-PyTorch variant of the same preset and batch.

FLOPs per step (analytic, from the layer shapes; equal to torch.utils.flop_counter on one step):
  conv: F = 2 N H W Cout Cin k^2 at the conv's resolution (after any upsample); forward F, input
  gradient F, weight gradient F. The step: forward of encoder (N), decoder (2N), critic (2N);
  backward: encoder dW all + dX all but the first layer (x needs none); decoder dW + dX (2N);
  critic dX of every layer for the autoencoder objective (N, through x_mix), critic dW all + dX all
  but the first for the critic objective (2N); probe 2 N D C forward + 2 N D C for its weight.
Bytes per step (a floor model for a fully fused schedule, at the variant's activation size s):
  each conv reads its input and writes its output once per pass (forward, dX, dW) at s bytes per
  element; each parameter costs 32 B (fp32 gradient written, Adam reads p, g, m, v, writes p, m, v).

On a machine without a GPU (or --device cpu) the same comparison runs on the CPU at small sizes and
says so: CPU numbers say nothing about GPU speed. The fused kernels run on a CPU only under the
Triton interpreter (very slow), so fused is skipped there unless --fused-cpu; every skipped variant
is recorded with its reason.

Arrays of runs (--array K1,K2,...; issue 14's benchmark): K same-shaped runs (seeds seed .. seed+K-1),
each on its own batch of --batches images (default 64, the paper's), one step of all K runs timed as one
step. images/s counts every run (K x batch / step time); TFLOP/s is K x the FLOPs above; launches are
those of one eager step of all K runs (sequential variants: K x one run's); peak memory holds all K.
  fused_array       ACAITrainer(config, backend="fused", runs=K): acai_fast.trainer.RunArray with the
                    default fused settings (CUDA graphs on a GPU), one launch per layer for all runs
  fused_sequential  K single fused trainers (fused_graph above), stepped one after another
  vmap              VmapACAIStep: torch.func.stack_module_state + vmap over the plain networks
                    (PyTorch's own way), bf16, in one hand-captured CUDA graph (eager where the
                    capture fails; the row's note says so)
  grouped           GroupedACAIStep: HFTA's way, each conv of the K runs one grouped conv (groups=K),
                    bf16 channels_last, in one hand-captured CUDA graph
  plain_sequential  K graph_bf16 steps (a graph each, one shared memory pool), one after another
Both K-run plain steps compute each run's SPEC step (both objectives, Adam over the run's own
parameters, its own alphas): tests/test_bench.py checks one step of each, run by run, against
PlainACAIStep with the same weights and alphas. The table adds speed-ups against plain_sequential
and fused_sequential at the same K; each timed window is cut to about --array-max-seconds. On the
CPU the three plain variants run eagerly and the fused ones are skipped unless --fused-cpu.

    python bench/throughput.py                                   # GPU: lines, mnist256, cifar1024 at 64, 1024
    python bench/throughput.py --quick --json out.json --csv out.csv --plot out.png   # ~2 min on an H100
    python bench/throughput.py --device cpu --presets lines --batches 8 --steps 3 --json out.json
    python bench/throughput.py --array 1,4,16,64 --json arrays.json --csv arrays.csv --plot arrays.png   # GPU
    python bench/throughput.py --array 1,2 --device cpu --batches 2 --steps 2 --json arrays.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

if "--fused-cpu" in sys.argv[1:]:  # the Triton interpreter is chosen when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, stack_module_state, vmap  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import cuda_graph, environment, step_times, summarize, write_csv, write_json  # noqa: E402

from acai_fast import ACAIConfig, ACAITrainer, _ext  # noqa: E402
from acai_fast.config import PRESETS  # noqa: E402
from acai_fast.engine import count_launches  # noqa: E402
from acai_fast.engine.launches import counting_launches  # noqa: E402
from acai_fast.networks import he_modified_std  # noqa: E402
from acai_fast.profiling import GpuSampler  # noqa: E402

VARIANTS = ("eager_fp32", "eager_bf16", "graph_bf16", "compile", "fused", "fused_graph", "reference")
DEFAULT_VARIANTS = VARIANTS[:-1]  # compile runs only with --compile (recorded as skipped otherwise)
PLAIN = ("eager_fp32", "eager_bf16", "graph_bf16", "compile", "reference")  # plain PyTorch
CPU_NOTE = ("CPU numbers: measured on the CPU, at small sizes, to keep the benchmark from rotting; they "
            "say nothing about speed on a GPU")
GPU_DEFAULTS = dict(presets="lines,mnist256,cifar1024", batches="64,1024", steps=100, warmup=10,
                    min_seconds=1.0, first_step="first")
QUICK = dict(presets="lines,cifar1024", batches="64,1024", steps=100, warmup=5, min_seconds=0.3)
CPU_DEFAULTS = dict(presets="lines", batches="8", steps=5, warmup=1, min_seconds=0.0, first_step="none")
ARRAY_VARIANTS = ("fused_array", "fused_sequential", "vmap", "grouped", "plain_sequential")
ARRAY_GPU_DEFAULTS = dict(presets="lines", batches="64", steps=100, warmup=10, min_seconds=1.0, first_step="none",
                          array_max_seconds=3.0)
ARRAY_CPU_DEFAULTS = dict(CPU_DEFAULTS, array_max_seconds=0.0)


# ------------------------------------------------------------------------------------------------
# The networks' layers (SPEC.md section 1), their FLOPs and bytes
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
    """One conv layer: cin -> cout, k x k, running at `size` x `size` (after any 2x upsample of its
    input), with its leaky ReLU, 2x2 average pool of the output, nearest 2x upsample of the input."""

    cin: int
    cout: int
    k: int
    size: int
    act: bool = True
    pool: bool = False
    up: bool = False

    def flops(self, n: int) -> int:
        """2 N H W Cout Cin k^2: one forward, or one input gradient, or one weight gradient."""
        return 2 * n * self.size ** 2 * self.cout * self.cin * self.k ** 2

    def in_elements(self, n: int) -> int:
        return n * self.cin * (self.size // 2 if self.up else self.size) ** 2

    def out_elements(self, n: int) -> int:
        return n * self.cout * (self.size // 2 if self.pool else self.size) ** 2

    @property
    def params(self) -> int:
        return self.cout * self.cin * self.k ** 2 + self.cout


def encoder_layers(colors: int, depth: int, scales: int, latent: int, size: int = 32) -> list[Conv]:
    layers = [Conv(colors, depth, 1, size, act=False)]
    cin = depth
    for s in range(scales):
        layers += [Conv(cin, depth << s, 3, size), Conv(depth << s, depth << s, 3, size, pool=True)]
        cin, size = depth << s, size // 2
    return layers + [Conv(cin, depth << scales, 3, size), Conv(depth << scales, latent, 3, size, act=False)]


def decoder_layers(latent: int, depth: int, scales: int, colors: int, width: int) -> list[Conv]:
    layers, cin, size, up = [], latent, width, False
    for s in range(scales - 1, -1, -1):
        size *= 2 if up else 1
        layers += [Conv(cin, depth << s, 3, size, up=up), Conv(depth << s, depth << s, 3, size)]
        cin, up = depth << s, True
    size *= 2 if up else 1
    return layers + [Conv(cin, depth, 3, size, up=up), Conv(depth, colors, 3, size, act=False)]


def network_layers(config: ACAIConfig) -> dict[str, list[Conv]]:
    c = config
    return dict(encoder=encoder_layers(c.colors, c.depth, c.scales, c.latent, c.image_size),
                decoder=decoder_layers(c.latent, c.depth, c.scales, c.colors, c.latent_width),
                critic=encoder_layers(c.colors, c.critic_depth, c.scales, c.latent, c.image_size))


def step_flops(config: ACAIConfig, batch: int) -> dict[str, int]:
    """FLOPs of one training step (see the module docstring): forward, backward and total."""
    nets, n = network_layers(config), batch

    def total(layers, images, skip_first=False):
        return sum(layer.flops(images) for layer in layers[1 if skip_first else 0:])

    enc, dec, crit = nets["encoder"], nets["decoder"], nets["critic"]
    probe = 2 * n * config.latent_dims * config.nclass
    forward = total(enc, n) + total(dec, 2 * n) + total(crit, 2 * n) + probe
    backward = (total(enc, n) + total(enc, n, skip_first=True)          # encoder: dW, dX
                + 2 * total(dec, 2 * n)                                  # decoder (ae; x_mix): dW, dX
                + total(crit, n)                                         # critic dX, autoencoder objective
                + total(crit, 2 * n) + total(crit, 2 * n, skip_first=True)  # critic objective: dW, dX
                + probe)                                                 # probe dW
    return dict(forward=forward, backward=backward, total=forward + backward)


def step_bytes(config: ACAIConfig, batch: int, act_bytes: int) -> int:
    """Bytes one step must move at least (the floor model of the module docstring)."""
    nets, n = network_layers(config), batch

    def io(layers, images, skip_first=False):
        return sum(layer.in_elements(images) + layer.out_elements(images) for layer in layers[1 if skip_first else 0:])

    enc, dec, crit = nets["encoder"], nets["decoder"], nets["critic"]
    elements = (io(enc, n) + io(dec, 2 * n) + io(crit, 2 * n)                        # forward
                + io(enc, n) + io(enc, n, skip_first=True) + 2 * io(dec, 2 * n)       # ae backward
                + io(crit, n) + io(crit, 2 * n) + io(crit, 2 * n, skip_first=True))   # critic backward
    params = sum(layer.params for layers in nets.values() for layer in layers)
    params += config.latent_dims * config.nclass + config.nclass
    return elements * act_bytes + 32 * params


# ------------------------------------------------------------------------------------------------
# The plain-PyTorch step (the baselines)
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
            c_mix = self.critic(x_mix).float().mean((1, 2, 3))
            c_real = self.critic(ae + cfg.reg * (x - ae)).float().mean((1, 2, 3))
            loss_ae = F.mse_loss(ae.float(), x.float())
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
            logits = self.probe(z.detach().float().flatten(1))
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
    """A hyper-parameter of each run as a (K,) fp32 tensor: None -> `default` for every run."""
    t = torch.full((runs,), float(default)) if value is None else torch.as_tensor(value, dtype=torch.float32)
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
        c_mix = self._net(2, pc, x_mix).float().mean((1, 2, 3))
        c_real = self._net(2, pc, ae + reg * (x - ae)).float().mean((1, 2, 3))
        return z, F.mse_loss(ae.float(), x.float()), c_mix, c_real

    def _probe(self, pp, z):
        return functional_call(self.templates[3], pp, (z,))

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None,
             alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of every run: x (K, N, C, H, W), labels (K, N) or None; losses as (K,) tensors."""
        if alpha is None:
            alpha = draw_alpha(self.runs, x.shape[1], x.device)
        pe, pd, pc, pp = self.params
        z, loss_ae, c_mix, c_real = vmap(self._forward)(pe, pd, pc, x, alpha, self.reg)
        losses, ae_objective, critic_objective = array_losses(loss_ae, c_mix, c_real, alpha, self.advweight)
        grads = torch.autograd.grad(ae_objective, self.ae_params, retain_graph=True)
        grads += torch.autograd.grad(critic_objective, self.critic_params)
        params = self.ae_params + self.critic_params
        if labels is not None:
            logits = vmap(self._probe)(pp, z.detach().float().flatten(2))  # (K, N, classes)
            probe_loss = per_run_cross_entropy(logits, labels)
            grads += torch.autograd.grad(probe_loss.sum(), self.probe_params)
            params = params + self.probe_params
            losses["probe_loss"] = probe_loss
        assign_grads(params, grads)
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}

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
            c_mix = self._per_run(self._chain("critic", crit, x_mix)).float().mean((2, 3, 4)).t()  # (K, N)
            c_real = self._per_run(self._chain("critic", crit, x_real)).float().mean((2, 3, 4)).t()
            loss_ae = (aek.float() - xk.float()).square().mean((0, 2, 3, 4))  # (K,)
        losses, ae_objective, critic_objective = array_losses(loss_ae, c_mix, c_real, alpha, self.advweight)
        grads = torch.autograd.grad(ae_objective, self.ae_params, retain_graph=True)
        grads += torch.autograd.grad(critic_objective, self.critic_params)
        params = self.ae_params + self.critic_params
        if labels is not None:
            zf = self._per_run(z.detach().float()).transpose(0, 1).flatten(2)  # (K, N, latent dims)
            w, b = self.probe_params
            logits = torch.baddbmm(b.unsqueeze(1), zf, w.transpose(1, 2))  # (K, N, classes)
            probe_loss = per_run_cross_entropy(logits, labels)
            grads += torch.autograd.grad(probe_loss.sum(), self.probe_params)
            params = params + self.probe_params
            losses["probe_loss"] = probe_loss
        assign_grads(params, grads)
        self.optimizer.step()
        return {name: v.detach() for name, v in losses.items()}

    def run_parameters(self, k: int) -> list[torch.Tensor]:
        """Run k's parameters in PlainACAIStep's order (ae_params, critic_params, probe_params)."""
        return [p.unflatten(0, (self.runs, -1))[k] for p in self.ae_params + self.critic_params] + \
            [p[k] for p in self.probe_params]


# ------------------------------------------------------------------------------------------------
# Cases and results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    variant: str


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    steps_timed: int | None = None
    images_per_s: float | None = None
    gflop_per_step: float | None = None
    gflop_forward: float | None = None
    gflop_backward: float | None = None
    tflops: float | None = None
    gb_per_step: float | None = None
    gbps: float | None = None
    launches: int | None = None
    launches_detail: str | None = None
    peak_mem_mib: float | None = None
    first_step_s: float | None = None
    first_step_cold_s: float | None = None
    first_step_warm_s: float | None = None
    gpu: dict = dataclasses.field(default_factory=dict)  # NVML summary of the timed window

    def row(self) -> dict:
        d = dict(dataclasses.asdict(self.case))
        d.update({k: v for k, v in dataclasses.asdict(self).items() if k not in ("case", "gpu")})
        d.update(self.gpu)
        return d


@dataclasses.dataclass
class Built:
    """A variant ready to time: fn() runs one step; count() gives the launches of one eager step."""
    fn: object
    count: object = None
    keep: tuple = ()  # objects that must outlive the timing (trainer, graph, step)
    note: str | None = None  # how it ran, where that differs from the variant's description


def why_not(variant: str, device: torch.device, args) -> str | None:
    """The reason `variant` cannot (or will not) run here, or None."""
    if variant == "compile" and not args.compile:
        return "not asked for: pass --compile (slow: ANCHORS measured ~200 s of compiling per case)"
    if device.type != "cuda":
        if variant in ("graph_bf16", "fused_graph"):
            return "CUDA graphs need a CUDA GPU"
        if variant == "fused":
            if not args.fused_cpu:
                return ("the fused kernels run on a CPU only under the Triton interpreter (minutes per "
                        "step at full size); pass --fused-cpu to time that anyway")
            if not (_ext.HAS_TRITON and _ext.INTERPRET):
                return "--fused-cpu needs triton and TRITON_INTERPRET=1 set before acai_fast is imported"
    elif variant.startswith("fused") and not _ext.HAS_TRITON:
        return "triton is not installed"
    return None


def build(case: Case, device: torch.device, x: torch.Tensor, labels: torch.Tensor, args) -> Built:
    """Construct the variant and everything it needs (a CUDA graph is captured here)."""
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    v = case.variant
    if v in ("fused", "fused_graph", "reference"):
        backend = "reference" if v == "reference" else "fused"
        trainer = ACAITrainer(config, backend=backend, device=device, seed=args.seed,
                              cuda_graph=None if v == "fused_graph" else False)
        return Built(lambda: trainer.step(x, labels), lambda: count_launches(trainer, x, labels), (trainer,))
    bf16 = v != "eager_fp32"
    step = PlainACAIStep(config, device, seed=args.seed, bf16=bf16, channels_last=bf16,
                         capturable=v == "graph_bf16")
    xs = x.contiguous(memory_format=step.memory_format)

    def eager():
        return step.step(xs, labels)

    def count():
        with counting_launches() as c:
            eager()
        return c
    if v == "graph_bf16":
        replay = cuda_graph(eager)  # 3 eager steps on a side stream, then the capture
        return Built(replay, count, (step, replay))
    if v == "compile":
        compiled = torch.compile(step.step, mode=args.compile_mode)
        return Built(lambda: compiled(xs, labels), None, (step, compiled))
    return Built(eager, count, (step,))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_data(config: ACAIConfig, batch: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, config.colors, config.image_size, config.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, config.nclass, (batch,), generator=g)
    return x.to(device), labels.to(device)


def measure(make, device: torch.device, args, sampler: GpuSampler | None, max_seconds: float = 0.0) -> dict:
    """Time one variant: build it (make() -> Built) and run its first step (first_step_s), args.warmup
    untimed steps, then the timed window: >= args.steps back-to-back steps, stretched to
    args.min_seconds (at most args.max_steps) and, with max_seconds > 0, cut to about max_seconds
    (never under min(args.steps, 5) steps); then the peak memory and the launches of one eager step."""
    on_gpu = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    built = make()
    built.fn()
    sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.warmup):
        built.fn()
    sync(device)
    per_step = (time.perf_counter() - t1) / max(args.warmup, 1)
    steps = args.steps
    if args.min_seconds > 0 and per_step > 0:
        steps = max(steps, min(math.ceil(args.min_seconds / per_step), args.max_steps))
    if max_seconds > 0 and per_step > 0:
        steps = min(steps, max(math.floor(max_seconds / per_step), min(args.steps, 5)))
    start = sampler.clock() if sampler is not None else None
    times = step_times(built.fn, steps=steps, device=device)
    gpu = sampler.summary(start) if sampler is not None else {}
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if on_gpu else None
    launches = built.count() if built.count is not None else None  # after timing: it trains a step
    sync(device)
    return dict(times=times, first=first, gpu=gpu, peak=peak, launches=launches, note=built.note)


def run_case(case: Case, device: torch.device, args, sampler: GpuSampler | None) -> Result:
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    flops = step_flops(config, case.batch)
    act_bytes = 4 if case.variant in ("eager_fp32", "reference") or device.type != "cuda" else 2
    nbytes = step_bytes(config, case.batch, act_bytes)
    common = dict(gflop_per_step=flops["total"] / 1e9, gflop_forward=flops["forward"] / 1e9,
                  gflop_backward=flops["backward"] / 1e9, gb_per_step=nbytes / 1e9)
    reason = why_not(case.variant, device, args)
    if reason is not None:
        return Result(case, status="skipped", reason=reason, **common)
    x, labels = batch_data(config, case.batch, device, args.seed)
    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        m = measure(lambda: build(case, device, x, labels, args), device, args, sampler)
    except Exception as exc:  # a failing variant is reported; the others still run
        return Result(case, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}", **common)
    finally:
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
    med, p20, p80 = summarize(m["times"])
    launches = m["launches"]
    return Result(case, ms_median=med, ms_p20=p20, ms_p80=p80, steps_timed=len(m["times"]),
                  images_per_s=case.batch / med * 1e3, tflops=flops["total"] / (med * 1e-3) / 1e12,
                  gbps=nbytes / (med * 1e-3) / 1e9, launches=launches.total if launches else None,
                  launches_detail=launches.summary() if launches else None, peak_mem_mib=m["peak"],
                  first_step_s=m["first"], gpu=m["gpu"], **common)


# ------------------------------------------------------------------------------------------------
# First step in fresh processes: cold (empty compile caches) and warm (the same caches again)
# ------------------------------------------------------------------------------------------------


def child_first_step(spec: str, device: torch.device, seed: int) -> int:
    """--child PRESET:BATCH:VARIANT: construct the variant, run one step, print its wall time as JSON."""
    preset, batch, variant = spec.split(":")
    case = Case(preset, int(batch), variant)
    config = ACAIConfig.preset(preset, batch=case.batch)
    x, labels = batch_data(config, case.batch, device, seed)
    args = argparse.Namespace(seed=seed, compile_mode=os.environ.get("ACAI_BENCH_COMPILE_MODE", "max-autotune"))
    sync(device)
    t0 = time.perf_counter()
    built = build(case, device, x, labels, args)
    built.fn()
    sync(device)
    print(json.dumps(dict(first_step_s=time.perf_counter() - t0)))
    return 0


def first_step_cold_warm(case: Case, device: torch.device, args,
                         python: str = sys.executable) -> tuple[float | None, float | None, str | None]:
    """(cold, warm, error): two fresh processes (`python` this script --child ...) sharing one new
    TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR: the first compiles into it, the second finds it full."""
    cache = tempfile.mkdtemp(prefix="acai_bench_cache_")
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), ACAI_BENCH_COMPILE_MODE=args.compile_mode)
    cmd = [python, str(pathlib.Path(__file__).resolve()), "--device", str(device), "--seed", str(args.seed),
           "--child", f"{case.preset}:{case.batch}:{case.variant}"] + (["--fused-cpu"] if args.fused_cpu else [])
    times: list[float] = []
    error = None
    try:
        for _ in range(2):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.first_step_timeout)
            if proc.returncode != 0:
                error = f"child failed: {proc.stderr.strip()[-300:]}"
                break
            times.append(json.loads(proc.stdout.strip().splitlines()[-1])["first_step_s"])
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    times += [None] * (2 - len(times))
    return times[0], times[1], error


# ------------------------------------------------------------------------------------------------
# Speed-ups, the table, the picture
# ------------------------------------------------------------------------------------------------


def speedups(results: list[Result]) -> list[dict]:
    """Flat rows with speedup_vs_eager_fp32, speedup_vs_best_plain and best_plain_variant added."""
    rows = []
    for r in results:
        row = r.row()
        same = [o for o in results if (o.case.preset, o.case.batch) == (r.case.preset, r.case.batch)
                and o.ms_median is not None]
        base = next((o for o in same if o.case.variant == "eager_fp32"), None)
        plain = [o for o in same if o.case.variant in PLAIN]
        best = min(plain, key=lambda o: o.ms_median) if plain else None
        ok = r.ms_median is not None
        row["speedup_vs_eager_fp32"] = base.ms_median / r.ms_median if ok and base else None
        row["speedup_vs_best_plain"] = best.ms_median / r.ms_median if ok and best else None
        row["best_plain_variant"] = best.case.variant if best else None
        rows.append(row)
    return rows


def _f(v, fmt, width):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{fmt}}"


def _x(v):
    return f"{'-':>7}" if v is None else f"{v:6.2f}x"


def format_table(rows: list[dict], device: torch.device) -> str:
    head = (f"{'preset':<10} {'batch':>5} {'variant':<12} {'ms/step':>9} {'p20':>8} {'p80':>8} {'img/s':>9} "
            f"{'TFLOP/s':>8} {'GB/s':>7} {'launch':>6} {'peak MiB':>8} {'1st s':>6} {'cold s':>6} {'warm s':>6} "
            f"{'util%':>5} {'W':>5} {'x fp32':>7} {'x best':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['preset']:<10} {r['batch']:>5} {r['variant']:<12} {r['status']}: {r['reason']}")
            continue
        lines.append(
            f"{r['preset']:<10} {r['batch']:>5} {r['variant']:<12} {r['ms_median']:>9.3f} {r['ms_p20']:>8.3f} "
            f"{r['ms_p80']:>8.3f} {r['images_per_s']:>9.0f} {_f(r['tflops'], '.3f' if r['tflops'] < 1 else '.1f', 8)} "
            f"{r['gbps']:>7.1f} {_f(r['launches'], 'd', 6)} {_f(r['peak_mem_mib'], '.0f', 8)} "
            f"{_f(r['first_step_s'], '.2f', 6)} {_f(r['first_step_cold_s'], '.1f', 6)} "
            f"{_f(r['first_step_warm_s'], '.1f', 6)} {_f(r.get('gpu_util_mean'), '.0f', 5)} "
            f"{_f(r.get('gpu_power_w_mean'), '.0f', 5)} {_x(r['speedup_vs_eager_fp32'])} "
            f"{_x(r['speedup_vs_best_plain'])}")
    lines.append(f"x fp32: speed-up against eager_fp32; x best: against the fastest plain-PyTorch variant "
                 f"({', '.join(PLAIN)}) of the same preset and batch. ms/step: median of the timed steps.")
    if device.type != "cuda":
        lines.append(f"*** {CPU_NOTE} ***")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str) -> None:
    """Grouped bars: ms/step of every variant that ran, per preset and batch (log scale)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    groups = list(dict.fromkeys((r["preset"], r["batch"]) for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(len(variants), 1) / 3), 4.5))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for g, (preset, batch) in enumerate(groups):
            r = next((r for r in ok if (r["preset"], r["batch"], r["variant"]) == (preset, batch, v)), None)
            if r is not None:
                xs.append(g + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["ms_median"])
        bars = ax.bar(xs, ys, width, label=v)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [f"{p}\nbatch {b}" for p, b in groups])
    times = [r["ms_median"] for r in ok]
    log_scale = bool(times) and max(times) / min(times) > 20
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median" + (", log scale)" if log_scale else ")"))
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, ncol=min(len(variants), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Arrays of runs (--array): K same-shaped runs per step, five ways
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArrayCase:
    preset: str
    batch: int  # images per run
    runs: int  # K
    variant: str


@dataclasses.dataclass(frozen=True)
class ArrayResult:
    case: ArrayCase
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    note: str | None = None  # how it ran where that differs from the variant's description
    ms_median: float | None = None  # one step of all K runs
    ms_p20: float | None = None
    ms_p80: float | None = None
    steps_timed: int | None = None
    images_per_s: float | None = None  # of all runs together: K * batch / step time
    gflop_per_step: float | None = None  # K x step_flops
    tflops: float | None = None
    launches: int | None = None  # of one step of all K runs
    launches_detail: str | None = None
    peak_mem_mib: float | None = None
    first_step_s: float | None = None  # construction (graph captures included) and the first step
    gpu: dict = dataclasses.field(default_factory=dict)

    def row(self) -> dict:
        d = dict(dataclasses.asdict(self.case))
        d.update({k: v for k, v in dataclasses.asdict(self).items() if k not in ("case", "gpu")})
        d.update(self.gpu)
        return d


def array_data(config: ACAIConfig, runs: int, batch: int, device: torch.device, seed: int):
    """x (K, N, C, H, W) in [-1, 1] and labels (K, N): each run its own batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(runs, batch, config.colors, config.image_size, config.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, config.nclass, (runs, batch), generator=g)
    return x.to(device), labels.to(device)


def times_runs(count, runs: int):
    """A LaunchCount of one run's step, times K (K identical runs one after another)."""
    def scale(counts):
        return collections.Counter({name: n * runs for name, n in counts.items()})
    return type(count)(scale(count.triton), scale(count.cuda_extension), scale(count.torch_ops))


def why_not_array(variant: str, device: torch.device, args) -> str | None:
    """The reason an array variant cannot (or will not) run here, or None."""
    if variant.startswith("fused"):
        return why_not("fused_graph" if device.type == "cuda" else "fused", device, args)
    return None


def graph_or_eager(make, device: torch.device) -> Built:
    """make() -> (step, eager): eager() runs one step of all runs. On a GPU the step is captured in
    one CUDA graph by hand; where the capture fails, a fresh step runs eagerly and the note says why."""
    step, eager = make()

    def count(eager=eager):
        with counting_launches() as c:
            eager()
        return c
    if device.type != "cuda":
        return Built(eager, count, (step,), "eager: CUDA graphs need a CUDA GPU")
    try:
        replay = cuda_graph(eager)
        return Built(replay, count, (step, replay))
    except Exception as exc:
        torch.cuda.synchronize(device)
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        step, eager = make()  # a failed capture may leave the first step half-updated
        return Built(eager, lambda: count(eager), (step,), f"eager: CUDA-graph capture failed ({reason})")


def build_array(case: ArrayCase, device: torch.device, x: torch.Tensor, labels: torch.Tensor, args) -> Built:
    """Construct an array variant (captures included) on run k = seed args.seed + k, x (K, N, ...)."""
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    runs, v, on_gpu = case.runs, case.variant, device.type == "cuda"
    seeds = [args.seed + k for k in range(runs)]
    if v in ("fused_array", "fused_sequential"):
        from acai_fast.engine.graphs import WARMUP_STEPS
        if v == "fused_array":
            trainers = [ACAITrainer(config, backend="fused", device=device, seed=args.seed, runs=runs)]
            inputs = [(x, labels)]
            count = lambda: count_launches(trainers[0], x, labels)  # noqa: E731
        else:
            trainers = [ACAITrainer(config, backend="fused", device=device, seed=s) for s in seeds]
            inputs = list(zip(x.unbind(), labels.unbind()))
            count = lambda: times_runs(count_launches(trainers[0], *inputs[0]), runs)  # noqa: E731

        def fn():
            for t, (xk, yk) in zip(trainers, inputs):
                t.step(xk, yk)
        if trainers[0].graphs is None:
            return Built(fn, count, tuple(trainers), "eager: CUDA graphs need a CUDA GPU")
        for _ in range(WARMUP_STEPS + 1):  # the trainers' eager warm-up steps and their captures
            fn()
        failed = {f for t in trainers for f in t.graphs.failed.values()}
        return Built(fn, count, tuple(trainers), f"eager: CUDA-graph capture failed ({failed.pop()[:200]})"
                     if failed else None)
    if v == "plain_sequential":  # the single-run graph_bf16 variant, K of them one after another
        steps = [PlainACAIStep(config, device, seed=s, bf16=True, channels_last=True, capturable=on_gpu)
                 for s in seeds]
        xs = [xk.contiguous(memory_format=torch.channels_last) for xk in x.unbind()]
        eagers = [functools.partial(st.step, xk, yk) for st, xk, yk in zip(steps, xs, labels.unbind())]

        def count():
            with counting_launches() as c:
                eagers[0]()
            return times_runs(c, runs)
        if not on_gpu:
            return Built(lambda: [e() for e in eagers], count, tuple(steps), "eager: CUDA graphs need a CUDA GPU")
        pool = torch.cuda.graph_pool_handle()  # replayed in capture order: one pool for all K graphs
        replays = [cuda_graph(e, pool=pool) for e in eagers]
        return Built(lambda: [r() for r in replays], count, (steps, replays))
    cls = dict(vmap=VmapACAIStep, grouped=GroupedACAIStep)[v]

    def make():
        step = cls(config, device, seeds, bf16=True, channels_last=True, capturable=on_gpu)
        xs = step.prepare(x)
        return step, lambda: step.step(xs, labels)
    return graph_or_eager(make, device)


def run_array_case(case: ArrayCase, device: torch.device, args, sampler: GpuSampler | None) -> ArrayResult:
    config = ACAIConfig.preset(case.preset, batch=case.batch)
    flops = case.runs * step_flops(config, case.batch)["total"]
    common = dict(gflop_per_step=flops / 1e9)
    reason = why_not_array(case.variant, device, args)
    if reason is not None:
        return ArrayResult(case, status="skipped", reason=reason, **common)
    x, labels = array_data(config, case.runs, case.batch, device, args.seed)
    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        m = measure(lambda: build_array(case, device, x, labels, args), device, args, sampler,
                    max_seconds=args.array_max_seconds)
    except Exception as exc:  # a failing variant (e.g. out of memory at a large K) is reported
        return ArrayResult(case, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}", **common)
    finally:
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
    med, p20, p80 = summarize(m["times"])
    launches = m["launches"]
    return ArrayResult(case, note=m["note"], ms_median=med, ms_p20=p20, ms_p80=p80, steps_timed=len(m["times"]),
                       images_per_s=case.runs * case.batch / med * 1e3, tflops=flops / (med * 1e-3) / 1e12,
                       launches=launches.total if launches else None,
                       launches_detail=launches.summary() if launches else None, peak_mem_mib=m["peak"],
                       first_step_s=m["first"], gpu=m["gpu"], **common)


def array_speedups(results: list[ArrayResult]) -> list[dict]:
    """Flat rows with speedup_vs_plain_sequential and speedup_vs_fused_sequential (images/s ratios
    within the same preset, batch and K)."""
    rows = []
    for r in results:
        row = r.row()
        key = (r.case.preset, r.case.batch, r.case.runs)
        for base in ("plain_sequential", "fused_sequential"):
            b = next((o for o in results if (o.case.preset, o.case.batch, o.case.runs) == key
                      and o.case.variant == base and o.images_per_s), None)
            row[f"speedup_vs_{base}"] = r.images_per_s / b.images_per_s if b and r.images_per_s else None
        rows.append(row)
    return rows


def format_array_table(rows: list[dict], device: torch.device) -> str:
    head = (f"{'preset':<10} {'batch':>5} {'K':>3} {'variant':<16} {'ms/step':>9} {'p20':>8} {'p80':>8} "
            f"{'img/s':>9} {'TFLOP/s':>8} {'launch':>7} {'peak MiB':>8} {'1st s':>6} {'util%':>5} {'W':>5} "
            f"{'x plain':>7} {'x fused':>7}")
    lines, notes = [head, "-" * len(head)], []
    for r in rows:
        name = f"{r['preset']:<10} {r['batch']:>5} {r['runs']:>3} {r['variant']:<16}"
        if r["status"] != "ok":
            lines.append(f"{name} {r['status']}: {r['reason']}")
            continue
        mark = ""
        if r["note"]:
            if r["note"] not in notes:
                notes.append(r["note"])
            mark = f" [{notes.index(r['note']) + 1}]"
        lines.append(
            f"{name} {r['ms_median']:>9.3f} {r['ms_p20']:>8.3f} {r['ms_p80']:>8.3f} {r['images_per_s']:>9.0f} "
            f"{_f(r['tflops'], '.3f' if r['tflops'] < 1 else '.1f', 8)} {_f(r['launches'], 'd', 7)} "
            f"{_f(r['peak_mem_mib'], '.0f', 8)} {_f(r['first_step_s'], '.2f', 6)} "
            f"{_f(r.get('gpu_util_mean'), '.0f', 5)} {_f(r.get('gpu_power_w_mean'), '.0f', 5)} "
            f"{_x(r['speedup_vs_plain_sequential'])} {_x(r['speedup_vs_fused_sequential'])}{mark}")
    lines.append("K runs of `batch` images each per step; ms/step: median time of one step of all K runs; img/s: "
                 "K x batch / ms; TFLOP/s: K x step_flops / ms; launch: launches of one eager step of all K runs; "
                 "x plain / x fused: images/s against plain_sequential / fused_sequential at the same K.")
    lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    if device.type != "cuda":
        lines.append(f"*** {CPU_NOTE} ***")
    return "\n".join(lines)


def plot_arrays(rows: list[dict], path, title: str) -> None:
    """Grouped bars: images/s of every array variant that ran, per preset, batch and K."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    groups = list(dict.fromkeys((r["preset"], r["batch"], r["runs"]) for r in rows))
    variants = [v for v in ARRAY_VARIANTS if any(r["variant"] == v for r in ok)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * max(len(variants), 1) / 3), 4.5))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for g, group in enumerate(groups):
            r = next((r for r in ok if (r["preset"], r["batch"], r["runs"], r["variant"]) == (*group, v)), None)
            if r is not None:
                xs.append(g + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["images_per_s"])
        bars = ax.bar(xs, ys, width, label=v)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [f"{p}, K={k}\n{b} img/run" for p, b, k in groups])
    rates = [r["images_per_s"] for r in ok]
    log_scale = bool(rates) and max(rates) / min(rates) > 20
    if log_scale:
        ax.set_yscale("log")
    ax.margins(y=0.15)  # room for the bar labels under the legend
    ax.set_ylabel("images/s, all runs together" + (" (log scale)" if log_scale else ""))
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, ncol=min(len(variants), 3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_arrays(args, device: torch.device, env: dict, where: str) -> int:
    """--array: every preset x batch x K x array variant; the table, JSON, CSV and plot."""
    on_gpu = device.type == "cuda"
    cases = [ArrayCase(p, b, k, v) for p in args.presets for b in args.batches for k in args.array
             for v in args.variants]
    sampler = GpuSampler(args.nvml_interval, device=device) if on_gpu else None
    results: list[ArrayResult] = []
    t_start = time.perf_counter()
    with sampler if sampler is not None else contextlib.nullcontext():
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t_start:6.0f} s] {case.preset} batch {case.batch} "
                  f"K={case.runs} {case.variant} ...", file=sys.stderr, flush=True)
            r = run_array_case(case, device, args, sampler)
            results.append(r)
            if r.status == "ok":
                print(f"    {r.ms_median:.3f} ms/step [{r.ms_p20:.3f}, {r.ms_p80:.3f}] over {r.steps_timed} steps, "
                      f"{r.images_per_s:.0f} img/s" + (f" ({r.note})" if r.note else ""), file=sys.stderr, flush=True)
            else:
                print(f"    {r.status}: {r.reason}", file=sys.stderr, flush=True)
    rows = array_speedups(results)
    print(format_array_table(rows, device), flush=True)
    if sampler is not None and not sampler.available:
        print(f"NVML: {sampler.reason}", flush=True)
    payload = dict(device=device.type, note=CPU_NOTE if not on_gpu else None, environment=env,
                   nvml=dict(available=bool(sampler and sampler.available), source=sampler and sampler.source,
                             reason=sampler.reason if sampler else "CPU run"),
                   arguments={k: v for k, v in vars(args).items() if k != "child"},
                   flop_model=__doc__.split("FLOPs per step")[1].split("On a machine")[0].strip(),
                   array_model=__doc__.split("Arrays of runs")[1].split("    python bench")[0].strip(),
                   arrays=rows)
    _write_results(args, payload, rows, env, device, where, on_gpu, plot_arrays,
                   "acai_fast arrays of runs: images/s")
    return 0


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--presets", default=None, help=f"comma-separated, of {','.join(PRESETS)} "
                   f"(default GPU: {GPU_DEFAULTS['presets']}; CPU: {CPU_DEFAULTS['presets']})")
    p.add_argument("--batches", default=None, help=f"default GPU: {GPU_DEFAULTS['batches']} (with --array: "
                   f"{ARRAY_GPU_DEFAULTS['batches']} per run); CPU: {CPU_DEFAULTS['batches']}")
    p.add_argument("--variants", default=None, help=f"subset of {','.join(VARIANTS)} (default "
                   f"{','.join(DEFAULT_VARIANTS)}); with --array, of {','.join(ARRAY_VARIANTS)} (default: all)")
    p.add_argument("--array", default=None, help="comma-separated array sizes K (e.g. 1,4,16,64): time arrays of K "
                   "runs (see 'Arrays of runs' above; default presets lines, batch 64 per run on a GPU) instead of "
                   "the single-run comparison")
    p.add_argument("--array-max-seconds", type=float, default=None,
                   help="with --array: cut each timed window to about this long (default GPU 3, CPU no cut)")
    p.add_argument("--steps", type=int, default=None, help="timed steps at least (default GPU 100, CPU 5)")
    p.add_argument("--min-seconds", type=float, default=None,
                   help="stretch the timed window to this long (NVML samples; default GPU 1.0, CPU 0)")
    p.add_argument("--max-steps", type=int, default=20000, help="cap of the stretched window")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default GPU 10, CPU 1)")
    p.add_argument("--quick", action="store_true", help="lines and cifar1024 at 64 and 1024, short windows (~2 min)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for --compile")
    p.add_argument("--fused-cpu", action="store_true", help="on the CPU, time fused under the Triton interpreter")
    p.add_argument("--first-step", choices=("none", "first", "all"), default=None,
                   help="cold/warm first step in fresh processes: none, first (the default fast trainer at "
                        "the first preset and batch; GPU default) or all cases")
    p.add_argument("--first-step-timeout", type=float, default=300.0)
    p.add_argument("--nvml-interval", type=float, default=0.05, help="NVML sampling interval, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write environment, arguments and results here")
    p.add_argument("--csv", default=None, help="one row per result (environment repeated in each)")
    p.add_argument("--plot", default=None, help="PNG of the step times as bars")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine (use --device cpu)")
    if args.array is not None:
        if args.quick or args.compile:
            p.error("--quick and --compile belong to the single-run benchmark, not to --array")
        try:
            args.array = [int(k) for k in args.array.split(",") if k]
        except ValueError:
            p.error(f"--array: comma-separated integers, got {args.array!r}")
        if not args.array or min(args.array) < 1:
            p.error("--array: array sizes must be >= 1")
        defaults = dict(ARRAY_GPU_DEFAULTS if device.type == "cuda" else ARRAY_CPU_DEFAULTS)
        valid, default_variants = ARRAY_VARIANTS, ARRAY_VARIANTS
    else:
        defaults = dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
        valid, default_variants = VARIANTS, DEFAULT_VARIANTS
    if args.quick and device.type == "cuda":
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in (args.variants or ",".join(default_variants)).split(",") if v]
    if args.compile and "compile" not in args.variants:
        args.variants.append("compile")
    bad = set(args.variants) - set(valid)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; valid{' with --array' if args.array else ''}: {', '.join(valid)}")
    args.presets = [s for s in args.presets.split(",") if s]
    bad = set(args.presets) - set(PRESETS)
    if bad:
        p.error(f"unknown presets {sorted(bad)}; valid: {', '.join(PRESETS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches: comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batches must be >= 1, --steps >= 1, --warmup >= 0")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if args.child:
        return child_first_step(args.child, device, args.seed)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    env = environment()
    cases = [Case(p, b, v) for p in args.presets for b in args.batches for v in args.variants]
    where = f"{env['gpu']} (sm_{env['gpu_capability']})" if on_gpu else \
        f"CPU: {env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads"
    print(f"acai_fast throughput on {where}; torch {env['torch']}, triton {env['triton']}, "
          f"commit {(env['commit'] or '?')[:10]}{' (dirty)' if env['dirty'] else ''}", flush=True)
    if not on_gpu:
        print(f"*** {CPU_NOTE} ***", flush=True)
    if args.array:
        return main_arrays(args, device, env, where)
    fast = "fused_graph" if "fused_graph" in args.variants else ("fused" if "fused" in args.variants else None)
    cold_cases = set()
    if args.first_step == "all":
        cold_cases = set(cases)
    elif args.first_step == "first" and fast is not None:
        cold_cases = {Case(args.presets[0], args.batches[0], fast)}

    sampler = GpuSampler(args.nvml_interval, device=device) if on_gpu else None
    results: list[Result] = []
    t_start = time.perf_counter()
    with sampler if sampler is not None else contextlib.nullcontext():
        for i, case in enumerate(cases):
            elapsed = time.perf_counter() - t_start
            print(f"[{i + 1}/{len(cases)} {elapsed:6.0f} s] {case.preset} batch {case.batch} {case.variant} ...",
                  file=sys.stderr, flush=True)
            r = run_case(case, device, args, sampler)
            if case in cold_cases and r.status == "ok":
                cold, warm, error = first_step_cold_warm(case, device, args)
                r = dataclasses.replace(r, first_step_cold_s=cold, first_step_warm_s=warm,
                                        reason=f"first step cold/warm: {error}" if error else r.reason)
            results.append(r)
            if r.status == "ok":
                print(f"    {r.ms_median:.3f} ms/step [{r.ms_p20:.3f}, {r.ms_p80:.3f}] over {r.steps_timed} steps, "
                      f"{r.images_per_s:.0f} img/s", file=sys.stderr, flush=True)
            else:
                print(f"    {r.status}: {r.reason}", file=sys.stderr, flush=True)
    rows = speedups(results)
    print(format_table(rows, device), flush=True)
    if sampler is not None and not sampler.available:
        print(f"NVML: {sampler.reason}", flush=True)
    payload = dict(device=device.type, note=CPU_NOTE if not on_gpu else None, environment=env,
                   nvml=dict(available=bool(sampler and sampler.available), source=sampler and sampler.source,
                             reason=sampler.reason if sampler else "CPU run"),
                   arguments={k: v for k, v in vars(args).items() if k not in ("child", "array", "array_max_seconds")},
                   flop_model=__doc__.split("FLOPs per step")[1].split("On a machine")[0].strip(),
                   results=rows)
    _write_results(args, payload, rows, env, device, where, on_gpu, plot, "acai_fast step time")
    return 0


def _write_results(args, payload, rows, env, device, where, on_gpu, plotter, title) -> None:
    """--json (the payload), --csv (a row per result with the environment) and --plot."""
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        keep = ("gpu", "torch", "triton", "cuda", "commit", "dirty", "timestamp", "cpu")
        write_csv(args.csv, [dict(row, device=device.type, **{k: env[k] for k in keep}) for row in rows])
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        title = (f"{title}, {where}\ntorch {env['torch']}, {env['timestamp'][:10]}"
                 + ("\nCPU NUMBERS (not a GPU)" if not on_gpu else ""))
        plotter(rows, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
