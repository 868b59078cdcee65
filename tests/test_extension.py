"""The optional CUDA extension acai_fast._C: built where a CUDA compiler is, imports without a GPU,
exposes its functions with docstrings, checks its arguments, and fails clearly without a GPU.
Also: the CMake switch that leaves a pure-Python install, and the loader's messages."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import acai_fast
from acai_fast import _ext

HAS_GPU = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNCTIONS = ("mix_fwd", "mix_bwd", "image_loss_fwd", "critic_loss_fwd", "philox_alpha_host",
             "cuda_device_count")
needs_ext = pytest.mark.skipif(not _ext.cuda_extension_available(),
                               reason=f"acai_fast._C is not built ({_ext._IMPORT_ERROR})")


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


def test_built_where_a_cuda_compiler_is():
    """With nvcc present and ACAI_FAST_CUDA not OFF (CI and the dev machines), the install builds
    acai_fast._C; it must import even without a GPU (static cudart)."""
    if not _nvcc() or os.environ.get("ACAI_FAST_CUDA", "ON").upper() in ("OFF", "0", "FALSE"):
        pytest.skip("no CUDA compiler here, or ACAI_FAST_CUDA=OFF: the pure-Python install is expected")
    assert acai_fast.cuda_extension_available(), (
        f"nvcc is at {_nvcc()} but acai_fast._C did not import: {_ext._IMPORT_ERROR}. "
        f"Reinstall with `pip install -e .` (and see the CMake output).")


def test_availability_is_a_bool():
    assert acai_fast.cuda_extension_available() in (True, False)


@needs_ext
def test_exposes_its_functions_with_docstrings():
    C = _ext.extension()
    for name in FUNCTIONS:
        fn = getattr(C, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no docstring"
    assert C.MAX_PARTIALS == _ext.MAX_PARTIALS and C.PARTIALS_PER_BLOCK == _ext.PARTIALS_PER_BLOCK
    assert (C.DTYPE_FLOAT32, C.DTYPE_BFLOAT16) == (_ext.dtype_code(torch.float32), _ext.dtype_code(torch.bfloat16))


@needs_ext
def test_checks_its_arguments():
    C = _ext.extension()
    with pytest.raises(ValueError, match="mix_fwd: z is a null pointer"):
        C.mix_fwd(0, 8, 8, 0, 4, 4, 0, 0)
    with pytest.raises(ValueError, match="n and d must be >= 1"):
        C.mix_bwd(8, 8, 8, 0, 4, 0, False, 0)
    with pytest.raises(ValueError, match=r"dtype must be 0 \(float32\) or 1 \(bfloat16\), got 2"):
        C.mix_fwd(8, 8, 8, 0, 4, 4, 2, 0)
    with pytest.raises(ValueError, match="dtype_ae must be"):
        C.image_loss_fwd(8, 8, 8, 8, 8, 8, 8, 10, 0.2, 0, 5, 0)
    with pytest.raises(ValueError, match="counter is a null pointer"):
        C.critic_loss_fwd(8, 8, 8, 8, 8, 8, 8, 8, 0, 4, 4, 0.5, True, 0, 0)


@needs_ext
@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_kernels_without_a_gpu_raise_clearly():
    C = _ext.extension()
    assert C.cuda_device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        C.mix_fwd(8, 8, 8, 0, 4, 4, 0, 0)  # checked before anything touches the (fake) pointers
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        C.image_loss_fwd(8, 8, 8, 8, 8, 8, 8, 10, 0.2, 0, 1, 0)


def test_loader_messages(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "No module named 'acai_fast._C'")
    assert not _ext.cuda_extension_available()
    with pytest.raises(RuntimeError, match="not available: No module named"):
        _ext.extension()
    with pytest.raises(ValueError, match="backend='cuda' but the CUDA extension"):
        _ext.check_backend_runs("mix", "cuda", torch.device("cpu"))
    assert _ext.resolve_backend("mix", torch.zeros(1), "auto") == "reference"


def test_resolve_backend_prefers_cuda_then_triton(monkeypatch):
    fake_cuda = torch.empty(1, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    monkeypatch.setattr(_ext, "_C", object())
    assert _ext.resolve_backend("mix", fake_cuda, "auto") == "cuda"
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "HAS_TRITON", True)
    assert _ext.resolve_backend("mix", fake_cuda, "auto") == "triton"
    monkeypatch.setattr(_ext, "HAS_TRITON", False)
    assert _ext.resolve_backend("mix", fake_cuda, "auto") == "reference"
    assert _ext.resolve_backend("mix", fake_cuda, "triton") == "triton"  # never replaced
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        _ext.resolve_backend("mix", fake_cuda, "fast")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("switch", ("OFF", "ON-without-nvcc"))
def test_cmake_builds_without_cuda_when_told_or_without_nvcc(tmp_path, switch):
    """ACAI_FAST_CUDA=OFF, or no CUDA compiler: CMake configures nothing to build and says so
    (the wheel is then the pure-Python package)."""
    env = dict(os.environ)
    args = ["cmake", "-S", ROOT, "-B", str(tmp_path / "build")]
    if switch == "OFF":
        args.append("-DACAI_FAST_CUDA=OFF")
        expected = "ACAI_FAST_CUDA=OFF: building without CUDA"
    else:
        env.pop("CUDACXX", None)
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not os.path.exists(os.path.join(p, "nvcc")))
        expected = "no CUDA compiler found: building without CUDA"
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expected in proc.stdout, proc.stdout
