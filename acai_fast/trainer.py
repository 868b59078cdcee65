"""ACAITrainer: the ACAI training step of SPEC.md section 2, a fit loop with evaluations and
checkpoints, and the encode/decode/interpolate helpers.

One step, top to bottom (`ACAITrainer.step`):
    z = enc(x); ae = dec(z)
    alpha = 0.5 - |u - 0.5|, u ~ U(0, 1)            (per image)
    z_mix = alpha * z + (1 - alpha) * z[N-1-i]       (item i mixed with item N-1-i)
    x_mix = dec(z_mix)
    loss_ae = mean((ae - x)^2); loss_ae_disc = mean(critic(x_mix)^2)
    loss_disc = mean((critic(x_mix) - alpha)^2); loss_disc_real = mean(critic(ae + reg*(x - ae))^2)
    Adam(enc+dec) on loss_ae + advweight * loss_ae_disc; Adam(critic) on loss_disc + loss_disc_real;
    Adam(probe) on the softmax cross-entropy of a linear probe on the detached latent.
All three updates come from the same forward pass.

Backends: "reference" runs that in plain PyTorch, fp32 (the oracle and the baseline). "fused" runs
the same step on the fused ops, side by side with it in `_forward_reference` / `_forward_fused`:
Triton conv blocks (acai_fast.ops.conv_block) on channels_last activations in bf16 (fp32 master
weights, fp32 accumulation), one mix launch with alpha drawn on the device from a Philox state
(acai_fast.ops.mix) and the fused ACAI losses (acai_fast.ops.acai_loss); CUDA kernels where
acai_fast._C is built, their Triton twins otherwise. On the CPU "fused" runs only under
TRITON_INTERPRET=1, in fp32 (tests).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import _ext
from .config import ACAIConfig
from .networks import build_networks
from .ops.acai_loss import acai_critic_loss, acai_image_loss
from .ops.conv_block import frozen_weights, weight_cache
from .ops.mix import make_rng_state, mix

log = logging.getLogger("acai_fast")

BACKENDS = ("auto", "reference", "fused")
# "auto" picks "fused" on a GPU only once the fused step has been checked there against the
# reference (tests/test_trainer_fused.py -m gpu) and timed (bench/throughput.py); until then the
# reference is the default everywhere and "fused" must be asked for by name.
AUTO_PICKS_FUSED = False
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CHECKPOINT_VERSION = 1
GRAPH_WARMUP_STEPS = 3  # eager steps (per batch shape) before a cuda_graph trainer captures its step
LOSS_NAMES = ("loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real", "probe_loss", "probe_accuracy")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `backend` means on `device` ("auto" -> the fastest one verified there)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        fused_ok = AUTO_PICKS_FUSED and device.type == "cuda" and _ext.HAS_TRITON
        return "fused" if fused_ok else "reference"
    if backend == "fused":
        if not _ext.HAS_TRITON:
            raise ValueError("backend 'fused' needs triton (pip install 'acai_fast[triton]'); "
                             "use backend='reference'")
        if device.type != "cuda" and not _ext.INTERPRET:
            raise ValueError(f"backend 'fused' runs on a CUDA GPU, not on {device.type} (on the CPU "
                             f"only under TRITON_INTERPRET=1, slowly, for tests); use backend='reference'")
    return backend


def resolve_dtype(dtype, backend: str, device: torch.device) -> torch.dtype:
    """The activation dtype of the step: fp32 for "reference"; bf16 for "fused" on a GPU (fp32
    under the CPU interpreter, which has no bf16 arithmetic) unless fp32 is asked for."""
    if dtype is None:
        return torch.bfloat16 if backend == "fused" and device.type == "cuda" else torch.float32
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or torch.float32 / torch.bfloat16), "
                         f"got {dtype!r}")
    if resolved == torch.bfloat16 and backend != "fused":
        raise ValueError("dtype bf16 needs backend='fused'; the reference backend computes in fp32")
    if resolved == torch.bfloat16 and device.type != "cuda":
        raise ValueError("dtype bf16 runs on a GPU only (the CPU interpreter has no bf16 arithmetic)")
    return resolved


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t in channels_last: free for the Triton convs' outputs (they already are)."""
    return t.contiguous(memory_format=torch.channels_last)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as the contiguous (N, H, W, C) tensor it is (a view)."""
    return t.permute(0, 2, 3, 1)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _adam(params, config: ACAIConfig, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    # PyTorch's Adam (fused kernels on CUDA; capturable: its step count on the device, for graphs).
    # TF1's AdamOptimizer, used by the paper's code, adds eps to sqrt(v_hat) * sqrt(1 - beta2^t)
    # instead of sqrt(v_hat): a difference of 1e-8 in the denominator, negligible beside gradients
    # of this size.
    return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda", capturable=capturable)


class ACAITrainer:
    """Trains one ACAI model (encoder, decoder, critic and linear probe) on one device.

    >>> trainer = ACAITrainer(ACAIConfig.preset("lines"), device="cpu", seed=0)
    >>> losses = trainer.step(x, labels)         # x: (N, colors, 32, 32) in [-1, 1]
    >>> trainer.fit("lines", kimg=16, out_dir="runs/lines")
    """

    def __init__(self, config: ACAIConfig | None = None, backend: str = "auto", device=None,
                 seed: int = 0, dtype=None, cuda_graph: bool = False):
        self.config = config if config is not None else ACAIConfig.preset("lines")
        if not isinstance(self.config, ACAIConfig):
            raise ValueError(f"config must be an ACAIConfig, got {type(self.config).__name__}")
        self.device = torch.device(device if device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        self.backend = resolve_backend(backend, self.device)
        self.dtype = resolve_dtype(dtype, self.backend, self.device)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and (self.backend != "fused" or self.device.type != "cuda"):
            raise ValueError(f"cuda_graph=True needs backend='fused' on a CUDA device, got backend "
                             f"{self.backend!r} on {self.device}")
        self.seed = int(seed)
        log.info("ACAITrainer: backend=%s (asked %s), %s activations, on %s", self.backend, backend,
                 str(self.dtype).replace("torch.", ""), self.device)

        with torch.random.fork_rng(devices=[]):  # initialise on the CPU: same weights on every device
            torch.manual_seed(self.seed)
            nets = build_networks(self.config)
        self.encoder, self.decoder = nets["encoder"], nets["decoder"]
        self.critic, self.probe = nets["critic"], nets["probe"]
        for net in self._networks():
            net.to(self.device)
        self._set_conv_backend(self.backend)
        self.ae_params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.critic_params = list(self.critic.parameters())
        self.opt_ae = _adam(self.ae_params, self.config, self.device, self.cuda_graph)
        self.opt_critic = _adam(self.critic_params, self.config, self.device, self.cuda_graph)
        self.opt_probe = _adam(self.probe.parameters(), self.config, self.device, self.cuda_graph)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)  # alpha draws (reference)
        self.alpha_state = make_rng_state(self.seed, self.device)  # alpha draws (fused: Philox)
        # The fused ops: the CUDA/Triton choice of acai_fast.ops on a GPU; Triton (interpreted) on the CPU.
        self.op_backend = "auto" if self.device.type == "cuda" else "triton"
        self.nimg = 0  # images trained on
        self.steps = 0
        self._labels_checked = False
        self._graphs: dict = {}  # (batch, with labels) -> (CUDAGraph, static inputs, static losses)
        self._graph_warmups: dict = {}

    def _networks(self):
        return (self.encoder, self.decoder, self.critic, self.probe)

    def _set_conv_backend(self, backend: str) -> None:
        conv = "triton" if backend == "fused" else "reference"
        for net in (self.encoder, self.decoder, self.critic):
            net.backend = conv

    @contextlib.contextmanager
    def _fp32_inference(self):
        """encode/decode run the reference convs in fp32 whatever the training backend: evaluations
        and pictures are exact and comparable across backends (and cuDNN is quick at inference)."""
        nets = (self.encoder, self.decoder, self.critic)
        before = [net.backend for net in nets]
        self._set_conv_backend("reference")
        try:
            yield
        finally:
            for net, backend in zip(nets, before):
                net.backend = backend

    # ------------------------------------------------------------------ the step
    def draw_alpha(self, n: int) -> torch.Tensor:
        """alpha = 0.5 - |u - 0.5|, u ~ U(0, 1): uniform on [0, 0.5], shape (n, 1, 1, 1)."""
        u = torch.rand(n, 1, 1, 1, generator=self.generator, device=self.device)
        return 0.5 - (u - 0.5).abs()

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One ACAI training step on a batch x (N, colors, 32, 32) in [-1, 1] (and labels (N,) int).

        Returns the logged losses as 0-d tensors on the device (float() them to read; they are not
        synchronised, so a loop of steps never waits for the GPU)."""
        x, labels = self._check_batch(x, labels)
        for net in self._networks():
            net.train()
        losses = self._graph_step(x, labels) if self.cuda_graph else self._train_step(x, labels)
        self.nimg += x.shape[0]
        self.steps += 1
        return losses

    def _train_step(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """SPEC section 2: one forward, then both Adam updates (and the probe's) from it."""
        cfg = self.config
        forward = self._forward_fused if self.backend == "fused" else self._forward_reference
        with weight_cache():  # fused: each weight cast to the kernels' layout once per step
            z, (loss_ae, loss_ae_disc, loss_disc, loss_disc_real) = forward(x)
            # Each objective's gradient goes to its own parameters only (the fused convs skip the
            # critic's weight gradients, which the autoencoder's pass would compute and drop).
            with frozen_weights(self.critic_params):
                ae_grads = torch.autograd.grad(loss_ae + cfg.advweight * loss_ae_disc, self.ae_params,
                                               retain_graph=True)
            critic_grads = torch.autograd.grad(loss_disc + loss_disc_real, self.critic_params)
        for params, grads in ((self.ae_params, ae_grads), (self.critic_params, critic_grads)):
            for p, g in zip(params, grads):
                p.grad = g
        self.opt_ae.step()
        self.opt_critic.step()

        losses = dict(loss_ae=loss_ae.detach(), loss_ae_disc=loss_ae_disc.detach(),
                      loss_disc=loss_disc.detach(), loss_disc_real=loss_disc_real.detach())
        if labels is not None:
            losses.update(self._probe_step(z.detach().float(), labels))
        return losses

    def _graph_step(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The step as one CUDA-graph replay (one per batch size, with or without labels).

        The first GRAPH_WARMUP_STEPS steps of each kind run eagerly on a side stream (they are real
        steps: Triton autotuning, the ops' reduction counters and Adam's state are set up outside the
        capture); the next one captures the step on static input buffers, and every step from then on
        copies its batch in and replays. Alpha comes from the device-side Philox state, which the
        graph advances, and the capturable Adams keep their step counts on the device."""
        key = (x.shape[0], labels is not None)
        if key not in self._graphs:
            current = torch.cuda.current_stream(self.device)
            warmups = self._graph_warmups.get(key, 0)
            if warmups < GRAPH_WARMUP_STEPS:
                self._graph_warmups[key] = warmups + 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    losses = self._train_step(x, labels)
                current.wait_stream(side)
                return losses
            static_x = x.clone()
            static_labels = labels.clone() if labels is not None else None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_losses = self._train_step(static_x, static_labels)
            self._graphs[key] = (graph, static_x, static_labels, static_losses)
            log.info("captured the training step of batch %d (labels: %s) in a CUDA graph", *key)
        graph, static_x, static_labels, static_losses = self._graphs[key]
        static_x.copy_(x)
        if labels is not None:
            static_labels.copy_(labels)
        graph.replay()
        # One copy out of the graph's buffers (a stack), not one per loss: the next replay rewrites them.
        return dict(zip(static_losses, torch.stack(list(static_losses.values())).unbind()))

    def _forward_reference(self, x: torch.Tensor):
        """SPEC section 2 in plain PyTorch: -> (z, (loss_ae, loss_ae_disc, loss_disc, loss_disc_real))."""
        cfg = self.config
        z = self.encoder(x)
        ae = self.decoder(z)
        alpha = self.draw_alpha(x.shape[0])
        z_mix = alpha * z + (1 - alpha) * z.flip(0)
        x_mix = self.decoder(z_mix)
        critic_mix = self.critic(x_mix)  # (N,)
        critic_real = self.critic(ae + cfg.reg * (x - ae))

        loss_ae = F.mse_loss(ae, x)
        loss_ae_disc = critic_mix.square().mean()
        loss_disc = (critic_mix - alpha.flatten()).square().mean()
        loss_disc_real = critic_real.square().mean()
        return z, (loss_ae, loss_ae_disc, loss_disc, loss_disc_real)

    def _forward_fused(self, x: torch.Tensor):
        """The same on the fused ops. Activations are channels_last in self.dtype; the mix and loss
        ops see them as the contiguous NHWC tensors they are. The decoder runs once on the 2N
        latents [z; z_mix] (the same arithmetic per image, half the launches, and no sum of two
        weight gradients). x_real is detached: only the critic objective reads critic(x_real), and it
        trains the critic alone (as in the reference, where autograd.grad over the critic's
        parameters never reaches the autoencoder)."""
        cfg, ops, n = self.config, self.op_backend, x.shape[0]
        x = x.contiguous(memory_format=torch.channels_last)  # fp32: the loss target stays exact
        z = _channels_last(self.encoder(x.to(self.dtype)))
        z_mix, alpha = mix(_nhwc(z), state=self.alpha_state, backend=ops)  # alpha (N,) fp32
        ae, x_mix = _channels_last(self.decoder(torch.cat([z, _nchw(z_mix)]))).split(n)
        loss_ae, x_real = acai_image_loss(_nhwc(x), _nhwc(ae), cfg.reg, backend=ops)
        critic_mix = _channels_last(self.critic.forward_map(x_mix))  # (N, latent, w, w): pre-mean
        critic_real = _channels_last(self.critic.forward_map(_nchw(x_real).detach()))
        loss_ae_disc, loss_disc, loss_disc_real = acai_critic_loss(
            _nhwc(critic_mix), _nhwc(critic_real), alpha, backend=ops)
        return z, (loss_ae, loss_ae_disc, loss_disc, loss_disc_real)

    def _probe_step(self, z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.probe(z)
        loss = F.cross_entropy(logits, labels)
        self.opt_probe.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_probe.step()
        accuracy = (logits.argmax(1) == labels).float().mean()
        return dict(probe_loss=loss.detach(), probe_accuracy=accuracy.detach())

    def _check_batch(self, x, labels):
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = (cfg.colors, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError("x must hold at least one image")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor in [-1, 1], got {x.dtype}")
        x = x.to(self.device, torch.float32, non_blocking=True)
        if labels is None:
            return x, None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != x.shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a 1-D tensor of {x.shape[0]} class indices, got {shape}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
        if not self._labels_checked or labels.device.type == "cpu":
            # Checked once on the GPU (it costs a sync); always where it is free.
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= cfg.nclass:
                raise ValueError(f"labels must lie in [0, {cfg.nclass}) (config.nclass), got [{lo}, {hi}]")
            self._labels_checked = True
        return x, labels.to(self.device, torch.long, non_blocking=True)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Latents of images x (N, colors, 32, 32): -> (N, latent, w, w) on the trainer's device."""
        x, _ = self._check_batch(x, None)
        self.encoder.eval()
        with self._fp32_inference():
            return torch.cat([self.encoder(b) for b in x.split(batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images of latents z (N, latent, w, w): -> (N, colors, 32, 32), unclipped."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != self.config.latent_shape:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (N, {', '.join(map(str, self.config.latent_shape))}), got {shape}")
        self.decoder.eval()
        z = z.to(self.device, torch.float32)
        with self._fp32_inference():
            return torch.cat([self.decoder(b) for b in z.split(batch_size)])

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 16) -> torch.Tensor:
        """Decode the linear interpolation of the latents of x_a and x_b (both (N, colors, 32, 32))
        in `steps` steps, ends included: -> (N, steps, colors, 32, 32)."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        if x_a.shape != x_b.shape:
            raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
        z_a, z_b = self.encode(x_a), self.encode(x_b)
        # The paper's order of operations: (z_a * (S-1-t) + z_b * t) / (S-1).
        z = torch.stack([(z_a * (steps - 1 - t) + z_b * t) / (steps - 1) for t in range(steps)], dim=1)
        images = self.decode(z.flatten(0, 1))  # (N*steps, latent, w, w) -> (N*steps, colors, 32, 32)
        return images.view(x_a.shape[0], steps, *images.shape[1:])

    @torch.no_grad()
    def probe_accuracy(self, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
        """Accuracy (in [0, 1]) of the linear probe on images x with integer labels."""
        z = self.encode(x, batch_size)
        self.probe.eval()
        pred = self.probe(z).argmax(1)
        return float((pred == labels.to(pred.device)).float().mean())

    # ------------------------------------------------------------------ training loop
    def fit(self, data="lines", kimg: float = 16384, *, eval_kimg: float | None = 64,
            out_dir: str | os.PathLike | None = None, evaluate: Callable | None = None,
            progress: bool = True, seed: int | None = None,
            preview: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
        """Train until `kimg` thousand (x1024) images have been seen in total (a resumed trainer
        continues from its own count), evaluating every `eval_kimg` and at the end.

        data: "lines" (the built-in generator), an iterable of x or (x, labels) batches, or a tuple
            (images, labels) of tensors, reshuffled every epoch.
        evaluate: trainer -> dict of metrics; default: the lines evaluation for "lines", none else.
        out_dir: if given, each evaluation appends a line to out_dir/metrics.jsonl and writes
            out_dir/checkpoint.pt (atomically) and out_dir/interpolations.png.
        preview: (x_a, x_b) image pairs drawn as rows of interpolations.png (default for "lines":
            16 test pairs).
        Returns the list of evaluation records."""
        from . import lines as lines_mod  # late import: lines imports nothing from here

        total = int(round(kimg * 1024))
        if total <= 0:
            raise ValueError(f"kimg must be > 0, got {kimg}")
        eval_every = int(round(eval_kimg * 1024)) if eval_kimg else None
        if eval_every is not None and eval_every <= 0:
            raise ValueError(f"eval_kimg must be > 0 or None, got {eval_kimg}")
        seed = self.seed if seed is None else seed
        if isinstance(data, str):
            if data != "lines":
                raise ValueError(f"data: the only built-in dataset is 'lines', got {data!r}")
            if self.config.colors != 1 or self.config.image_size != lines_mod.SIZE:
                raise ValueError("the lines data needs colors=1 and 32x32 images (the 'lines' preset)")
            batches = lines_mod.lines_batches(self.config.batch, seed=seed, device=self.device,
                                              start_step=self.steps)
            if evaluate is None:
                evaluate = _lines_evaluation
            if preview is None:
                a, b = lines_mod.eval_pairs(16)
                preview = (lines_mod.draw_lines(a), lines_mod.draw_lines(b))
        elif isinstance(data, tuple):
            batches = tensor_batches(*data, batch=self.config.batch, seed=seed + self.steps)
        elif isinstance(data, Iterable):
            batches = iter(data)
        else:
            raise ValueError(f"data must be 'lines', an iterable of batches or (images, labels), got {type(data).__name__}")
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

        history: list[dict] = []
        sums: dict[str, torch.Tensor] = {}
        interval_steps, interval_images, interval_time = 0, 0, 0.0
        next_eval = (self.nimg // eval_every + 1) * eval_every if eval_every else None
        bar = _progress(total, self.nimg, enabled=progress)
        try:
            while self.nimg < total:
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"data ran out after {self.nimg} images, before kimg={kimg}")
                x, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
                t0 = time.perf_counter()
                losses = self.step(x, labels)
                for k, v in losses.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                interval_steps += 1
                interval_images += x.shape[0]
                if self.device.type == "cuda" and interval_steps % 256 == 0:
                    torch.cuda.synchronize()  # keep the timing honest and the queue short
                interval_time += time.perf_counter() - t0
                bar.update(x.shape[0])
                due = next_eval is not None and self.nimg >= next_eval
                if due or self.nimg >= total:
                    if self.device.type == "cuda":
                        t0 = time.perf_counter()
                        torch.cuda.synchronize()
                        interval_time += time.perf_counter() - t0
                    record = dict(kimg=round(self.nimg / 1024, 3), nimg=self.nimg, step=self.steps,
                                  images_per_s=round(interval_images / max(interval_time, 1e-9), 1))
                    record.update({k: float(v) / interval_steps for k, v in sums.items()})
                    record["rmse"] = math.sqrt(max(record["loss_ae"], 0.0)) * 127.5
                    if evaluate is not None:
                        record.update(evaluate(self))
                    history.append(record)
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss_ae", "mean_distance")
                                     if k in record})
                    if out is not None:
                        self._write_outputs(out, record, preview)
                    sums, interval_steps, interval_images, interval_time = {}, 0, 0, 0.0
                    if next_eval is not None:
                        while next_eval <= self.nimg:
                            next_eval += eval_every
        finally:
            bar.close()
        return history

    def _write_outputs(self, out: Path, record: dict, preview) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json_line(record) + "\n")
        self.save(out / "checkpoint.pt")
        if preview is not None:
            from .plotting import save_interpolation_grid
            save_interpolation_grid(self.interpolate(*preview), out / "interpolations.png")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return dict(
            version=CHECKPOINT_VERSION, config=self.config.to_dict(), backend=self.backend,
            seed=self.seed, nimg=self.nimg, steps=self.steps,
            encoder=self.encoder.state_dict(), decoder=self.decoder.state_dict(),
            critic=self.critic.state_dict(), probe=self.probe.state_dict(),
            opt_ae=self.opt_ae.state_dict(), opt_critic=self.opt_critic.state_dict(),
            opt_probe=self.opt_probe.state_dict(),
            generator=self.generator.get_state(), generator_device=self.device.type,
            alpha_state=self.alpha_state.cpu(),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole training state to `path` atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, backend: str = "auto",
             dtype=None, cuda_graph: bool = False) -> "ACAITrainer":
        """A trainer restored from `path` (weights, optimiser states, counters, alpha generators).
        Any backend can continue any checkpoint: the weights are fp32 whatever trained them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path} is not an acai_fast checkpoint (version {CHECKPOINT_VERSION})")
        trainer = cls(ACAIConfig.from_dict(state["config"]), backend=backend, device=device,
                      seed=state["seed"], dtype=dtype, cuda_graph=cuda_graph)
        for name in ("encoder", "decoder", "critic", "probe"):
            getattr(trainer, name).load_state_dict(state[name])
        for name in ("opt_ae", "opt_critic", "opt_probe"):
            getattr(trainer, name).load_state_dict(state[name])
        trainer.nimg, trainer.steps = state["nimg"], state["steps"]
        if state["generator_device"] == trainer.device.type:
            trainer.generator.set_state(state["generator"])
        else:  # generator states do not carry across device types: reseed reproducibly instead
            log.warning("checkpoint from %s loaded on %s: alpha draws restart from seed %d + step",
                        state["generator_device"], trainer.device.type, trainer.seed)
            trainer.generator.manual_seed(trainer.seed + trainer.steps)
        if "alpha_state" in state:  # a Philox state is plain integers: it carries across devices
            trainer.alpha_state.copy_(state["alpha_state"])
        return trainer


def json_line(record: dict) -> str:
    """One strict-JSON line: NaN (an undefined metric, e.g. smoothness) is written as null."""
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})


def _lines_evaluation(trainer: ACAITrainer) -> dict:
    from .lines import evaluate_lines
    return evaluate_lines(trainer)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int,
                   seed: int = 0):
    """Endless shuffled batches (x, labels) from in-memory tensors; a new permutation every epoch."""
    if images.shape[0] < batch:
        raise ValueError(f"need at least one batch of {batch} images, got {images.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(images.shape[0], generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield images[idx], (labels[idx] if labels is not None else None)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, desc="train")
