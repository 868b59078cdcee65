"""Counting the kernel launches of a step, on any device (the CPU included), so that a test can pin
the count and a benchmark can print it.

What counts as one launch: one Triton kernel run (compiled or interpreted), one call into the CUDA
extension acai_fast._C, and one PyTorch operator that computes something (aten ops that only make
views, allocate or read metadata are not launches). Work done inside a Triton run (the CPU
interpreter copies tensors with PyTorch ops) is not counted. This is the number a GPU would see
for an eager step, to within PyTorch's own fused kernels (one `_fused_adam_` call is one launch
for up to ~100 tensors); `torch.profiler` on a GPU gives the exact count.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _ext

# aten ops that allocate, alias or read metadata without running a kernel.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_local_scalar_dense", "item", "is_nonzero", "equal", "_has_compatible_shallow_copy_type",
    "record_stream", "_unsafe_view", "_record_function_enter_new", "_record_function_exit",
}


@dataclasses.dataclass
class LaunchCount:
    """Launches of one step: total, and per Triton kernel, CUDA-extension function and aten op."""
    triton: dict[str, int]
    cuda_extension: dict[str, int]
    torch_ops: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.cuda_extension.values()) + sum(self.torch_ops.values())

    def summary(self) -> str:
        parts = [f"{self.total} launches: {sum(self.triton.values())} Triton"]
        if self.cuda_extension:
            parts.append(f"{sum(self.cuda_extension.values())} CUDA extension")
        parts.append(f"{sum(self.torch_ops.values())} PyTorch ops "
                     f"({', '.join(f'{k} x{v}' for k, v in sorted(self.torch_ops.items()))})")
        return ", ".join(parts)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_KERNEL:
                self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _ExtensionProxy:
    def __init__(self, module, counts):
        self._module, self._counts = module, counts

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def counted(*args, **kwargs):
            self._counts[name] += 1
            return fn(*args, **kwargs)
        return counted


@contextlib.contextmanager
def counting_launches(dry_run: bool = False):
    """Within this scope every launch (see the module docstring) is counted; yields the LaunchCount,
    filled in as launches happen. dry_run: Triton launches are counted but not run (their outputs
    keep whatever was in memory): the count of a full-size step on the CPU, where the interpreter
    would take minutes to run it. Valid because no launch decision of acai_fast depends on values."""
    count = LaunchCount(collections.Counter(), collections.Counter(), collections.Counter())
    mode = _AtenCounter(count.torch_ops)
    patched = []
    if _ext.HAS_TRITON:
        from triton.runtime import interpreter, jit
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    count.triton[getattr(self, "__name__", "kernel")] += 1
                if dry_run:
                    return None
                mode.paused += 1
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    mode.paused -= 1

            cls.run = run
            patched.append((cls, original))
    extension = _ext.extension
    _ext.extension = lambda: _ExtensionProxy(extension(), count.cuda_extension)
    try:
        with mode:
            yield count
    finally:
        _ext.extension = extension
        for cls, original in patched:
            cls.run = original


def count_launches(trainer, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                   dry_run: bool = False) -> LaunchCount:
    """The launches of one eager training step of `trainer` on (x, labels). The step is real (unless
    dry_run, see `counting_launches`: then the parameters take garbage values): the trainer's
    parameters and counters move on. Run one step first so that one-time work (compilation,
    autotuning, optimiser state) is not counted. A trainer that replays CUDA graphs is counted on
    its eager step (the graph replays the same launches)."""
    graphs, trainer.graphs = trainer.graphs, None
    try:
        with counting_launches(dry_run) as count:
            trainer.step(x, labels)
    finally:
        trainer.graphs = graphs
    return count
