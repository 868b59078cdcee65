"""Comparison helpers for the kernel tests."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """Like torch.testing.assert_close, but prints the first mismatching indices and both values."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:5]
        rows = "\n".join(f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, "
                         f"expected {expected[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(max abs err {(actual - expected).abs().max().item():.3g}, "
                             f"atol={atol}, rtol={rtol}); first ones:\n{rows}")


def assert_close_lowp(actual, reference_fp32, torch_lowp, *, name="tensor", factor=2.0, floor=1e-5):
    """The flash-attention rule for low precision: the kernel's max error against the fp32 reference
    is at most `factor` times PyTorch's own max error in the same dtype, plus a small floor."""
    ref = reference_fp32.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    torch_err = (torch_lowp.detach().double() - ref).abs().max().item()
    assert err <= factor * torch_err + floor, (
        f"{name}: max error {err:.3g} vs fp32 reference exceeds {factor} x PyTorch's own "
        f"low-precision error {torch_err:.3g} + {floor}")


def compile_sm90_in_subprocess(test_module: str) -> None:
    """Run `test_module.compile_sm90()` in a fresh interpreter with TRITON_INTERPRET unset (the
    interpreter is chosen at import), so that Triton's real compiler builds the kernels for sm_90
    without a GPU; skip when this triton has no NVIDIA backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; "
            f"import {test_module} as t; t.compile_sm90()")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia'" in done.stderr:
        pytest.skip("this triton has no NVIDIA backend")
    assert done.returncode == 0, done.stderr[-3000:]
