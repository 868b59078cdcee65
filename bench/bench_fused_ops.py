"""Benchmark of the fused mix and ACAI-loss ops against the eager PyTorch sequences they replace.

For the latent shapes (mix, critic-map pass) and image shapes (image pass) of every preset, at each
batch, times forward+backward (median, p20, p80 of CUDA-event timings after warm-up) of:
  eager        the trainer's PyTorch sequence (torch.rand alpha, the SPEC's expressions, autograd.grad
               for the gradients the step needs, and for mix the add into the existing latent gradient)
  eager_graph  the same captured in a CUDA graph
  triton       the fused Triton kernels, launched from Python   (triton_graph: in a CUDA graph)
  cuda         the fused CUDA kernels of acai_fast._C             (cuda_graph: in a CUDA graph)
  cuda_maps1   (critic pass only) the CUDA kernel with grad_maps=False: per-image gradients
Ops and their bytes-moved floor (s = element size, M = N*C*32*32 image elements, D = latent dims):
  mix          fwd reads z, writes z_mix and alpha; bwd reads g and dz, writes dz:   5*N*D*s + 8N
  image_loss   reads x and ae, writes d_ae and x_real (one pass, gradients included):  4*M*s
  critic_loss  reads both maps, writes the three map gradients:                         5*N*D*s (+4N)
GB/s = floor bytes / median time; "x floor" = median time / (floor bytes / measured copy bandwidth)
(a device-to-device copy of 1 GiB measures the bandwidth). Kernel launches per call are counted
with torch.profiler on one eager call.

Targets (issue 4, H100): one launch forward and one backward per fused op; the loss op within 2x of
its bytes-moved floor at batch 1024; both faster than eager_graph at batch 64.

    python bench/bench_fused_ops.py [--batches 64,1024] [--dtype bf16] [--json out.json]
    python bench/bench_fused_ops.py --quick        # batch 64 and 1024, fewer repeats
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

from acai_fast import ACAIConfig, cuda_extension_available  # noqa: E402
from acai_fast.config import PRESETS  # noqa: E402
from acai_fast.ops.acai_loss import critic_loss_fwd, image_loss_fwd  # noqa: E402
from acai_fast.ops.mix import make_rng_state, mix_bwd, mix_fwd  # noqa: E402

OPS = ("mix", "image_loss", "critic_loss")
VARIANTS = ("eager", "eager_graph", "triton", "triton_graph", "cuda", "cuda_graph", "cuda_maps1")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
REG, ADVWEIGHT = 0.2, 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape (per image) and batch; `presets`: the presets that have this shape."""

    op: str
    shape: tuple[int, ...]
    batch: int
    dtype: str
    presets: tuple[str, ...]

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return self.batch * n


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    variant: str
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    gbps: float | None = None
    x_floor: float | None = None
    launches: int | None = None
    skipped: str | None = None


def cases(batches, dtype: str, ops=OPS) -> list[Case]:
    """Every distinct (op, shape) of the presets at every batch: latent shapes for mix and the
    critic-map pass (the critic's output map has the latent's shape), image shapes for the image pass."""
    out = []
    for op in ops:
        shapes: dict[tuple, list[str]] = {}
        for p in PRESETS:
            cfg = ACAIConfig.preset(p)
            shape = (cfg.colors, cfg.image_size, cfg.image_size) if op == "image_loss" else cfg.latent_shape
            shapes.setdefault(tuple(shape), []).append(p)
        for shape, names in sorted(shapes.items()):
            out += [Case(op, shape, b, dtype, tuple(names)) for b in batches]
    return out


def bytes_moved(case: Case, variant: str = "cuda") -> int:
    """The floor: bytes each fused op must read and write once (see the module docstring)."""
    s = DTYPES[case.dtype].itemsize
    n, e = case.batch, case.elements
    if case.op == "mix":
        return 5 * e * s + 8 * n
    if case.op == "image_loss":
        return 4 * e * s
    if variant == "cuda_maps1":
        return 2 * e * s + 3 * n * s + 4 * n
    return 5 * e * s + 4 * n


# ------------------------------------------------------------------------------------------------
# The callables: each runs one forward+backward of its variant on preallocated tensors
# ------------------------------------------------------------------------------------------------


def make_fn(case: Case, variant: str, device: str = "cuda"):
    """fn() running one forward+backward of `variant` (device "cpu": the eager and triton variants
    under the Triton interpreter, how tests keep this benchmark in step with the ops' signatures)."""
    dev, dt, n = device, DTYPES[case.dtype], case.batch
    backend = variant.split("_")[0]
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=gen).to(dt)

    if case.op == "mix":
        z = randn(n, *case.shape)
        dz = torch.zeros_like(z)
        if backend == "eager":
            z = z.requires_grad_()
            g = randn(n, *case.shape).to(torch.promote_types(dt, torch.float32))

            def fn():
                u = torch.rand(n, 1, 1, 1, device=dev)
                alpha = 0.5 - (u - 0.5).abs()
                z_mix = alpha * z + (1 - alpha) * z.flip(0)
                (gz,) = torch.autograd.grad(z_mix, z, g)
                dz.add_(gz)
            return fn
        g = randn(n, *case.shape)
        state = make_rng_state(0, dev)

        def fn():
            _, alpha = mix_fwd(z, state=state, backend=backend)
            mix_bwd(g, alpha, dz=dz, backend=backend)
        return fn

    if case.op == "image_loss":
        x = (torch.rand(n, *case.shape, device=dev, generator=gen) * 2 - 1).to(dt)
        ae = randn(n, *case.shape)
        if backend == "eager":
            ae = ae.requires_grad_()

            def fn():
                loss_ae = F.mse_loss(ae, x)
                x_real = ae + REG * (x - ae)  # noqa: F841  (the critic's input)
                torch.autograd.grad(loss_ae, ae)
            return fn
        return lambda: image_loss_fwd(x, ae, REG, backend=backend)

    c_mix, c_real = randn(n, *case.shape), randn(n, *case.shape)
    alpha = torch.rand(n, device=dev, generator=gen) * 0.5
    if backend == "eager":
        c_mix, c_real = c_mix.requires_grad_(), c_real.requires_grad_()

        def fn():
            cm, cr = c_mix.mean((1, 2, 3)), c_real.mean((1, 2, 3))
            loss_ae_disc = cm.square().mean()
            loss_disc = (cm - alpha).square().mean()
            loss_disc_real = cr.square().mean()
            torch.autograd.grad(ADVWEIGHT * loss_ae_disc, c_mix, retain_graph=True)
            torch.autograd.grad(loss_disc + loss_disc_real, (c_mix, c_real))
        return fn
    grad_maps = variant != "cuda_maps1"
    return lambda: critic_loss_fwd(c_mix, c_real, alpha, ADVWEIGHT, grad_maps=grad_maps, backend=backend)


def count_launches(fn) -> int | None:
    """CUDA kernels (and memsets/copies) that one call of fn launches, from torch.profiler."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # profiler unavailable: leave the column empty rather than fail the run
        return None


def copy_bandwidth_gbs() -> float:
    """Achievable device bandwidth: read + write of a 1 GiB device-to-device copy, GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    times = cuda_time(lambda: dst.copy_(src), warmup=3, reps=10, inner=3)
    return 2 * src.numel() * 4 / (summarize(times)[0] * 1e-3) / 1e9


def run_case(case: Case, variants, *, bandwidth: float, warmup: int, reps: int, inner: int) -> list[Result]:
    results = []
    for variant in variants:
        if variant.startswith("cuda") and not cuda_extension_available():
            results.append(Result(case, variant, skipped="acai_fast._C not built"))
            continue
        if variant == "cuda_maps1" and case.op != "critic_loss":
            continue
        fn = make_fn(case, variant)
        launches = None
        if variant.endswith("_graph"):
            fn = cuda_graph(fn)
        else:
            launches = count_launches(fn)
        med, p20, p80 = summarize(cuda_time(fn, warmup=warmup, reps=reps, inner=inner))
        floor = bytes_moved(case, variant)
        results.append(Result(case, variant, med, p20, p80, gbps=floor / (med * 1e-3) / 1e9,
                              x_floor=med / (floor / (bandwidth * 1e9) * 1e3), launches=launches))
    return results


def summarize_targets(results: list[Result]) -> dict:
    """The issue's targets, each True/False/None (not measured)."""
    by = {(r.case, r.variant): r for r in results if r.ms_median is not None}
    out = {}
    fused = [r for r in results if r.variant in ("cuda", "cuda_maps1", "triton") and r.launches is not None]
    # One launch forward and one backward: mix = 2 kernels per fwd+bwd; each loss pass = 1 kernel.
    out["one_launch_per_direction"] = (all(r.launches == (2 if r.case.op == "mix" else 1) for r in fused)
                                       if fused else None)
    losses = [r for r in results if r.case.op in ("image_loss", "critic_loss") and r.case.batch == 1024
              and r.variant in ("cuda", "cuda_graph") and r.x_floor is not None]
    out["loss_within_2x_floor_at_1024"] = all(r.x_floor <= 2 for r in losses) if losses else None
    wins = []
    for (case, variant), r in by.items():
        if case.batch == 64 and variant in ("cuda", "cuda_graph") and (case, "eager_graph") in by:
            wins.append(r.ms_median < by[(case, "eager_graph")].ms_median)
    out["faster_than_eager_graph_at_64"] = all(wins) if wins else None
    return out


def print_table(results: list[Result]) -> None:
    variants = [v for v in VARIANTS if any(r.variant == v and r.ms_median is not None for r in results)]
    rows = {}
    for r in results:
        rows.setdefault(r.case, {})[r.variant] = r
    head = f"{'op':<12} {'shape':<12} {'batch':>5} {'floor MB':>8} | " + " | ".join(f"{v:>22}" for v in variants)
    print("cells: median time, GB/s against the bytes-moved floor, #kernel launches per call (not for graphs)")
    print(head)
    print("-" * len(head))
    for case, by in rows.items():
        cells = []
        for v in variants:
            r = by.get(v)
            if r is None or r.ms_median is None:
                cells.append(f"{'-':>22}")
            else:
                launches = f"#{r.launches}" if r.launches is not None else "  "
                cells.append(f"{r.ms_median * 1e3:7.1f}us {r.gbps:6.0f}GB/s {launches:>3}")
        shape = "x".join(map(str, case.shape))
        print(f"{case.op:<12} {shape:<12} {case.batch:>5} {bytes_moved(case) / 1e6:8.2f} | " + " | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,1024", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30, help="timed repeats (median, p20, p80 over them)")
    parser.add_argument("--inner", type=int, default=20, help="calls per timed repeat")
    parser.add_argument("--quick", action="store_true", help="10 repeats of 10 calls")
    parser.add_argument("--json", default=None, help="write environment, arguments, results, summary here")
    args = parser.parse_args(argv)
    require_cuda("bench_fused_ops.py")
    if args.quick:
        args.reps, args.inner, args.warmup = 10, 10, 5
    ops = [o for o in args.ops.split(",") if o]
    variants = [v for v in args.variants.split(",") if v]
    for name, given, valid in (("op", ops, OPS), ("variant", variants, VARIANTS)):
        bad = set(given) - set(valid)
        if bad:
            parser.error(f"unknown {name}(s) {sorted(bad)}; valid: {', '.join(valid)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    torch.backends.cudnn.benchmark = True
    bandwidth = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s; dtype {args.dtype}; "
          f"acai_fast._C built: {cuda_extension_available()}")
    results = []
    for case in cases(batches, args.dtype, ops):
        results += run_case(case, variants, bandwidth=bandwidth, warmup=args.warmup, reps=args.reps,
                            inner=args.inner)
    print_table(results)
    summary = summarize_targets(results)
    print("targets:", summary)
    if args.json:
        write_json(args.json, dict(environment=environment(), arguments=vars(args), copy_bandwidth_gbs=bandwidth,
                                   results=[dataclasses.asdict(r) for r in results], summary=summary))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
