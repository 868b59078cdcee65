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
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os

import torch
import torch.nn.functional as F

from . import _ext
from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, package_version, save_checkpoint
from .config import ACAIConfig
from .distributed import local_batch, rank_seed
from .models import Randomness, build_model
from .networks import LinearProbe
from .ops.mix import draw_alpha, make_rng_state
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
        acai_fast.runs.RunArray: K runs of the model trained together as one array."""
        if runs is not None and cls is ACAITrainer:
            from .runs import RunArray
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
        self.device = torch.device(device if device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        self.backend = resolve_backend(backend, self.device)
        self.dtype = resolve_dtype(dtype, self.backend, self.device)
        self.cuda_graph = resolve_cuda_graph(cuda_graph, self.backend, self.device)
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
                    p.grad = g if g is not None else torch.zeros_like(p)
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
            p.grad = g
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
