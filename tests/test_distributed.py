"""torchrun data parallelism (acai_fast.distributed): rank seeds, the global batch, and a real
two-process gloo job on the CPU against one process computing the same global batch.

The one-process side is written out here from the public pieces (the model's objectives, the
trainer's Adam): each rank's shard of the global batch with that rank's alpha stream, the gradients
of every objective averaged over the two shards, one Adam step. That is what DistributedDataParallel
means; the job must give the same parameters within float tolerance."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.checkpoint import load_checkpoint
from acai_fast.distributed import local_batch, rank_seed
from acai_fast.loop import tensor_batches
from acai_fast.models import Randomness
from acai_fast.ops.mix import make_rng_state
from helpers import assert_close, read_jsonl, write_idx

ROOT = Path(__file__).resolve().parents[1]


def test_rank_seeds_keep_rank_0_and_separate_the_others():
    assert rank_seed(0, 0) == 0 and rank_seed(12345, 0) == 12345  # one process = the plain run
    seeds = {rank_seed(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32  # no two (seed, rank) pairs share a stream
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert rank_seed(7, 3) == rank_seed(7, 3)  # a pure function: a resumed job draws the same
    with pytest.raises(ValueError):
        rank_seed(-1, 1)


def test_global_batch_splits_into_pairs():
    assert local_batch(64, 1) == 64 and local_batch(64, 8) == 8
    with pytest.raises(ValueError, match="does not split evenly over 3"):
        local_batch(64, 3)
    with pytest.raises(ValueError, match="mixing needs pairs"):
        local_batch(8, 8)


def test_tensor_shards_partition_each_global_batch_and_resume_exactly():
    images = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1)
    labels = torch.arange(30)
    shards = [tensor_batches(images, labels, batch=4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(3):  # 3 global batches of 8 = one epoch of 30 // 8 = 3 steps
        (a, la), (b, lb) = next(shards[0]), next(shards[1])
        assert torch.equal(a.flatten().long(), la) and torch.equal(b.flatten().long(), lb)
        seen += la.tolist() + lb.tolist()
    assert len(set(seen)) == 24  # no image twice within an epoch, across both ranks
    resumed = tensor_batches(images, labels, batch=4, seed=3, start_step=2, rank=1, world_size=2)
    straight = tensor_batches(images, labels, batch=4, seed=3, rank=1, world_size=2)
    for _ in range(2):
        next(straight)
    for _ in range(4):  # across the epoch boundary too
        assert torch.equal(next(resumed)[1], next(straight)[1])


def _one_process_equivalent(config, images, labels, steps, world):
    """DDP semantics in one process: per step, each rank's shard with its own alpha stream, the
    gradients of every objective (and the probe) averaged over the shards, then one Adam step."""
    trainer = ACAITrainer(config, backend="reference", device="cpu", seed=0)  # same initial weights
    n = local_batch(config.batch, world)
    shards = [tensor_batches(images, labels, batch=n, seed=0, rank=r, world_size=world) for r in range(world)]
    streams = [Randomness(make_rng_state(rank_seed(0, r), "cpu"), torch.Generator().manual_seed(rank_seed(0, r)))
               for r in range(world)]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    losses = []
    for _ in range(steps):
        total = [torch.zeros_like(p) for p in params]
        step_losses = []
        for r in range(world):
            x, y = next(shards[r])
            out = trainer.model.objectives(x, streams[r])
            grads = {}
            for name, objective in out.objectives.items():
                group = trainer.param_groups[name]
                for p, g in zip(group, torch.autograd.grad(objective, group, retain_graph=True)):
                    grads[p] = g
            probe_loss = F.cross_entropy(trainer.probe(out.latent.detach()), y)
            for p, g in zip(trainer.probe.parameters(), torch.autograd.grad(probe_loss, list(trainer.probe.parameters()))):
                grads[p] = g
            total = [t + grads[p] for t, p in zip(total, params)]
            step_losses.append(float(out.logged["loss_ae"].detach()))
        for p, t in zip(params, total):
            p.grad = t * (1.0 / world)
        trainer.optimizer.step()
        losses.append(sum(step_losses) / world)
    return trainer, losses


def test_two_process_gloo_job_equals_one_process_with_the_global_batch(tmp_path):
    """`torchrun --nproc_per_node=2 -m acai_fast.cli train` on the CPU (gloo), global batch 8 =
    2 x 4: the parameters after 3 steps equal the one-process computation of the same global
    batches; rank 0 alone evaluated and wrote (one metrics line per evaluation)."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data, "train", 40, rng)
    write_idx(data, "t10k", 36, rng)
    out = tmp_path / "run"
    steps, batch = 3, 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acai_fast.cli", "train", "--preset", "mnist32", "--data", str(data),
           "--batch", str(batch), "--kimg", str(steps * batch / 1024), "--eval-kimg", str(2 * batch / 1024),
           "--out", str(out), "--device", "cpu", "--backend", "reference", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("torchrun job of 2 processes (gloo)") == 1  # said once, by rank 0

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3]  # one line per evaluation: rank 0 alone wrote
    assert records[-1]["nimg"] == steps * batch  # global images
    assert "probe_accuracy" in records[-1]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["rank_states"]) == 2
    assert state["steps"] == steps and state["nimg"] == steps * batch
    # each rank drew 3 x 4 alphas from its own stream
    assert [int(s["alpha_state"][0]) for s in state["rank_states"]] == [rank_seed(0, 0), rank_seed(0, 1)]
    assert all(int(s["alpha_state"][1]) == steps * batch // 2 for s in state["rank_states"])

    from acai_fast.data import load_idx_dataset
    images, labels = load_idx_dataset(data, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same summation order in the convs
    try:
        config = ACAIConfig.preset("mnist32", batch=batch)
        expected, losses = _one_process_equivalent(config, images, labels, steps, world=2)
    finally:
        torch.set_num_threads(threads)
    for name, value in expected.model.state_dict().items():
        assert_close(state["model"][name], value, atol=1e-6, rtol=1e-5, name=f"model.{name}")
    for name, value in expected.probe.state_dict().items():
        assert_close(state["probe"][name], value, atol=1e-6, rtol=1e-5, name=f"probe.{name}")
    # the metrics line's loss_ae is the mean over both ranks (of the last interval: step 3)
    assert records[-1]["loss_ae"] == pytest.approx(losses[-1], rel=1e-5)

    # a distributed checkpoint continues in one process (rank 0's streams are the one-process ones)
    single = ACAITrainer.load(out / "checkpoint.pt", device="cpu")
    assert single.steps == steps and torch.equal(single.alpha_state, state["rank_states"][0]["alpha_state"])


_AVERAGE_WORKER = '''
import sys, torch
from acai_fast.distributed import init_from_env
ctx = init_from_env("cpu")
r = ctx.rank
# the fused engine's layouts: channels_last conv weights with persistent .grad; a plain bias; the
# probe's parameters without a gradient on a step without labels
w = torch.nn.Parameter(torch.zeros(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
b = torch.nn.Parameter(torch.zeros(4))
probe = torch.nn.Parameter(torch.zeros(2, 5))
average = ctx.gradient_average([w, b, probe])
w.grad = (torch.arange(108.0).view(4, 3, 3, 3) * (r + 1)).contiguous(memory_format=torch.channels_last)
grad_storage = w.grad.data_ptr()
b.grad = torch.full((4,), float(r))
flag = average(torch.tensor(1.0 if r == 1 else 0.0))
ok = (torch.equal(w.grad, torch.arange(108.0).view(4, 3, 3, 3) * 1.5)
      and w.grad.is_contiguous(memory_format=torch.channels_last) and w.grad.data_ptr() == grad_storage
      and torch.equal(b.grad, torch.full((4,), 0.5)) and probe.grad is None and float(flag) == 1.0)
flag = average(None)  # a second call reuses the buffer; no flag raised anywhere
ok = ok and torch.equal(b.grad, torch.full((4,), 0.5)) and float(flag) == 0.0
stop, save, bad = ctx.agree(r == 0, 0, r == 1)
ok = ok and (stop, save, bad) == (1, 0, 1) and ctx.sum_host([1.0, float(r)]) == [2.0, 1.0]
ok = ok and [int(t[0]) for t in ctx.gather_host(torch.tensor([r * 10]))] == [0, 10]
print(f"rank {r} ok={ok}", flush=True)
ctx.close()
sys.exit(0 if ok else 1)
'''


def test_gradient_average_over_two_gloo_processes(tmp_path):
    """The all-reduce on the layouts the fused engine uses (channels_last .grad written in place,
    parameters without a gradient), the flag slot, and the host agreements."""
    script = tmp_path / "worker.py"
    script.write_text(_AVERAGE_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 0 ok=True" in proc.stdout and "rank 1 ok=True" in proc.stdout
