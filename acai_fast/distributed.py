"""torchrun glue: data-parallel ACAI training with torch.distributed's own collectives.

    torchrun --nproc_per_node=K -m acai_fast.cli train ...        (or: torchrun --nproc_per_node=K
                                                                   --no-python acai-fast train ...)

What a rank does differently from one process (DistributedDataParallel semantics):
- Shards. config.batch is the *global* batch: each of the K ranks steps on batch / K images of its
  own, drawn (data and alphas) from `rank_seed(seed, rank)`; rank 0's streams are the one-process
  streams. The weights start equal everywhere (initialised on the CPU from the global seed).
  Mixing pairs item i with item n-1-i of the rank's own local batch (n = batch / K): the pairs are
  random either way, so this is the SPEC's mixing on K sub-batches.
- Gradients. After a step's gradients and before Adam, every parameter's .grad (the autoencoder's,
  the critic's and the probe's) is averaged over the ranks by ONE all_reduce of one flat fp32
  buffer (DDP's gradient bucket, as a single bucket). With equal local batches the average is the
  gradient of the mean loss over the global batch, so Adam sees what one process with the global
  batch would see; both backends call it the same way.
- Outputs and control. Rank 0 alone evaluates and writes checkpoints, metrics and pictures;
  `ACAITrainer.save` gathers every rank's random streams first (every rank calls it). Decisions
  taken on the host (stop on a signal, a time-based checkpoint, a failed pre-flight check) are
  agreed by a MAX all_reduce of a few integers over a gloo group, so every rank stops or saves at
  the same step.

NCCL on GPUs (one GPU per rank: cuda:LOCAL_RANK), gloo on CPUs. CUDA graphs: the gradient
all_reduce runs stream-ordered on a persistent buffer whose address never changes, the form in
which PyTorch can capture NCCL collectives; this has NOT run on a GPU in this project (no GPU was
available): capture with NCCL, its speed and the overlap with the backward pass are unmeasured.
Where capture fails, engine.graphs logs the reason and runs the step eagerly.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("acai_fast")

_M64 = (1 << 64) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s data and alpha streams: `seed` itself on rank 0 (a one-process run
    is the plain run), on other ranks a well-mixed 63-bit value (splitmix64 of seed and rank), so
    that no two ranks of one run, and no rank and a nearby seed's rank 0, share a stream."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    if rank == 0:
        return seed
    x = (seed + rank * 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) >> 1  # 63 bits: the Philox state holds the seed as an int64


def local_batch(global_batch: int, world_size: int) -> int:
    """Images per rank for a global batch: global_batch / world_size, which must be a whole number
    of at least 2 (mixing needs pairs)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world_size} "
                         f"processes; use a multiple of {world_size}")
    n = global_batch // world_size
    if n < 2:
        raise ValueError(f"the global batch {global_batch} over {world_size} processes leaves {n} image "
                         f"per process; mixing needs pairs: use a global batch >= {2 * world_size}")
    return n


@dataclasses.dataclass
class Distributed:
    """One rank of a torchrun job: who it is, where it computes, and the collectives it uses.

    group: the process group of the gradients (None: the default group, NCCL or gloo);
    control_group: a gloo group for the host-side agreements (the default group on CPUs)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: object = None
    control_group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates and writes."""
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        return local_batch(global_batch, self.world_size)

    def gradient_average(self, params) -> "GradientAverage":
        return GradientAverage(params, self)

    def flat_gradient_average(self, storage: torch.Tensor, flags: int = 1) -> "FlatGradientAverage":
        return FlatGradientAverage(storage, flags, self)

    def agree(self, *flags: int) -> tuple[int, ...]:
        """The maximum of each integer flag over all ranks (a collective: every rank calls it at the
        same point). Host-side, over gloo: it never waits for the GPU."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return tuple(int(v) for v in t)

    def sum_host(self, values: list[float]) -> list[float]:
        """The sum over ranks of a few host numbers (logged losses): float64, over gloo."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.control_group)
        return t.tolist()

    def gather_host(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a CPU tensor of the same shape and dtype on every rank (rank order)."""
        tensor = tensor.detach().cpu().contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.control_group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.control_group)

    def close(self) -> None:
        """Leave the job (destroy the process group) if this module started it."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device=None, timeout_minutes: float = 30.0) -> Distributed | None:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment), or None when this process runs alone (no WORLD_SIZE, or WORLD_SIZE 1).

    device: "cuda" (or None with a GPU present) -> NCCL, this rank on cuda:LOCAL_RANK; "cpu" ->
    gloo. timeout_minutes bounds how long a collective waits for a missing rank (rank 0's
    evaluations and checkpoint writes happen while the others wait in their next collective)."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not an integer") from None
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed "
                         f"runs with torchrun (torchrun --nproc_per_node={world} -m acai_fast.cli ...)")
    rank = int(env["RANK"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs on this "
                             f"machine: start at most that many processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {dev.type}")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        kwargs = dict(device_id=dev) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    log.info("distributed: rank %d of %d (local %d) on %s, %s", rank, world, local_rank, dev, backend)
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                       group=None, control_group=control)


class FlatGradientAverage:
    """Averages a flat fp32 gradient buffer over the ranks in place: `storage` holds the gradients
    followed by `flags` slots (the trainer's acai_fast.parameters.RunParameters.grad_storage: every
    run's gradients, then one flag per run, e.g. "this run's losses are not finite"), which are
    summed with the gradients, so every rank learns whether any rank raised a flag without a second
    collective. One all_reduce (SUM) and one scale of the gradients by 1/world_size: capturable in
    a CUDA graph by design (not run on a GPU here: unmeasured, see the module docstring)."""

    def __init__(self, storage: torch.Tensor, flags: int, distributed: Distributed):
        if storage.dtype != torch.float32 or storage.dim() != 1 or not storage.is_contiguous():
            raise ValueError("gradient averaging expects one contiguous 1-D fp32 buffer")
        self.storage, self.flags, self.distributed = storage, int(flags), distributed
        self.flag = storage[storage.numel() - self.flags:]

    def __call__(self, flag: torch.Tensor | None = None) -> torch.Tensor:
        """Average the gradients in place over the ranks; returns the flags summed over the ranks
        (a (flags,) fp32 view into the buffer, > 0 where any rank passed a nonzero flag)."""
        if flag is None:
            self.flag.zero_()
        else:
            self.flag.copy_(flag.reshape(self.flags))
        dist.all_reduce(self.storage, op=dist.ReduceOp.SUM, group=self.distributed.group)
        self.storage[:self.storage.numel() - self.flags].mul_(1.0 / self.distributed.world_size)
        return self.flag  # a view: valid until the next call rewrites the buffer


class GradientAverage:
    """Averages the .grad of a fixed list of fp32 parameters over the ranks: copy every gradient into
    one persistent flat buffer, FlatGradientAverage on it, copy back. (The trainer keeps its
    gradients in a flat buffer already and uses FlatGradientAverage directly.)

    The buffer segments take each parameter's own memory layout (channels_last stays
    channels_last), so both copies are plain memory copies; a parameter without a gradient (the
    probe on a step without labels) contributes zeros and keeps grad None. One extra slot carries a
    flag (e.g. "this rank's losses are not finite") summed with the gradients, so every rank learns
    whether any rank raised it without a second collective. A few multi-tensor launches and one
    collective per step on a persistent buffer: capturable in a CUDA graph by design (not run on a
    GPU here: unmeasured, see the module docstring)."""

    def __init__(self, params, distributed: Distributed):
        self.params = list(params)
        self.distributed = distributed
        dtypes = {p.dtype for p in self.params}
        if dtypes - {torch.float32}:
            raise ValueError(f"gradient averaging expects fp32 parameters, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else distributed.device
        self.flat = torch.zeros(total + 1, dtype=torch.float32, device=device)
        self.views = []
        offset = 0
        for p in self.params:
            dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
            view = (self.flat.as_strided(p.shape, p.stride(), offset) if dense
                    else self.flat[offset:offset + p.numel()].view(p.shape))
            self.views.append(view)
            offset += p.numel()
        self._average = FlatGradientAverage(self.flat, 1, distributed)

    def __call__(self, flag: torch.Tensor | None = None) -> torch.Tensor:
        """Average the gradients in place over the ranks; returns the flag summed over the ranks
        (a 0-d fp32 view into the buffer, > 0 where any rank passed a nonzero flag)."""
        grads, views, absent = [], [], []
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                absent.append(view)
            else:
                grads.append(p.grad)
                views.append(view)
        # torch._foreach_*: the multi-tensor ops PyTorch's own optimisers use (one launch per list).
        torch._foreach_copy_(views, grads)
        if absent:
            torch._foreach_zero_(absent)
        summed = self._average(flag)
        torch._foreach_copy_(grads, views)
        return summed[0]  # a view: valid until the next call rewrites the buffer
