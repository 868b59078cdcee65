"""probe_loss: the one-launch probe pass (Triton, under the interpreter on the CPU) against the
autograd reference: loss, accuracy and both gradients, latents in NCHW / channels_last / 2-D, odd
sizes, and bad input."""
import pytest
import torch

from acai_fast.ops.probe_loss import ProbeLoss, probe_loss, probe_loss_ref
from helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, C, H, W, classes): the lines latent at batch 64, an odd one, a wide one over several row blocks
SHAPES = {"lines": (64, 16, 2, 2, 10), "odd": (5, 3, 3, 1, 7), "wide": (37, 64, 4, 4, 10)}


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


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_array_of_runs_equals_single_runs(backend, seed):
    """runs=True: R=3 probes on their own latents (row blocks of a channels_last buffer), labels and
    weights in one launch equal R single calls."""
    runs, n = 3, 6
    big = torch.randn(runs, 2 * n, 2, 2, 4, device=DEVICE).permute(0, 1, 4, 2, 3)  # channels_last runs
    z = big[:, n:]
    weight = torch.randn(runs, 10, 16, device=DEVICE)
    bias = torch.randn(runs, 10, device=DEVICE)
    labels = torch.randint(0, 10, (runs, n), device=DEVICE)
    out = probe_loss(z, weight, bias, labels, runs=True, backend=backend)
    assert out.loss.shape == (runs,) and out.d_weight.shape == weight.shape
    for r in range(runs):
        one = probe_loss(z[r], weight[r], bias[r], labels[r], backend=backend)
        for f in ProbeLoss._fields:
            assert_close(getattr(out, f)[r], getattr(one, f), atol=0, rtol=0, name=f"run {r} {f}")


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


def compile_sm90():
    """Compile the probe kernel for sm_90 (interpreter off; see test_kernel_compiles_for_sm90):
    catches what only the GPU compiler rejects (dot tile sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from acai_fast.ops.probe_loss import _probe_loss_kernel
    for zdt in ("fp32", "bf16"):
        constexprs = dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=64)
        signature = dict(Z_ptr="*" + zdt, W_ptr="*fp32", B_ptr="*fp32", L_ptr="*i64", DW_ptr="*fp32",
                         DB_ptr="*fp32", Out_ptr="*fp32",
                         **{k: "i32" for k in "N C D HW WD stride_zn stride_zc stride_zh stride_zw stride_zr".split()},
                         **{k: "constexpr" for k in constexprs})
        triton.compile(ASTSource(fn=_probe_loss_kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel")
def test_kernel_compiles_for_sm90():
    from helpers import compile_sm90_in_subprocess
    compile_sm90_in_subprocess("test_probe_loss")
