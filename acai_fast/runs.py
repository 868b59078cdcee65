"""RunArray: K runs of one model trained together, as one array (`ACAITrainer(config, runs=K)`).

Every number in the paper is a mean over re-runs, and choosing lambda (advweight) or gamma (reg)
means sweeping them; at the paper's batch of 64 one run cannot fill a GPU. An array holds K runs
of the same shapes: each parameter stacked ([K, ...]), one Philox alpha stream and one noise
generator per run, per-run advweight, reg and lr, and its own batches (x: (K, N, C, H, W)). On the
fused backend every kernel has a run axis in its grid, so one launch per layer serves all K runs
(acai_fast.engine.fused_step); on the reference backend the step is a plain loop over the runs,
each the model's own autograd objective on its slice of the parameters (the oracle).

Run k of an array equals the single run `ACAITrainer(config_k, seed=seed_k)` on the same batches:
the same initial weights, alphas, updates (tests/test_runs.py). `array.run(k)` hands it out as
that ordinary trainer (evaluate, interpolate, save).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import numbers

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .config import ACAIConfig
from .models import Randomness, build_model
from .networks import LinearProbe
from .ops.mix import make_rng_states
from .ops.probe_loss import probe_loss
from .trainer import ACAITrainer, make_adam, resolve_backend, resolve_cuda_graph, resolve_dtype

log = logging.getLogger("acai_fast")

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
        self.device = torch.device(device if device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        self.backend = resolve_backend(backend, self.device)
        self.dtype = resolve_dtype(dtype, self.backend, self.device)
        self.cuda_graph = resolve_cuda_graph(cuda_graph, self.backend, self.device)
        self.model_name = model

        # Each run's initial weights are exactly those of the single run with its seed.
        inits = []
        for s, cfg in zip(self.settings, self.configs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s["seed"])
                m, p = build_model(model, cfg), LinearProbe(cfg.latent_dims, cfg.nclass)
            inits.append({**dict(m.named_parameters()),
                          **{f"probe.{k}": v for k, v in p.named_parameters()}})
        # The structure: one model per run (its config; the oracle calls it on the run's slice of
        # the stacked parameters), the first one also the fused engine's template.
        self.models = [build_model(model, cfg).to(self.device) for cfg in self.configs]
        self.model = self.models[0]
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
            state["model"] = {n: p[k].detach().clone() for n, p in self.stacked.items() if not n.startswith("probe.")}
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
