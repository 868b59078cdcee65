"""acai_fast.ops.adam: the one-launch Triton Adam over flat (R, P) buffers against PyTorch's fused
Adam on the same rows (adam_ref) and against torch.optim.Adam on separate tensors; per-run learning
rates, the probe segment (only with labels), found_inf per run, the step counts advanced on the
device and the ticket counters left at zero, and the bf16 copy of the weights.

Tolerance: both compute the same elementwise formula in fp32, with bias corrections from the same
step count; they may round a product or a division differently (PyTorch's CPU kernel is
vectorised, the interpreter runs numpy), so each step's update may differ by a few ulp of the
parameter (|p| <= 5 here: ulp 4.8e-7) plus a few ulp of the update itself (lr-sized, 1e-3 here):
over 4 steps atol 2e-6, rtol 1e-5. The first moment m = b1*m + (1-b1)*g can cancel: its error is a
few ulp of its terms (|g| <= 5: (1-b1)*|g| <= 0.5, ulp 6e-8), not of the result: atol 2e-7. The
second moment has no cancellation (both terms >= 0): rtol 1e-5 and an atol far below its size."""
import pytest
import torch

from acai_fast.ops.adam import BETAS, EPS, adam_ref, adam_triton
from helpers import assert_close


def _buffers(runs, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(runs, size, generator=g)
    return dict(params=p, grads=torch.zeros(runs, size), exp_avg=torch.zeros(runs, size),
                exp_avg_sq=torch.zeros(runs, size), steps=torch.zeros(runs, 2))


def _grads(runs, size, step):
    g = torch.Generator().manual_seed(100 + step)
    scale = torch.tensor([1e-8, 1e-4, 1.0])[torch.randint(0, 3, (runs, size), generator=g)]
    return torch.randn(runs, size, generator=g) * scale  # sizes around eps, typical, large


@pytest.mark.parametrize("runs, size, p_nets", [(1, 1000, 960), (3, 4133, 4096), (2, 64, 64)])
def test_triton_adam_equals_pytorchs_fused_adam(runs, size, p_nets):
    lrs = [1e-4, 3e-4, 1e-3][:runs]
    ref, tri = _buffers(runs, size), _buffers(runs, size)
    counter = torch.zeros(runs, dtype=torch.int32)
    lr = torch.tensor(lrs)
    for step in range(4):
        probe = step != 1  # a step without labels leaves the probe's segment (and its count) alone
        g = _grads(runs, size, step)
        ref["grads"].copy_(g)
        tri["grads"].copy_(g)
        adam_ref(**ref, lrs=lrs, p_nets=p_nets, probe=probe)
        adam_triton(**tri, lr=lr, counter=counter, p_nets=p_nets, probe=probe, block=256)
        assert torch.equal(tri["steps"], ref["steps"]), (tri["steps"], ref["steps"])
        assert int(counter.abs().sum()) == 0
        for key in ("params", "exp_avg", "exp_avg_sq"):
            atol = dict(params=2e-6, exp_avg=2e-7, exp_avg_sq=1e-12)[key]
            assert_close(tri[key], ref[key], atol=atol, rtol=1e-5, name=f"step {step} {key}")
    expected_probe_steps = 3 if size > p_nets else 0
    assert ref["steps"][:, 0].tolist() == [4.0] * runs
    assert ref["steps"][:, 1].tolist() == [float(expected_probe_steps)] * runs


def test_reference_is_torch_optim_adam_bit_for_bit():
    """adam_ref on a flat row == torch.optim.Adam(fused=True) on the parameters it holds, exactly:
    the trainer's optimiser is the paper's Adam as PyTorch implements it."""
    torch.manual_seed(0)
    shapes = [(7, 3, 3, 3), (7,), (5, 11)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = torch.optim.Adam(params, lr=1e-4, betas=BETAS, eps=EPS, fused=True)
    sizes = [p.numel() for p in params]
    flat = _buffers(1, sum(sizes))
    flat["params"][0].copy_(torch.cat([p.detach().flatten() for p in params]))
    for step in range(3):
        grads = [torch.randn(s) * 10 ** -(step + 2) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        flat["grads"][0].copy_(torch.cat([g.flatten() for g in grads]))
        adam_ref(**flat, lrs=[1e-4], p_nets=sum(sizes), probe=False)
    assert torch.equal(flat["params"][0], torch.cat([p.detach().flatten() for p in params]))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_found_inf_skips_one_run_and_its_step_count(impl):
    runs, size = 2, 300
    b = _buffers(runs, size)
    before = b["params"].clone()
    b["grads"].copy_(_grads(runs, size, 0))
    found = torch.tensor([0.0, 1.0])
    if impl == "reference":
        adam_ref(**b, lrs=[1e-4, 1e-4], p_nets=size, probe=True, found_inf=found)
    else:
        adam_triton(**b, lr=torch.tensor([1e-4, 1e-4]), counter=torch.zeros(runs, dtype=torch.int32),
                    p_nets=size, probe=True, found_inf=found, block=128)
    assert not torch.equal(b["params"][0], before[0])
    assert torch.equal(b["params"][1], before[1]) and float(b["exp_avg"][1].abs().sum()) == 0
    assert b["steps"][:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_low_precision_copy_follows_the_weights(impl):
    b = _buffers(2, 500)
    lowp = torch.zeros(2, 500, dtype=torch.bfloat16)
    b["grads"].copy_(_grads(2, 500, 0))
    if impl == "reference":
        adam_ref(**b, lrs=[1e-3, 1e-3], p_nets=480, probe=True, lowp=lowp)
    else:
        try:
            adam_triton(**b, lr=torch.tensor([1e-3, 1e-3]), counter=torch.zeros(2, dtype=torch.int32),
                        p_nets=480, probe=True, lowp=lowp, block=128)
        except Exception as exc:  # the interpreter's bf16 support varies by Triton version
            if "bfloat16" in str(exc) or "bf16" in str(exc):
                pytest.skip(f"the Triton interpreter cannot store bf16 here: {exc}")
            raise
    if impl == "reference" or torch.cuda.is_available():
        assert torch.equal(lowp, b["params"].to(torch.bfloat16))
    else:  # the CPU interpreter has no real bf16: its conversion may truncate instead of rounding
        err = (lowp.float() - b["params"]).abs()
        assert bool((err <= b["params"].abs() * 2 ** -7).all()), float(err.max())


def test_bad_buffers_are_refused():
    b = _buffers(1, 100)
    with pytest.raises(ValueError, match="grads"):
        adam_triton(b["params"], torch.zeros(1, 99), b["exp_avg"], b["exp_avg_sq"], b["steps"],
                    torch.tensor([1e-4]), torch.zeros(1, dtype=torch.int32), p_nets=100, probe=False)
    with pytest.raises(ValueError, match="steps"):
        adam_triton(**{**b, "steps": torch.zeros(1)}, lr=torch.tensor([1e-4]),
                    counter=torch.zeros(1, dtype=torch.int32), p_nets=100, probe=False)
