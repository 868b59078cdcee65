"""Training batches from a dataset that lives on the training device (as fast CIFAR trainers such as
airbench do): the images are moved there once, as uint8 bytes (4x smaller than float32: SVHN's
604,388 training images take 1.9 GB), and each step gathers its batch there and scales it to
[-1, 1], so the host never limits the step. On the CPU the same code runs on the CPU.

Batch number s is a pure function of (seed, s): epoch e = s // steps_per_epoch visits the images in
the order numpy.random.default_rng([seed, e]).permutation(N) (drawn on the host: the same batches on
every device; one small copy per epoch), dropping the last incomplete batch. A run resumed at step s
(start_step=s) therefore sees exactly the batches it would have seen. This is the order of
acai_fast.loop.tensor_batches, so both give the same batches; under torchrun each of world_size
processes takes its `batch` images of each global batch of batch * world_size (rank r: images
r*batch .. (r+1)*batch - 1), a partition.
"""
from __future__ import annotations

import numpy as np
import torch

from .common import to_unit_range


class DeviceBatches:
    """Endless seeded (x, labels) batches from (N, C, H, W) images held on `device`.

    images: uint8 pixels (scaled x * 2/255 - 1 per batch on the device) or floating images already
    in [-1, 1] (kept in their dtype); labels: (N,) integers or None (then batches are (x, None)).
    x is float32 (batch, C, H, W) on `device`.

    >>> batches = DeviceBatches(pixels, labels, batch=64, seed=0, device="cuda", start_step=trainer.steps)
    >>> fit(trainer, batches, kimg=1024)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int,
                 seed: int = 0, device=None, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be an (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 pixels or floating point in [-1, 1], got {images.dtype}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank!r} of {world_size!r}")
        if images.shape[0] < batch * world_size:
            raise ValueError(f"need at least one batch of {batch * world_size} images, got {images.shape[0]}")
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]
                                   or labels.is_floating_point()):
            raise ValueError(f"labels must be (N,) = ({images.shape[0]},) integers, got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)  # once: the whole set lives on the device
        self.labels = labels.to(self.device, torch.long) if labels is not None else None
        self.batch, self.seed, self.step = batch, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = images.shape[0] // (batch * world_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        """The image order of `epoch` (a permutation of N, int64, on the host)."""
        rng = np.random.default_rng([self.seed, epoch])
        return torch.from_numpy(rng.permutation(self.images.shape[0]))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = self.order(epoch).to(self.device, non_blocking=True)
            self._epoch = epoch
        start = (offset * self.world_size + self.rank) * self.batch
        idx = self._order[start:start + self.batch]
        self.step += 1
        x = to_unit_range(self.images.index_select(0, idx))
        return x, (self.labels.index_select(0, idx) if self.labels is not None else None)


def device_batches(images: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int,
                   seed: int = 0, device=None, start_step: int = 0, rank: int = 0,
                   world_size: int = 1) -> DeviceBatches:
    """`DeviceBatches(...)`: the iterator that fit() pulls training batches from (see there)."""
    return DeviceBatches(images, labels, batch=batch, seed=seed, device=device, start_step=start_step,
                         rank=rank, world_size=world_size)
