"""The linear probe's test accuracy (SPEC.md section 5): the single dense layer trained alongside the
model on its detached latent, scored on held-out images."""
from __future__ import annotations

import torch


@torch.no_grad()
def probe_accuracy(trainer, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Accuracy (in [0, 1]) of `trainer`'s linear probe on `images` (N, colors, 32, 32) with integer
    `labels` (N,), encoded through the trainer's public `encode`."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a 1-D tensor of {images.shape[0]} class indices")
    z = trainer.encode(images, batch_size)
    trainer.probe.eval()
    pred = trainer.probe(z).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())
