"""The cost model's model-to-wall factor: acai_fast.ops.cost applied to the engine that was measured.

The only whole-step times measured on a GPU so far are of the engine at commit 1aa7db1 (H100, bf16,
CUDA graph: 2.04 / 4.47 / 46.4 ms per step for lines b64 / cifar1024 b64 / cifar1024 b1024,
ANCHORS.md). This script extracts that commit's package (git archive) into a temporary folder,
traces one training step of each case on the CPU (a dry run: Triton launches recorded, not run;
activations in bf16 as on the GPU; each of its three Adams costed as PyTorch's fused Adam, as it
runs on a GPU), costs every launch with this checkout's cost.py (conv configs: the model's best of
that engine's autotuned, pruned config lists, as its autotuner would pick) and prints the model
beside the measurement. cost.MODEL_TO_WALL is the mean of the ratios.

    python bench/model_old_engine.py [--gpu h100] [--commit 1aa7db1]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED_MS = {("lines", 64): 2.04, ("cifar1024", 64): 4.47, ("cifar1024", 1024): 46.4}  # ANCHORS.md, H100
# aten ops that only check inputs on the CPU (once per trainer on a GPU) and are not part of a step
CPU_ONLY = ("min", "max", "aminmax", "isnan", "any")
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
             "_local_scalar_dense", "item", "is_nonzero", "equal", "_has_compatible_shallow_copy_type",
             "record_stream", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}


def _inner(old: str, preset: str, batch: int, gpu: str) -> None:
    """Runs in a subprocess whose `acai_fast` is the old package (not this checkout's)."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower() and "skbc" not in repr(f).lower()]
    sys.path.insert(0, old)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    import acai_fast
    assert acai_fast.__file__.startswith(old), f"imported {acai_fast.__file__}, not the old package"
    spec = importlib.util.spec_from_file_location("acai_cost", REPO / "acai_fast" / "ops" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    sys.modules["acai_cost"] = cost
    spec.loader.exec_module(cost)
    from acai_fast.config import ACAIConfig
    from acai_fast.ops import conv_block as cb
    from acai_fast.trainer import ACAITrainer

    config = ACAIConfig.preset(preset, batch=batch)
    trainer = ACAITrainer(config, backend="fused", device="cpu", dtype="fp32")
    trainer.dtype = torch.bfloat16  # a dry run: no kernel computes, the buffers are the GPU's
    x = torch.rand(batch, config.colors, 32, 32) * 2 - 1
    labels = torch.randint(0, 10, (batch,))
    records = []

    def tensors(v):
        if isinstance(v, torch.Tensor):
            return [v]
        if isinstance(v, (list, tuple)):
            return [t for e in v for t in tensors(e)]
        return []

    class Mode(TorchDispatchMode):
        paused = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not self.paused and not func.is_view and name not in NO_KERNEL:
                records.append(("torch", name, tensors(list(args)) + tensors(out), None))
            return out

    mode = Mode()

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            grid = grid(named) if callable(grid) else grid
            records.append(("triton", self.__name__, named, tuple(grid) + (1,) * (3 - len(grid))))

    interpreter.InterpretedFunction.run = run
    for opt in (trainer.opt_ae, trainer.opt_critic, trainer.opt_probe):  # fused on a GPU, not on the CPU
        def step(*a, _opt=opt, _orig=opt.step, **k):
            mode.paused += 1
            try:
                return _orig(*a, **k)
            finally:
                mode.paused -= 1
                params = [p for g in _opt.param_groups for p in g["params"] if p.grad is not None]
                if params:
                    records.append(("torch", "_fused_adam_", params, None))
                    records.append(("torch", "_foreach_add_", [], None))
        opt.step = step
    with mode:
        trainer.step(x, labels)  # one-time work (optimiser state) first
    records.clear()
    with mode:
        trainer.step(x, labels)

    kinds = {"_conv_fwd_kernel": "fwd", "_conv_bwd_dx_kernel": "dx", "_conv_bwd_dw_kernel": "dw"}
    lists = dict(fwd=(cb.FWD_CONFIGS, cb._prune_mnk("COUT", "CIN")), dx=(cb.DX_CONFIGS, cb._prune_mnk("CIN", "COUT")),
                 dw=(cb.DW_CONFIGS, cb._prune_dw))
    per, total, n = collections.Counter(), 0.0, 0
    for source, name, a, grid in records:
        if source == "triton" and name in kinds:
            kind = kinds[name]
            configs, prune = lists[kind]
            c = cost.rank_configs(kind, cost.conv_shape(kind, a), prune(configs, a), gpu)[0][2]
        elif source == "triton" and "mix" in name:
            z = a.get("Z_ptr", a.get("G_ptr"))
            c = cost.mix_cost(int(a["N"]), int(a["D"]), 1, z.element_size(), backward="bwd" in name, gpu=gpu)
        elif source == "triton":
            moved = sum(t.numel() * t.element_size() for t in a.values() if isinstance(t, torch.Tensor))
            c = cost.stream_cost(name, moved, grid[0] * grid[1] * grid[2], gpu, tail_us=cost.REDUCE_STEP_US)
        elif name in CPU_ONLY:
            continue
        elif name == "_fused_adam_":
            parts = cost.torch_fused_adam_costs([t.numel() for t in a], gpu)
            c = parts[0]
            c.time_us = sum(p.time_us for p in parts)
        elif name.startswith("_foreach"):
            c = cost.stream_cost(name, 0, 1, gpu)
        else:
            c = cost.stream_cost(name, sum(t.numel() * t.element_size() for t in a), 4 * cost.get_gpu(gpu).sms, gpu)
        n += 1
        total += c.time_us
        per[name] += c.time_us
    top = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in per.most_common(4))
    print(f"{n}\t{total / 1e3:.4f}\t{top}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--commit", default="1aa7db1")
    parser.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        _inner(args.inner[0], args.inner[1], int(args.inner[2]), args.gpu)
        return 0
    ratios = []
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.commit, "acai_fast"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        print(f"engine at {args.commit}, modelled on {args.gpu} by this checkout's acai_fast/ops/cost.py")
        print(f"{'case':<18} {'launches':>8} {'model ms':>9} {'measured':>9} {'ratio':>6}  largest (ms)")
        for (preset, batch), measured in MEASURED_MS.items():
            out = subprocess.run([sys.executable, __file__, "--gpu", args.gpu, "--inner", old, preset, str(batch)],
                                 check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            launches, model, top = out.stdout.strip().splitlines()[-1].split("\t")
            ratios.append(float(model) / measured)
            print(f"{preset + ' b' + str(batch):<18} {launches:>8} {float(model):>9.3f} {measured:>9.2f} "
                  f"{ratios[-1]:>6.2f}  {top}")
    print(f"mean model / measured: {sum(ratios) / len(ratios):.2f} (cost.MODEL_TO_WALL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
