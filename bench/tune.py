"""Tune the conv-block kernels on this GPU and write the table acai_fast ships
(acai_fast/ops/tuned/sm<major><minor>.json), so that users' first steps compile each kernel once and
benchmark nothing.

For each preset and batch: a fused trainer takes two steps with ACAI_FAST_AUTOTUNE=1 (Triton's
autotuner times every config of FWD/DX/DW_CONFIGS on every layer shape); the configs it picked are
recorded under conv_block.shape_key and merged into the table (existing entries for other shapes
are kept). Then, for every recorded launch, the tuned config and the shape heuristic are timed
against each other (CUDA events, median of 20), so the table's gain over the heuristic is printed.

    python bench/tune.py [--presets lines,mnist256,svhn256,cifar1024] [--batches 64,1024] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ["ACAI_FAST_AUTOTUNE"] = "1"  # read by acai_fast.ops.conv_block at import

import torch  # noqa: E402

import acai_fast.ops.conv_block as cbm  # noqa: E402
from acai_fast import ACAIConfig, ACAITrainer  # noqa: E402


def record_launches(presets, batches):
    """{shape key: (kernel name, config, a replay closure)} for every conv launch of the steps."""
    seen = {}
    original = cbm._launch

    def recording(name, config, grid, *args, **constexprs):
        used, source = original(name, config, grid, *args, **constexprs)
        if source == "autotune":
            named = dict(zip(cbm._KERNELS[name].arg_names, args))
            key = cbm.shape_key(name, named)

            def replay(cfg, name=name, grid=grid, args=args, constexprs=constexprs):
                return original(name, cfg, grid, *args, **constexprs)
            seen[key] = (name, used, named, replay)
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


def time_config(replay, cfg, reps=20):
    times = []
    for _ in range(3):
        replay(cfg)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


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

    configs, gain_tuned, gain_heur = {}, 0.0, 0.0
    print(f"{'shape':<90} {'tuned us':>9} {'heuristic us':>12}")
    for key, (name, cfg, named, replay) in sorted(seen.items()):
        t_tuned = time_config(replay, cfg)
        t_heur = time_config(replay, cbm.heuristic_config(name, named))
        gain_tuned, gain_heur = gain_tuned + t_tuned, gain_heur + t_heur
        print(f"{key:<90} {t_tuned:9.1f} {t_heur:12.1f}")
        configs[key] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    print(f"sum over {len(seen)} shapes: tuned {gain_tuned:.0f} us, heuristic {gain_heur:.0f} us")

    major, minor = torch.cuda.get_device_capability()
    path = cbm.TUNED_DIR / f"sm{major}{minor}.json"
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
