"""ACAITrainer: one model (ACAI by default, acai_fast.models), its optimisers, the linear probe, the
random streams, the step, and checkpoints.

One step (`ACAITrainer.step`), whatever the backend:
    objectives = model's forward pass on x           (ACAI: SPEC.md section 2)
    each objective's gradient w.r.t. its own parameter group only; one Adam per group
    Adam(probe) on the softmax cross-entropy of a linear probe on the detached latent (with labels)
All updates come from the same forward pass.

Backends: "reference" runs the model's objectives in plain PyTorch autograd, fp32 (the oracle and
the baseline). "fused" runs ACAI's step as an explicit schedule on the fused kernels
(acai_fast.engine.fused_step), bf16 activations with fp32 master weights on a GPU, replayed as one
CUDA graph per batch shape by default (acai_fast.engine.graphs); other models on "fused" run their
objectives through the fused conv blocks. On the CPU "fused" runs only under TRITON_INTERPRET=1, in
fp32 (tests). Training loops live in acai_fast.loop (`fit`).

RunArray (`ACAITrainer(config, runs=K)`, second half of this file): K runs of one model trained
together as one array, stacked parameters, one launch per layer for all runs on the fused backend.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import _ext
from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, package_version, save_checkpoint
from .config import ACAIConfig
from .distributed import local_batch, rank_seed
from .models import Randomness, build_model
from .networks import LinearProbe
from .ops.mix import draw_alpha, make_rng_state, make_rng_states
from .ops.probe_loss import probe_loss
from .profiling import phase

log = logging.getLogger("acai_fast")

BACKENDS = ("auto", "reference", "fused")
# "auto" picks "fused" on a GPU only once the fused step has been checked there against the
# reference (tests -m gpu), timed (bench/throughput.py) and shown to train as well
# (scripts/gpu_check.sh quality); until then the reference is the default everywhere and "fused"
# must be asked for by name.
AUTO_PICKS_FUSED = False
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CHECKPOINT_VERSION = FORMAT_VERSION  # the file format is acai_fast.checkpoint's
INPUT_RANGE_SLACK = 1e-5  # training images must lie in [-1 - slack, 1 + slack] (float rounding)


def _in_layout_of(p: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """g (zeros when None) with p's strides. PyTorch's fused Adam walks a parameter and its gradient
    as flat memory in the parameter's order, so a gradient in another layout (a transposed matmul
    gradient, a channels_last conv gradient of a contiguous weight) would update the wrong elements."""
    if g is None:
        return torch.zeros_like(p)
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


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


def resolve_cuda_graph(cuda_graph, backend: str, device: torch.device) -> bool:
    """None -> on for the fused backend on a GPU, off elsewhere; True needs fused on a GPU."""
    if cuda_graph is None:
        return backend == "fused" and device.type == "cuda"
    if cuda_graph and (backend != "fused" or device.type != "cuda"):
        raise ValueError(f"cuda_graph=True needs backend='fused' on a CUDA device, got backend "
                         f"{backend!r} on {device}")
    return bool(cuda_graph)


def resolve_setup(device, backend: str, dtype, cuda_graph):
    """(device, backend, dtype, cuda_graph) of a trainer from what was asked (None: the defaults)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    backend = resolve_backend(backend, device)
    return device, backend, resolve_dtype(dtype, backend, device), resolve_cuda_graph(cuda_graph, backend, device)


def make_adam(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    """The paper's Adam (betas 0.9/0.999, eps 1e-8): PyTorch's fused implementation (one launch per
    optimiser on a GPU; capturable: its step count on the device, for graphs).

    TF1's AdamOptimizer, used by the paper's code, adds eps to sqrt(v_hat) * sqrt(1 - beta2^t)
    instead of sqrt(v_hat): a difference of 1e-8 in the denominator, negligible beside gradients
    of this size."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=True, capturable=capturable)


class ACAITrainer:
    """Trains one model (ACAI by default) and its linear probe on one device.

    >>> trainer = ACAITrainer(ACAIConfig.preset("lines"), device="cpu", seed=0)
    >>> losses = trainer.step(x, labels)         # x: (N, colors, 32, 32) in [-1, 1]
    >>> trainer.fit("lines", kimg=16, out_dir="runs/lines")

    backend: "auto" | "reference" | "fused" (see the module docstring). dtype: activation dtype of
    the fused step (default bf16 on a GPU). cuda_graph: replay each fused step as one CUDA graph
    (default: on for fused on a GPU; False is for debugging: every step then pays the host cost of
    ~100 launches). model: one of acai_fast.models.MODELS.
    distributed: an acai_fast.distributed.Distributed (one rank of a torchrun job; see there) or
    None. The rank's device is used, config.batch is the global batch, every gradient is averaged
    over the ranks before Adam, and the rank's data and alphas come from rank_seed(seed, rank).
    skip_nonfinite: a step whose losses are not all finite (on any rank) applies no update (Adam is
    gated on the device through its found_inf input: no host sync, graph-safe); the step counts.
    """

    def __new__(cls, *args, runs=None, **kwargs):
        """ACAITrainer(config, ..., runs=K or [{"seed": 0, "advweight": 0.5}, ...]) makes an
        RunArray (below): K runs of the model trained together as one array."""
        if runs is not None and cls is ACAITrainer:
            return RunArray(*args, runs=runs, **kwargs)
        return super().__new__(cls)

    def __init__(self, config: ACAIConfig | None = None, backend: str = "auto", device=None,
                 seed: int = 0, dtype=None, cuda_graph: bool | None = None, model: str = "acai",
                 distributed=None, skip_nonfinite: bool = False, runs: None = None):
        self.config = config if config is not None else ACAIConfig.preset("lines")
        if not isinstance(self.config, ACAIConfig):
            raise ValueError(f"config must be an ACAIConfig, got {type(self.config).__name__}")
        self.distributed = distributed  # acai_fast.distributed.Distributed (a torchrun rank) or None
        self.world_size = 1 if distributed is None else distributed.world_size
        self.rank = 0 if distributed is None else distributed.rank
        if distributed is not None:
            if device is not None and torch.device(device).type != distributed.device.type:
                raise ValueError(f"device {device!r} but this torchrun rank runs on {distributed.device}")
            device = distributed.device
            local_batch(self.config.batch, self.world_size)  # the global batch must split into pairs
        self.device, self.backend, self.dtype, self.cuda_graph = resolve_setup(device, backend, dtype,
                                                                                cuda_graph)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        self.seed = seed

        with torch.random.fork_rng(devices=[]):  # initialise on the CPU: same weights on every device
            torch.manual_seed(self.seed)
            self.model = build_model(model, self.config)
            self.probe = LinearProbe(self.config.latent_dims, self.config.nclass)
        self.model.to(self.device)
        self.probe.to(self.device)
        self.param_groups = self.model.param_groups()
        # One Adam over every group and the probe. Adam is elementwise per parameter, so with one
        # learning rate this is exactly the SPEC's separate optimisers (each parameter's update uses
        # only its own gradient, which only its own objective produced), in 2 launches instead of 6.
        self.optimizer = make_adam([p for params in self.param_groups.values() for p in params]
                                   + list(self.probe.parameters()), self.config.lr, self.device,
                                   self.cuda_graph)
        stream_seed = rank_seed(self.seed, self.rank)  # = seed in one process
        self.generator = torch.Generator(self.device).manual_seed(stream_seed)  # noise other than alpha
        self.alpha_state = make_rng_state(stream_seed, self.device)  # alpha draws (Philox, both backends)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._range_checked = False
        self.nimg = 0  # images trained on
        self.steps = 0
        self._labels_checked = False

        self.engine = None  # the fused schedule (ACAI on "fused"), else the model's autograd step
        if self.backend == "fused":
            if self.model.name == "acai":
                from .engine.fused_step import FusedACAIStep
                self.engine = FusedACAIStep(self.model, dtype=self.dtype, device=self.device,
                                            alpha_states=self.alpha_state.unsqueeze(0),
                                            advweight=self.config.advweight, reg=self.config.reg,
                                            on_layout_change=self.match_optimizer_layouts)
            else:
                self._set_conv_backend("triton")
        self.graphs = None
        if self.cuda_graph:
            from .engine.graphs import StepGraphs
            self.graphs = StepGraphs(self.device, generators=[self.generator])
        self._gradient_average = None  # torchrun: every .grad averaged over the ranks before Adam
        if distributed is not None:
            self._gradient_average = distributed.gradient_average(
                [p for group in self.optimizer.param_groups for p in group["params"]])
        log.info("ACAITrainer: model=%s backend=%s (asked %s), %s activations, on %s%s", self.model.name,
                 self.backend, backend, str(self.dtype).replace("torch.", ""), self.device,
                 ", CUDA graphs" if self.cuda_graph else "")

    # ------------------------------------------------------------------ the networks
    @property
    def encoder(self):
        return self.model.encoder

    @property
    def decoder(self):
        return self.model.decoder

    @property
    def critic(self):
        return self.model.critic

    @property
    def ae_params(self) -> list:
        return self.param_groups["ae"]

    @property
    def critic_params(self) -> list:
        return self.param_groups["critic"]

    def _networks(self):
        return (self.model, self.probe)

    def _set_conv_backend(self, backend: str) -> None:
        for chain in self.model.conv_chains():
            chain.backend = backend

    @contextlib.contextmanager
    def _fp32_inference(self):
        """encode/decode run the reference convs in fp32 whatever the training backend: evaluations
        and pictures are exact and comparable across backends (and cuDNN is quick at inference)."""
        chains = self.model.conv_chains()
        before = [c.backend for c in chains]
        self._set_conv_backend("reference")
        try:
            yield
        finally:
            for chain, backend in zip(chains, before):
                chain.backend = backend

    # ------------------------------------------------------------------ the step
    def draw_alpha(self, n: int) -> torch.Tensor:
        """n mixing coefficients 0.5 - |u - 0.5| from the trainer's Philox stream (advancing it):
        (n, 1, 1, 1), uniform on [0, 0.5]."""
        return draw_alpha(self.alpha_state, n).view(n, 1, 1, 1)

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step on a batch x (N, colors, 32, 32) in [-1, 1] (and labels (N,) int).

        Returns the logged losses as 0-d tensors on the device (float() them to read; they are not
        synchronised, so a loop of steps never waits for the GPU)."""
        x, labels = self._check_batch(x, labels, training=True)
        for net in self._networks():
            net.train()
        if self.graphs is not None:
            key = (tuple(x.shape), labels is not None, self.skip_nonfinite)
            losses = self.graphs.run(key, self._train_step, x, labels)
        else:
            losses = self._train_step(x, labels)
        self.nimg += x.shape[0] * self.world_size  # global images: every rank stepped on as many
        self.steps += 1
        return losses

    def _train_step(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One forward; every objective's gradient w.r.t. its own parameters (and the probe's, on the
        detached latent); then one Adam update of everything."""
        if self.engine is not None:
            with phase("forward_backward"):  # profiler marks (acai_fast.profiling); no cost otherwise
                losses, latent = self.engine.gradients(x)
        else:
            losses, latent = self._autograd_gradients(x)
        if labels is not None:
            with phase("probe"):
                losses.update(self._probe_gradients(latent, labels))
        else:
            for p in self.probe.parameters():
                p.grad = None  # no labels: Adam leaves the probe alone
        self._before_update(losses)
        with phase("optimizer"):
            self.optimizer.step()
            self.model.after_update()
        return losses

    def _before_update(self, losses: dict[str, torch.Tensor]) -> None:
        """Between the gradients and Adam. torchrun: average every gradient over the ranks (one
        all_reduce, acai_fast.distributed). skip_nonfinite: gate the update on every rank's losses
        being finite, through fused Adam's found_inf input (GradScaler's contract: 1 skips the whole
        update and its step count). Neither waits for the GPU."""
        found = None
        if self.skip_nonfinite:
            found = (~torch.isfinite(torch.stack([v.float() for v in losses.values()]))).any().float()
        if self._gradient_average is not None:
            found = self._gradient_average(found)  # summed over the ranks: any rank's non-finite loss
        self.optimizer.found_inf = None if found is None else (found > 0).float()

    def _autograd_gradients(self, x: torch.Tensor):
        """The model's objectives in autograd; each objective's gradient reaches its own group only."""
        with phase("forward"):
            out = self.model.objectives(x, Randomness(self.alpha_state, self.generator))
        groups = list(out.objectives.items())
        with phase("backward"):
            for i, (name, objective) in enumerate(groups):
                params = self.param_groups[name]
                grads = torch.autograd.grad(objective, params, retain_graph=i < len(groups) - 1,
                                            allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = _in_layout_of(p, g)
        return {k: v.detach() for k, v in out.logged.items()}, out.latent.detach()

    def _probe_gradients(self, z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy of the linear probe on the detached latent z; sets its gradients.
        Fused backend: one launch (acai_fast.ops.probe_loss) writing the persistent .grad tensors."""
        if self.backend == "fused":
            weight, bias = self.probe.dense.weight, self.probe.dense.bias
            for p in (weight, bias):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
            out = probe_loss(z, weight, bias, labels, d_weight_out=weight.grad, d_bias_out=bias.grad,
                             backend="auto" if self.device.type == "cuda" else "triton")
            return dict(probe_loss=out.loss, probe_accuracy=out.accuracy)
        logits = self.probe(z.float())
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, list(self.probe.parameters()))
        for p, g in zip(self.probe.parameters(), grads):
            p.grad = _in_layout_of(p, g)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return dict(probe_loss=loss.detach(), probe_accuracy=accuracy.detach())

    def _check_batch(self, x, labels, training: bool = False):
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
        if training:
            self._check_training_images(x)
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

    def _check_training_images(self, x: torch.Tensor) -> None:
        """A training batch holds pairs to mix and values in [-1, 1] (no NaN). The range is checked
        on every batch that is on the CPU (before it moves; one aminmax: measured 37 us for 64
        grey, 114 us for 64 RGB 32x32 images on a loaded 2-core CPU) and on the first batch that is
        already on a GPU (reading it back costs a sync; later NaNs there show up as non-finite
        losses, which fit() reports). The data loaders keep training sets on the device."""
        if x.shape[0] < 2:
            raise ValueError(f"a training batch needs at least 2 images (mixing pairs image i with "
                             f"image N-1-i), got {x.shape[0]}")
        if x.device.type != "cpu" and self._range_checked:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("x holds NaN values; training images must lie in [-1, 1]")
        if lo < -1 - INPUT_RANGE_SLACK or hi > 1 + INPUT_RANGE_SLACK:
            raise ValueError(f"x must lie in [-1, 1] (pixels scaled x * 2/255 - 1), got values in "
                             f"[{lo:.4g}, {hi:.4g}]")
        self._range_checked = True

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Latents of images x (N, colors, 32, 32): -> (N, latent, w, w) on the trainer's device."""
        x, _ = self._check_batch(x, None)
        self.model.eval()
        with self._fp32_inference():
            return torch.cat([self.model.encode(b) for b in x.split(batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images of latents z (N, latent, w, w): -> (N, colors, 32, 32), unclipped."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != self.config.latent_shape:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (N, {', '.join(map(str, self.config.latent_shape))}), got {shape}")
        self.model.eval()
        z = z.to(self.device, torch.float32)
        with self._fp32_inference():
            return torch.cat([self.model.decode(b) for b in z.split(batch_size)])

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

    # ------------------------------------------------------------------ training loop
    def fit(self, data="lines", kimg: float = 16384, **kwargs) -> list[dict]:
        """`acai_fast.loop.fit(self, data, kimg, ...)`: train with evaluations, metrics and
        checkpoints (see there). The one import from a floor above: the trainer's familiar verb."""
        from .loop import fit
        return fit(self, data, kimg, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole training state as plain data (tensors, dicts, lists, numbers, strings: it loads
        with torch.load(weights_only=True)). In a torchrun job it also holds every rank's random
        streams (rank_states), gathered from all ranks: every rank must call it."""
        state = dict(
            version=CHECKPOINT_VERSION, package_version=package_version(), model_name=self.model.name,
            config=self.config.to_dict(), backend=self.backend, seed=self.seed, nimg=self.nimg,
            steps=self.steps, world_size=self.world_size,
            model=self.model.state_dict(), probe=self.probe.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(), generator_device=self.device.type,
            alpha_state=self.alpha_state.cpu(),
        )
        if self.distributed is not None:
            generators = self.distributed.gather_host(self.generator.get_state())
            alphas = self.distributed.gather_host(self.alpha_state)
            state["rank_states"] = [dict(generator=g, alpha_state=a) for g, a in zip(generators, alphas)]
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole training state to `path` atomically (acai_fast.checkpoint: a temporary
        file, fsync, rename; the previous file stays whole until the new one is complete). In a
        torchrun job every rank calls it (it gathers the ranks' random streams); rank 0 writes."""
        state = self.state_dict()
        if self.distributed is None or self.distributed.is_main:
            save_checkpoint(state, path)

    def load_state_dict(self, state: dict) -> None:
        """Restore weights, optimiser states, counters and random streams (any backend's state)."""
        if state.get("model_name") != self.model.name:
            raise ValueError(f"checkpoint holds model {state.get('model_name')!r}, not {self.model.name!r}")
        self.model.load_state_dict(state["model"])
        self.probe.load_state_dict(state["probe"])
        # deepcopy: optimizer.load_state_dict keeps the given tensors (same device and dtype), and
        # an in-memory state (another trainer's) must not be shared
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.match_optimizer_layouts()
        self.nimg, self.steps = state["nimg"], state["steps"]
        generator, alpha_state = self._saved_streams(state)
        if generator is not None and state["generator_device"] == self.device.type:
            self.generator.set_state(generator)
        else:  # generator states do not carry across device types: reseed reproducibly instead
            log.warning("checkpoint from %s (%d process(es)) loaded on %s (%d): noise draws restart "
                        "from this rank's seed + step", state["generator_device"],
                        state.get("world_size", 1), self.device.type, self.world_size)
            self.generator.manual_seed(rank_seed(self.seed, self.rank) + self.steps)
        self.alpha_state.copy_(alpha_state)  # plain integers: carries across devices
        if self.engine is not None:
            self.engine.reload_parameters()

    def _saved_streams(self, state: dict):
        """This rank's saved (generator state or None, alpha state): its own when the checkpoint
        came from a job of as many ranks; rank 0's (= the one-process streams) for rank 0; else the
        rank's alpha stream restarts from rank_seed at the saved position (a new world size)."""
        ranks = state.get("rank_states")
        if ranks is not None and len(ranks) == self.world_size:
            return ranks[self.rank]["generator"], ranks[self.rank]["alpha_state"]
        if self.rank == 0:
            return state["generator"], state["alpha_state"]
        offset = int(state["alpha_state"][1])
        return None, make_rng_state(rank_seed(self.seed, self.rank), "cpu", offset=offset)

    def match_optimizer_layouts(self) -> None:
        """Give Adam's moments their parameter's memory layout. Fused Adam walks a parameter and its
        moments as flat memory, so a moment saved by a trainer whose weights were channels_last (the
        fused engine) would be scrambled on a trainer with contiguous weights, and vice versa."""
        with torch.no_grad():
            for p, state in self.optimizer.state.items():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                        state[k] = torch.empty_like(p).copy_(v)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, backend: str = "auto",
             dtype=None, cuda_graph: bool | None = None, distributed=None,
             skip_nonfinite: bool = False) -> "ACAITrainer":
        """A trainer restored from `path` (weights, optimiser states, counters, random streams).
        Any backend can continue any checkpoint: the weights are fp32 whatever trained them.

        The file is read as data (acai_fast.checkpoint.load_checkpoint, weights_only=True): a
        missing file raises FileNotFoundError; a truncated, foreign, crafted or wrong-version file,
        or one whose contents do not fit, raises CheckpointError (a ValueError) in one line."""
        state = load_checkpoint(path)
        try:
            config = ACAIConfig.from_dict(state["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its config is not valid ({str(exc).splitlines()[0]})") from None
        trainer = cls(config, backend=backend, device=device, seed=state["seed"], dtype=dtype,
                      cuda_graph=cuda_graph, model=state["model_name"], distributed=distributed,
                      skip_nonfinite=skip_nonfinite)
        try:
            trainer.load_state_dict(state)
        except (KeyError, IndexError, TypeError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: its weights or optimiser state do not fit this model "
                                  f"({first[:200]})") from None
        return trainer

# ================================================================================================
# Arrays of runs: RunArray (ACAITrainer(config, runs=K))
#
# Every number in the paper is a mean over re-runs, and choosing lambda (advweight) or gamma (reg)
# means sweeping them; at the paper's batch of 64 one run cannot fill a GPU. An array holds K runs
# of the same shapes: each parameter stacked ([K, ...]), one Philox alpha stream and one noise
# generator per run, per-run advweight, reg and lr, and its own batches (x: (K, N, C, H, W)). On the
# fused backend every kernel has a run axis in its grid, so one launch per layer serves all K runs
# (acai_fast.engine.fused_step); on the reference backend the step is a plain loop over the runs,
# each the model's own autograd objective on its slice of the parameters (the oracle). Run k of an
# array equals the single run ACAITrainer(config_k, seed=seed_k) on the same batches (the same
# initial weights, alphas, updates: tests/test_runs.py); array.run(k) hands it out as that
# ordinary trainer (evaluate, interpolate, save).
# ================================================================================================

RUN_FIELDS = ("seed", "advweight", "reg", "lr")  # what may differ between the runs of one array
LOSS_NAMES = ("loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real")


def run_settings(runs, config: ACAIConfig, seed: int = 0) -> list[dict]:
    """The runs of an array as a list of {seed, advweight, reg, lr} dicts.

    runs: K (seeds seed, seed+1, ..., the config's hyper-parameters) or a list of dicts with any
    of RUN_FIELDS (missing seeds: seed + index; missing hyper-parameters: the config's)."""
    if isinstance(runs, bool) or not isinstance(runs, (int, list, tuple)):
        raise ValueError(f"runs must be a positive int or a list of dicts, got {runs!r}")
    if isinstance(runs, int):
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        runs = [{} for _ in range(runs)]
    if not runs:
        raise ValueError("runs is an empty list")
    settings = []
    for k, r in enumerate(runs):
        if not isinstance(r, dict) or set(r) - set(RUN_FIELDS):
            raise ValueError(f"run {k}: a dict with keys among {RUN_FIELDS}, got {r!r}")
        s = {**dict(seed=seed + k, advweight=config.advweight, reg=config.reg, lr=config.lr), **r}
        if not isinstance(s["seed"], int) or isinstance(s["seed"], bool) or not 0 <= s["seed"] < 2 ** 63:
            raise ValueError(f"run {k}: seed must be an int in [0, 2^63), got {s['seed']!r}")
        for key in ("advweight", "reg", "lr"):
            if not isinstance(s[key], numbers.Real) or isinstance(s[key], bool):
                raise ValueError(f"run {k}: {key} must be a number, got {s[key]!r}")
            s[key] = float(s[key])
        dataclasses.replace(config, **{k: s[k] for k in ("advweight", "reg", "lr")})  # validates
        settings.append(s)
    return settings


class RunArray:
    """K runs of one model trained together on one device (see the module docstring).

    >>> array = ACAITrainer(ACAIConfig.preset("lines"), runs=[{"seed": 0}, {"seed": 1, "advweight": 1.0}])
    >>> losses = array.step(x, labels)      # x (2, 64, 1, 32, 32), labels (2, 64): one batch per run
    >>> losses["loss_ae"]                   # (2,): one value per run
    >>> array.run(1).save("run1.pt")        # run 1 as an ordinary ACAITrainer

    Arguments as ACAITrainer's, plus runs (see run_settings). Attributes: settings (the runs'
    dicts), configs (each run's ACAIConfig), stacked (parameter name -> (K, ...) tensor, the
    probe's under "probe."), alpha_states (K, 3), generators (K), optimizer, nimg (images per run).
    """

    def __init__(self, config: ACAIConfig | None = None, backend: str = "auto", device=None,
                 seed: int = 0, dtype=None, cuda_graph: bool | None = None, model: str = "acai",
                 runs=1):
        self.config = config if config is not None else ACAIConfig.preset("lines")
        if not isinstance(self.config, ACAIConfig):
            raise ValueError(f"config must be an ACAIConfig, got {type(self.config).__name__}")
        self.settings = run_settings(runs, self.config, seed)
        self.runs = len(self.settings)
        self.configs = [dataclasses.replace(self.config, **{k: s[k] for k in ("advweight", "reg", "lr")})
                        for s in self.settings]
        self.device, self.backend, self.dtype, self.cuda_graph = resolve_setup(device, backend, dtype,
                                                                                cuda_graph)
        self.model_name = model

        # Each run's initial weights are exactly those of the single run with its seed.
        # Each run's model, built under its seed: its parameters are the run's initial weights (they
        # move into the stacked tensors below); its buffers (a VQ-VAE's codebook) stay the run's
        # own, and the oracle calls the model on the run's slice of the stacked parameters.
        inits, self.models = [], []
        for s, cfg in zip(self.settings, self.configs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s["seed"])
                m, p = build_model(model, cfg), LinearProbe(cfg.latent_dims, cfg.nclass)
            inits.append({**dict(m.named_parameters()),
                          **{f"probe.{k}": v for k, v in p.named_parameters()}})
            self.models.append(m.to(self.device))
        self.model = self.models[0]  # the structure (and the fused engine's template)
        self.probe = LinearProbe(self.config.latent_dims, self.config.nclass).to(self.device)
        fused_acai = self.backend == "fused" and self.model.name == "acai"
        self.stacked: dict[str, torch.nn.Parameter] = {}
        with torch.no_grad():
            for name in inits[0]:
                t = torch.stack([init[name].detach() for init in inits]).to(self.device)
                if fused_acai and t.dim() == 5:
                    from .engine.fused_step import channels_last_like
                    t = channels_last_like(t)
                param = torch.nn.Parameter(t)
                param.grad = torch.zeros_like(param)
                self.stacked[name] = param
        names_of = {id(p): n for n, p in self.model.named_parameters()}
        self.group_names = {g: [names_of[id(p)] for p in params]
                            for g, params in self.model.param_groups().items()}
        self.optimizer = self._make_optimizer()
        self.alpha_states = make_rng_states([s["seed"] for s in self.settings], self.device)
        self.generators = [torch.Generator(self.device).manual_seed(s["seed"]) for s in self.settings]
        self.nimg = 0  # images per run
        self.steps = 0
        self._labels_checked = False

        self.engine = None
        if self.backend == "fused":
            if not fused_acai:
                raise ValueError(f"an array of runs on the fused backend needs the acai model (its fused "
                                 f"schedule); model {model!r} runs arrays on backend='reference'")
            from .engine.fused_step import FusedACAIStep
            self.engine = FusedACAIStep(
                self.model, dtype=self.dtype, device=self.device, alpha_states=self.alpha_states,
                advweight=self._per_run("advweight"), reg=self._per_run("reg"),
                stacked={k: v for k, v in self.stacked.items() if not k.startswith("probe.")})
        self.graphs = None
        if self.cuda_graph:
            from .engine.graphs import StepGraphs
            self.graphs = StepGraphs(self.device, generators=self.generators)
        log.info("RunArray: %d runs of %s, backend=%s, %s on %s", self.runs, model, self.backend,
                 str(self.dtype).replace("torch.", ""), self.device)

    def _per_run(self, key):
        values = [s[key] for s in self.settings]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _make_optimizer(self):
        """One fused Adam over the stacked parameters when the runs share one learning rate (the
        usual case: 2 launches for the whole array); otherwise one parameter group per learning
        rate over the runs' slices (views of the stacked tensors, their .grad views of the stacked
        gradients: Adam updates the stacked storage in place)."""
        lrs = [s["lr"] for s in self.settings]
        capturable = self.cuda_graph
        if len(set(lrs)) == 1:
            return make_adam(list(self.stacked.values()), lrs[0], self.device, capturable)
        self._run_views = []
        groups = {}
        for k, lr in enumerate(lrs):
            views = []
            for p in self.stacked.values():
                v = p.detach()[k].requires_grad_()
                v.grad = p.grad[k]
                views.append(v)
            self._run_views.append(views)
            groups.setdefault(lr, []).extend(views)
        opt = make_adam([{"params": ps, "lr": lr} for lr, ps in groups.items()], lrs[0], self.device,
                        capturable)
        return opt

    # ------------------------------------------------------------------ the step
    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step of every run: x (K, N, colors, 32, 32) in [-1, 1] (run k's batch in
        x[k]), labels (K, N) or None. Returns the logged losses as (K,) tensors on the device."""
        x, labels = self._check_batch(x, labels)
        if self.graphs is not None:
            losses = self.graphs.run((tuple(x.shape), labels is not None), self._train_step, x, labels)
        else:
            losses = self._train_step(x, labels)
        self.nimg += x.shape[1]
        self.steps += 1
        return losses

    def _train_step(self, x, labels):
        if self.engine is not None:
            losses, z = self.engine.gradients(x)
        else:
            losses, z = self._oracle_gradients(x)
        self._probe_grads_present(labels is not None)
        if labels is not None:
            losses.update(self._probe_gradients(z, labels))
        self.optimizer.step()
        for m in self.models:
            m.after_update()
        return losses

    def _probe_grads_present(self, present: bool) -> None:
        """Without labels the probe has no gradient (None): Adam leaves it alone, as in one run."""
        for i, name in enumerate(self.stacked):
            if not name.startswith("probe."):
                continue
            p = self.stacked[name]
            if not present:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
            for k, views in enumerate(getattr(self, "_run_views", [])):
                views[i].grad = p.grad[k] if present else None

    def _run_params(self, k: int) -> dict[str, torch.Tensor]:
        return {n: p[k] for n, p in self.stacked.items() if not n.startswith("probe.")}

    def _oracle_gradients(self, x):
        """The reference: each run's own objectives in autograd on its slice of the parameters."""
        per_run = []
        zs = []
        for k, m in enumerate(self.models):
            params = self._run_params(k)
            out = functional_call(m, params, (x[k], Randomness(self.alpha_states[k], self.generators[k])))
            groups = list(out.objectives.items())
            for i, (group, objective) in enumerate(groups):
                names = self.group_names[group]
                grads = torch.autograd.grad(objective, [params[n] for n in names],
                                            retain_graph=i < len(groups) - 1, allow_unused=True)
                for n, g in zip(names, grads):
                    self.stacked[n].grad[k].copy_(g if g is not None else torch.zeros_like(params[n]))
            per_run.append({k2: v.detach() for k2, v in out.logged.items()})
            zs.append(out.latent.detach())
        losses = {name: torch.stack([r[name] for r in per_run]) for name in per_run[0]}
        return losses, torch.stack(zs)

    def _probe_gradients(self, z, labels):
        w, b = self.stacked["probe.dense.weight"], self.stacked["probe.dense.bias"]
        if self.backend == "fused":
            out = probe_loss(z, w, b, labels, d_weight_out=w.grad, d_bias_out=b.grad, runs=True,
                             backend="auto" if self.device.type == "cuda" else "triton")
            return dict(probe_loss=out.loss, probe_accuracy=out.accuracy)
        losses, accs = [], []
        for k in range(self.runs):
            params = {"dense.weight": w[k], "dense.bias": b[k]}
            logits = functional_call(self.probe, params, (z[k].float(),))
            loss = F.cross_entropy(logits, labels[k])
            gw, gb = torch.autograd.grad(loss, [params["dense.weight"], params["dense.bias"]])
            w.grad[k].copy_(gw)
            b.grad[k].copy_(gb)
            losses.append(loss.detach())
            accs.append((logits.argmax(1) == labels[k]).float().mean())
        return dict(probe_loss=torch.stack(losses), probe_accuracy=torch.stack(accs))

    def _check_batch(self, x, labels):
        cfg = self.config
        expected = (self.runs, cfg.colors, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or (x.shape[0], *x.shape[2:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x of an array of {self.runs} runs must be ({self.runs}, N, {cfg.colors}, "
                             f"{cfg.image_size}, {cfg.image_size}), got {shape}")
        if x.shape[1] < 2:
            raise ValueError(f"each run needs at least 2 images per batch (mixing pairs them), got {x.shape[1]}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor in [-1, 1], got {x.dtype}")
        x = x.to(self.device, torch.float32)
        if self.engine is not None:  # channels_last per run, the engine's layout (a copy if not)
            x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        if labels is None:
            return x, None
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(x.shape[:2]):
            raise ValueError(f"labels must be ({self.runs}, {x.shape[1]}) class indices, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
        if not self._labels_checked or labels.device.type == "cpu":
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= cfg.nclass:
                raise ValueError(f"labels must lie in [0, {cfg.nclass}), got [{lo}, {hi}]")
            self._labels_checked = True
        return x, labels.to(self.device, torch.long)

    # ------------------------------------------------------------------ runs in and out of the array
    @classmethod
    def from_runs(cls, trainers: list[ACAITrainer], **kwargs) -> "RunArray":
        """An array continuing single-run trainers of one model and shape (e.g. a sweep's runs loaded
        from their checkpoints), each at the same step: weights, Adam moments, streams, counters.
        The inverse of `run(k)`. kwargs: backend, device, dtype, cuda_graph (default: the first's)."""
        if not trainers:
            raise ValueError("from_runs needs at least one trainer")
        first = trainers[0]
        if len({(t.model.name, t.steps, t.nimg) for t in trainers}) > 1 or any(
                dataclasses.replace(t.config, advweight=0.0, reg=0.0, lr=1.0)
                != dataclasses.replace(first.config, advweight=0.0, reg=0.0, lr=1.0) for t in trainers):
            raise ValueError("from_runs: the trainers must share model, shapes and step count")
        opts = dict(backend=first.backend, device=first.device, dtype=first.dtype,
                    cuda_graph=first.cuda_graph)
        opts.update(kwargs)
        runs = [dict(seed=t.seed, advweight=t.config.advweight, reg=t.config.reg, lr=t.config.lr)
                for t in trainers]
        array = cls(first.config, model=first.model.name, runs=runs, **opts)
        with torch.no_grad():
            for k, t in enumerate(trainers):
                named = {**dict(t.model.named_parameters()),
                         **{f"probe.{n}": p for n, p in t.probe.named_parameters()}}
                for name, p in named.items():
                    array.stacked[name][k].copy_(p)
                    src = t.optimizer.state.get(p)
                    if not src:
                        continue
                    dst = array._adam_state(k, name, src)
                    for key, v in src.items():
                        dst[key].copy_(v)
                for (_, b), (_, src) in zip(array.models[k].named_buffers(), t.model.named_buffers()):
                    b.copy_(src)
                array.alpha_states[k].copy_(t.alpha_state.to(array.device))
                if t.device.type == array.device.type:
                    array.generators[k].set_state(t.generator.get_state())
        array.nimg, array.steps = first.nimg, first.steps
        return array

    def _adam_state(self, k: int, name: str, like: dict) -> dict:
        """Run k's Adam state tensors for parameter `name` (views into the stacked moments), created
        (zeros, the step count from `like`) where the optimizer has none yet."""
        p = self.stacked[name]
        key = self._run_views[k][list(self.stacked).index(name)] if hasattr(self, "_run_views") else p
        state = self.optimizer.state[key]
        if not state:
            state["step"] = like["step"].detach().clone().to(self.device)
            for moment in ("exp_avg", "exp_avg_sq"):
                state[moment] = torch.zeros_like(key)
        return {"step": state["step"], **{m: state[m] if key is not p else state[m][k]
                                          for m in ("exp_avg", "exp_avg_sq")}}

    def run(self, k: int) -> ACAITrainer:
        """Run k as an ordinary ACAITrainer (a copy of its state: weights, Adam moments, streams,
        counters), to evaluate, interpolate, save or train on alone."""
        if not isinstance(k, int) or not 0 <= k < self.runs:
            raise ValueError(f"run index must be in [0, {self.runs}), got {k!r}")
        s = self.settings[k]
        single = ACAITrainer(self.configs[k], backend=self.backend, device=self.device, seed=s["seed"],
                             dtype=self.dtype, cuda_graph=self.cuda_graph, model=self.model_name)
        state = single.state_dict()
        with torch.no_grad():
            state["model"] = {**{n: b.detach().clone() for n, b in self.models[k].named_buffers()},
                              **{n: p[k].detach().clone() for n, p in self.stacked.items()
                                 if not n.startswith("probe.")}}
            state["probe"] = {n[len("probe."):]: p[k].detach().clone() for n, p in self.stacked.items()
                              if n.startswith("probe.")}
            state["optimizer"] = self._run_optimizer_state(k, single)
        state.update(nimg=self.nimg, steps=self.steps, generator=self.generators[k].get_state(),
                     alpha_state=self.alpha_states[k].cpu())
        single.load_state_dict(state)
        return single

    def _run_optimizer_state(self, k: int, single: ACAITrainer) -> dict:
        """Run k's Adam state in the single trainer's optimizer layout (parameter order: its groups,
        then the probe)."""
        names_of = {id(p): n for n, p in single.model.named_parameters()}
        names_of.update({id(p): f"probe.{n}" for n, p in single.probe.named_parameters()})
        template = single.optimizer.state_dict()
        order = [names_of[id(p)] for g in single.optimizer.param_groups for p in g["params"]]
        index = {n: i for i, n in enumerate(self.stacked)}
        state = {}
        for i, name in enumerate(order):
            if hasattr(self, "_run_views"):
                src = self.optimizer.state.get(self._run_views[k][index[name]], {})
                sliced = {key: v.detach().clone() for key, v in src.items()}
            else:
                src = self.optimizer.state.get(self.stacked[name], {})
                sliced = {key: (v[k] if key != "step" else v).detach().clone() for key, v in src.items()}
            if sliced:
                state[i] = sliced
        return {"state": state, "param_groups": copy.deepcopy(template["param_groups"])}
