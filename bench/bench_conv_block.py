"""Per-layer benchmark of the conv block: fused Triton kernels against plain PyTorch, bf16.

For every distinct layer shape of the chosen presets' encoder, decoder and critic (enumerated from
`build_networks`, not hard-coded) and every batch, times forward, backward and forward+backward
(median, p20, p80 of CUDA-event timings after warm-up) for:
  eager        bf16 channels_last: F.interpolate (nearest 2x) -> F.conv2d (no bias) -> + bias ->
               F.leaky_relu -> F.avg_pool2d, each its own kernel (cudnn.benchmark on)
  graph        the same captured in a CUDA graph (one graph per direction)
  fused        conv_block(backend="triton"), launched eagerly from Python
  fused_graph  the same captured in a CUDA graph (how the trainer runs it: a whole-step graph)
Weights are bf16 for every backend (the fused block's arrangement is cached, as it is between
optimizer steps). FLOPs: forward 2*N*H*W*Cout*Cin*k*k at the conv's resolution (after any upsample),
backward twice that (dx and dW), both three times; TFLOP/s = FLOPs / median time.

A last column gives the cost model's time of the fused launches with the configs the package
chooses on this GPU (acai_fast.ops.cost: a MODEL, printed beside the measurement to check it).

Target (issue 3, H100, one run): fused forward+backward faster than `graph` on every layer shape, and
>= 1.5x faster summed over the cifar1024 layers at batch 64. The summary checks both, for `fused`
and for `fused_graph`.

    python bench/bench_conv_block.py [--presets lines,cifar1024] [--batches 64,1024] [--json out.json]
    python bench/bench_conv_block.py --quick        # lines at batch 64, fewer repeats
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import cuda_graph, cuda_time, environment, require_cuda, summarize, write_json  # noqa: E402

from acai_fast import ACAIConfig  # noqa: E402
from acai_fast.networks import build_networks  # noqa: E402

BACKENDS = ("eager", "graph", "fused", "fused_graph")
GPU_KEY = None  # the cost.GPUS key of this GPU (set in main), for the modelled column
DIRECTIONS = ("fwd", "bwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One distinct ConvBlock shape of a preset; `count`: how many blocks of encoder, decoder and
    critic have it (each network once; the ACAI step runs the decoder and critic twice)."""

    preset: str
    cin: int
    cout: int
    k: int
    size: int  # input spatial size (before any upsample)
    upsample_input: bool
    leaky_slope: float | None
    pool_output: bool
    count: int = 1

    @property
    def conv_size(self) -> int:
        return self.size * 2 if self.upsample_input else self.size

    def __str__(self) -> str:
        flags = ["up"] * self.upsample_input + ["lrelu"] * (self.leaky_slope is not None) + ["pool"] * self.pool_output
        return f"{self.cin}->{self.cout} k{self.k} @{self.size}{' ' if flags else ''}{'+'.join(flags)}"


@dataclasses.dataclass(frozen=True)
class Case:
    layer: Layer
    batch: int
    backend: str
    direction: str


@dataclasses.dataclass(frozen=True)
class Result:
    preset: str
    layer: str
    count: int
    batch: int
    backend: str
    direction: str
    gflop: float
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    model_ms: float | None = None  # fused backends: acai_fast.ops.cost's time of the launches (a model)
    skipped: str | None = None


def preset_layers(preset: str) -> list[Layer]:
    """The distinct ConvBlock shapes of the preset's encoder, decoder and critic, in network order,
    each with the input size it sees (encoder/critic start at 32x32, the decoder at the latent)."""
    config = ACAIConfig.preset(preset)
    nets = build_networks(config)
    layers: dict[tuple, Layer] = {}
    for name, size in (("encoder", config.image_size), ("decoder", config.latent_width),
                       ("critic", config.image_size)):
        for block in nets[name].blocks:
            cout, cin, k, _ = block.weight.shape
            layer = Layer(preset, cin, cout, k, size, block.upsample_input, block.leaky_slope,
                          block.pool_output)
            key = dataclasses.replace(layer, count=0)
            old = layers.get(key)
            layers[key] = dataclasses.replace(layer, count=old.count + 1 if old else 1)
            size = layer.conv_size // 2 if block.pool_output else layer.conv_size
    return list(layers.values())


def flops(layer: Layer, batch: int, direction: str) -> int:
    """Analytic FLOPs of the conv (the bias, activation, pool and upsample are not counted)."""
    fwd = 2 * batch * layer.conv_size ** 2 * layer.cout * layer.cin * layer.k ** 2
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[direction]


def modelled_ms(layer: Layer, batch: int, direction: str, gpu: str, weight_dtype=torch.bfloat16) -> float | None:
    """The cost model's time (ms, a MODEL) of the fused launches of one direction (fwd: the forward;
    bwd: dx + dW; fwd_bwd: all three) in bf16 with the configs conv_configs chooses for `gpu`
    (a cost.GPUS key); None without the model."""
    try:
        from acai_fast.ops import conv_configs, cost
    except ImportError:
        return None
    h = layer.conv_size
    kinds = {"fwd": ("fwd",), "bwd": ("dx", "dw"), "fwd_bwd": ("fwd", "dx", "dw")}[direction]
    total = 0.0
    for kind in kinds:
        shape = conv_configs.launch_shape(kind, N=batch, H=h, W=h, CIN=layer.cin, COUT=layer.cout, KS=layer.k,
                                          UPSAMPLE=layer.upsample_input, ACT=layer.leaky_slope is not None,
                                          POOL=layer.pool_output, dtype=torch.bfloat16, weight_dtype=weight_dtype)
        config, _ = conv_configs.choose_config(kind, shape, gpu=gpu)
        total += cost.conv_cost(kind, shape, config, gpu).time_us
    return total / 1000


def eager_block(x, w, b, layer: Layer):
    """Plain PyTorch, one kernel per step (the baseline the fusion removes)."""
    if layer.upsample_input:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    y = F.conv2d(x, w, None, padding=layer.k // 2) + b.view(1, -1, 1, 1)
    if layer.leaky_slope is not None:
        y = F.leaky_relu(y, layer.leaky_slope)
    if layer.pool_output:
        y = F.avg_pool2d(y, 2)
    return y


def make_callables(layer: Layer, batch: int, backend: str) -> dict:
    """direction -> zero-argument callable running it once on fixed bf16 inputs."""
    from acai_fast.ops.conv_block import conv_block

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, layer.cin, layer.size, layer.size, device="cuda", generator=g)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(layer.cout, layer.cin, layer.k, layer.k, device="cuda", generator=g)
         / (layer.cin * layer.k ** 2) ** 0.5).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.zeros(layer.cout, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inputs = (x, w, b)
    if backend in ("eager", "graph"):
        def block():
            return eager_block(x, w, b, layer)
    else:
        def block():
            return conv_block(x, w, b, upsample_input=layer.upsample_input, leaky_slope=layer.leaky_slope,
                              pool_output=layer.pool_output, backend="triton")
    grad_y = torch.randn_like(block().detach())
    state = {}

    def forward_for_backward():
        state["y"] = block()

    def fwd():
        return block()

    def bwd():
        return torch.autograd.grad(state["y"], inputs, grad_y, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(block(), inputs, grad_y)

    if backend in ("eager", "fused"):
        forward_for_backward()
        return dict(fwd=fwd, bwd=bwd, fwd_bwd=fwd_bwd)
    return dict(fwd=cuda_graph(fwd), bwd=cuda_graph(bwd, setup=forward_for_backward),
                fwd_bwd=cuda_graph(fwd_bwd))


def run_layer(layer: Layer, batch: int, backends, *, warmup: int, reps: int, inner: int) -> list[Result]:
    results = []
    for backend in backends:
        fns, error = None, None
        try:
            fns = make_callables(layer, batch, backend)
        except Exception as e:  # e.g. a capture failing: record the reason, keep going
            error = f"{type(e).__name__}: {e}"
        for direction in DIRECTIONS:
            gflop = flops(layer, batch, direction) / 1e9
            base = dict(preset=layer.preset, layer=str(layer), count=layer.count, batch=batch,
                        backend=backend, direction=direction, gflop=gflop)
            if fns is None:
                results.append(Result(**base, skipped=error))
                continue
            try:
                med, p20, p80 = summarize(cuda_time(fns[direction], warmup=warmup, reps=reps, inner=inner))
            except Exception as e:
                results.append(Result(**base, skipped=f"{type(e).__name__}: {e}"))
                continue
            model = modelled_ms(layer, batch, direction, GPU_KEY) if backend.startswith("fused") and GPU_KEY else None
            results.append(Result(**base, ms_median=med, ms_p20=p20, ms_p80=p80, tflops=gflop / med, model_ms=model))
        del fns
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return results


def summarize_targets(results: list[Result]) -> dict:
    """Per (preset, batch): sums of fwd_bwd medians over the distinct layers (and weighted by how
    often each occurs), speed-ups over `graph`, and the layers where a fused variant is slower."""
    out = {}
    timed = [r for r in results if r.direction == "fwd_bwd" and r.ms_median is not None]
    for preset, batch in sorted({(r.preset, r.batch) for r in timed}):
        rows = [r for r in timed if r.preset == preset and r.batch == batch]
        by = {(r.layer, r.backend): r for r in rows}
        layers = sorted({r.layer for r in rows})
        entry = {}
        for backend in BACKENDS:
            if all((l, backend) in by for l in layers):
                entry[f"sum_ms_{backend}"] = sum(by[l, backend].ms_median for l in layers)
                entry[f"weighted_sum_ms_{backend}"] = sum(by[l, backend].ms_median * by[l, backend].count
                                                          for l in layers)
        for fused in ("fused", "fused_graph"):
            if f"sum_ms_{fused}" in entry and "sum_ms_graph" in entry:
                entry[f"speedup_{fused}_vs_graph"] = entry["sum_ms_graph"] / entry[f"sum_ms_{fused}"]
                entry[f"layers_where_{fused}_is_not_faster_than_graph"] = [
                    l for l in layers if by[l, fused].ms_median >= by[l, "graph"].ms_median]
        out[f"{preset}@{batch}"] = entry
    return out


def print_table(results: list[Result]) -> None:
    backends = [b for b in BACKENDS if any(r.backend == b for r in results)]
    rows = {}
    for r in results:
        rows.setdefault((r.preset, r.batch, r.layer, r.direction), {})[r.backend] = r
    head = f"{'preset':<10} {'batch':>5} {'layer':<28} {'dir':<7} {'GFLOP':>8}"
    print(head + "".join(f" {b + ' ms (TF/s)':>22}" for b in backends))
    for (preset, batch, layer, direction), by in rows.items():
        gflop = next(iter(by.values())).gflop
        cells = []
        for b in backends:
            r = by.get(b)
            cells.append(f" {'skipped':>22}" if r is None or r.ms_median is None
                         else f" {r.ms_median:>11.4f} ({r.tflops:>6.1f})  ")
        model = next((r.model_ms for r in by.values() if r.model_ms is not None), None)
        cells.append(f"   model {model:.4f} ms" if model is not None else "")
        print(f"{preset:<10} {batch:>5} {layer:<28} {direction:<7} {gflop:>8.3f}" + "".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="lines,cifar1024", help="comma-separated preset names")
    parser.add_argument("--batches", default="64,1024", help="comma-separated batch sizes")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30, help="timed repeats (median, p20, p80 over them)")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--quick", action="store_true", help="lines at batch 64 only, 10 repeats")
    parser.add_argument("--json", default=None, help="write environment, arguments, results, summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batches, args.reps = "lines", "64", 10
    presets = [p for p in args.presets.split(",") if p]
    batches = [int(b) for b in args.batches.split(",") if b]
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; valid: {', '.join(BACKENDS)}")
    for p in presets:
        ACAIConfig.preset(p)  # validates the name
    require_cuda("bench_conv_block")
    torch.backends.cudnn.benchmark = True
    global GPU_KEY
    from acai_fast.ops.conv_configs import gpu_of
    GPU_KEY = gpu_of(torch.device("cuda"))  # None on a GPU the cost model does not know

    env = environment()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}")
    results = []
    for preset in presets:
        for batch in batches:
            for layer in preset_layers(preset):
                results += run_layer(layer, batch, backends, warmup=args.warmup, reps=args.reps,
                                     inner=args.inner)
    print_table(results)
    summary = summarize_targets(results)
    for key, entry in summary.items():
        parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()]
        print(f"# {key}: " + ", ".join(parts))
    if args.json:
        write_json(args.json, dict(environment=env, args=vars(args),
                                   results=[dataclasses.asdict(r) for r in results], summary=summary))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
