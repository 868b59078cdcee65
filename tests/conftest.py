"""Shared test set-up.

Without a CUDA GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, fp32): the
variable must be set before any kernel module is imported, which is why it is set here, first.
Tests marked `gpu` skip with a reason when no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import dataclasses

        from triton.runtime import interpreter
    except ImportError:
        pass
    else:
        # The interpreter checks every int32 index operation for overflow, which takes ~40% of its
        # time; test shapes are far from 2^31 elements, so the check can never fire here.
        builder = interpreter.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): they gain nothing from more, and on a shared 2-core machine two OpenMP threads
    spin-wait for each other (measured here: a tiny ACAI step 13x slower, 0.65 s against 0.048 s; a
    2x16x32x32 conv 80 ms against 0.2 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed():
    """Seed torch (CPU and CUDA) so that every test's random inputs are reproducible."""
    torch.manual_seed(0)
    return 0
