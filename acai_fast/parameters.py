"""The parameters, gradients and Adam state of K runs of one model, as rows of flat buffers.

Every run's trainable tensors (the model's parameter groups in order, then the linear probe) live
in one fp32 row of P elements: `values` (K, P), `grads` (K, P), Adam's `exp_avg` / `exp_avg_sq`
(K, P), the step counts (K, 2) (networks, probe) and, for bf16 steps, a bf16 copy `lowp` (K, P)
of the weights that Adam refreshes and the conv kernels read. Each parameter is a view into its
segment of the row (conv weights of the fused engine channels_last: Cin contiguous), so:
- each run's nn.Module works as usual (its nn.Parameters *are* those views), for the reference
  step, evaluations and pictures;
- `stacked[name]` is the (K, ...) view of one parameter over all runs, what the kernels' run axis
  reads (run stride P);
- Adam is one launch over the whole (K, P) (acai_fast.ops.adam), and the gradient all-reduce of a
  torchrun job is one collective over `grads` (one extra slot carries a flag).
Segments start at multiples of ALIGN elements (128 B), and rows are ALIGN-padded (padding has zero
gradient and never moves), so every run's segments have the same alignment: run k of an array
and the single run with its seed take bitwise the same Adam steps.

`FlatAdam` is the optimiser over these buffers with torch.optim's face (param_groups, state[p],
step(), state_dict / load_state_dict in torch.optim.Adam's own format): checkpoints written before
the buffers were flat load as they did, and tests written against torch.optim keep working.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .ops.adam import BETAS, EPS, adam_ref, adam_triton

ALIGN = 32  # elements (128 B): segment starts and row length


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclasses.dataclass(frozen=True)
class Segment:
    """Where one parameter lives in a row: offset, shape, and whether it is laid out channels_last."""
    name: str
    offset: int
    shape: tuple
    channels_last: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _view(row_block: torch.Tensor, seg: Segment) -> torch.Tensor:
    """seg's tensor over the leading axes of `row_block` (..., P): (..., *shape), a view."""
    lead = row_block.shape[:-1]
    flat = row_block[..., seg.offset:seg.offset + seg.numel]
    if seg.channels_last:  # (Cout, Cin, k, k) stored as (Cout, k, k, Cin)
        cout, cin, kh, kw = seg.shape
        nd = len(lead)
        v = flat.reshape(*lead, cout, kh, kw, cin)
        return v.permute(*range(nd), nd, nd + 3, nd + 1, nd + 2)
    return flat.reshape(*lead, *seg.shape)


class RunParameters:
    """Flat buffers for the parameters of `models` (one module per run, same structure) and their
    `probes`; rebinds every module's parameters to views of the buffers (initial values kept).

    groups: group name -> parameter names of the model (the model's param_groups, in order); the
    probe's parameters follow under "probe.<name>". conv_channels_last: lay 4-D conv weights out
    with Cin contiguous (the fused engine's layout). lowp_dtype: also keep a copy in this dtype
    (bf16) for the kernels, refreshed by every Adam step and by `refresh_lowp`."""

    def __init__(self, models: list[nn.Module], probes: list[nn.Module], groups: dict[str, list[str]],
                 device, *, conv_channels_last: bool = False, lowp_dtype=None):
        self.runs = len(models)
        self.device = torch.device(device)
        self.groups = groups
        named = [dict(m.named_parameters()) for m in models]
        probe_named = [dict(p.named_parameters()) for p in probes]
        self.net_names = [n for names in groups.values() for n in names]
        self.probe_names = [f"probe.{n}" for n in probe_named[0]]
        self.names = self.net_names + self.probe_names  # the optimiser's parameter order
        segments, offset = [], 0
        for name in self.names:
            p = probe_named[0][name[6:]] if name.startswith("probe.") else named[0][name]
            cl = conv_channels_last and p.dim() == 4 and not name.startswith("probe.")
            segments.append(Segment(name, offset, tuple(p.shape), cl))
            offset = _aligned(offset + p.numel())
        self.size = _aligned(offset)  # P
        self.segments = {s.name: s for s in segments}
        # where the probe's segment starts (the networks' end): Adam leaves [p_nets, P) alone on
        # steps without labels
        self.p_nets = segments[len(self.net_names)].offset if self.probe_names else self.size

        # K*P gradients + K flag slots: a torchrun all-reduce carries each run's "not finite" flag
        # in the same collective as the gradients (acai_fast.distributed.FlatGradientAverage)
        self.grad_storage = torch.zeros(self.runs * self.size + self.runs, device=self.device)
        self.values = torch.zeros(self.runs, self.size, device=self.device)
        self.grads = self.grad_storage[:self.runs * self.size].view(self.runs, self.size)
        self.stacked = {n: _view(self.values, s) for n, s in self.segments.items()}
        self.stacked_grads = {n: _view(self.grads, s) for n, s in self.segments.items()}
        with torch.no_grad():
            for k in range(self.runs):
                for name in self.names:
                    src = probe_named[k][name[6:]] if name.startswith("probe.") else named[k][name]
                    self.stacked[name][k].copy_(src.detach())
        self.params_of_run = []  # per run: name -> the module's nn.Parameter (a view of values)
        for k, (model, probe) in enumerate(zip(models, probes)):
            model.to(self.device)
            probe.to(self.device)
            mods = {**named[k], **{f"probe.{n}": p for n, p in probe_named[k].items()}}
            for name, p in mods.items():
                p.data = self.stacked[name][k]
                p.grad = self.stacked_grads[name][k]
            self.params_of_run.append(mods)
        self.lowp = None
        self.kernel_weights = self.stacked  # what the kernels read: the fp32 values or the copy
        if lowp_dtype is not None and lowp_dtype != torch.float32:
            self.lowp = torch.empty(self.runs, self.size, device=self.device, dtype=lowp_dtype)
            self.kernel_weights = {n: _view(self.lowp, s) for n, s in self.segments.items()}
            self.refresh_lowp()

    def refresh_lowp(self) -> None:
        """Copy the fp32 values into the low-precision copy (after values changed outside Adam)."""
        if self.lowp is not None:
            with torch.no_grad():
                self.lowp.copy_(self.values)

    @contextlib.contextmanager
    def lowp_copy(self, dtype):
        """Within this scope, a `dtype` copy of the weights for the kernels (if there is none): how
        a launch trace on the CPU (acai_fast.engine.launches, dry run) sees the weights a bf16 step
        reads on a GPU. Restores the previous state after."""
        saved = (self.lowp, self.kernel_weights)
        if self.lowp is None or self.lowp.dtype != dtype:
            self.lowp = torch.empty(self.runs, self.size, device=self.device, dtype=dtype)
            self.kernel_weights = {n: _view(self.lowp, s) for n, s in self.segments.items()}
        try:
            yield
        finally:
            self.lowp, self.kernel_weights = saved

    def rebind(self, k: int) -> None:
        """Run k's parameters and their .grad back on their views of `values` / `grads`: code that
        replaced a parameter's .data (a user re-laying out a weight) has its values copied into the
        buffer first, so Adam never updates a tensor the module no longer uses, nor misses one.
        (The reference step calls it every step; the fused engine reads the buffers themselves.)"""
        with torch.no_grad():
            for name, p in self.params_of_run[k].items():
                value = self.stacked[name][k]
                if p.data_ptr() != value.data_ptr() or p.stride() != value.stride():
                    value.copy_(p.detach())
                    p.data = value
                view = self.stacked_grads[name][k]
                if p.grad is not view:
                    p.grad = view


class FlatAdam:
    """Adam (lr per run, betas 0.9/0.999, eps 1e-8) over a RunParameters' buffers.

    `step()` is one update of every run: the Triton kernel on a GPU (or under the interpreter when
    `use_triton`), else PyTorch's fused Adam on the rows (the reference). It reads the gradients
    from the flat buffer; a parameter whose .grad was rebound to another tensor (code written for
    torch.optim) has it copied in first, and the probe takes part only when its .grad is not None.
    `found_inf`: None or a (K,) fp32 device tensor set before step() (nonzero: skip that run).
    torch.optim's face: param_groups (one per learning rate, over run 0's parameters when K == 1,
    else over the runs' parameters of that rate), state[p] (views: step, exp_avg, exp_avg_sq)."""

    def __init__(self, params: RunParameters, lrs: list[float], *, use_triton: bool = False):
        self.params = params
        self.lrs = [float(v) for v in lrs]
        K, P = params.runs, params.size
        dev = params.device
        self.exp_avg = torch.zeros(K, P, device=dev)
        self.exp_avg_sq = torch.zeros(K, P, device=dev)
        self.steps = torch.zeros(K, 2, device=dev)  # fp32 step counts: networks, probe
        self.lr = torch.tensor(self.lrs, dtype=torch.float32, device=dev)
        self.counter = torch.zeros(K, dtype=torch.int32, device=dev)
        self.use_triton = use_triton
        self.found_inf = None
        self._m = {n: _view(self.exp_avg, s) for n, s in params.segments.items()}
        self._v = {n: _view(self.exp_avg_sq, s) for n, s in params.segments.items()}
        by_lr: dict[float, list] = {}
        for k, lr in enumerate(self.lrs):
            by_lr.setdefault(lr, []).extend(params.params_of_run[k].values())
        self.param_groups = [dict(params=ps, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, amsgrad=False,
                                  maximize=False, foreach=None, capturable=False, differentiable=False,
                                  fused=True, decoupled_weight_decay=False) for lr, ps in by_lr.items()]
        self._where = {id(p): (k, name) for k, mods in enumerate(params.params_of_run) for name, p in mods.items()}

    # ------------------------------------------------------------------ torch.optim's face
    @property
    def state(self) -> dict:
        """p -> {"step", "exp_avg", "exp_avg_sq"} (views into the buffers) for every parameter."""
        out = {}
        for k, mods in enumerate(self.params.params_of_run):
            for name, p in mods.items():
                seg = 1 if name.startswith("probe.") else 0
                out[p] = dict(step=self.steps[k, seg], exp_avg=self._m[name][k], exp_avg_sq=self._v[name][k])
        return out

    def _gather_grads(self) -> bool:
        """Copy gradients that code rebound (p.grad = tensor) into the flat buffer; True when the
        probe has gradients (its .grad is not None)."""
        probe = True
        with torch.no_grad():
            for k, mods in enumerate(self.params.params_of_run):
                for name, p in mods.items():
                    view = self.params.stacked_grads[name][k]
                    if p.grad is None:
                        if name.startswith("probe."):
                            probe = False
                        else:
                            view.zero_()
                    elif p.grad is not view:
                        view.copy_(p.grad)
                        p.grad = view
        return probe

    def step(self, probe: bool | None = None) -> None:
        """One Adam update of every run. probe: whether the probe's segment takes part (default:
        whether the probe's .grad is not None)."""
        has_probe = self._gather_grads() if probe is None else probe
        p = self.params
        with torch.no_grad():
            if self.use_triton:
                adam_triton(p.values, p.grads, self.exp_avg, self.exp_avg_sq, self.steps, self.lr,
                            self.counter, p_nets=p.p_nets, probe=has_probe, found_inf=self.found_inf,
                            lowp=p.lowp)
            else:
                adam_ref(p.values, p.grads, self.exp_avg, self.exp_avg_sq, self.steps, self.lrs,
                         p_nets=p.p_nets, probe=has_probe, found_inf=self.found_inf, lowp=p.lowp)

    def zero_grad(self, set_to_none: bool = False) -> None:
        with torch.no_grad():
            self.params.grads.zero_()

    # ------------------------------------------------------------------ checkpoints (per run)
    def run_state_dict(self, k: int) -> dict:
        """Run k's state in torch.optim.Adam's format (parameters numbered in `params.names` order:
        the model's groups, then the probe); a parameter whose segment never stepped has no entry."""
        state = {}
        for i, name in enumerate(self.params.names):
            seg = 1 if name.startswith("probe.") else 0
            if float(self.steps[k, seg]) > 0:
                state[i] = dict(step=self.steps[k, seg].detach().clone(),
                                exp_avg=self._m[name][k].detach().clone(),
                                exp_avg_sq=self._v[name][k].detach().clone())
        group = {key: v for key, v in self.param_groups[0].items() if key != "params"}
        group.update(lr=self.lrs[k], params=list(range(len(self.params.names))))
        return dict(state=state, param_groups=[group])

    def load_run_state_dict(self, k: int, state: dict) -> None:
        """Run k's moments and step counts from torch.optim.Adam's format (any device, any layout).
        Raises ValueError when the state does not fit these parameters."""
        names = self.params.names
        n_saved = sum(len(g["params"]) for g in state["param_groups"])
        if n_saved != len(names):
            raise ValueError(f"optimizer state holds {n_saved} parameters, this model has {len(names)}")
        saved = state["state"]
        with torch.no_grad():
            steps = {0: [], 1: []}
            for i, name in enumerate(names):
                seg = 1 if name.startswith("probe.") else 0
                entry = saved.get(i, saved.get(str(i)))
                if not entry:
                    self._m[name][k].zero_()
                    self._v[name][k].zero_()
                    steps[seg].append(0.0)
                    continue
                self._m[name][k].copy_(entry["exp_avg"])
                self._v[name][k].copy_(entry["exp_avg_sq"])
                steps[seg].append(float(entry["step"]))
            for seg, values in steps.items():
                if values and len(set(values)) > 1:
                    raise ValueError(f"optimizer state: parameters of one segment at different steps {sorted(set(values))}")
                self.steps[k, seg] = values[0] if values else 0.0

    def state_dict(self) -> dict:
        """A single run's state (torch.optim.Adam's format); an array's is per run (run_state_dict)."""
        if self.params.runs != 1:
            raise ValueError("an array's optimizer state is per run: run_state_dict(k)")
        return self.run_state_dict(0)

    def load_state_dict(self, state: dict) -> None:
        if self.params.runs != 1:
            raise ValueError("an array's optimizer state is per run: load_run_state_dict(k, state)")
        self.load_run_state_dict(0, state)
