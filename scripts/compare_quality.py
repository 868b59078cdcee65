"""Does the fused backend train as well as the reference? Lines preset, same seeds and length on
both backends, the paper's metrics (Mean Distance, Mean Smoothness) at the end, compared against the
run-to-run noise of the reference. The check that lets `backend="auto"` pick the fused engine on a
GPU (acai_fast.options.AUTO_PICKS_FUSED).

    python scripts/compare_quality.py [--kimg 256] [--seeds 0,1] [--json out.json]

Exit status 0 when, for both metrics, the fused runs' mean lies within the tolerance of the
reference runs' mean: max(3 x the larger of the two backends' std over seeds, 25% of the reference
mean). 1 otherwise. Needs a GPU for the fused backend (the reference alone runs anywhere, slowly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.eval.lines import evaluate_lines


def train(backend: str, seed: int, kimg: float) -> dict:
    trainer = ACAITrainer(ACAIConfig.preset("lines"), backend=backend, seed=seed)
    t0 = time.perf_counter()
    history = trainer.fit("lines", kimg=kimg, eval_kimg=kimg / 4, progress=False)
    last = history[-1]
    print(f"{backend:9s} seed {seed}: Mean Distance {last['mean_distance'] * 1e3:.3f}e-3, "
          f"Smoothness {last['mean_smoothness']:.3f}, loss_ae {last['loss_ae']:.4f} "
          f"({time.perf_counter() - t0:.0f} s, {last['images_per_s']:.0f} img/s)", flush=True)
    return last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=256)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("compare_quality.py needs a CUDA GPU for the fused backend", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {b: [train(b, s, args.kimg) for s in seeds] for b in ("reference", "fused")}
    verdicts, report = [], {"kimg": args.kimg, "seeds": seeds, "runs": runs}
    for metric in ("mean_distance", "mean_smoothness"):
        ref = np.array([r[metric] for r in runs["reference"]], dtype=float)
        fus = np.array([r[metric] for r in runs["fused"]], dtype=float)
        tol = max(3 * max(ref.std(), fus.std()), 0.25 * abs(ref.mean()))
        ok = bool(abs(fus.mean() - ref.mean()) <= tol)
        verdicts.append(ok)
        report[metric] = dict(reference=ref.tolist(), fused=fus.tolist(), tolerance=tol, within=ok)
        print(f"{metric}: reference {ref.mean():.4g} +- {ref.std():.2g}, fused {fus.mean():.4g} +- "
              f"{fus.std():.2g}, |diff| {abs(fus.mean() - ref.mean()):.3g} vs tolerance {tol:.3g}: "
              f"{'OK' if ok else 'DIFFERENT'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("fused trains like the reference" if all(verdicts) else "fused DIFFERS from the reference")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
