"""mix: the fused latent mixing (CUDA, Triton) against the PyTorch reference `mix_ref`.

CPU (TRITON_INTERPRET=1, fp32): Philox known-answer vectors; the reference generator, Triton's
tl.randint/tl.rand and the CUDA kernel's own Philox code (run on the host through _C) agree bit for
bit; forward, backward (fresh and accumulating) and autograd on every preset's latent shape at odd
batch sizes; the device-side state's reproducibility; alpha's distribution; bad input; the
Triton kernels compile for sm_90 (no GPU needed) with the PTX the design relies on.
GPU (marked `gpu`): CUDA vs Triton vs reference in fp32 and bf16, identical seeded alphas, their
uniformity, and CUDA-graph capture with fresh draws on every replay.
"""
from __future__ import annotations

import math

import pytest
import torch

import acai_fast.ops.mix as mm
from acai_fast import _ext
from acai_fast.config import PRESETS, ACAIConfig
from acai_fast.ops.mix import (make_rng_state, mix, mix_bwd, mix_bwd_ref, mix_fwd, mix_ref,
                               philox4x32_ref, philox_alpha_ref)
from helpers import assert_close, assert_close_lowp, compile_sm90_in_subprocess

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
LATENT_SHAPES = sorted({ACAIConfig.preset(p).latent_shape for p in PRESETS})  # (C, w, w) of every preset
BATCHES = (1, 3, 64)
needs_ext = pytest.mark.skipif(not _ext.cuda_extension_available(), reason="acai_fast._C is not built")


def cpu_backends():
    return ("triton", "reference")


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF
# Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = [torch.tensor([v], dtype=torch.int64) for v in (*counter, *key)]
    got = tuple(int(w) for w in philox4x32_ref(*words))
    assert got == expected, f"{[hex(g) for g in got]} != {[hex(e) for e in expected]}"


SEEDS_OFFSETS = [(0, 0), (1234, 5), (0x7EDCBA9876543210, 2 ** 32 - 7), (2 ** 40 + 3, 2 ** 45 + 11)]


@pytest.mark.parametrize("seed, offset", SEEDS_OFFSETS)
def test_reference_generator_matches_triton_rand(seed, offset):
    """philox_alpha_ref draws tl.randint's words (the interpreter's, on the CPU) and turns them into
    0.5 - |tl.rand - 0.5| (exactly where tl.rand < 0.5, to 2.4e-7 elsewhere: the fold is in integers)."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(State, Ints, Floats, N: tl.constexpr):
        i = tl.arange(0, N)
        seed_, offset_ = tl.load(State), tl.load(State + 1)
        tl.store(Ints + i, tl.randint(seed_, offset_ + i))
        tl.store(Floats + i, tl.rand(seed_, offset_ + i))

    n = 64
    state = make_rng_state(seed, "cpu", offset=offset)
    ints, floats = torch.empty(n, dtype=torch.int32), torch.empty(n)
    draw[(1,)](state, ints, floats, N=n)
    ctr = offset + torch.arange(n, dtype=torch.int64)
    zero = torch.zeros_like(ctr)
    w, *_ = philox4x32_ref(ctr & M32, ctr >> 32, zero, zero, torch.full_like(ctr, seed & M32),
                           torch.full_like(ctr, seed >> 32))
    assert torch.equal(w, ints.to(torch.int64) & M32)
    alpha = philox_alpha_ref(state, n)
    spec = 0.5 - (floats - 0.5).abs()  # the SPEC's formula on tl.rand
    assert torch.equal(alpha[floats < 0.5], floats[floats < 0.5])
    assert (alpha - spec).abs().max() <= 2 ** -22  # the float formula rounds 1 - u to 2^-23 itself
    assert state.tolist() == [seed, offset + n, 0]


@needs_ext
@pytest.mark.parametrize("seed, offset", SEEDS_OFFSETS)
def test_cuda_philox_code_matches_reference_on_host(seed, offset):
    """The CUDA kernel's Philox + uint->float + alpha code (csrc/common.cuh, __host__ __device__),
    run on the CPU, gives the reference's alphas bit for bit."""
    n = 257
    got = torch.tensor(_ext.extension().philox_alpha_host(seed, offset, n), dtype=torch.float32)
    expected = philox_alpha_ref(make_rng_state(seed, "cpu", offset=offset), n)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_alpha_is_uniform_on_zero_half():
    """Kolmogorov-Smirnov against U[0, 0.5] with a fixed seed (reference generator; the GPU test
    repeats it on the kernels, which draw the same numbers)."""
    n = 200_000
    alpha = philox_alpha_ref(make_rng_state(2024, "cpu"), n).double()
    assert alpha.min() >= 0 and alpha.max() <= 0.5
    _check_uniform(alpha)


def _check_uniform(alpha):
    n = alpha.numel()
    s = (alpha.sort().values * 2).cpu()  # -> U[0, 1]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = max((i / n - s).max().item(), (s - (i - 1) / n).max().item())
    assert ks < 1.63 / math.sqrt(n), f"KS statistic {ks:.3g} (1% critical value {1.63 / math.sqrt(n):.3g})"
    assert abs(alpha.mean().item() - 0.25) < 4 * (0.5 / math.sqrt(12)) / math.sqrt(n)


@pytest.mark.parametrize("backend", cpu_backends())
def test_state_makes_the_sequence(backend):
    """Two draws of N continue the sequence of one draw of 2N; the offset moves, the counter stays 0."""
    z = torch.randn(6, 2, 4, 4)
    state = make_rng_state(77, "cpu")
    _, a1 = mix_fwd(z, state=state, backend=backend)
    _, a2 = mix_fwd(z, state=state, backend=backend)
    assert state.tolist() == [77, 12, 0]
    both = philox_alpha_ref(make_rng_state(77, "cpu"), 12)
    assert torch.equal(torch.cat([a1, a2]), both)
    assert not torch.equal(a1, a2)


# ------------------------------------------------------------------------------------------------
# Values and gradients (CPU: Triton under the interpreter, fp32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draw", (False, True), ids=("alpha", "seeded"))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape", LATENT_SHAPES + [(3, 5, 7)], ids=str)
def test_forward_matches_reference(shape, n, draw, seed):
    z = torch.randn(n, *shape, device=DEVICE)
    if draw:
        state = make_rng_state(11, DEVICE)
        z_mix, alpha = mix_fwd(z, state=state, backend="triton", poison=True)
        assert torch.equal(alpha, philox_alpha_ref(make_rng_state(11, DEVICE), n))
        assert state.tolist() == [11, n, 0]
    else:
        alpha = torch.rand(n, 1, 1, 1, device=DEVICE) * 0.5
        z_mix, alpha_out = mix_fwd(z, alpha, backend="triton", poison=True)
        assert alpha_out.shape == (n,) and alpha_out.data_ptr() == alpha.data_ptr()
    assert_close(z_mix, mix_ref(z, alpha), atol=1e-6, rtol=1e-6, name="z_mix")


@pytest.mark.parametrize("accumulate", (False, True))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape", LATENT_SHAPES + [(3, 5, 7)], ids=str)
def test_backward_matches_reference(shape, n, accumulate, seed):
    g = torch.randn(n, *shape, device=DEVICE)
    alpha = torch.rand(n, device=DEVICE) * 0.5
    expected = mix_bwd_ref(g, alpha)
    if accumulate:
        dz0 = torch.randn_like(g)
        dz = dz0.clone()
        out = mix_bwd(g, alpha, dz=dz, backend="triton")
        assert out is dz
        expected = expected + dz0
    else:
        dz = mix_bwd(g, alpha, backend="triton", poison=True)
    assert_close(dz, expected, atol=1e-6, rtol=1e-6, name="dz")


def test_backward_formula_is_the_autograd_of_the_reference(seed):
    """mix_bwd_ref is the gradient of mix_ref (odd batch: the middle row mixes with itself)."""
    z = torch.randn(5, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(5, dtype=torch.float64) * 0.5
    g = torch.randn_like(z)
    (dz,) = torch.autograd.grad(mix_ref(z, alpha), z, g)
    assert_close(mix_bwd_ref(g, alpha), dz, atol=1e-12, rtol=1e-12, name="dz")


@pytest.mark.parametrize("draw", (False, True), ids=("alpha", "seeded"))
@pytest.mark.parametrize("n", (1, 3))
def test_autograd(n, draw, seed):
    z = torch.randn(n, 16, 2, 2, device=DEVICE, requires_grad=True)
    g = torch.randn(n, 16, 2, 2, device=DEVICE)
    kwargs = dict(state=make_rng_state(3, DEVICE)) if draw else dict(alpha=torch.rand(n, device=DEVICE) / 2)
    z_mix, alpha = mix(z, backend="triton", **kwargs)
    assert not alpha.requires_grad
    (dz,) = torch.autograd.grad(z_mix, z, g)
    z_ref = z.detach().clone().requires_grad_()
    (dz_ref,) = torch.autograd.grad(mix_ref(z_ref, alpha), z_ref, g)
    assert_close(dz, dz_ref, atol=1e-6, rtol=1e-6, name="dz")


def test_reference_backend_is_the_reference(seed):
    z = torch.randn(3, 2, 4, 4, requires_grad=True)
    state = make_rng_state(9, "cpu")
    z_mix, alpha = mix(z, state=state, backend="reference")
    assert state.tolist() == [9, 3, 0]
    assert torch.equal(z_mix, mix_ref(z, alpha))
    assert z_mix.requires_grad


def test_auto_on_cpu_is_the_reference(caplog):
    import logging
    z = torch.randn(3, 2, 4, 4)
    assert _ext.resolve_backend("mix", z, "auto") == "reference"
    with caplog.at_level(logging.DEBUG, logger="acai_fast.ops.mix"):
        mix_fwd(z, torch.full((3,), 0.25), backend="auto")
    assert "backend=reference (asked auto)" in caplog.text


def compile_sm90():
    """Compile both kernels (every flag, both dtypes) for sm_90 without a GPU (interpreter off, see
    test_kernels_compile_for_sm90) and check the PTX: alpha is one rounded multiply (no FMA), the
    offset advance is one single-thread acq_rel atomic after a barrier."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(fn, signature, constexprs):
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]

    for dt in ("fp32", "bf16"):
        p, ints = "*" + dt, dict(N="i32", D="i32")
        for draw in (True, False):
            ptx = compile_(mm._mix_fwd_kernel, dict(Z_ptr=p, Zmix_ptr=p, Alpha_ptr="*fp32",
                                                    State_ptr="*i64" if draw else "*fp32", **ints,
                                                    stride_zr="i32", stride_mr="i32"),
                           dict(DRAW=draw, BLOCK_D=64))
            if draw:
                assert "mul.f32" in ptx and "0f2FFFFFFF" in ptx, "alpha is not float(y) * scale"
                assert ptx.count("atom.global.gpu.acq_rel.add.u64") == 1
                assert ptx.index("bar.sync") < ptx.index("atom.global")
        for acc in (True, False):
            compile_(mm._mix_bwd_kernel, dict(G_ptr=p, Alpha_ptr="*fp32", Dz_ptr=p, **ints,
                                              stride_gr="i32", stride_dr="i32"),
                     dict(ACCUMULATE=acc, BLOCK_D=1024))
    ptx = compile_(mm._alpha_draw_kernel, dict(Alpha_ptr="*fp32", State_ptr="*i64", N="i32"), dict(BLOCK=64))
    assert "mul.f32" in ptx and ptx.index("bar.sync") < ptx.rindex("st.global")


@pytest.mark.parametrize("n", (1, 7, 64, 1100))
def test_draw_alpha_is_the_mix_draw(n):
    """draw_alpha (the reference step's draw) gives the bits mix draws from the same state, on every
    backend, and advances the offset by n; a second draw continues the stream."""
    state = make_rng_state(11, DEVICE, offset=5)
    expected = philox_alpha_ref(state.clone(), 2 * n)
    for backend in ("reference", "triton"):
        s = state.clone()
        first, second = mm.draw_alpha(s, n, backend=backend), mm.draw_alpha(s, n, backend=backend)
        assert torch.equal(torch.cat([first, second]), expected), backend
        assert int(s[1]) == 5 + 2 * n and int(s[2]) == 0
    z = torch.randn(n, 3, device=DEVICE)
    _, alpha = mix_fwd(z, state=state.clone(), backend="triton")
    assert torch.equal(alpha, expected[:n])
    with pytest.raises(ValueError, match="positive int"):
        mm.draw_alpha(state, 0)


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_array_of_runs_equals_single_runs(backend):
    """mix_fwd_runs / mix_bwd_runs over R=3 runs (own seeds, row blocks of bigger buffers) equal R
    single-run calls bit for bit, and advance each run's own stream."""
    runs, n, shape = 3, 5, (2, 3, 3)
    big = torch.randn(runs, 2 * n, *shape, device=DEVICE)
    z, out = big[:, :n], big[:, n:]
    states = mm.make_rng_states([3, 9, 3], DEVICE)
    singles = [make_rng_state(s, DEVICE) for s in (3, 9, 3)]
    z_mix, alpha = mm.mix_fwd_runs(z, states.clone(), out=out, backend=backend)
    assert z_mix.data_ptr() == out.data_ptr()
    g = torch.randn(runs, n, *shape, device=DEVICE)
    dz = torch.randn(runs, n, *shape, device=DEVICE)
    dz_runs = mm.mix_bwd_runs(g, alpha, dz=dz.clone(), backend=backend)
    for r in range(runs):
        zm1, a1 = mix_fwd(z[r].contiguous(), state=singles[r], backend=backend)
        assert torch.equal(z_mix[r], zm1) and torch.equal(alpha[r], a1), r
        assert torch.equal(dz_runs[r], mix_bwd(g[r], a1, dz=dz[r].clone(), backend=backend)), r
    assert torch.equal(alpha[0], alpha[2]) and not torch.equal(alpha[0], alpha[1])  # seeds 3, 9, 3
    with pytest.raises(ValueError, match="runs, 3"):
        mm.mix_fwd_runs(z, states[0])


@pytest.mark.skipif(HAS_GPU, reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    compile_sm90_in_subprocess("test_mix")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any launch
# ------------------------------------------------------------------------------------------------


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(mm, "_mix_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(mm, "_mix_bwd_kernel", _NoLaunch())
    monkeypatch.setattr(_ext, "extension", lambda: (_ for _ in ()).throw(AssertionError("launch")))


def _z(*shape, **kw):
    return torch.randn(*shape, **kw) if shape else torch.randn(3, 2, 4, 4, **kw)


BAD_FWD = [
    ("not a tensor", lambda: dict(z=[[1.0]], alpha=torch.rand(3)), "torch.Tensor"),
    ("fp16", lambda: dict(z=_z().half(), alpha=torch.rand(3)), "float16 is not supported"),
    ("int", lambda: dict(z=torch.ones(3, 4, dtype=torch.int32), alpha=torch.rand(3)), "not supported"),
    ("empty batch", lambda: dict(z=torch.randn(0, 4), alpha=torch.rand(0)), "N >= 1"),
    ("0-d", lambda: dict(z=torch.tensor(1.0), alpha=torch.rand(1)), "N >= 1"),
    ("non-contiguous", lambda: dict(z=_z(3, 4, 4, 2).transpose(1, 3), alpha=torch.rand(3)), "contiguous"),
    ("alpha shape", lambda: dict(z=_z(), alpha=torch.rand(4)), "N=3 values"),
    ("alpha 2-d", lambda: dict(z=_z(), alpha=torch.rand(1, 3)), "N=3 values"),
    ("alpha dtype", lambda: dict(z=_z(), alpha=torch.rand(3).double()), "float32"),
    ("alpha bf16", lambda: dict(z=_z().bfloat16(), alpha=torch.rand(3).bfloat16()), "float32"),
    ("alpha grad", lambda: dict(z=_z(), alpha=torch.rand(3, requires_grad=True)), "no gradient"),
    ("alpha device", lambda: dict(z=_z(), alpha=torch.rand(3, device="meta")), "one device"),
    ("both", lambda: dict(z=_z(), alpha=torch.rand(3), state=make_rng_state(0, "cpu")), "exactly one"),
    ("neither", lambda: dict(z=_z()), "exactly one"),
    ("state dtype", lambda: dict(z=_z(), state=torch.zeros(3, dtype=torch.int32)), "int64"),
    ("state shape", lambda: dict(z=_z(), state=torch.zeros(2, dtype=torch.int64)), r"shape \(3,\)"),
    ("state device", lambda: dict(z=_z(), state=torch.zeros(3, dtype=torch.int64, device="meta")),
     "z's device"),
]


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("case", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_bad_input_forward(case, backend, no_launch):
    _, make, match = case
    kwargs = make()
    z = kwargs.pop("z")
    with pytest.raises(ValueError, match=match):
        mix_fwd(z, kwargs.pop("alpha", None), backend=backend, **kwargs)
    kwargs = make()
    z = kwargs.pop("z")
    with pytest.raises(ValueError, match=match):  # the functional op checks the same way
        mix(z, kwargs.pop("alpha", None), backend=backend, **kwargs)


def test_bad_input_backward(no_launch):
    g, alpha = torch.randn(3, 8), torch.rand(3)
    with pytest.raises(ValueError, match="must match g"):
        mix_bwd(g, alpha, dz=torch.zeros(3, 8).bfloat16(), backend="triton")
    with pytest.raises(ValueError, match="must match g"):
        mix_bwd(g, alpha, dz=torch.zeros(3, 4, 2), backend="triton")
    with pytest.raises(ValueError, match="share memory"):
        mix_bwd(g, alpha, dz=g, backend="triton")
    with pytest.raises(ValueError, match="N=3 values"):
        mix_bwd(g, torch.rand(2), backend="triton")


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_rng_state(-1, "cpu")
    with pytest.raises(ValueError, match="seed"):
        make_rng_state(2 ** 63, "cpu")
    with pytest.raises(ValueError, match="seed"):
        make_rng_state(1.5, "cpu")


def test_backend_choice_errors(no_launch, monkeypatch):
    z, alpha = _z(), torch.rand(3)
    with pytest.raises(ValueError, match="unknown backend"):
        mix_fwd(z, alpha, backend="cudnn")
    with pytest.raises(ValueError, match="CUDA tensors|not built"):
        mix_fwd(z, alpha, backend="cuda")
    monkeypatch.setattr(_ext, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        mix_fwd(z, alpha, backend="triton")


# ------------------------------------------------------------------------------------------------
# GPU: CUDA vs Triton vs reference, seeded alphas, CUDA graphs
# ------------------------------------------------------------------------------------------------

GPU_BACKENDS = ("cuda", "triton") if _ext.cuda_extension_available() else ("triton",)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (1, 3, 64, 1024))
@pytest.mark.parametrize("shape", LATENT_SHAPES + [(3, 5, 7)], ids=str)
def test_gpu_matches_reference(shape, n, dtype, backend, seed):
    z32 = torch.randn(n, *shape, device="cuda")
    g32 = torch.randn_like(z32)
    z, g = z32.to(dtype), g32.to(dtype)
    state = make_rng_state(5, "cuda")
    z_mix, alpha = mix_fwd(z, state=state, backend=backend, poison=True)
    assert torch.equal(alpha, philox_alpha_ref(make_rng_state(5, "cuda"), n))
    dz = mix_bwd(g, alpha, backend=backend, poison=True)
    dz_acc = z.clone()
    mix_bwd(g, alpha, dz=dz_acc, backend=backend)
    ref_fwd = mix_ref(z, alpha, upcast=True)  # fp32 math on the same (rounded) inputs
    ref_bwd = mix_bwd_ref(g, alpha, upcast=True)
    if dtype == torch.float32:
        assert_close(z_mix, ref_fwd, atol=1e-6, rtol=1e-6, name="z_mix")
        assert_close(dz, ref_bwd, atol=1e-6, rtol=1e-6, name="dz")
        assert_close(dz_acc, ref_bwd + z.float(), atol=1e-6, rtol=1e-6, name="dz accumulated")
    else:
        assert_close_lowp(z_mix, ref_fwd, mix_ref(z, alpha), name="z_mix")
        assert_close_lowp(dz, ref_bwd, mix_bwd_ref(g, alpha), name="dz")
        assert_close_lowp(dz_acc, ref_bwd + z.float(), mix_bwd_ref(g, alpha) + z, name="dz accumulated")


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_extension_available(), reason="acai_fast._C is not built")
def test_gpu_cuda_and_triton_draw_identical_alphas_and_are_uniform():
    n = 1 << 20
    z = torch.zeros(n, 1, device="cuda")
    alphas = {}
    for backend in ("cuda", "triton"):
        state = make_rng_state(123456789, "cuda", offset=2 ** 32 - 1000)
        alphas[backend] = torch.cat([mix_fwd(z, state=state, backend=backend)[1] for _ in range(2)])
        assert state.tolist() == [123456789, 2 ** 32 - 1000 + 2 * n, 0]
    assert torch.equal(alphas["cuda"], alphas["triton"])
    ref = philox_alpha_ref(make_rng_state(123456789, "cuda", offset=2 ** 32 - 1000), 2 * n)
    assert torch.equal(alphas["cuda"], ref)
    _check_uniform(alphas["cuda"].double())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_replays_draw_fresh_alphas(backend):
    n, shape = 64, (16, 4, 4)
    z = torch.randn(n, *shape, device="cuda")
    g = torch.randn_like(z)
    state = make_rng_state(42, "cuda")
    dz = torch.zeros_like(z)

    def step():
        z_mix, alpha = mix_fwd(z, state=state, backend=backend)
        mix_bwd(g, alpha, dz=dz, backend=backend)
        return z_mix, alpha

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    state.copy_(make_rng_state(42, "cuda"))
    dz.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        z_mix, alpha = step()
    state.copy_(make_rng_state(42, "cuda"))  # capture does not run the kernels: restart the sequence
    dz.zero_()
    expected = philox_alpha_ref(make_rng_state(42, "cuda"), 3 * n).view(3, n)
    acc = torch.zeros_like(z)
    for r in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(alpha, expected[r]), f"replay {r} drew other alphas"
        assert_close(z_mix, mix_ref(z, expected[r]), atol=1e-6, rtol=1e-6, name=f"z_mix replay {r}")
        acc += mix_bwd_ref(g, expected[r])
        assert_close(dz, acc, atol=1e-5, rtol=1e-5, name=f"dz accumulated after replay {r}")
    assert state.tolist() == [42, 3 * n, 0]
