"""Counting the kernel launches of a step, on any device (the CPU included), so that a test can pin
the count and a benchmark can print it.

What counts as one launch: one Triton kernel run (compiled or interpreted), one call into the CUDA
extension acai_fast._C, and one PyTorch operator that computes something (aten ops that only make
views, allocate or read metadata are not launches). Work done inside a Triton run (the CPU
interpreter copies tensors with PyTorch ops) is not counted. This is the number a GPU would see
for an eager step, to within PyTorch's own fused kernels (one `_fused_adam_` call is one launch
for up to ~100 tensors); `torch.profiler` on a GPU gives the exact count.

`trace_launches` records each launch in order (kernel, named arguments as meta tensors and scalars,
constexprs, config and grid, the layer it belongs to), and `model_launches` costs a trace on a
modelled GPU (acai_fast.ops.cost), re-resolving every conv launch's config for that GPU: the
`acai-fast profile --model h100` table, on any machine.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _ext
from .fused_step import SIDE_STREAMS

# aten ops that allocate, alias or read metadata without running a kernel.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_local_scalar_dense", "item", "is_nonzero", "equal", "_has_compatible_shallow_copy_type",
    "record_stream", "_unsafe_view", "_record_function_enter_new", "_record_function_exit",
}


@dataclasses.dataclass
class LaunchCount:
    """Launches of one step: total, and per Triton kernel, CUDA-extension function and aten op."""
    triton: dict[str, int]
    cuda_extension: dict[str, int]
    torch_ops: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.cuda_extension.values()) + sum(self.torch_ops.values())

    def summary(self) -> str:
        parts = [f"{self.total} launches: {sum(self.triton.values())} Triton"]
        if self.cuda_extension:
            parts.append(f"{sum(self.cuda_extension.values())} CUDA extension")
        parts.append(f"{sum(self.torch_ops.values())} PyTorch ops "
                     f"({', '.join(f'{k} x{v}' for k, v in sorted(self.torch_ops.items()))})")
        return ", ".join(parts)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts, recorder=None):
        super().__init__()
        self.counts = counts
        self.recorder = recorder
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        counted = not self.paused and not func.is_view and name not in _NO_KERNEL
        if counted:
            self.counts[name] += 1
        out = func(*args, **kwargs)
        if counted and self.recorder is not None:
            self.recorder.torch_op(name, args, kwargs, out)
        return out


class _ExtensionProxy:
    def __init__(self, module, counts, recorder=None):
        self._module, self._counts, self._recorder = module, counts, recorder

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def counted(*args, **kwargs):
            self._counts[name] += 1
            if self._recorder is not None:
                self._recorder.extension(name, args, kwargs)
            return fn(*args, **kwargs)
        return counted


@contextlib.contextmanager
def counting_launches(dry_run: bool = False, *, recorder: "_Recorder | None" = None):
    """Within this scope every launch (see the module docstring) is counted; yields the LaunchCount,
    filled in as launches happen. dry_run: Triton launches are counted but not run (their outputs
    keep whatever was in memory): the count of a full-size step on the CPU, where the interpreter
    would take minutes to run it. Valid because no launch decision of acai_fast depends on values.
    recorder: also record every launch in order (used by `trace_launches`)."""
    count = LaunchCount(collections.Counter(), collections.Counter(), collections.Counter())
    mode = _AtenCounter(count.torch_ops, recorder)
    patched = []
    if _ext.HAS_TRITON:
        from triton.runtime import interpreter, jit
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    count.triton[getattr(self, "__name__", "kernel")] += 1
                    if recorder is not None:
                        recorder.triton(self, args, kwargs)
                if dry_run:
                    return None
                mode.paused += 1
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    mode.paused -= 1

            cls.run = run
            patched.append((cls, original))
    extension = _ext.extension
    _ext.extension = lambda: _ExtensionProxy(extension(), count.cuda_extension, recorder)
    try:
        with mode:
            yield count
    finally:
        _ext.extension = extension
        for cls, original in patched:
            cls.run = original


def count_launches(trainer, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                   dry_run: bool = False) -> LaunchCount:
    """The launches of one eager training step of `trainer` on (x, labels). The step is real (unless
    dry_run, see `counting_launches`: then the parameters take garbage values): the trainer's
    parameters and counters move on. Run one step first so that one-time work (compilation,
    autotuning, optimiser state) is not counted. A trainer that replays CUDA graphs is counted on
    its eager step (the graph replays the same launches)."""
    graphs, trainer.graphs = trainer.graphs, None
    try:
        with counting_launches(dry_run) as count:
            trainer.step(x, labels)
    finally:
        trainer.graphs = graphs
    return count


# ------------------------------------------------------------------------------------------------
# A trace of every launch, and its modelled cost on a GPU
# ------------------------------------------------------------------------------------------------

# Config keys of a Triton launch (the rest of its keyword arguments are the kernel's constexprs).
_CONFIG_KEYS = ("num_warps", "num_stages", "SPLIT_K", "TAPS", "SPLITS", "REDUCE_GROUP")
# The conv_block kernels and the config kind acai_fast.ops.cost / conv_block.choose_config use.
CONV_KERNELS = {"_conv_fwd_kernel": "fwd", "_conv_bwd_dx_kernel": "dx", "_conv_bwd_dw_kernel": "dw"}
# aten ops that run on the CPU only: the trainer's input checks (image range, labels), which on a
# GPU run once per trainer, not per step (tests/test_trainer_fused.py pins the same set).
CPU_ONLY_OPS = ("min", "max", "aminmax", "isnan", "any")


@dataclasses.dataclass
class Launch:
    """One launch of a traced step. source: "triton", "torch" or "cuda_extension"; kernel: the
    Triton kernel's name, the aten op or the extension function; args: Triton: every named argument
    (tensors as meta tensors: shape, strides, dtype) and constexpr; torch/extension: {"inputs":
    [meta tensors], "outputs": [...]}; grid: the Triton grid (3 ints); config: the launch's BLOCK_*,
    num_warps, num_stages (and split keys); layer: the network layer whose parameters it reads or
    writes ("critic.blocks.6"), "probe", or None."""
    source: str
    kernel: str
    args: dict
    grid: tuple | None = None
    config: dict = dataclasses.field(default_factory=dict)
    layer: str | None = None


@dataclasses.dataclass
class LaunchTrace:
    """The launches of one step, in order, and their count (as `count_launches` gives it)."""
    launches: list[Launch]
    count: LaunchCount


def _meta(t):
    if isinstance(t, torch.Tensor):
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
    if isinstance(t, (list, tuple)):
        return type(t)(_meta(v) for v in t)
    return t


def _tensors(values) -> list:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


class _Recorder:
    """Collects Launch records; `names` maps the storage address of each parameter and gradient to
    its layer name."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.launches: list[Launch] = []

    def _layer(self, tensors) -> str | None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                name = self.names.get(t.data_ptr())
                if name is not None:
                    return name
        return None

    def triton(self, fn, args, kwargs) -> None:
        names = list(getattr(fn, "arg_names", []))
        named = dict(zip(names, args))
        named.update({k: v for k, v in kwargs.items() if k not in ("grid", "warmup", "num_warps", "num_stages")})
        config = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in _CONFIG_KEYS}
        grid = kwargs.get("grid")
        if callable(grid):
            grid = grid({**named, **config})
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid)) if grid is not None else None
        name = getattr(fn, "__name__", "kernel")
        keys = {"_conv_fwd_kernel": ("W_ptr",), "_conv_bwd_dx_kernel": ("W_ptr",),
                "_conv_bwd_dw_kernel": ("DW_ptr", "DB_ptr"), "_probe_loss_kernel": ("W_ptr", "DW_ptr")}.get(name, ())
        layer = self._layer(named.get(k) for k in keys)
        self.launches.append(Launch("triton", name, {k: _meta(v) for k, v in named.items()}, grid, config, layer))

    def torch_op(self, name, args, kwargs, out) -> None:
        inputs, outputs = _tensors(list(args) + list(kwargs.values())), _tensors([out])
        lists = [_meta(a) for a in args if isinstance(a, (list, tuple))]  # e.g. fused Adam's tensor lists
        self.launches.append(Launch("torch", name, {"inputs": _meta(inputs), "outputs": _meta(outputs),
                                                    "lists": lists}))

    def extension(self, name, args, kwargs) -> None:
        inputs = _tensors(list(args) + list(kwargs.values()))
        self.launches.append(Launch("cuda_extension", name, {"inputs": _meta(inputs), "outputs": []}))


def parameter_names(trainer) -> dict[int, str]:
    """{storage address: layer name} of every parameter and gradient of a trainer (one run: the
    model's and the probe's parameters; an array: its stacked tensors), layer names without the
    trailing .weight / .bias ("encoder.blocks.0", "probe.dense")."""
    items = []
    params = getattr(trainer, "parameters", None)  # acai_fast.parameters.RunParameters
    stacked = getattr(trainer, "stacked", None)
    if params is not None and hasattr(params, "stacked_grads"):
        for group in (params.stacked, params.stacked_grads, params.kernel_weights):
            items += list(group.items())
    elif isinstance(stacked, dict):
        items += list(stacked.items())
    else:
        model = getattr(trainer, "model", None)
        if model is not None:
            items += list(model.named_parameters())
        probe = getattr(trainer, "probe", None)
        if probe is not None:
            items += [(f"probe.{n}", p) for n, p in probe.named_parameters()]
    names = {}
    for name, p in items:
        layer = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        for t in (p, p.grad):
            if isinstance(t, torch.Tensor) and t.numel():
                names.setdefault(t.data_ptr(), layer)
    return names


def trace_launches(trainer, x: torch.Tensor, labels: torch.Tensor | None = None, *, dry_run: bool = True,
                   dtype: torch.dtype | None = None, warmup: int = 1) -> LaunchTrace:
    """Every launch of one eager training step of `trainer` on (x, labels), in order (see Launch).

    dry_run: Triton launches are recorded but not run (see `counting_launches`): a full-size step
    traced on the CPU in seconds. dtype: trace the fused step with this activation dtype (e.g.
    torch.bfloat16, what a GPU runs) although the CPU cannot compute in it; needs dry_run and a
    trainer with a fused engine (its `engine.dtype` is set for the traced steps and restored).
    warmup: untraced (dry-run) steps first, so that one-time work (optimiser state) is left out.
    The trainer's parameters and counters move on (garbage values in a dry run), as in count_launches."""
    engine = getattr(trainer, "engine", None)
    old_dtype = getattr(engine, "dtype", None)
    if dtype is not None:
        if not dry_run:
            raise ValueError("trace_launches: dtype= traces a dtype the device may not compute; it needs dry_run=True")
        if engine is None or old_dtype is None:
            raise ValueError("trace_launches: dtype= needs a trainer with a fused engine (backend='fused')")
    graphs, trainer.graphs = trainer.graphs, None
    lowp = contextlib.nullcontext()
    if dtype is not None and dtype != torch.float32 and hasattr(trainer, "parameters"):
        lowp = trainer.parameters.lowp_copy(dtype)  # the kernels then read the weights as a GPU would
    try:
        if dtype is not None:
            engine.dtype = dtype
        lowp.__enter__()
        for _ in range(warmup):
            with counting_launches(dry_run):
                trainer.step(x, labels)
        recorder = _Recorder(parameter_names(trainer))
        with counting_launches(dry_run, recorder=recorder) as count:
            trainer.step(x, labels)
    finally:
        lowp.__exit__(None, None, None)
        trainer.graphs = graphs
        if dtype is not None:
            engine.dtype = old_dtype
    return LaunchTrace(recorder.launches, count)


# ------------------------------------------------------------------------------------------------
# The modelled profile of a trace
# ------------------------------------------------------------------------------------------------

CONFIG_POLICIES = ("chooser", "heuristic", "model", "traced")


def target_config(kind: str, args: dict, gpu, policy: str = "chooser"):
    """(config, source) of a conv launch on the modelled `gpu` (not the machine tracing it: under the
    CPU interpreter the traced configs are the interpreter's).
    policy "chooser": what conv_block picks on that GPU without autotuning (`conv_block.choose_config(
    kind, launch_shape, gpu=...)`: its tuned table for the GPU's architecture, else the cost model's
    fastest candidate, else its heuristic; with a chooser that takes no gpu: the table, else
    `heuristic_config`); "heuristic": the heuristic, table ignored; "model": the table, else
    `cost.best_config` over conv_block's config lists; "traced": as launched."""
    from ..ops import conv_block, cost

    if policy not in CONFIG_POLICIES:
        raise ValueError(f"unknown config policy {policy!r}; valid: {', '.join(CONFIG_POLICIES)}")
    gpu = cost.get_gpu(gpu)
    key = next((k for k, g in cost.GPUS.items() if g == gpu), None)
    shape = _launch_shape(kind, args)
    if policy == "heuristic":
        return conv_block.heuristic_config(kind, {**args, **(shape or {})}), "heuristic"
    if shape is not None and key is not None and policy == "chooser":  # conv_block's chooser, for any GPU
        return conv_block.choose_config(kind, shape, gpu=key)
    entry = conv_block.tuned_table(gpu.arch).get(conv_block.shape_key(kind, {**args, **(shape or {})}))
    if entry is not None:
        return dict(entry), "table"
    if policy == "model":
        lists = dict(fwd=conv_block.FWD_CONFIGS, dx=conv_block.DX_CONFIGS, dw=conv_block.DW_CONFIGS)
        best = cost.best_config(kind, args, lists[kind], gpu)
        if best is not None:
            return best, "model"
    return conv_block.heuristic_config(kind, args), "heuristic"


def _launch_shape(kind: str, args: dict) -> dict | None:
    """conv_block's launch-shape dict of a traced conv launch, when conv_block's chooser takes one
    and a target GPU (choose_config(name, shape, gpu=...)); None for a chooser without them."""
    import inspect

    from ..ops import conv_block

    if not hasattr(conv_block, "launch_shape") or "gpu" not in inspect.signature(conv_block.choose_config).parameters:
        return None
    t = args["Y_ptr"] if kind == "fwd" else args["G_ptr"]
    w = args.get("W_ptr")
    return conv_block.launch_shape(kind, **{k: args[k] for k in ("N", "H", "W", "CIN", "COUT", "KS")},
                                   UPSAMPLE=bool(args["UPSAMPLE"]), ACT=bool(args["ACT"]), POOL=bool(args["POOL"]),
                                   dtype=t.dtype, weight_dtype=w.dtype if isinstance(w, torch.Tensor) else None,
                                   RUNS=_runs(t), **{k: bool(args[k]) for k in ("GRAD_IS_DZ", "INPUT_ACT")
                                                     if k in args})


def _pass_name(launch: Launch) -> str:
    if launch.kernel in CONV_KERNELS:
        return {"fwd": "forward", "dx": "dx", "dw": "dW"}[CONV_KERNELS[launch.kernel]]
    for key, name in (("mix_fwd", "mix"), ("mix_bwd", "mix bwd"), ("alpha", "alpha"), ("image_loss", "image loss"),
                      ("critic_loss", "critic loss"), ("probe", "probe"), ("adam", "adam"), ("foreach", "adam step"),
                      ("clone", "copy"), ("copy", "copy")):
        if key in launch.kernel:
            return name
    return "other"


def _numel(t) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _bytes(t) -> int:
    return _numel(t) * t.element_size() if isinstance(t, torch.Tensor) else 0


def _runs(t) -> int:
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() == 5 else 1


def _launch_cost(launch: Launch, gpu, policy: str):
    """(LaunchCost, shape label, config label, config source) of one traced launch."""
    from ..ops import cost

    a, grid = launch.args, launch.grid or (1, 1, 1)
    ctas = grid[0] * grid[1] * grid[2]
    name = launch.kernel
    if launch.source == "triton" and name in CONV_KERNELS:
        kind = CONV_KERNELS[name]
        config, source = (launch.config, "traced") if policy == "traced" else target_config(kind, a, gpu, policy)
        shape = cost.conv_shape(kind, a)
        c = cost.conv_cost(kind, shape, config, gpu)
        return c, shape.label(), c.config, source
    if launch.source == "triton":
        if name == "_mix_fwd_kernel" or name == "_mix_bwd_kernel":
            z = a.get("Z_ptr", a.get("G_ptr"))
            n, d = int(a["N"]), int(a["D"])
            c = cost.mix_cost(n, d, grid[2], z.element_size(), backward=name == "_mix_bwd_kernel",
                              block_d=int(a["BLOCK_D"]), gpu=gpu)
            return c, f"N{n} D{d}" + (f" x{grid[2]} runs" if grid[2] > 1 else ""), f"BLOCK_D={a['BLOCK_D']}", "fixed"
        if name == "_image_loss_fwd_kernel":
            m = int(a["M"])
            c = cost.image_loss_cost(m, grid[1], a["Ae_ptr"].element_size(), a["X_ptr"].element_size(),
                                     ctas=grid[0], block=int(a["BLOCK"]), gpu=gpu)
            return c, f"M{m}" + (f" x{grid[1]} runs" if grid[1] > 1 else ""), f"BLOCK={a['BLOCK']}", "fixed"
        if name == "_critic_loss_fwd_kernel":
            n, k = int(a["N"]), int(a["K"])
            c = cost.critic_loss_cost(n, k, grid[1], a["Cmix_ptr"].element_size(), block_n=int(a["BLOCK_N"]),
                                      block_k=int(a["BLOCK_K"]), gpu=gpu)
            return c, f"N{n} K{k}" + (f" x{grid[1]} runs" if grid[1] > 1 else ""), \
                f"BLOCK_N={a['BLOCK_N']} BLOCK_K={a['BLOCK_K']}", "fixed"
        if name.startswith("_probe_loss"):
            z = a["Z_ptr"]
            runs = int(z.shape[0]) if z.dim() == 5 else 1
            n, classes, d = int(a["N"]), int(a["C"]), int(a["D"])
            block_n = int(a.get("BLOCK_N", 32))
            multi = "D_CHUNK" in a  # one program per (row block, feature chunk, run); else one per run
            c = cost.probe_cost(n, d, classes, runs, z.element_size(), rows_per_program=block_n if multi else n,
                                d_chunk=int(a["D_CHUNK"]) if multi else d, block_n=block_n,
                                block_c=int(a.get("BLOCK_C", 16)), block_d=int(a.get("BLOCK_D", 64)), gpu=gpu)
            return c, f"N{n} D{d} C{classes}" + (f" x{runs} runs" if runs > 1 else ""), \
                " ".join(f"{k}={v}" for k, v in launch.config.items() if k.startswith("BLOCK")), "fixed"
        if "adam" in name.lower():
            tensors = [t for t in a.values() if isinstance(t, torch.Tensor)]
            big = max((_numel(t) for t in tensors if t.dtype == torch.float32), default=0)
            copy = max((t.element_size() for t in tensors if _numel(t) == big and t.element_size() < 4), default=0)
            block = int(launch.config.get("BLOCK", a.get("BLOCK", 1024)))
            c = cost.adam_cost(big, 1, block=block, weight_copy_itemsize=copy, ctas=ctas, gpu=gpu)
            return c, f"P{big}", f"BLOCK={block}", "fixed"
        moved = sum(_bytes(t) for t in a.values())
        return cost.stream_cost(name, moved, ctas, gpu), "", "", "fixed"
    # PyTorch ops and extension calls
    ins, outs = a.get("inputs", []), a.get("outputs", [])
    if name == "_fused_adam_":
        numels = [_numel(t) for t in (a["lists"][0] if a.get("lists") else [])]
        parts = cost.torch_fused_adam_costs(numels, gpu)
        total = parts[0]
        for p in parts[1:]:
            total = cost.LaunchCost("adam(torch)", total.ctas + p.ctas, total.slots, 0.0, 0.0, 0.0,
                                    total.hbm_bytes + p.hbm_bytes, total.l2_bytes + p.l2_bytes, 0,
                                    total.time_us + p.time_us, total.bound,
                                    {k: total.terms[k] + p.terms.get(k, 0.0) for k in total.terms})
        return total, f"{len(numels)} tensors, {sum(numels)} params", f"{len(parts)} kernels", "PyTorch"
    if name.startswith("_foreach"):
        n = len(a["lists"][0]) if a.get("lists") else len(ins)
        parts = [cost.stream_cost(name, 16 * min(110, n - i), 1, gpu) for i in range(0, max(n, 1), 110)]
        total = parts[0]
        total.time_us = sum(p.time_us for p in parts)
        return total, f"{n} tensors", f"{len(parts)} kernels", "PyTorch"
    moved = sum(_bytes(t) for t in ins) + sum(_bytes(t) for t in outs)
    g = cost.get_gpu(gpu)
    return cost.stream_cost(name, moved, g.sms * 4, gpu), \
        " ".join("x".join(map(str, t.shape)) for t in outs[:1]), "", "PyTorch"


def model_launches(trace: LaunchTrace, gpu="h100", *, configs: str = "chooser",
                   exclude: tuple = CPU_ONLY_OPS) -> list[dict]:
    """The modelled cost of every launch of a trace on `gpu` (acai_fast.ops.cost): one dict per
    launch, in order: index, layer, pass, stream, kernel, shape, config, config_source, ctas, waves,
    flops (issued), useful_flops, hbm_bytes, l2_bytes, smem, time_us, bound, terms. stream: "side0",
    "side1", ... for the conv weight gradients, which the fused engine runs on SIDE_STREAMS extra CUDA
    streams on a GPU, taking them in turn (engine.fused_step._SideStreams; a CPU trace runs them in
    order), else "main". Conv launches get the config
    `target_config(..., policy=configs)` gives for that GPU. aten ops in `exclude` (the CPU-only
    input checks) are left out."""
    rows, dw_launches = [], 0
    for launch in trace.launches:
        if launch.source == "torch" and launch.kernel in exclude:
            continue
        c, shape, config, source = _launch_cost(launch, gpu, configs)
        pass_name = _pass_name(launch)
        stream = "main"
        if pass_name == "dW":
            stream, dw_launches = f"side{dw_launches % SIDE_STREAMS}", dw_launches + 1
        rows.append({"index": len(rows), "layer": launch.layer or "", "pass": pass_name, "stream": stream,
                     "kernel": launch.kernel, "shape": shape, "config": config, "config_source": source,
                     "ctas": c.ctas, "waves": round(c.waves, 3), "flops": c.flops, "useful_flops": c.useful_flops,
                     "hbm_bytes": c.hbm_bytes, "l2_bytes": c.l2_bytes, "smem": c.smem, "time_us": c.time_us,
                     "bound": c.bound, "terms": c.terms})
    return rows


def model_step(trainer, x: torch.Tensor, labels: torch.Tensor | None = None, gpu="h100", *,
               dtype: torch.dtype | None = None, configs: str = "chooser") -> list[dict]:
    """One step of `trainer` traced as a dry run and modelled on `gpu`: `model_launches` of
    `trace_launches(trainer, x, labels, dtype=dtype)` (a fused trainer on the CPU under the Triton
    interpreter, or on a GPU without running a kernel). The trainer's state moves on (garbage)."""
    return model_launches(trace_launches(trainer, x, labels, dry_run=True, dtype=dtype), gpu, configs=configs)
