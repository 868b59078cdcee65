"""The compiled and Triton backends: loads the optional CUDA extension acai_fast._C (built by CMake
when a CUDA compiler is present, see csrc/README.md) and holds the helpers that the ops with a CUDA
twin (acai_fast.ops.mix, acai_fast.ops.acai_loss) share: backend resolution, dtype codes, streams,
the grid-reduction workspace."""
from __future__ import annotations

import importlib
import os

import torch

try:  # import_module, not `from . import _C`: its error names the missing module plainly
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as exc:  # built without CUDA, or not built at all
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = None

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


class _NoTriton:
    """Stands in for triton where it is not installed (a CPU-only install): the kernel definitions
    of acai_fast.ops still parse, and only the reference backends can run."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def Config(kwargs, num_warps=4, num_stages=3):
        return dict(kwargs=kwargs, num_warps=num_warps, num_stages=num_stages)

    @staticmethod
    def autotune(**kwargs):
        return lambda fn: fn


def triton_modules():
    """(triton, triton.language), or (a stand-in, None) without triton."""
    return (triton, tl) if HAS_TRITON else (_NoTriton(), None)

# The Triton interpreter is chosen when triton.jit runs (at import): read it once, the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Backends of the ops with a CUDA twin, fastest first. "auto" picks the first that can run.
BACKENDS = ("auto", "cuda", "triton", "reference")


def cuda_extension_available() -> bool:
    """True when acai_fast._C was built and imports (it still needs a GPU to run)."""
    return _C is not None


def extension():
    """The acai_fast._C module, or a RuntimeError that says why it is missing and what to do."""
    if _C is None:
        raise RuntimeError(
            "acai_fast._C (the CUDA extension) is not available: "
            f"{_IMPORT_ERROR or 'not built'}. It is built by `pip install -e .` when nvcc is found "
            "and ACAI_FAST_CUDA is not OFF; use backend='triton' or backend='reference' meanwhile.")
    return _C


def resolve_backend(op: str, tensor: torch.Tensor, backend: str) -> str:
    """The backend an op runs for an input on tensor's device: "cuda", "triton" or "reference".

    "auto": "cuda" for CUDA tensors when acai_fast._C is built, else "triton" for CUDA tensors when
    Triton is installed, else "reference". An explicit choice is never replaced: the op's input
    checks fail with a clear message when it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        if _C is not None:
            return "cuda"
        if HAS_TRITON:
            return "triton"
    return "reference"


def check_backend_runs(op: str, backend: str, device: torch.device) -> None:
    """ValueError when `backend` cannot run on `device` (a clear message before any launch)."""
    if backend == "cuda":
        if _C is None:
            raise ValueError(f"{op}: backend='cuda' but the CUDA extension acai_fast._C is not built "
                             f"({_IMPORT_ERROR or 'not built'}); use backend='triton' or 'reference'")
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    elif backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: backend='triton' but triton is not installed")
        if device.type != "cuda" and not INTERPRET:
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors, got tensors on {device} "
                             f"(use backend='reference', or TRITON_INTERPRET=1 for the interpreter)")


# dtype codes of csrc/acai_fast.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer cudaStream_t (for acai_fast._C)."""
    return torch.cuda.current_stream(device).cuda_stream


# Grid reductions (last-block-done) in both the CUDA and Triton kernels: at most MAX_PARTIALS blocks,
# 3 fp32 partials each, and an int32 ticket counter that every launch leaves at 0.
MAX_PARTIALS = 1024
PARTIALS_PER_BLOCK = 3
_counters: dict[torch.device, torch.Tensor] = {}


def reduction_counter(device: torch.device) -> torch.Tensor:
    """The per-device int32 ticket counter of the reducing kernels (zeroed once, on first use; each
    launch resets it). Launches on one stream share it safely; kernels running concurrently on
    different streams must each get their own (the ops take `counter=`)."""
    counter = _counters.get(device)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the reduction counter of this device would be created inside CUDA graph "
                               "capture (in the graph's private memory): run the op once before capturing")
        counter = _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def fix_triton_interpreter() -> None:
    """Work around two bugs of Triton's CPU interpreter (TRITON_INTERPRET=1); idempotent, and a
    no-op when the interpreter is off.

    1. Triton 3.6 turns a scalar into a Python int with int(array of shape (1,)), which NumPy >= 2.4
       refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every loop with a
       runtime bound fails. Re-patch tl.tensor.__index__ to take the single element.
    2. The interpreter types the result of a comparison as its operands' type (a bool array tagged
       int32); Triton 3.9's splat then casts by the tag, so `(cols < n) & (pid == 0)` becomes an
       int32 mask and tl.store refuses it ("mask has unsupported dtype"). Tag bool results int1.
    """
    if not (HAS_TRITON and INTERPRET):
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if not getattr(original, "_acai_fixed", False):
        def patch_lang_tensor(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        patch_lang_tensor._acai_fixed = True
        interpreter._patch_lang_tensor = patch_lang_tensor

    builder = interpreter.InterpreterBuilder
    binary_op = builder.binary_op
    if not getattr(binary_op, "_acai_fixed", False):
        def typed_binary_op(self, lhs, rhs, op):
            out = binary_op(self, lhs, rhs, op)
            if out.data.dtype == np.bool_ and out.dtype != tl.int1:
                out = interpreter.TensorHandle(out.data, tl.int1)
            return out

        typed_binary_op._acai_fixed = True
        builder.binary_op = typed_binary_op
