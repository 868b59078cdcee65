"""Loads the optional CUDA extension acai_fast._C (built by CMake when a CUDA compiler is present)."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # built without CUDA, or not built at all
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = None


def cuda_extension_available() -> bool:
    """True when acai_fast._C was built and imports (it still needs a GPU to run)."""
    return _C is not None
