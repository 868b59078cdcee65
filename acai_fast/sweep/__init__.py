"""sweep(): settings x seeds -> arrays of runs -> one folder per run + a summary (`acai-fast sweep`).

    from acai_fast.sweep import sweep
    sweep("lines", seeds=range(4), advweight=[0, 0.5, 1], kimg=4096, eval_kimg=64, out="sweeps/lambda")

Every number in the paper is a mean over re-runs, and choosing lambda (advweight) or gamma (reg)
means sweeping them. A sweep is the cross product of the swept hyper-parameters (advweight, reg,
lr: none of them changes a tensor's shape) and the seeds. Its runs are trained `array` at a time as
one acai_fast.trainer.RunArray (on the fused backend one launch per layer serves every run of an
array; a non-ACAI model on the fused backend one run at a time: see Job.arrays); the rest wait their
turn. Run k of an array is the run `acai-fast train --seed S --advweight A --reg R --lr L` would
train: the same weights, alphas and batches (lines: its own lines_batches stream of its seed; image
presets: its own DeviceBatches order of its seed).

What `out` holds:
    sweep.json                             the sweep's arguments and runs (resume checks them)
    advweight=0.5_reg=0.2_lr=0.0001_seed=3/    one folder per run, what `acai-fast train` writes:
        metrics.jsonl                      fit()'s record keys (+ seed, array_runs, array_images_per_s)
        checkpoint.pt  interpolations.png  (ACAITrainer.load continues the run alone)
        status.json                        training | finished | nonfinite (with the reason)
        events.out.tfevents.*              with tensorboard=True: `tensorboard --logdir out`
    summary.md  summary.csv                one row per setting: per run the median of its last 20
                                           evaluations, then mean +- std over its seeds
    summary_METRIC_vs_PARAM.png            each metric against each swept hyper-parameter

A run whose loss turns non-finite is stopped alone: its slice of the array keeps computing (garbage,
harmlessly: Adam and every kernel act per run) but is no longer recorded or evaluated; its folder,
the summary and stderr say why. resume=True continues a stopped sweep: finished runs are skipped,
the others are rebuilt from their checkpoints (RunArray.from_runs; runs at the same step share an
array), a run never checkpointed starts over. Under torchrun (distributed=) rank r trains
runs[r::world_size] on its own GPU; rank 0 writes the summary once every run folder says its run
is done (reading the folders: ranks' shares can differ by a whole array, hours, longer than any
collective's timeout).

The machinery under sweep() serves `acai-fast reproduce` too (each model's re-runs are its seeds):
a Job (model, data as a RunData, run length, each run's folder), plan_arrays (what the folders
still need, as arrays, checked before anything trains) and train_arrays (the one array loop).

The package, one job per module (imports point down the list):
    main.py      sweep(): arguments, folder and data checked before anything trains; the flow
    summary.py   summarize(): summary.md, summary.csv, the plots
    shards.py    torchrun: each rank's share of the runs; rank 0 waits for the others
    training.py  Job, RunData, plan_arrays, train_arrays: the arrays and their loop
    folders.py   status.json, metrics.jsonl, sweep.json: read, written atomically, checked
    plan.py      Run, plan_runs, describe; runs per array (memory), checkpoints' disk room
"""
from .folders import read_records, read_status
from .main import SweepArgumentError, sweep
from .plan import (CPU_ARRAY, MAX_ARRAY, MEMORY_FRACTION, SWEPT, Run, checkpoint_room, default_array_size, describe,
                   parameter_count, plan_runs, run_memory_bytes)
from .shards import POLL_SECONDS, rank_share
from .summary import METRICS, WINDOW, summarize
from .training import PREVIEW_PAIRS, Job, RunData, images_left, plan_arrays, train_arrays

__all__ = ["CPU_ARRAY", "MAX_ARRAY", "MEMORY_FRACTION", "METRICS", "POLL_SECONDS", "PREVIEW_PAIRS", "SWEPT", "WINDOW",
           "Job", "Run", "RunData", "SweepArgumentError", "checkpoint_room", "default_array_size", "describe",
           "images_left", "parameter_count", "plan_arrays", "plan_runs", "rank_share", "read_records", "read_status",
           "run_memory_bytes", "summarize", "sweep", "train_arrays"]
