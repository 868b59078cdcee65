"""Latents and networks out of a trained model, for work beyond acai_fast (`acai-fast encode`,
`acai-fast export`).

    latents = encode_dataset(trainer, images)               # (N, latent, w, w) float32, on the CPU
    save_latents("latents.npz", latents, labels=y, names=files, classes=names)
    export_networks(trainer, "exported/")                   # encoder.pt2, decoder.pt2, export.json

`encode_dataset` runs the trainer's public `encode` (the reference fp32 convs, whatever backend
trained it) a chunk at a time on the trainer's device, so a dataset held as uint8 bytes or on the
host never has to fit there as floats. `export_networks` writes the model's encode and decode, as
`encode`/`decode` run them (a VAE's posterior mean; a VQ-VAE's quantisation inside decode), as
`torch.export` programs with a dynamic batch size, traced on the CPU in fp32; they need torch only:

    import torch
    encoder = torch.export.load("exported/encoder.pt2").module()
    decoder = torch.export.load("exported/decoder.pt2").module()
    z = encoder(x)            # x: float32 (N, colors, 32, 32) in [-1, 1] (= pixels * 2/255 - 1)
    images = decoder(z)       # (N, colors, 32, 32), unclipped

Where torch.export cannot trace a network, TorchScript (torch.jit.trace) is written instead
(`encoder.torchscript.pt`, loaded with torch.jit.load); export.json says which, with the shapes.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.common import to_unit_range

log = logging.getLogger(__name__)

FORMATS = ("export", "torchscript")
FILES = {"export": "{}.pt2", "torchscript": "{}.torchscript.pt"}


# ------------------------------------------------------------------------------------------------
# Latents
# ------------------------------------------------------------------------------------------------


def encode_dataset(trainer, images: torch.Tensor, *, batch_size: int = 1024, progress: bool = False,
                   desc: str = "encode") -> torch.Tensor:
    """Latents (N, latent, w, w), float32 on the CPU, of `images` (N, colors, 32, 32): uint8 pixels
    (scaled x * 2/255 - 1 a chunk at a time) or floats in [-1, 1], on any device. Each chunk of
    `batch_size` images moves to the trainer's device and goes through `trainer.encode` (reference
    fp32 convs, no gradients); `progress`: a bar on a terminal, plain lines elsewhere."""
    from .progress import progress as progress_report

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be an (N, colors, 32, 32) tensor, got {shape}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = []
    with progress_report(len(images), desc=desc, unit="img", enabled=progress) as bar:
        for chunk in images.split(batch_size):
            out.append(trainer.encode(to_unit_range(chunk), batch_size).cpu())
            bar.update(len(chunk))
    if not out:
        return torch.empty(0, *trainer.config.latent_shape)
    return torch.cat(out)


def save_latents(path: str | os.PathLike, latents: torch.Tensor, *, labels: torch.Tensor | None = None,
                 classes=None, names=None, is_test: torch.Tensor | None = None, **meta) -> dict:
    """Write latents (N, latent, w, w) to an .npz file (atomically: a temporary file, then a
    rename) that numpy.load reads without pickles. Keys:

        latents      (N, latent*w*w) float32, flattened (C order: channel, row, column)
        latent_maps  (N, latent, w, w) float32, the encoder's output shape
        labels       (N,) int64, class indices (when known)    classes  (K,) str, label k's name
        names        (N,) str, each image's file (when known)  is_test  (N,) bool, the test split
        and one 0-d entry per `meta` keyword (str, int, float: the checkpoint, the model, ...).
    Returns the dict of arrays written."""
    latents = torch.as_tensor(latents).detach().float().cpu()
    if latents.dim() != 4:
        raise ValueError(f"latents must be (N, latent, w, w), got {tuple(latents.shape)}")
    n = latents.shape[0]
    arrays = dict(latents=latents.flatten(1).numpy(), latent_maps=latents.numpy())
    for key, value, kind in (("labels", labels, np.int64), ("is_test", is_test, np.bool_)):
        if value is not None:
            arrays[key] = torch.as_tensor(value).cpu().numpy().astype(kind)
    for key, value in (("classes", classes), ("names", names)):
        if value is not None:
            arrays[key] = np.array([str(v) for v in value], dtype=str)
    for key in ("labels", "names", "is_test"):
        if key in arrays and arrays[key].shape != (n,):
            raise ValueError(f"{key} must hold one entry per latent ({n}), got shape {arrays[key].shape}")
    for key, value in meta.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"meta {key}={value!r}: only str, int, float or bool")
        arrays[key] = np.array(value)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: numpy adds no .npz suffix
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return arrays


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------


class ModelEncode(nn.Module):
    """`model.encode` as a module (what torch.export traces): images -> latents (N, latent, w, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


class ModelDecode(nn.Module):
    """`model.decode` as a module: latents (N, latent, w, w) -> images (N, colors, 32, 32), unclipped."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


def inference_model(trainer) -> nn.Module:
    """A CPU fp32 copy of the trainer's model for export: reference convs, eval mode, no critic
    (encode and decode never use it), no gradients."""
    model = copy.deepcopy(trainer.model).to("cpu", torch.float32).eval()
    for chain in model.conv_chains():
        chain.backend = "reference"
    if getattr(model, "critic", None) is not None:  # not part of encode or decode: kept out of the files
        model.critic = None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_networks(trainer, out_dir: str | os.PathLike, *, format: str = "export",
                    checkpoint: str | None = None) -> dict:
    """Write the model's encoder and decoder into `out_dir` (module docstring) and export.json;
    returns export.json's dict. format: "export" (torch.export, falling back to TorchScript for a
    network it cannot trace, logged and recorded) or "torchscript"."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = trainer.config
    model = inference_model(trainer)
    x = torch.zeros(2, config.colors, config.image_size, config.image_size)
    z = torch.zeros(2, *config.latent_shape)
    files = {}
    for name, module, example in (("encoder", ModelEncode(model), x), ("decoder", ModelDecode(model), z)):
        files[name] = _write_program(module, example, out_dir, name, format)
    info = dict(
        model=trainer.model.name, config=config.to_dict(), kimg=round(trainer.nimg / 1024, 3),
        checkpoint=checkpoint, torch_version=torch.__version__,
        files={k: dict(file=f, format=fmt) for k, (f, fmt) in files.items()},
        encoder=dict(input=f"float32 (N, {config.colors}, {config.image_size}, {config.image_size}) in [-1, 1] "
                           f"(pixels * 2/255 - 1)",
                     output=f"float32 (N, {', '.join(map(str, config.latent_shape))})"),
        decoder=dict(input=f"float32 (N, {', '.join(map(str, config.latent_shape))})",
                     output=f"float32 (N, {config.colors}, {config.image_size}, {config.image_size}), unclipped "
                            f"(pixels = (clip(y, -1, 1) + 1) * 127.5)"),
        load={"export": "torch.export.load(path).module()", "torchscript": "torch.jit.load(path)"},
    )
    (out_dir / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _write_program(module: nn.Module, example: torch.Tensor, out_dir: Path, name: str,
                   format: str) -> tuple[str, str]:
    """Write one network; returns (file name, format written)."""
    if format == "export":
        try:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
            path = out_dir / FILES["export"].format(name)
            torch.export.save(program, _tmp(path))
            os.replace(_tmp(path), path)
            return path.name, "export"
        except Exception as exc:  # noqa: BLE001 - any tracing failure: fall back, say so
            log.warning("torch.export could not trace the %s (%s: %s); writing TorchScript instead", name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    path = out_dir / FILES["torchscript"].format(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the convs' shape checks: constants here
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the fallback, knowingly
        traced = torch.jit.trace(module, (example,), check_trace=False)
    torch.jit.save(traced, str(_tmp(path)))
    os.replace(_tmp(path), path)
    return path.name, "torchscript"


def _tmp(path: Path) -> Path:
    """encoder.pt2 -> encoder.tmp.pt2 (torch.export.save wants the .pt2 ending)."""
    return path.with_name(path.name.split(".", 1)[0] + ".tmp." + path.name.split(".", 1)[1])


def load_networks(folder: str | os.PathLike) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) callables from an export_networks folder (what a user without acai_fast
    writes in two lines; here for tests and convenience)."""
    folder = Path(folder)
    info = json.loads((folder / "export.json").read_text())
    loaded = []
    for name in ("encoder", "decoder"):
        entry = info["files"][name]
        path = folder / entry["file"]
        loaded.append(torch.export.load(path).module() if entry["format"] == "export" else torch.jit.load(str(path)))
    return tuple(loaded)
