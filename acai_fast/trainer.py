"""ACAITrainer: K >= 1 runs of one model (ACAI by default, acai_fast.models), their linear probes,
one optimiser, the random streams, the step, and checkpoints. A single run is the array of one.

One step (`ACAITrainer.step`), whatever the backend and the number of runs:
    objectives = the model's forward pass on x             (ACAI: docs/what_it_computes.md, the step)
    each objective's gradient w.r.t. its own parameter group only
    the linear probe's cross-entropy on the detached latent (with labels)
    one Adam update of every parameter (acai_fast.ops.adam)
All updates come from the same forward pass.

The two ways a step runs, and the only thing that differs between them: "reference" runs each run's
objectives in plain PyTorch autograd, fp32 (a loop over the runs: the oracle and the baseline);
"fused" runs ACAI's step as an explicit schedule on the fused kernels with a run axis in every
launch (acai_fast.engine.fused_step), bf16 activations with fp32 master weights on a GPU, replayed
as one CUDA graph per batch shape by default (acai_fast.engine.graphs); other models on "fused" run
their objectives through the fused conv blocks. On the CPU "fused" runs only under
TRITON_INTERPRET=1, in fp32 (tests). Every run's parameters, gradients and Adam state are rows of
flat buffers (acai_fast.parameters), so one run and K runs share one layout, one optimiser launch
and one checkpoint format (per run). Training loops live in acai_fast.loop (`fit`).

Arrays of runs: every number in the paper is a mean over re-runs, and choosing lambda (advweight)
or gamma (reg) means sweeping them; at the paper's batch of 64 one run cannot fill a GPU.
`ACAITrainer(config, runs=K or [{"seed": 0, "advweight": 0.5}, ...])` holds K runs of the same
shapes (seeds, advweight, reg, lr may differ), each with its own alpha stream, noise generator and
batches (x: (K, N, C, H, W)); run k equals the single run ACAITrainer(config_k, seed=seed_k) on the
same batches (tests/test_runs.py), and `trainer.run(k)` hands it out as that ordinary trainer.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os

import torch
import torch.nn.functional as F

from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, package_version, save_checkpoint
from .config import ACAIConfig
from .data.common import to_unit_range
from .distributed import local_batch, rank_seed
from .models import Randomness, build_model
from .networks import LinearProbe
from .ops.acai_loss import LOSS_NAMES  # noqa: F401 (kept importable from here)
from .ops.philox import draw_alpha, make_rng_state, make_rng_states
from .ops.probe_loss import counter_size as probe_counter_size
from .ops.probe_loss import probe_loss
from .parameters import FlatAdam, RunParameters
from .options import (AUTO_PICKS_FUSED, BACKENDS, DTYPES, RUN_FIELDS, resolve_backend,  # noqa: F401
                      resolve_cuda_graph, resolve_dtype, resolve_setup, run_settings)
from .profiling import phase

log = logging.getLogger("acai_fast")

CHECKPOINT_VERSION = FORMAT_VERSION  # the file format is acai_fast.checkpoint's
INPUT_RANGE_SLACK = 1e-5  # training images must lie in [-1 - slack, 1 + slack] (float rounding)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class ACAITrainer:
    """Trains K >= 1 runs of one model (ACAI by default) and their linear probes on one device.

    >>> trainer = ACAITrainer(ACAIConfig.preset("lines"), device="cpu", seed=0)
    >>> losses = trainer.step(x, labels)         # x: (N, colors, 32, 32) in [-1, 1]; 0-d losses
    >>> trainer.fit("lines", kimg=16, out_dir="runs/lines")
    >>> array = ACAITrainer(config, runs=[{"seed": 0}, {"seed": 1, "advweight": 1.0}])
    >>> losses = array.step(x, labels)           # x (2, N, ...), labels (2, N): losses (2,)
    >>> array.run(1).save("run1.pt")             # run 1 as an ordinary single-run trainer

    backend: "auto" | "reference" | "fused" (see the module docstring). dtype: activation dtype of
    the fused step (default bf16 on a GPU). cuda_graph: replay each fused step as one CUDA graph
    (default: on for fused on a GPU; False is for debugging: every step then pays the host cost of
    ~100 launches). model: one of acai_fast.models.MODELS. runs: None (one run: inputs without a run
    axis, 0-d losses) or K / a list of run settings (see run_settings: inputs and losses with a
    leading run axis).
    distributed: an acai_fast.distributed.Distributed (one rank of a torchrun job; see there) or
    None. The rank's device is used, config.batch is the global batch, every gradient is averaged
    over the ranks before Adam, and the rank's data and alphas come from rank_seed(seed, rank).
    skip_nonfinite: a run whose losses are not all finite (on any rank) applies no update that step
    (Adam is gated on the device: no host sync, graph-safe); the step counts.
    Attributes: runs, settings (each run's dict), configs (each run's ACAIConfig), models / probes
    (one module per run; their parameters are views of the flat buffers), stacked (parameter name
    -> (K, ...) view over the runs, the probe's under "probe."), alpha_states (K, 3), generators,
    optimizer (acai_fast.parameters.FlatAdam), nimg (images per run), steps. One run also has
    model, probe, encoder/decoder/critic, alpha_state, generator, seed.
    """

    def __new__(cls, *args, runs=None, **kwargs):
        """ACAITrainer(config, runs=...) is an array of runs: an instance of RunArray (the name the
        array had when it was a class of its own; the same trainer)."""
        if runs is not None and cls is ACAITrainer:
            return super().__new__(RunArray)
        return super().__new__(cls)

    def __init__(self, config: ACAIConfig | None = None, backend: str = "auto", device=None,
                 seed: int = 0, dtype=None, cuda_graph: bool | None = None, model: str = "acai",
                 distributed=None, skip_nonfinite: bool = False, runs=None):
        self.config = config if config is not None else ACAIConfig.preset("lines")
        if not isinstance(self.config, ACAIConfig):
            raise ValueError(f"config must be an ACAIConfig, got {type(self.config).__name__}")
        self.is_array = runs is not None
        self.settings = run_settings(runs if self.is_array else [{"seed": seed}], self.config, seed)
        self.runs = len(self.settings)
        self.configs = [dataclasses.replace(self.config, **{k: s[k] for k in ("advweight", "reg", "lr")})
                        for s in self.settings]
        self.seed = self.settings[0]["seed"]
        self.model_name = model
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
        fused_acai = self.backend == "fused" and model == "acai"

        # Each run's model and probe are built under its seed: the single run's initial weights.
        self.models, self.probes = [], []
        for s, cfg in zip(self.settings, self.configs):
            with torch.random.fork_rng(devices=[]):  # initialise on the CPU: same weights on every device
                torch.manual_seed(s["seed"])
                self.models.append(build_model(model, cfg))
                self.probes.append(LinearProbe(cfg.latent_dims, cfg.nclass))
        names_of = {id(p): n for n, p in self.models[0].named_parameters()}
        groups = {g: [names_of[id(p)] for p in ps] for g, ps in self.models[0].param_groups().items()}
        self.parameters = RunParameters(self.models, self.probes, groups, self.device,
                                        conv_channels_last=fused_acai,
                                        lowp_dtype=self.dtype if fused_acai else None)
        self.stacked = self.parameters.stacked
        # One Adam over every group and the probe. Adam is elementwise per parameter, so with one
        # learning rate per run this is exactly the separate optimisers of the paper's code (each
        # parameter's update uses only its own gradient, which only its own objective produced).
        self.optimizer = FlatAdam(self.parameters, [s["lr"] for s in self.settings],
                                  use_triton=self.backend == "fused")
        stream_seeds = [rank_seed(s["seed"], self.rank) for s in self.settings]  # = seeds in one process
        self.alpha_states = make_rng_states(stream_seeds, self.device)  # alpha draws (Philox, both backends)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in stream_seeds]  # other noise
        self.skip_nonfinite = bool(skip_nonfinite)
        self._range_checked = False
        self._labels_checked = False
        self.nimg = 0  # images trained on, per run
        self.steps = 0
        self._probe_counter = None

        self.engine = None  # the fused schedule (ACAI on "fused"), else the models' autograd step
        if fused_acai:
            from .engine.fused_step import FusedACAIStep
            self.engine = FusedACAIStep(self.model, dtype=self.dtype, device=self.device,
                                        alpha_states=self.alpha_states, advweight=self._per_run("advweight"),
                                        reg=self._per_run("reg"), params=self.parameters)
        elif self.backend == "fused":
            self._set_conv_backend("triton")
        self.graphs = None
        if self.cuda_graph:
            from .engine.graphs import StepGraphs
            self.graphs = StepGraphs(self.device, generators=self.generators)
        self._gradient_average = None  # torchrun: every gradient averaged over the ranks before Adam
        if distributed is not None:
            self._gradient_average = distributed.flat_gradient_average(self.parameters.grad_storage,
                                                                       flags=self.runs)
        log.info("ACAITrainer: %s%s, backend=%s (asked %s), %s activations, on %s%s",
                 f"{self.runs} runs of " if self.is_array else "", model, self.backend, backend,
                 str(self.dtype).replace("torch.", ""), self.device, ", CUDA graphs" if self.cuda_graph else "")

    def _per_run(self, key):
        values = [s[key] for s in self.settings]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ one run's networks
    def _single(self, what: str) -> None:
        if self.is_array:
            raise ValueError(f"{what} is per run on an array of {self.runs} runs: use trainer.run(k).{what}")

    @property
    def model(self):
        return self.models[0]

    @property
    def probe(self):
        return self.probes[0]

    @property
    def alpha_state(self) -> torch.Tensor:
        return self.alpha_states[0]

    @property
    def generator(self) -> torch.Generator:
        return self.generators[0]

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
    def param_groups(self) -> dict:
        return self.model.param_groups()

    @property
    def ae_params(self) -> list:
        return self.param_groups["ae"]

    @property
    def critic_params(self) -> list:
        return self.param_groups["critic"]

    def _set_conv_backend(self, backend: str) -> None:
        for m in self.models:
            for chain in m.conv_chains():
                chain.backend = backend

    @contextlib.contextmanager
    def _fp32_inference(self):
        """encode/decode run the reference convs in fp32 whatever the training backend: evaluations
        and pictures are exact and comparable across backends (and cuDNN is quick at inference)."""
        chains = self.model.conv_chains()
        before = [c.backend for c in chains]
        for c in chains:
            c.backend = "reference"
        try:
            yield
        finally:
            for chain, backend in zip(chains, before):
                chain.backend = backend

    # ------------------------------------------------------------------ the step
    def draw_alpha(self, n: int) -> torch.Tensor:
        """n mixing coefficients 0.5 - |u - 0.5| from run 0's Philox stream (advancing it):
        (n, 1, 1, 1), uniform on [0, 0.5]."""
        return draw_alpha(self.alpha_state, n).view(n, 1, 1, 1)

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step of every run on x (N, colors, 32, 32) in [-1, 1] (an array: (K, N, ...),
        run k's batch in x[k]) and labels (N,) ((K, N)) int or None.

        Returns the logged losses on the device: 0-d tensors for one run, (K,) for an array (float()
        them to read; they are not synchronised, so a loop of steps never waits for the GPU)."""
        x, labels = self._check_batch(x, labels, training=True)
        for net in (*self.models, *self.probes):
            net.train()
        if self.graphs is not None:
            key = (tuple(x.shape), labels is not None, self.skip_nonfinite)
            losses = self.graphs.run(key, self._train_step, x, labels)
        else:
            losses = self._train_step(x, labels)
        self.nimg += x.shape[1] * self.world_size  # global images: every rank stepped on as many
        self.steps += 1
        return losses if self.is_array else {k: v[0] for k, v in losses.items()}

    def _train_step(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One forward; every objective's gradient w.r.t. its own parameters (and the probe's, on the
        detached latent); then one Adam update of everything. x (K, N, ...), losses (K,)."""
        if self.engine is not None:
            with phase("forward_backward"):  # profiler marks (acai_fast.profiling); no cost otherwise
                losses, latent = self.engine.gradients(x)
        else:
            losses, latent = self._autograd_gradients(x)
        if labels is not None:
            with phase("probe"):
                losses.update(self._probe_gradients(latent, labels))
        self._before_update(losses)
        with phase("optimizer"):
            self.optimizer.step(probe=labels is not None)  # without labels Adam leaves the probe alone
            for m in self.models:
                m.after_update()
        return losses

    def _autograd_gradients(self, x: torch.Tensor):
        """Each run's objectives in autograd; each objective's gradient reaches its own group only,
        written into the flat gradient buffer (one multi-tensor copy per run)."""
        per_run, latents = [], []
        for k, model in enumerate(self.models):
            with phase("forward"):
                out = model.objectives(x[k], Randomness(self.alpha_states[k], self.generators[k]))
            groups = list(out.objectives.items())
            params = self.parameters.params_of_run[k]
            views, grads = [], []
            with phase("backward"):
                for i, (name, objective) in enumerate(groups):
                    names = self.parameters.groups[name]
                    found = torch.autograd.grad(objective, [params[n] for n in names],
                                                retain_graph=i < len(groups) - 1, allow_unused=True)
                    for n, g in zip(names, found):
                        view = self.parameters.stacked_grads[n][k]
                        if g is None:  # a parameter this objective does not reach: zero gradient
                            view.zero_()
                        else:
                            views.append(view)
                            grads.append(g)
                torch._foreach_copy_(views, grads)  # the multi-tensor op PyTorch's optimisers use
            self.parameters.rebind(k)
            per_run.append({n: v.detach() for n, v in out.logged.items()})
            latents.append(out.latent.detach())
        return {n: torch.stack([r[n] for r in per_run]) for n in per_run[0]}, torch.stack(latents)

    def _probe_gradients(self, z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy of each run's linear probe on its detached latent z[k]; writes the
        probe's gradients. Fused backend: one launch for all runs (acai_fast.ops.probe_loss)."""
        w, b = self.stacked["probe.dense.weight"], self.stacked["probe.dense.bias"]
        dw, db = self.parameters.stacked_grads["probe.dense.weight"], self.parameters.stacked_grads["probe.dense.bias"]
        if self.backend == "fused":
            if self._probe_counter is None:  # the probe's reduction counter, this trainer's own
                self._probe_counter = torch.zeros(probe_counter_size(self.runs), dtype=torch.int32,
                                                  device=self.device)
            out = probe_loss(z, w, b, labels, d_weight_out=dw, d_bias_out=db, runs=True,
                             backend="auto" if self.device.type == "cuda" else "triton",
                             counter=self._probe_counter)
            return dict(probe_loss=out.loss, probe_accuracy=out.accuracy)
        losses, accuracies = [], []
        for k, probe in enumerate(self.probes):
            logits = probe(z[k].float())
            loss = F.cross_entropy(logits, labels[k])
            gw, gb = torch.autograd.grad(loss, [probe.dense.weight, probe.dense.bias])
            dw[k].copy_(gw)
            db[k].copy_(gb)
            losses.append(loss.detach())
            accuracies.append((logits.argmax(1) == labels[k]).float().mean())
        return dict(probe_loss=torch.stack(losses), probe_accuracy=torch.stack(accuracies))

    def _before_update(self, losses: dict[str, torch.Tensor]) -> None:
        """Between the gradients and Adam. torchrun: average every gradient over the ranks (one
        all_reduce of the flat gradient buffer, acai_fast.distributed). skip_nonfinite: gate each
        run's update on its losses being finite on every rank, through Adam's found_inf input
        (GradScaler's contract: nonzero skips the run's whole update and its step count). Neither
        waits for the GPU."""
        found = None
        if self.skip_nonfinite:
            stacked = torch.stack([v.float().reshape(self.runs) for v in losses.values()])
            found = (~torch.isfinite(stacked)).any(0).float()  # (K,)
        if self._gradient_average is not None:
            found = self._gradient_average(found)  # summed over the ranks: any rank's non-finite loss
        self.optimizer.found_inf = None if found is None else (found > 0).float()

    def _check_batch(self, x, labels, training: bool = False):
        """x and labels checked, on the device, with a leading run axis: (K, N, ...) and (K, N)."""
        cfg, K = self.config, self.runs
        image = (cfg.colors, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.is_array:
            if x.dim() != 5 or (x.shape[0], *x.shape[2:]) != (K, *image):
                raise ValueError(f"x of an array of {K} runs must be ({K}, N, {', '.join(map(str, image))}), "
                                 f"got {tuple(x.shape)}")
        elif x.dim() != 4 or tuple(x.shape[1:]) != image:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, image))}), got {tuple(x.shape)}")
        if x.shape[-4] < 1:
            raise ValueError("x must hold at least one image")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor in [-1, 1], got {x.dtype}")
        if training:
            self._check_training_images(x)
        x = x.to(self.device, torch.float32, non_blocking=True)
        x = x if self.is_array else x.unsqueeze(0)
        if self.engine is not None:  # channels_last per run, the engine's layout (free if it already is)
            x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        if labels is None:
            return x, None
        lead = tuple(x.shape[:2]) if self.is_array else (x.shape[1],)
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            what = f"a ({K}, {x.shape[1]}) tensor" if self.is_array else f"a 1-D tensor of {x.shape[1]}"
            raise ValueError(f"labels must be {what} class indices, got {shape}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
        if not self._labels_checked or labels.device.type == "cpu":
            # Checked once on the GPU (it costs a sync); always where it is free.
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= cfg.nclass:
                raise ValueError(f"labels must lie in [0, {cfg.nclass}) (config.nclass), got [{lo}, {hi}]")
            self._labels_checked = True
        labels = labels.to(self.device, torch.long, non_blocking=True)
        return x, labels if self.is_array else labels.unsqueeze(0)

    def _check_training_images(self, x: torch.Tensor) -> None:
        """A training batch holds pairs to mix and values in [-1, 1] (no NaN). The range is checked
        on every batch that is on the CPU (before it moves; one aminmax: measured 37 us for 64
        grey, 114 us for 64 RGB 32x32 images on a loaded 2-core CPU) and on the first batch that is
        already on a GPU (reading it back costs a sync; later NaNs there show up as non-finite
        losses, which fit() reports). The data loaders keep training sets on the device."""
        n = x.shape[-4]
        if n < 2:
            raise ValueError(f"a training batch needs at least 2 images{' per run' if self.is_array else ''} "
                             f"(mixing pairs image i with image N-1-i), got {n}")
        if x.device.type != "cpu" and self._range_checked:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("x holds NaN values; training images must lie in [-1, 1]")
        if lo < -1 - INPUT_RANGE_SLACK or hi > 1 + INPUT_RANGE_SLACK:
            raise ValueError(f"x must lie in [-1, 1] (pixels scaled x * 2/255 - 1), got values in "
                             f"[{lo:.4g}, {hi:.4g}]")
        self._range_checked = True

    # ------------------------------------------------------------------ inference (one run)
    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Latents of images x (N, colors, 32, 32), floats in [-1, 1] or uint8 pixels (scaled as the
        data loaders scale them), on any device: -> (N, latent, w, w) on the trainer's device.
        Moved and scaled `batch_size` images at a time, so a whole dataset can be passed."""
        self._single("encode")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model.eval()
        with self._fp32_inference():
            chunks = [self.model.encode(self._check_batch(to_unit_range(b), None)[0][0])
                      for b in x.split(batch_size)]
        if not chunks:
            raise ValueError("x must hold at least one image")
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images of latents z (N, latent, w, w): -> (N, colors, 32, 32), unclipped."""
        self._single("decode")
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
        checkpoints (see there). The one import from a floor above, made when called: the
        trainer's familiar verb (fit needs a trainer; a trainer does not need fit)."""
        from .loop import fit
        return fit(self, data, kimg, **kwargs)

    # ------------------------------------------------------------------ runs in and out of an array
    def run(self, k: int) -> "ACAITrainer":
        """Run k as an ordinary single-run ACAITrainer (a copy of its state: weights, Adam moments,
        streams, counters), to evaluate, interpolate, save or train on alone."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.runs:
            raise ValueError(f"run index must be in [0, {self.runs}), got {k!r}")
        single = ACAITrainer(self.configs[k], backend=self.backend, device=self.device,
                             seed=self.settings[k]["seed"], dtype=self.dtype, cuda_graph=self.cuda_graph,
                             model=self.model_name)
        single.load_state_dict(self._run_state(k))
        return single

    @classmethod
    def from_runs(cls, trainers: list["ACAITrainer"], **kwargs) -> "ACAITrainer":
        """An array continuing single-run trainers of one model and shape (e.g. a sweep's runs loaded
        from their checkpoints), each at the same step: weights, Adam moments, streams, counters.
        The inverse of `run(k)`. kwargs: backend, device, dtype, cuda_graph (default: the first's)."""
        if not trainers:
            raise ValueError("from_runs needs at least one trainer")
        first = trainers[0]
        if len({(t.model_name, t.steps, t.nimg) for t in trainers}) > 1 or any(
                dataclasses.replace(t.config, advweight=0.0, reg=0.0, lr=1.0)
                != dataclasses.replace(first.config, advweight=0.0, reg=0.0, lr=1.0) for t in trainers):
            raise ValueError("from_runs: the trainers must share model, shapes and step count")
        opts = dict(backend=first.backend, device=first.device, dtype=first.dtype, cuda_graph=first.cuda_graph)
        opts.update(kwargs)
        runs = [dict(seed=t.seed, advweight=t.config.advweight, reg=t.config.reg, lr=t.config.lr)
                for t in trainers]
        array = ACAITrainer(first.config, model=first.model_name, runs=runs, **opts)
        for k, t in enumerate(trainers):
            array._load_run_state(k, t._run_state(0))
        array.nimg, array.steps = first.nimg, first.steps
        return array

    # ------------------------------------------------------------------ checkpoints
    def _run_state(self, k: int) -> dict:
        """Run k's whole training state in the single-run checkpoint format (plain data: it loads
        with torch.load(weights_only=True))."""
        def copied(module):
            return {n: v.detach().clone() for n, v in module.state_dict().items()}

        return dict(
            version=CHECKPOINT_VERSION, package_version=package_version(), model_name=self.model_name,
            config=self.configs[k].to_dict(), backend=self.backend, seed=self.settings[k]["seed"],
            nimg=self.nimg, steps=self.steps, world_size=self.world_size,
            model=copied(self.models[k]), probe=copied(self.probes[k]),
            optimizer=self.optimizer.run_state_dict(k),
            generator=self.generators[k].get_state(), generator_device=self.device.type,
            alpha_state=self.alpha_states[k].cpu(),
        )

    def _load_run_state(self, k: int, state: dict) -> None:
        """Run k's weights, buffers, Adam state and random streams from a single-run state (any
        backend's, any layout)."""
        if state.get("model_name") != self.model_name:
            raise ValueError(f"checkpoint holds model {state.get('model_name')!r}, not {self.model_name!r}")
        self.models[k].load_state_dict(state["model"])  # copies into the flat buffers' views
        self.probes[k].load_state_dict(state["probe"])
        self.optimizer.load_run_state_dict(k, copy.deepcopy(state["optimizer"]))
        self.parameters.refresh_lowp()
        generator, alpha_state = self._saved_streams(state) if k == 0 else (state["generator"], state["alpha_state"])
        if generator is not None and state["generator_device"] == self.device.type:
            self.generators[k].set_state(generator)
        else:  # generator states do not carry across device types: reseed reproducibly instead
            log.warning("checkpoint from %s (%d process(es)) loaded on %s (%d): noise draws restart "
                        "from this rank's seed + step", state["generator_device"],
                        state.get("world_size", 1), self.device.type, self.world_size)
            self.generators[k].manual_seed(rank_seed(self.settings[k]["seed"], self.rank) + state["steps"])
        self.alpha_states[k].copy_(alpha_state)  # plain integers: carries across devices

    def state_dict(self) -> dict:
        """The whole training state of a single run as plain data (tensors, dicts, lists, numbers,
        strings). In a torchrun job it also holds every rank's random streams (rank_states),
        gathered from all ranks: every rank must call it. An array's state is per run (run(k))."""
        self._single("state_dict")
        state = self._run_state(0)
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
        """Restore a single run's weights, optimiser state, counters and random streams (any
        backend's state)."""
        self._single("load_state_dict")
        self._load_run_state(0, state)
        self.nimg, self.steps = state["nimg"], state["steps"]

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
        except (KeyError, IndexError, TypeError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: its weights or optimiser state do not fit this model "
                                  f"({first[:200]})") from None
        return trainer


class RunArray(ACAITrainer):
    """`ACAITrainer(config, runs=K)`: the name of an array of runs (kept: it was a class of its own
    before one trainer served one run and K). RunArray(config, runs=K) is the same trainer."""

    def __init__(self, config: ACAIConfig | None = None, backend: str = "auto", device=None,
                 seed: int = 0, dtype=None, cuda_graph: bool | None = None, model: str = "acai",
                 distributed=None, skip_nonfinite: bool = False, runs=1):
        super().__init__(config, backend=backend, device=device, seed=seed, dtype=dtype,
                         cuda_graph=cuda_graph, model=model, distributed=distributed,
                         skip_nonfinite=skip_nonfinite, runs=runs)
