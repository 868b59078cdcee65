"""probe_loss: the one-launch probe pass (Triton, under the interpreter on the CPU) against the
autograd reference: loss, accuracy and both gradients, latents in NCHW / channels_last / 2-D, odd
sizes, arrays of runs, the in-launch reduction (bit-repeatable, counters left at zero), bad input,
and the kernel compiled for sm_80 / sm_90."""
import pytest
import torch

from acai_fast.ops import aot
from acai_fast.ops.probe_loss import ProbeLoss, counter_size, launch_shape, probe_loss, probe_loss_ref
from helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, C, H, W, classes): the lines latent at batch 64 (2 row blocks, 1 feature chunk), an odd one
# (1 program), a wide one (2 row blocks, the second of 5 rows, x 8 feature chunks), a ragged one
# (45 rows, D = 105: 2 chunks of 64, the last of 41)
SHAPES = {"lines": (64, 16, 2, 2, 10), "odd": (5, 3, 3, 1, 7), "wide": (37, 64, 4, 4, 10),
          "ragged": (45, 5, 3, 7, 3)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "flat"))
def test_matches_reference(shape, layout, seed):
    n, c, h, w, classes = SHAPES[shape]
    z = torch.randn(n, c, h, w, device=DEVICE)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "flat":
        z = z.flatten(1)
    weight = torch.randn(classes, c * h * w, device=DEVICE) * 0.3
    bias = torch.randn(classes, device=DEVICE) * 0.1
    labels = torch.randint(0, classes, (n,), device=DEVICE)
    labels[0] = (z[0].flatten() @ weight.T + bias).argmax()  # at least one correct answer
    ref = probe_loss_ref(z, weight, bias, labels)
    dw = torch.full_like(weight, float("nan"))
    db = torch.full_like(bias, float("nan"))
    out = probe_loss(z, weight, bias, labels, d_weight_out=dw, d_bias_out=db, backend="triton")
    assert out.d_weight is dw and out.d_bias is db
    assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(out.accuracy, ref.accuracy, atol=0, rtol=0, name="accuracy")
    assert 0 < float(ref.accuracy) <= 1
    # fp32 sums of N terms in another order: errors relative to the gradient's scale
    assert_close(dw, ref.d_weight, atol=1e-5 * float(ref.d_weight.abs().max()), rtol=1e-4, name="d_weight")
    assert_close(db, ref.d_bias, atol=1e-5 * float(ref.d_bias.abs().max()), rtol=1e-4, name="d_bias")


def test_reference_is_cross_entropy(seed):
    """The reference is F.cross_entropy of the flattened latent, and its gradient the closed form
    (softmax - onehot) / N."""
    z, weight, bias = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    labels = torch.tensor([0, 2, 1, 2])
    ref = probe_loss_ref(z, weight, bias, labels)
    logits = z @ weight.T + bias
    assert float(ref.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    g = (logits.softmax(1) - torch.nn.functional.one_hot(labels, 3)) / 4
    assert_close(ref.d_weight, g.T @ z, atol=1e-6, rtol=1e-5, name="closed form dW")
    assert_close(ref.d_bias, g.sum(0), atol=1e-6, rtol=1e-5, name="closed form db")


def test_launch_shape():
    """The grid the docstrings promise: row blocks x feature chunks of whole BLOCK_D tiles."""
    assert launch_shape(1024, 10, 1024) == (16, 32, 64, 128)  # cifar1024 at batch 1024: 32 x 8 programs
    assert launch_shape(64, 10, 64) == (16, 32, 64, 64)  # lines at batch 64: 2 x 1
    assert launch_shape(45, 3, 105) == (16, 32, 64, 64)  # 2 x 2, ragged in both
    assert launch_shape(8, 100, 4096)[0] == 128 and launch_shape(8, 100, 4096)[3] == 512  # 8 chunks


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("n, c", ((6, 4), (40, 8)))  # 1 program per run; 2 row blocks x 2 chunks
def test_array_of_runs_equals_single_runs(backend, n, c, seed):
    """runs=True: R=3 probes on their own latents (row blocks of a channels_last buffer), labels and
    weights in one launch equal R single calls, bit for bit."""
    runs = 3
    big = torch.randn(runs, 2 * n, 4, 4, c, device=DEVICE).permute(0, 1, 4, 2, 3)  # channels_last runs
    z = big[:, n:]
    weight = torch.randn(runs, 10, 16 * c, device=DEVICE)
    bias = torch.randn(runs, 10, device=DEVICE)
    labels = torch.randint(0, 10, (runs, n), device=DEVICE)
    out = probe_loss(z, weight, bias, labels, runs=True, backend=backend)
    assert out.loss.shape == (runs,) and out.d_weight.shape == weight.shape
    for r in range(runs):
        one = probe_loss(z[r], weight[r], bias[r], labels[r], backend=backend)
        for f in ProbeLoss._fields:
            assert_close(getattr(out, f)[r], getattr(one, f), atol=0, rtol=0, name=f"run {r} {f}")


def test_reduction_is_repeatable_and_leaves_counter_at_zero(seed):
    """The in-launch reduction sums the partials in a fixed order: two launches give the same bits
    (on a GPU the programs finish in a different order each time), and the counter is left at 0,
    so a persistent one can be passed on every step."""
    n, c, h, w, classes = 37, 8, 4, 4, 10  # 2 row blocks x 2 feature chunks per run
    z = torch.randn(2, n, c, h, w, device=DEVICE)
    weight = torch.randn(2, classes, c * h * w, device=DEVICE) * 0.1
    bias = torch.randn(2, classes, device=DEVICE)
    labels = torch.randint(0, classes, (2, n), device=DEVICE)
    counter = torch.zeros(counter_size(2), dtype=torch.int32, device=DEVICE)
    first = probe_loss(z, weight, bias, labels, runs=True, backend="triton", counter=counter)
    assert not counter.any()
    second = probe_loss(z, weight, bias, labels, runs=True, backend="triton", counter=counter)
    assert not counter.any()
    for f in ProbeLoss._fields:
        assert torch.equal(getattr(first, f), getattr(second, f)), f
    with pytest.raises(ValueError, match="counter must be"):
        probe_loss(z, weight, bias, labels, runs=True, backend="triton", counter=counter[:3])


def test_bad_input():
    z, weight, bias, labels = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight must be"):
        probe_loss(z, weight[:, :5], bias, labels)
    with pytest.raises(ValueError, match="labels must be"):
        probe_loss(z, weight, bias, labels[:3])
    with pytest.raises(ValueError, match="classes are supported"):
        probe_loss(z, torch.randn(200, 6), torch.randn(200), labels)
    with pytest.raises(ValueError, match="unknown backend"):
        probe_loss(z, weight, bias, labels, backend="cuda")


# ------------------------------------------------------------------------------------------------
# Compiled for the GPUs (Triton's compiler, no GPU needed)
# ------------------------------------------------------------------------------------------------

# (N, C, H, W, classes): the cifar1024 latent at batch 1024 (8 feature chunks), and the widest
# layer the op accepts (128 classes). tests/test_compile_targets.py compiles every preset's launch.
COMPILE_SHAPES = ((1024, 64, 4, 4, 10), (16, 16, 4, 4, 128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel")
def test_kernel_compiles_for_gpus():
    """The launches of COMPILE_SHAPES, fp32 and bf16 latents, compiled for sm_80 and sm_90: no
    compile error, shared memory far below any GPU's limit (64 KB), and no register spills but for
    the 128-class fp32 kernel (20 B on sm_90: 128 x 32 fp32 tiles; no preset has over 10 classes)."""
    specs = []
    for n, c, h, w, classes in COMPILE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            z = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
            with aot.recording_launches() as launches:  # recorded, not run
                probe_loss(z, torch.randn(classes, c * h * w), torch.randn(classes),
                           torch.zeros(n, dtype=torch.long), backend="triton")
            assert len(launches) == 1
            specs += [launches[0].specialise(arch) for arch in aot.TARGETS]
    try:
        reports = aot.compile_in_subprocess(specs, jobs=2)
    except RuntimeError as exc:
        if "no NVIDIA backend" in str(exc):
            pytest.skip(str(exc))
        raise
    for r in reports:
        assert r.error is None, r.error
        assert r.smem_total <= 64 * 1024, r.summary()
        if r.spec.constexpr("BLOCK_C") <= 16 or dict(r.spec.signature)["Z_ptr"] == "*bf16":
            assert r.spill_bytes == 0, r.summary()
