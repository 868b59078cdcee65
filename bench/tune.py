"""Tune the conv-block kernels on this GPU and write the table acai_fast ships
(acai_fast/ops/tuned/sm<major><minor>.json), so that users' first steps compile each kernel once and
benchmark nothing.

For each preset and batch: a fused trainer takes two steps with ACAI_FAST_AUTOTUNE=1: every conv
launch times the candidates `conv_configs.candidates` lists for its shape (tile configs, their
split-K variants, dW taps per program and split counts with their reduction groups), each as the
whole planned launch (workspace and counters included) with triton.testing.do_bench, and keeps the
fastest (`conv_configs.AUTOTUNED`). Then, for every recorded launch, the tuned config, the cost
model's pick (`conv_configs.model_config`) and the fallback heuristic are timed against each other,
each printed beside its modelled time (acai_fast.ops.cost, labelled "model"), and the tuned
configs are merged into the table (existing entries for other shapes are kept).

    python bench/tune.py [--presets lines,mnist256,svhn256,cifar1024] [--batches 64,1024] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ["ACAI_FAST_AUTOTUNE"] = "1"  # read by acai_fast.ops.conv_configs at import

import torch  # noqa: E402

import acai_fast.ops.conv_block as cbm  # noqa: E402
import acai_fast.ops.conv_configs as ccfg  # noqa: E402
from acai_fast import ACAIConfig, ACAITrainer  # noqa: E402


def record_launches(presets, batches):
    """{shape key: (kernel name, tuned config, launch shape, run)} for every conv launch of the
    steps; run(config) replays the launch (same tensors) with another config."""
    seen = {}
    original = cbm._launch

    def recording(name, shape, config, device, run):
        used, source = original(name, shape, config, device, run)
        if source == "autotune":
            seen[ccfg.shape_key(name, shape)] = (name, used, shape, run)
        return used, source

    cbm._launch = recording
    try:
        for preset in presets:
            for batch in batches:
                config = ACAIConfig.preset(preset, batch=batch)
                trainer = ACAITrainer(config, backend="fused", device="cuda", cuda_graph=False)
                x = torch.rand(batch, config.colors, 32, 32, device="cuda") * 2 - 1
                labels = torch.randint(0, config.nclass, (batch,), device="cuda")
                t0 = time.perf_counter()
                for _ in range(2):
                    trainer.step(x, labels)
                torch.cuda.synchronize()
                print(f"tuned {preset} batch {batch} in {time.perf_counter() - t0:.1f} s "
                      f"({len(seen)} shapes so far)", flush=True)
    finally:
        cbm._launch = original
    return seen


def time_us(run, cfg) -> float:
    """Median microseconds of one planned launch (triton.testing.do_bench clears the L2 between
    repeats and keeps the GPU busy while Python launches, so small launches are timed fairly)."""
    import triton

    return 1000 * triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=50)


def modelled_us(name, shape, cfg, gpu) -> float | None:
    try:
        from acai_fast.ops import cost
        return cost.conv_cost(name, shape, cfg, gpu).time_us
    except Exception:  # noqa: BLE001 - no model for this GPU
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="lines,mnist256,svhn256,cifar1024")
    parser.add_argument("--batches", default="64,1024")
    parser.add_argument("--dry-run", action="store_true", help="print the table instead of writing it")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/tune.py needs a CUDA GPU: it times kernels on the GPU it tunes for", file=sys.stderr)
        return 2
    presets = args.presets.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    seen = record_launches(presets, batches)
    gpu = ccfg.gpu_of(torch.device("cuda"))

    configs, totals = {}, dict(tuned=0.0, model=0.0, heuristic=0.0)
    print(f"{'shape':<96} {'tuned us':>9} {'model-pick us':>13} {'heuristic us':>12}   modelled us (tuned)")
    for key, (name, cfg, shape, run) in sorted(seen.items()):
        model_cfg = ccfg.model_config(name, shape, gpu) if gpu else None
        row = dict(tuned=time_us(run, cfg), heuristic=time_us(run, ccfg.heuristic_config(name, shape)))
        row["model"] = time_us(run, model_cfg) if model_cfg is not None else float("nan")
        for k in totals:
            totals[k] += row[k] if row[k] == row[k] else row["heuristic"]
        m = modelled_us(name, shape, cfg, gpu)
        print(f"{key:<96} {row['tuned']:9.1f} {row['model']:13.1f} {row['heuristic']:12.1f}   "
              f"{'' if m is None else f'{m:.1f} (model)'}  {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}")
        configs[key] = ccfg.to_entry(cfg)
    print(f"sum over {len(seen)} shapes: tuned {totals['tuned']:.0f} us, model's pick {totals['model']:.0f} us, "
          f"heuristic {totals['heuristic']:.0f} us")

    major, minor = torch.cuda.get_device_capability()
    path = ccfg.TUNED_DIR / f"sm{major}{minor}.json"
    table = json.loads(path.read_text()) if path.is_file() else {"configs": {}}
    table["configs"].update(configs)
    table.update(gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__,
                 torch=torch.__version__, date=datetime.date.today().isoformat())
    text = json.dumps(table, indent=1, sort_keys=True)
    if args.dry_run:
        print(text)
    else:
        path.write_text(text + "\n")
        print(f"wrote {len(table['configs'])} configs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
