"""conv_block: the fused Triton kernels against the PyTorch reference `conv_block_ref`.

CPU (TRITON_INTERPRET=1, fp32): output and the gradients of x, weight and bias for every flag
combination, kernel sizes 1 and 3, tiny / odd / realistic shapes; every autotune config on odd
shapes with poisoned outputs; weights in any layout and dtype; the launcher options the fused engine
uses (outputs written into blocks of bigger buffers, gradients of more images than the forward saved,
the in-kernel split reduction into strided fp32 gradients); the split paths (fwd/dx split-K, dW with
all taps per program and a two-level reduction: reference, bitwise repeatability, counters, runs);
a bf16 weight copy; dispatch and bad input; config choice (table, cost model, heuristic, candidates);
the kernels compile for sm_90 and sm_80 (no GPU needed); the benchmark's bookkeeping.
GPU (marked `gpu`): bf16 under the flash-attention rule on every layer shape of every preset at
batch 64 and 1024, every config with poisoned outputs in bf16 and fp32, fp32 master weights, CUDA
graph capture.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import pathlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import acai_fast.ops.conv_block as cbm  # noqa: E402
import acai_fast.ops.conv_configs as ccfg  # noqa: E402
from acai_fast import ACAIConfig
from acai_fast.config import PRESETS
from acai_fast.networks import Decoder, Encoder, build_networks
from acai_fast.ops.conv_block import (DW_CONFIGS, DX_CONFIGS, FWD_CONFIGS, conv_block, conv_block_ref,
                                      conv_bwd, conv_fwd, empty_activation, kernel_weight, resolve_backend)
from acai_fast.ops.conv_configs import dwc, mnk
from helpers import assert_close, assert_close_lowp, compile_sm90_in_subprocess

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_inputs(n, cin, cout, size, k, *, dtype=torch.float32, device=DEVICE, bias=True):
    """x (N, Cin, S, S), weight at the paper's init scale, a small random bias; all require grad."""
    x = torch.randn(n, cin, size, size, device=device, dtype=dtype)
    w = torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5
    b = torch.randn(cout, device=device) * 0.1 if bias else None
    w = w.to(dtype)
    b = b.to(dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


def reference(x, w, b, grad, flags, upcast=True):
    """Output and (dx, dw, db) of the reference; fp64 when upcast (the ground truth)."""
    xs = [t.detach().double().requires_grad_() if upcast and t is not None else t for t in (x, w, b)]
    y = conv_block_ref(*xs, **flags)
    leaves = [t for t in xs if t is not None]
    grads = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    return y, grads


def assert_fp32_close(actual, expected, name):
    """fp32 kernels vs an fp64 reference: 1e-4 relative, atol scaled by the tensor's magnitude."""
    scale = max(1.0, expected.abs().max().item())
    assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-4, name=name)


def check_block(x, w, b, flags, backend="triton"):
    y = conv_block(x, w, b, backend=backend, **flags)
    grad = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, leaves, grad)
    y_ref, expected = reference(x, w, b, grad, flags)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert y_ref.abs().max() > 0 and all(e.abs().max() > 0 for e in expected), "degenerate test case"
    assert_fp32_close(y, y_ref, "y")
    for name, g, e, leaf in zip(("dx", "dw", "db"), got, expected, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert_fp32_close(g, e, name)
    return y, got


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: fp32 against the reference
# ------------------------------------------------------------------------------------------------

FLAGS = [dict(upsample_input=u, leaky_slope=s, pool_output=p)
         for u, s, p in itertools.product((False, True), (0.2, None), (False, True))]
# (N, Cin, Cout, size without pool, size with pool): tiny, odd channel counts, a realistic multiple of 16.
SHAPES = {"tiny": (3, 1, 2, 1, 2), "odd_cin": (3, 17, 5, 5, 6), "odd_cout": (3, 2, 17, 5, 6),
          "realistic": (2, 16, 32, 8, 8)}


def flag_id(f):
    parts = ["up"] * f["upsample_input"] + ["conv"] + ["lrelu"] * (f["leaky_slope"] is not None)
    return "-".join(parts + ["pool"] * f["pool_output"])


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("k", (1, 3))
@pytest.mark.parametrize("flags", FLAGS, ids=[flag_id(f) for f in FLAGS])
def test_matches_reference(shape, k, flags, seed):
    n, cin, cout, size, pooled_size = SHAPES[shape]
    size = pooled_size if flags["pool_output"] and not flags["upsample_input"] else size
    x, w, b = make_inputs(n, cin, cout, size, k)
    y, _ = check_block(x, w, b, flags)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("slope", (0.0, -0.3, 1.5))
@pytest.mark.parametrize("pool", (False, True))
def test_other_slopes(slope, pool, seed):
    """slope >= 0 without a pool reads the sign of z off y; a negative slope needs the sign map."""
    x, w, b = make_inputs(2, 5, 6, 6, 3)
    check_block(x, w, b, dict(upsample_input=False, leaky_slope=slope, pool_output=pool))


def test_odd_size_with_pool_floors(seed):
    """avg_pool2d floors odd sizes: the last row and column get no gradient."""
    x, w, b = make_inputs(2, 3, 4, 5, 3)
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    check_block(x, w, b, flags)
    _, (dx, _, _) = check_block(torch.randn(2, 3, 5, 7, device=DEVICE, requires_grad=True), w, b, flags)
    assert dx.shape == (2, 3, 5, 7)


def test_no_bias(seed):
    x, w, _ = make_inputs(2, 5, 6, 6, 3, bias=False)
    check_block(x, w, None, dict(upsample_input=True, leaky_slope=0.2, pool_output=False))


def test_memory_formats_and_layouts(seed):
    """Any input memory format; outputs and dx in channels_last, dw and db contiguous."""
    x, w, b = make_inputs(2, 6, 5, 6, 3)
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    for xin in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()):
        y, (dx, dw, db) = check_block(xin, w, b, flags)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)
        assert dw.is_contiguous() and db.is_contiguous() and dw.shape == w.shape


def test_several_dw_splits(seed):
    """Enough pixels for the dW reduction to be split (partials summed in a fixed order)."""
    n, size = 2, 32
    assert ccfg.dw_heuristic_splits(n * size * size, 3, 2, 3) > 1  # the interpreter's config splits
    x, w, b = make_inputs(n, 2, 3, size, 3)
    _, (dx, dw, db) = check_block(x, w, b, dict(upsample_input=False, leaky_slope=0.2, pool_output=True))
    # Deterministic: no atomics, so a second backward is bitwise identical.
    y = conv_block(x, w, b, upsample_input=False, leaky_slope=0.2, pool_output=True, backend="triton")
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, (w, b), g, retain_graph=True)
    second = torch.autograd.grad(y, (w, b), g)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("p", (1, 255, 256, 1000, 2048, 65536, 1 << 20))
@pytest.mark.parametrize("asked", (1, 3, 7, 132, 5000))
@pytest.mark.parametrize("block_p", (16, 128))
def test_dw_split_plan(p, asked, block_p):
    """The chunks are dealt to the splits in contiguous ranges of whole chunks, none empty, all
    covered, never more splits than asked or than chunks (so any count, e.g. whole waves, runs)."""
    splits, chunks = ccfg.dw_split_plan(p, asked, block_p)
    assert chunks == -(-p // block_p) and splits == min(asked, chunks)
    bounds = [s * chunks // splits for s in range(splits + 1)]  # as the kernel computes them
    assert bounds[0] == 0 and bounds[-1] == chunks and all(b < c for b, c in zip(bounds, bounds[1:]))
    assert max(c - b for b, c in zip(bounds, bounds[1:])) == -(-chunks // splits)


def test_only_some_gradients(seed):
    """x without requires_grad (the encoder's input): no dx kernel, weight grads still right."""
    x, w, b = make_inputs(2, 3, 4, 4, 1)
    x = x.detach()
    y = conv_block(x, w, b, leaky_slope=None, backend="triton")
    g = torch.randn_like(y)
    dw, db = torch.autograd.grad(y, (w, b), g)
    _, (_, dw_ref, db_ref) = reference(x.requires_grad_(), w, b, g, dict(leaky_slope=None))
    assert_fp32_close(dw, dw_ref, "dw")
    assert_fp32_close(db, db_ref, "db")


def test_empty_batch(seed):
    x, w, b = make_inputs(0, 3, 4, 4, 3)
    y = conv_block(x, w, b, pool_output=True, backend="triton")
    assert y.shape == (0, 4, 2, 2)
    dx, dw, db = torch.autograd.grad(y.sum() + 0 * w.sum() + 0 * b.sum(), (x, w, b), allow_unused=True)
    assert dx.shape == x.shape and not dw.any() and not db.any()


# Small configs (16-row tiles) only for the CPU: many tiles per small test shape, so pid arithmetic
# and the pool windows across tiles are exercised; the GPU lists are run in full as well.
SMALL_MNK = [triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
             triton.Config(dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32))]
SMALL_DW = [triton.Config(dict(BLOCK_CI=16, BLOCK_CO=16, BLOCK_P=16))]


def run_configs(fwd_configs, dx_configs, dw_configs, *, dtype, device, shapes, check):
    """Each config of each kernel on each (n, cin, cout, size, k, flags), outputs poisoned (NaN)
    before the launch; `check(actual, expected, y_lowp_torch_or_None, name)` compares."""
    for n, cin, cout, size, k, flags in shapes:
        torch.manual_seed(0)
        x, w, b = make_inputs(n, cin, cout, size, k, dtype=dtype, device=device)
        x, w, b = x.detach(), w.detach(), b.detach()
        y_ref = conv_block_ref(x, w, b, upcast=True, **flags)
        grad = torch.randn_like(y_ref).to(dtype)
        _, (dx_ref, dw_ref, db_ref) = reference(x, w, b, grad, flags)
        lowp = None
        if dtype != torch.float32:  # PyTorch's own error in this dtype
            xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
            yl = conv_block_ref(xl, wl, bl, **flags)
            lowp = (yl,) + torch.autograd.grad(yl, (xl, wl, bl), grad)
        case = f"{n}x{cin}->{cout}@{size} k{k} {flag_id(flags)}"
        y0, sign = conv_fwd(x, w, b, **flags)
        for cfg in fwd_configs:
            y, _ = conv_fwd(x, w, b, **flags, config=cfg, poison=True)
            check(y, y_ref, lowp and lowp[0], f"y [{case}] {cfg}")
        for cfg in dx_configs:
            dx, _, _ = conv_bwd(grad, x, w, y0, sign, bias_dtype=b.dtype, **flags, need_dw=False,
                                need_db=False, dx_config=cfg, poison=True)
            check(dx, dx_ref, lowp and lowp[1], f"dx [{case}] {cfg}")
        for cfg in dw_configs:
            _, dw, db = conv_bwd(grad, x, w, y0, sign, bias_dtype=b.dtype, **flags, need_dx=False,
                                 dw_config=cfg, poison=True)
            check(dw, dw_ref, lowp and lowp[2], f"dw [{case}] {cfg}")
            check(db, db_ref, lowp and lowp[3], f"db [{case}] {cfg}")


def fp32_check(actual, expected, _lowp, name):
    assert_fp32_close(actual, expected, name)


def test_every_config_interpreter():
    """Every config of the three lists (and smaller ones) under the interpreter, outputs poisoned."""
    shapes = [(2, 17, 20, 6, 3, dict(upsample_input=False, leaky_slope=0.2, pool_output=True)),
              (2, 5, 3, 3, 3, dict(upsample_input=True, leaky_slope=0.2, pool_output=False))]
    one_tap = [c for c in DW_CONFIGS if c.kwargs["TAPS"] == 1]  # all-taps: one here, more in the split tests
    run_configs(FWD_CONFIGS + SMALL_MNK, DX_CONFIGS + SMALL_MNK, one_tap + DW_CONFIGS[-1:] + SMALL_DW,
                dtype=torch.float32, device=DEVICE, shapes=shapes, check=fp32_check)


def _legal(name, c):
    """tl.dot needs every tile dimension >= 16 on a GPU (the interpreter does not check) and Triton
    powers of two; the pool / upsample epilogues need BLOCK_M % 4 == 0; TAPS is 1 or all 9."""
    k = ccfg.normalized(name, c).kwargs
    tiles = [k[n] for n in (("BLOCK_CI", "BLOCK_CO", "BLOCK_P") if name == "dw" else ("BLOCK_M", "BLOCK_N", "BLOCK_K"))]
    ok = min(tiles) >= 16 and all(v & (v - 1) == 0 for v in tiles)
    if name == "dw":
        return ok and k["TAPS"] in (1, 9) and k["SPLITS"] >= 1 and k["REDUCE_GROUP"] >= 0
    return ok and k["BLOCK_M"] % 4 == 0 and k["SPLIT_K"] >= 1


def test_config_lists_fit_the_gpu_rules():
    for c in FWD_CONFIGS + DX_CONFIGS + [ccfg.INTERPRET_FWD_CONFIG, ccfg.INTERPRET_DX_CONFIG]:
        assert _legal("fwd", c), c
    for c in DW_CONFIGS + [ccfg.INTERPRET_DW_CONFIG]:
        assert _legal("dw", c), c
        k = c.kwargs  # 9 accumulators of CI x CO fp32 over 32 * warps threads: <= 72 registers
        assert k["TAPS"] == 1 or 9 * k["BLOCK_CI"] * k["BLOCK_CO"] <= 72 * 32 * c.num_warps, c


def shape(name, n, cin, cout, size, ks=3, runs=1, **flags):
    flags = dict(dict(UPSAMPLE=False, ACT=True, POOL=False), **flags)
    return ccfg.launch_shape(name, N=n, H=size, W=size, CIN=cin, COUT=cout, KS=ks, dtype=torch.bfloat16,
                             RUNS=runs, **flags)


@pytest.mark.parametrize("cin,cout,size,batch", ((1, 16, 32, 64), (3, 64, 32, 64), (16, 1, 32, 64),
                                                 (64, 64, 32, 1024), (256, 512, 4, 128), (256, 256, 8, 128),
                                                 (128, 256, 2, 64)))
def test_candidates(cin, cout, size, batch):
    """Candidates are legal, no tile is more than twice the channels it covers (the list never
    empties), split-K variants appear exactly for >= 64-row tiles of launches with few tiles, and
    every dW candidate's counters fit `dw_counter_size` (what the engine preallocates)."""
    for name in ("fwd", "dx", "dw"):
        args = shape(name, batch, cin, cout, size)
        cands = ccfg.candidates(name, args, "h100")
        assert cands and all(_legal(name, c) for c in cands)
        assert len({(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in cands}) == len(cands)
        if name == "dw":
            assert all(ccfg.dw_counters_needed(args, c) <= ccfg.dw_counter_size(3, cin, cout) for c in cands)
            assert all(c.kwargs["BLOCK_CI"] <= max(32, 2 * cin) and c.kwargs["BLOCK_CO"] <= max(32, 2 * cout)
                       for c in cands)
            continue
        split = [c for c in cands if c.kwargs["SPLIT_K"] > 1]
        assert all(c.kwargs["BLOCK_M"] >= 64 and ccfg.output_tiles(name, args, c) <= ccfg.SPLIT_K_MAX_TILES
                   for c in split)
        if min(cin, cout) >= 128 and size <= 8:  # the small-spatial wide layers get split-K
            assert split
        if batch == 1024:  # 65536 rows: thousands of tiles, no split
            assert not split


def test_candidates_fill_whole_waves():
    """dW: for the lines critic's first 3x3 layer (16->16 at 32x32, batch 128: 2048 chunks of 64
    pixels) the all-taps 16x16 tile gets split counts that make whole waves of 132 SMs (at least 2
    chunks per split, at most MAX_DW_SPLITS)."""
    args = shape("dw", 128, 16, 16, 32)
    counts = {c.kwargs["SPLITS"] * ccfg.dw_tiles(args, c) for c in ccfg.candidates("dw", args, "h100")
              if c.kwargs["TAPS"] == 9 and c.kwargs["BLOCK_CI"] == c.kwargs["BLOCK_CO"] == 16}
    assert {132, 264, 396, 528} <= counts and max(counts) <= ccfg.MAX_DW_SPLITS


def compile_sm90():
    """Compile each kernel for sm_90 and sm_80 without a GPU, the split-K and all-taps / two-level
    paths included: catches what only the GPU compiler rejects (dot tile sizes, layouts of the pool
    reshape, the atomics of the split reductions) and checks tensor-core MMA in bf16 (wgmma on
    sm_90) and shared memory within each GPU's per-block limit. Run with the interpreter off (see
    test_kernels_compile_for_sm90); acai_fast.ops.aot compiles every config the chooser can pick."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    limit = {90: 232448, 80: 166912}  # bytes of shared memory per block (H100/H200, A100)
    flags = dict(KS=3, UPSAMPLE=True, ACT=True, POOL=True)
    fwd, dx, dw = cbm._conv_fwd_kernel, cbm._conv_bwd_dx_kernel, cbm._conv_bwd_dw_kernel
    fwd_flags = dict(HAS_BIAS=True, SAVE_SIGN=True)
    dx_flags = dict(SIGN_FROM_OUT=False, GRAD_IS_DZ=False, INPUT_ACT=False)
    dw_flags = dict(SIGN_FROM_OUT=False, GRAD_IS_DZ=False, NEED_DB=True, SPLIT=True)
    # a block without pool reading dz (grad_is_dz), its dx applying its input's activation too
    dz = dict(POOL=False, SIGN_FROM_OUT=True, GRAD_IS_DZ=True)
    cases = [  # (kernel, dtype, arch, config, extra constexprs): every path once per GPU, fp32 too
        (fwd, "bf16", 90, mnk(64, 64, 64, 4, 3, 4), fwd_flags),
        (dx, "bf16", 90, mnk(64, 64, 64, 4, 3, 1), dx_flags),
        (dx, "bf16", 90, mnk(64, 128, 32, 8, 3, 3), dx_flags),
        (dx, "bf16", 90, mnk(64, 64, 64, 4, 3, 1), dict(dx_flags, INPUT_ACT=True)),
        (dx, "bf16", 90, mnk(128, 16, 16, 4, 3, 1), dict(dz, INPUT_ACT=True)),
        (dx, "bf16", 90, mnk(64, 128, 32, 8, 3, 3), dict(dz, INPUT_ACT=True)),
        (dw, "bf16", 90, dwc(64, 64, 64, 4, 3), dw_flags),
        (dw, "bf16", 90, dwc(32, 64, 32, 8, 1, 9), dw_flags),
        (dw, "bf16", 90, dwc(16, 16, 64, 4, 1, 9), dict(dw_flags, **dz)),
        (fwd, "fp32", 90, mnk(64, 64, 32, 4, 2, 1), fwd_flags),
        (dw, "fp32", 90, dwc(16, 16, 64, 4, 1, 9), dict(dw_flags, SPLIT=False)),
        (fwd, "bf16", 80, mnk(64, 64, 64, 4, 3, 2), fwd_flags),
        (dx, "bf16", 80, mnk(128, 16, 16, 4, 3, 1), dict(dz, INPUT_ACT=True)),
        (dx, "bf16", 80, mnk(64, 64, 64, 4, 3, 2), dict(dz, INPUT_ACT=True)),
        (dw, "bf16", 80, dwc(16, 32, 64, 4, 1, 9), dw_flags),
        (dw, "bf16", 80, dwc(16, 16, 64, 4, 1, 9), dict(dw_flags, **dz)),
    ]
    for fn, dt, arch, cfg, extra in cases:
        meta = {k: v for k, v in cfg.kwargs.items() if k in fn.arg_names}  # SPLITS is a grid size
        constexprs = {**flags, "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", **extra, **meta}
        signature = {}
        for name in fn.arg_names:  # pointers in the compute dtype, except the int8 sign map and counters
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = {"S_ptr": "*i8", "Counter_ptr": "*i32", "WS_ptr": "*fp32",
                                   "WSB_ptr": "*fp32"}.get(name, "*" + dt)
            else:
                signature[name] = "fp32" if name in ("leaky_slope", "input_slope") else "i32"
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        what = f"{fn.__name__} {dt} sm_{arch} {cfg.kwargs}"
        ptx = compiled.asm["ptx"]
        rows = cfg.kwargs.get("BLOCK_M", cfg.kwargs.get("BLOCK_CI"))  # the dot's M: wgmma needs >= 64
        mma = "wgmma" in ptx if arch == 90 and rows >= 64 else ("mma.sync" in ptx or "wgmma" in ptx)
        assert dt == "fp32" or mma, f"{what}: no tensor-core MMA"
        assert compiled.metadata.shared <= limit[arch], f"{what}: {compiled.metadata.shared} B of shared memory"


@pytest.mark.skipif(HAS_GPU, reason="the GPU tests compile and run every config")
def test_kernels_compile_for_sm90():
    compile_sm90_in_subprocess("test_conv_block")


# ------------------------------------------------------------------------------------------------
# The networks run on the triton backend
# ------------------------------------------------------------------------------------------------


def test_network_chain_matches_reference(seed):
    """A small encoder -> decoder (every block kind of SPEC section 1) on both backends."""
    enc, dec = Encoder(colors=3, depth=8, scales=2, latent=2), Decoder(latent=2, depth=8, scales=2, colors=3)
    enc_t, dec_t = copy.deepcopy(enc), copy.deepcopy(dec)
    enc_t.backend = dec_t.backend = "triton"
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out_ref = dec(enc(x))
    out = dec_t(enc_t(x))
    assert out.shape == (2, 3, 8, 8)
    assert_fp32_close(out, out_ref, "decoder output")
    loss_ref, loss = (out_ref ** 2).mean(), (out ** 2).mean()
    params_ref = list(enc.parameters()) + list(dec.parameters())
    params = list(enc_t.parameters()) + list(dec_t.parameters())
    for i, (g, e) in enumerate(zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref))):
        assert_fp32_close(g, e, f"param {i} grad")


# ------------------------------------------------------------------------------------------------
# Weights as the kernels read them
# ------------------------------------------------------------------------------------------------


def test_kernel_weight_layouts():
    """No copy when Cin or Cout is contiguous (any dtype: the kernels cast as they load); else a
    (k, k, Cin, Cout)-ordered copy."""
    w = torch.randn(5, 3, 3, 3)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert kernel_weight(w_cl) is w_cl
    w1 = torch.randn(5, 3, 1, 1)
    assert kernel_weight(w1) is w1
    wk = kernel_weight(w)
    assert wk is not w and wk.stride(0) == 1 and torch.equal(wk, w)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "transposed"))
def test_weight_layouts_give_the_same_block(layout, seed):
    x, w, b = make_inputs(2, 5, 6, 5, 3)
    w = w.detach()
    w = {"contiguous": w, "channels_last": w.contiguous(memory_format=torch.channels_last),
         "transposed": w.transpose(0, 1).contiguous().transpose(0, 1)}[layout].requires_grad_()
    _, (_, dw, _) = check_block(x, w, b, dict(upsample_input=False, leaky_slope=0.2, pool_output=True))
    assert dw.shape == w.shape


@pytest.mark.parametrize("impl", ("for-loop", "foreach", "fused"))
def test_updated_weights_are_used_after_any_optimizer(impl, seed):
    """Fused Adam updates weights without bumping weight._version: nothing is cached, so every call
    sees the current values."""
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    kwargs = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    opt = torch.optim.Adam([w], lr=0.1, **kwargs)
    x = torch.randn(1, 3, 4, 4)
    for _ in range(2):
        y = conv_block(x, w, None, leaky_slope=None, backend="triton")
        assert_fp32_close(y, conv_block_ref(x, w.detach(), None, leaky_slope=None), "y")
        w.grad = torch.randn_like(w)
        opt.step()


# ------------------------------------------------------------------------------------------------
# The launcher options of the fused engine
# ------------------------------------------------------------------------------------------------

ENGINE_FLAGS = [dict(upsample_input=False, leaky_slope=0.2, pool_output=True),   # sign map
                dict(upsample_input=True, leaky_slope=0.2, pool_output=False),   # sign from y
                dict(upsample_input=False, leaky_slope=None, pool_output=False)]


@pytest.mark.parametrize("flags", ENGINE_FLAGS, ids=[flag_id(f) for f in ENGINE_FLAGS])
def test_outputs_into_blocks_of_bigger_buffers(flags, seed):
    """out= / dx_out= write into row blocks of channels_last buffers and touch nothing else; the
    forward casts an fp32 x to the compute dtype in the kernel (out_dtype)."""
    x, w, b = (t.detach() for t in make_inputs(3, 5, 6, 6, 3))
    y_ref = conv_block_ref(x, w, b, upcast=True, **flags)
    big = torch.full((7, *y_ref.shape[1:]), 7.0, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y, sign = conv_fwd(x, w, b, out=big[2:5], out_dtype=torch.float32, **flags)
    assert y.data_ptr() == big[2:5].data_ptr()
    assert_fp32_close(big[2:5], y_ref, "y in place")
    assert (big[:2] == 7).all() and (big[5:] == 7).all()
    g = torch.randn_like(y_ref)
    _, (dx_ref, _, _) = reference(x, w, b, g, flags)
    dxbig = torch.full((5, *x.shape[1:]), 7.0, device=DEVICE).contiguous(memory_format=torch.channels_last)
    conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, need_dw=False, need_db=False, dx_out=dxbig[1:4], **flags)
    assert_fp32_close(dxbig[1:4], dx_ref, "dx in place")
    assert (dxbig[0] == 7).all() and (dxbig[4] == 7).all()
    with pytest.raises(ValueError, match="out must be a channels_last"):
        conv_fwd(x, w, b, out=big[2:4], **flags)


@pytest.mark.parametrize("flags", ENGINE_FLAGS, ids=[flag_id(f) for f in ENGINE_FLAGS])
def test_gradients_of_more_images_than_saved(flags, seed):
    """Gradient images NS.. of a 3N-image grad_y belong to saved images 0.. (image n -> n % NS):
    dx covers all of them, dW/db the first NS only (the critic's two objectives over one forward)."""
    x, w, b = (t.detach() for t in make_inputs(4, 5, 6, 6, 3))  # NS = 4 saved images
    y, sign = conv_fwd(x, w, b, **flags)
    g = torch.randn(6, *y.shape[1:], device=DEVICE)  # NG = 6: images 4, 5 reuse saved 0, 1
    dx, dw, db = conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, **flags)
    _, (dx_a, dw_a, db_a) = reference(x, w, b, g[:4], flags)
    _, (dx_b, _, _) = reference(x[:2], w, b, g[4:], flags)
    assert_fp32_close(dx, torch.cat([dx_a, dx_b]), "dx")
    assert_fp32_close(dw, dw_a, "dw over the first NS")
    assert_fp32_close(db, db_a, "db over the first NS")
    with pytest.raises(ValueError, match="at least one gradient image"):
        conv_bwd(g[:3], x, w, y, sign, bias_dtype=b.dtype, **flags)


def test_split_reduction_into_strided_fp32_grads(seed):
    """Several pixel splits: the last program of each tile sums the partials in split order and
    writes dw/db (fp32, any layout: here the channels_last .grad of a bf16-free fp32 weight) in the
    same launch; counters are left at zero, and a second call is bitwise identical."""
    n, size = 2, 32
    assert ccfg.dw_heuristic_splits(n * size * size, 3, 3, 5) > 1
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    x, w, b = (t.detach() for t in make_inputs(n, 3, 5, size, 3))
    w = w.contiguous(memory_format=torch.channels_last)
    y, sign = conv_fwd(x, w, b, **flags)
    g = torch.randn_like(y)
    _, (_, dw_ref, db_ref) = reference(x, w, b, g, flags)
    dw_out = torch.full_like(w, float("nan"))
    db_out = torch.full_like(b, float("nan"))
    counter = torch.zeros(cbm.dw_counter_size(3, 3, 5), dtype=torch.int32, device=DEVICE)
    results = []
    for _ in range(2):
        _, dw, db = conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, need_dx=False, dw_out=dw_out,
                             db_out=db_out, dw_counter=counter, **flags)
        assert dw is dw_out and db is db_out and dw.stride() == w.stride()
        assert not counter.any()
        results.append((dw.clone(), db.clone()))
    assert_fp32_close(results[0][0], dw_ref, "dw")
    assert_fp32_close(results[0][1], db_ref, "db")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------------
# Split reductions: fwd/dx split-K, dW with all taps per program and a two-level reduction
# ------------------------------------------------------------------------------------------------

# (N, Cin, Cout, size, flags): the fwd/dx of a small-spatial wide-ish layer and of odd channel counts.
# With BLOCK_K = 16, 17 -> 20 channels give 9 * 2 = 18 (tap, chunk) steps in the forward and dx: 4
# splits of 5, 5, 5, 3 steps (S does not divide them), 7 splits of 3 (the last empty, so 6 run).
SPLIT_SHAPES = [(2, 17, 20, 6, dict(upsample_input=False, leaky_slope=0.2, pool_output=True)),
                (3, 20, 17, 2, dict(upsample_input=True, leaky_slope=0.2, pool_output=False)),
                (2, 32, 48, 4, dict(upsample_input=False, leaky_slope=None, pool_output=False))]
SPLIT_K_CONFIGS = [mnk(64, 16, 16, 4, 1, 4), mnk(64, 32, 16, 4, 1, 7), mnk(16, 16, 16, 4, 1, 2)]


def _split_case(n, cin, cout, size, flags):
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in make_inputs(n, cin, cout, size, 3))
    y, sign = conv_fwd(x, w, b, **flags)
    g = torch.randn_like(y)
    y_ref, (dx_ref, dw_ref, db_ref) = reference(x, w, b, g, flags)
    return x, w, b, y, sign, g, (y_ref, dx_ref, dw_ref, db_ref)


@pytest.mark.parametrize("case", range(len(SPLIT_SHAPES)))
def test_split_k_matches_reference(case):
    """fwd and dx with SPLIT_K > 1 (S dividing the steps or not, more splits than steps, 16- and
    64-row tiles): equal to the fp64 reference (fp32 sums in another order: the same 1e-4 tolerance
    as every fp32 test), bitwise equal on a second run, counters left at zero, outputs poisoned."""
    n, cin, cout, size, flags = SPLIT_SHAPES[case]
    x, w, b, y0, sign, g, (y_ref, dx_ref, _, _) = _split_case(n, cin, cout, size, flags)
    counter = torch.zeros(ccfg.split_k_counter_size(), dtype=torch.int32, device=DEVICE)
    for cfg in SPLIT_K_CONFIGS:
        ys = [conv_fwd(x, w, b, **flags, config=cfg, counter=counter, poison=True)[0] for _ in range(2)]
        assert not counter.any(), f"fwd {cfg} left a counter set"
        assert_fp32_close(ys[0], y_ref, f"y {cfg}")
        assert torch.equal(ys[0], ys[1]), f"fwd {cfg} not repeatable"
        dxs = [conv_bwd(g, x, w, y0, sign, bias_dtype=b.dtype, **flags, need_dw=False, need_db=False,
                        dx_config=cfg, dx_counter=counter, poison=True)[0] for _ in range(2)]
        assert not counter.any(), f"dx {cfg} left a counter set"
        assert_fp32_close(dxs[0], dx_ref, f"dx {cfg}")
        assert torch.equal(dxs[0], dxs[1]), f"dx {cfg} not repeatable"


# (TAPS, SPLITS, REDUCE_GROUP) on 5 chunks of 16 pixels: all 9 taps without a split; one group of 5;
# groups of 2 (2 + 2 + 1: not dividing), one tap per program; groups of 3 (3 + 2), all taps.
# (One tap per program without a split: test_every_config_interpreter.)
DW_SPLIT_CONFIGS = [dwc(16, 16, 16, 4, 1, taps, splits, group)
                    for taps, splits, group in ((9, 1, 1), (9, 5, 5), (1, 5, 2), (9, 5, 3))]
# 72-75 pixels (5 chunks of 16): every split count above runs as asked
DW_SHAPES = [(2, 17, 20, 6, SPLIT_SHAPES[0][4]), (2, 20, 17, 3, SPLIT_SHAPES[1][4]),
             (3, 32, 48, 5, SPLIT_SHAPES[2][4])]


@pytest.mark.parametrize("case", range(len(DW_SHAPES)))
def test_dw_taps_and_two_level_reduction(case):
    """dW/db with all 9 taps per program (odd Cin/Cout: 17/20/48 channels over 16-wide tiles) and the
    two-level split reduction (groups not dividing the splits): equal to the fp64 reference,
    bitwise repeatable, counters at zero, outputs poisoned; the db of the all-taps programs too."""
    n, cin, cout, size, flags = DW_SHAPES[case]
    x, w, b, y0, sign, g, (_, _, dw_ref, db_ref) = _split_case(n, cin, cout, size, flags)
    counter = torch.zeros(ccfg.dw_counter_size(3, cin, cout), dtype=torch.int32, device=DEVICE)
    P = n * size * size * (4 if flags["upsample_input"] else 1)
    for cfg in DW_SPLIT_CONFIGS:
        k = cfg.kwargs
        assert ccfg.dw_split_plan(P, k["SPLITS"], k["BLOCK_P"])[0] == k["SPLITS"]  # the splits asked run
        repeats = 2 if k["SPLITS"] > 1 else 1  # the split paths: bitwise repeatable
        runs = [conv_bwd(g, x, w, y0, sign, bias_dtype=b.dtype, **flags, need_dx=False, dw_config=cfg,
                         dw_counter=counter, poison=True)[1:] for _ in range(repeats)]
        assert not counter.any(), f"dw {k} left a counter set"
        assert_fp32_close(runs[0][0], dw_ref, f"dw {k}")
        assert_fp32_close(runs[0][1], db_ref, f"db {k}")
        assert torch.equal(runs[0][0], runs[-1][0]) and torch.equal(runs[0][1], runs[-1][1]), f"{k} not repeatable"


def test_split_paths_of_an_array_equal_single_runs(seed):
    """R = 2 runs in one launch (each with its own workspace slots and counters) equal two single-run
    launches bit for bit, for split-K fwd/dx and the all-taps two-level dW."""
    from acai_fast.ops.conv_block import empty_activation
    runs, n, cin, cout, size = 2, 2, 17, 20, 6
    flags = SPLIT_SHAPES[0][4]
    xs, ws, bs = zip(*[(t.detach() for t in make_inputs(n, cin, cout, size, 3)) for _ in range(runs)])
    x = empty_activation((n, cin, size, size), torch.float32, DEVICE, runs)
    for r in range(runs):
        x[r].copy_(xs[r])
    w, b = torch.stack(ws), torch.stack(bs)
    fcfg, dcfg = SPLIT_K_CONFIGS[0], DW_SPLIT_CONFIGS[-1]
    y, sign = conv_fwd(x, w, b, **flags, config=fcfg)
    g = torch.randn(runs, n, *y.shape[-3:], device=DEVICE)
    g = g.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    dx, dw, db = conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, **flags, dx_config=fcfg, dw_config=dcfg)
    for r in range(runs):
        y1, s1 = conv_fwd(xs[r], ws[r], bs[r], **flags, config=fcfg)
        dx1, dw1, db1 = conv_bwd(g[r], xs[r], ws[r], y1, s1, bias_dtype=b.dtype, **flags, dx_config=fcfg,
                                 dw_config=dcfg)
        assert torch.equal(y[r], y1) and torch.equal(dx[r], dx1), f"run {r} y/dx"
        assert torch.equal(dw[r], dw1) and torch.equal(db[r], db1), f"run {r} dw/db"


def test_split_counters_too_small_are_refused(seed):
    x, w, b = (t.detach() for t in make_inputs(2, 5, 6, 6, 3))
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=False)
    small = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="split-K counter"):
        conv_fwd(x, w, b, **flags, config=mnk(16, 16, 16, 4, 1, 2), counter=small)
    y, sign = conv_fwd(x, w, b, **flags)
    with pytest.raises(ValueError, match="dw_counter must hold"):
        conv_bwd(torch.randn_like(y), x, w, y, sign, bias_dtype=b.dtype, **flags, need_dx=False,
                 dw_config=dwc(16, 16, 16, 4, 1, 1, 4, 2), dw_counter=small)
    with pytest.raises(ValueError, match="3x3 kernels only"):
        w5 = torch.randn(6, 5, 5, 5, device=DEVICE)
        conv_bwd(torch.randn_like(y), x, w5, y, sign, bias_dtype=b.dtype, **flags, need_dx=False,
                 dw_config=dwc(16, 16, 16, 4, 1, 9))


# ------------------------------------------------------------------------------------------------
# dL/dz handed down a chain: block i+1's dx applies block i's leaky-ReLU derivative in its epilogue
# (input_leaky_slope), block i's dx and dW read that gradient as dz (grad_is_dz)
# ------------------------------------------------------------------------------------------------

def _stacked(t, ng):
    """The saved images n % NS that NG stacked gradient images n belong to."""
    return t[[i % t.shape[0] for i in range(ng)]]


# block i+1's flags (the producer: any kind of block) and block i's (the consumer: no pool)
PRODUCER_FLAGS = [dict(upsample_input=False, leaky_slope=0.2, pool_output=True),    # sign map
                  dict(upsample_input=True, leaky_slope=0.2, pool_output=False),    # sign from y, 2x2 sum
                  dict(upsample_input=False, leaky_slope=0.2, pool_output=False),
                  dict(upsample_input=True, leaky_slope=None, pool_output=True)]
CONSUMER_FLAGS = [dict(upsample_input=False, leaky_slope=0.2, pool_output=False),
                  dict(upsample_input=True, leaky_slope=0.2, pool_output=False),
                  dict(upsample_input=False, leaky_slope=None, pool_output=False)]  # dz = dy: a no-op
# the interpreter's config (one 256-row tile), split-K with 4 and with 7 splits of (9 taps x 1 chunk)
DZ_DX_CONFIGS = [None, mnk(16, 16, 16, 4, 1, 4), mnk(64, 16, 16, 4, 1, 7)]


@pytest.mark.parametrize("slope", (0.2, 0.0))
@pytest.mark.parametrize("flags", PRODUCER_FLAGS, ids=[flag_id(f) for f in PRODUCER_FLAGS])
def test_dx_through_the_input_activation(flags, slope, seed):
    """input_leaky_slope: dx = d loss / d z_prev for x = leaky_relu(z_prev, slope), against fp64
    autograd through that ReLU and the block; NG = 5 gradient images over NS = 2 saved ones (image n
    reads x[n % NS]), odd channels (17 over 16-wide tiles, 6 reduced in 16-deep chunks), the
    interpreter's and split-K configs, outputs poisoned; dw and db as without it."""
    ns, ng, cin, cout = 2, 5, 17, 6
    size = 3 if flags["upsample_input"] else 6
    z_prev = torch.randn(ns, cin, size, size, device=DEVICE)
    x = torch.nn.functional.leaky_relu(z_prev, slope).contiguous(memory_format=torch.channels_last)
    _, w, b = (t.detach() for t in make_inputs(ns, cin, cout, size, 3))
    y, sign = conv_fwd(x, w, b, **flags)
    g = torch.randn(ng, *y.shape[1:], device=DEVICE)
    zp = _stacked(z_prev.double(), ng).requires_grad_()
    y_ref = conv_block_ref(torch.nn.functional.leaky_relu(zp, slope), w.double(), b.double(), **flags)
    dz_ref, = torch.autograd.grad(y_ref, zp, g.double())
    _, (_, dw_ref, db_ref) = reference(x, w, b, g[:ns], flags)
    assert (x <= 0).any() and (x > 0).any(), "both branches of the ReLU's derivative"
    counter = torch.zeros(ccfg.split_k_counter_size(), dtype=torch.int32, device=DEVICE)
    for cfg in DZ_DX_CONFIGS:
        dz, dw, db = conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, **flags, input_leaky_slope=slope,
                              dx_config=cfg, dx_counter=counter, poison=True)
        assert not counter.any(), f"{cfg} left a counter set"
        assert_fp32_close(dz, dz_ref, f"dL/dz_prev {cfg}")
        assert_fp32_close(dw, dw_ref, "dw")
        assert_fp32_close(db, db_ref, "db")


# dW: the interpreter's config (one tap per program), all 9 taps with a two-level split reduction
DZ_DW_CONFIGS = [None, dwc(16, 16, 16, 4, 1, 9, 5, 3)]


@pytest.mark.parametrize("flags", CONSUMER_FLAGS, ids=[flag_id(f) for f in CONSUMER_FLAGS])
def test_grad_is_dz(flags, seed):
    """grad_is_dz: grad_y is dL/dz (before this block's activation): dx, dw, db equal fp64 autograd
    of the conv alone (conv_block_ref without activation) with that gradient; y and sign are not
    read (None); NG = 3 over NS = 2 (dW over the first NS), odd channels, split-K dx, all-taps
    two-level dW, outputs poisoned, counters left at zero."""
    ns, ng, cin, cout = 2, 3, 17, 20
    size = 3 if flags["upsample_input"] else 6  # 72 conv pixels: 5 dW chunks of 16
    x, w, b = (t.detach() for t in make_inputs(ns, cin, cout, size, 3))
    conv = dict(flags, leaky_slope=None)
    dz = torch.randn(ng, *conv_block_ref(x, w, b, **conv).shape[1:], device=DEVICE)
    _, (dx_ref, _, _) = reference(_stacked(x, ng), w, b, dz, conv)
    _, (_, dw_ref, db_ref) = reference(x, w, b, dz[:ns], conv)
    dx_counter = torch.zeros(ccfg.split_k_counter_size(), dtype=torch.int32, device=DEVICE)
    dw_counter = torch.zeros(ccfg.dw_counter_size(3, cin, cout), dtype=torch.int32, device=DEVICE)
    for dx_cfg, dw_cfg in itertools.zip_longest(DZ_DX_CONFIGS, DZ_DW_CONFIGS):
        dx, dw, db = conv_bwd(dz, x, w, None, None, bias_dtype=b.dtype, **flags, grad_is_dz=True,
                              dx_config=dx_cfg, dw_config=dw_cfg, dx_counter=dx_counter,
                              dw_counter=dw_counter, poison=True)
        assert not dx_counter.any() and not dw_counter.any(), f"{dx_cfg} / {dw_cfg} left a counter set"
        assert_fp32_close(dx, dx_ref, f"dx {dx_cfg}")
        assert_fp32_close(dw, dw_ref, f"dw {dw_cfg}")
        assert_fp32_close(db, db_ref, f"db {dw_cfg}")


# the links of the networks (networks.py): encoder/critic pairs (-> a pooled block, -> the last block
# without activation), decoder (-> an upsampling block, up -> plain, up -> the last block)
NO_ACT = dict(upsample_input=False, leaky_slope=None, pool_output=False)
CHAIN_PAIRS = [(CONSUMER_FLAGS[0], PRODUCER_FLAGS[0]), (CONSUMER_FLAGS[0], NO_ACT),
               (CONSUMER_FLAGS[0], PRODUCER_FLAGS[1]), (CONSUMER_FLAGS[1], PRODUCER_FLAGS[2]),
               (CONSUMER_FLAGS[1], NO_ACT)]


@pytest.mark.parametrize("pair", CHAIN_PAIRS, ids=[f"{flag_id(a)}>{flag_id(b)}" for a, b in CHAIN_PAIRS])
def test_chain_hands_down_dz(pair, seed):
    """Two blocks A -> B (A: leaky ReLU, no pool): B's dx with input_leaky_slope and A's backward
    with grad_is_dz give A's dx, dw, db of the fp64 chain (autograd), and, in fp32, bit for bit
    what the dL/dy path gives (the same products: round(acc) * slope = round(acc * slope) when acc is
    already fp32); for an array of 2 runs in one launch each, with 3N stacked gradient rows over 2N
    saved images (the critic's pass), split-K dx and an all-taps split dW."""
    fa, fb = pair
    runs, ns, ng, c0, c1, c2 = 2, 2, 3, 5, 17, 6
    size = 3 if fa["upsample_input"] else 6  # A's conv: 2 x 6 x 6 = 72 pixels, 5 dW chunks of 16
    xa = empty_activation((ns, c0, size, size), torch.float32, DEVICE, runs)
    xa.copy_(torch.randn(runs, ns, c0, size, size))
    wa = torch.randn(runs, c1, c0, 3, 3, device=DEVICE) / (9 * c0) ** 0.5
    wb = torch.randn(runs, c2, c1, 3, 3, device=DEVICE) / (9 * c1) ** 0.5
    ba, bb = torch.randn(runs, c1, device=DEVICE) * 0.1, torch.randn(runs, c2, device=DEVICE) * 0.1
    ya, sa = conv_fwd(xa, wa, ba, **fa)
    yb, sb = conv_fwd(ya, wb, bb, **fb)
    g = empty_activation((ng, *yb.shape[-3:]), torch.float32, DEVICE, runs)
    g.copy_(torch.randn(runs, ng, *yb.shape[-3:]))
    dxc = torch.zeros(ccfg.split_k_counter_size(runs), dtype=torch.int32, device=DEVICE)
    dw_counter = torch.zeros(ccfg.dw_counter_size(3, c0, c1, runs), dtype=torch.int32, device=DEVICE)
    cfg = dict(dx_config=DZ_DX_CONFIGS[1], dx_counter=dxc)
    cfg_a = dict(cfg, dw_config=DZ_DW_CONFIGS[1], dw_counter=dw_counter)
    dz_a, _, _ = conv_bwd(g, ya, wb, yb, sb, **fb, need_dw=False, need_db=False, input_leaky_slope=0.2,
                          poison=True, **cfg)
    new = conv_bwd(dz_a, xa, wa, None, None, bias_dtype=ba.dtype, **fa, grad_is_dz=True, poison=True, **cfg_a)
    dy_a, _, _ = conv_bwd(g, ya, wb, yb, sb, **fb, need_dw=False, need_db=False, **cfg)
    old = conv_bwd(dy_a, xa, wa, ya, sa, bias_dtype=ba.dtype, **fa, **cfg_a)
    assert not dxc.any() and not dw_counter.any()
    for name, a, o in zip(("dx", "dw", "db"), new, old):
        assert torch.equal(a, o), f"{name}: the dz path differs from the dL/dy path in fp32"
    for r in range(runs):  # fp64 autograd of the chain, stacked rows as the kernels read them
        xr = _stacked(xa[r].double(), ng).requires_grad_()
        wr, br = (t[r].double().requires_grad_() for t in (wa, ba))
        yr = conv_block_ref(conv_block_ref(xr, wr, br, **fa), wb[r].double(), bb[r].double(), **fb)
        dx_ref, = torch.autograd.grad(yr, xr, g[r].double())
        yr = conv_block_ref(conv_block_ref(xr[:ns], wr, br, **fa), wb[r].double(), bb[r].double(), **fb)
        dw_ref, db_ref = torch.autograd.grad(yr, (wr, br), g[r, :ns].double())
        for name, got, ref in zip(("dx", "dw", "db"), new, (dx_ref, dw_ref, db_ref)):
            assert_fp32_close(got[r], ref, f"run {r} {name}")
        if r == 0:
            continue
        # the second run alone (run strides 0): the same bits as its row of the array launch
        dz1, _, _ = conv_bwd(g[r], ya[r], wb[r], yb[r], sb[r] if sb is not None else None, **fb, need_dw=False,
                             need_db=False, input_leaky_slope=0.2, **cfg)
        one = conv_bwd(dz1, xa[r], wa[r], None, None, bias_dtype=ba.dtype, **fa, grad_is_dz=True,
                       dx_config=cfg_a["dx_config"], dw_config=cfg_a["dw_config"])
        assert torch.equal(dz1, dz_a[r]) and all(torch.equal(a[r], o) for a, o in zip(new, one)), f"run {r}"


def test_dz_arguments_are_checked(seed):
    x, w, b = (t.detach() for t in make_inputs(2, 3, 4, 4, 3))
    pooled = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    y, sign = conv_fwd(x, w, b, **pooled)
    with pytest.raises(ValueError, match="grad_is_dz needs a block without pool"):
        conv_bwd(torch.randn_like(y), x, w, y, sign, bias_dtype=b.dtype, **pooled, grad_is_dz=True)
    for bad in (-0.1, float("nan"), float("inf"), "0.2"):
        with pytest.raises(ValueError, match="input_leaky_slope must be a finite number >= 0"):
            conv_bwd(torch.randn_like(y), x, w, y, sign, bias_dtype=b.dtype, **pooled, input_leaky_slope=bad)


def test_bf16_weight_copy(seed):
    """The kernels read the weight in whatever dtype it is stored (here the bf16 channels_last copy
    an optimizer step writes) and cast it as they load; the gradients stay fp32 (weight_dtype,
    bias_dtype) for the fp32 master parameters. fp32 activations under the interpreter: the result
    equals the reference run on the bf16 values exactly widened to fp32."""
    x, w, b = (t.detach() for t in make_inputs(2, 6, 5, 6, 3))
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    w16 = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b16 = b.to(torch.bfloat16)
    y, sign = conv_fwd(x, w16, b16, **flags, config=SPLIT_K_CONFIGS[2])
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    y_ref, (dx_ref, dw_ref, db_ref) = reference(x, w16.float(), b16.float(), g, flags)
    assert_fp32_close(y, y_ref, "y")
    dx, dw, db = conv_bwd(g, x, w16, y, sign, weight_dtype=torch.float32, bias_dtype=torch.float32, **flags,
                          dx_config=SPLIT_K_CONFIGS[2], dw_config=DW_SPLIT_CONFIGS[-1])
    assert dx.dtype == dw.dtype == db.dtype == torch.float32
    for name, got, want in (("dx", dx, dx_ref), ("dw", dw, dw_ref), ("db", db, db_ref)):
        assert_fp32_close(got, want, name)


# ------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ------------------------------------------------------------------------------------------------


def test_resolve_backend_is_visible(caplog):
    x = torch.randn(1, 2, 4, 4)
    assert resolve_backend(x, "auto") == ("triton" if x.is_cuda else "reference")
    assert resolve_backend(x, "triton") == "triton" and resolve_backend(x, "reference") == "reference"
    w, b = torch.randn(3, 2, 3, 3), torch.zeros(3)
    with caplog.at_level(logging.DEBUG, logger="acai_fast.ops.conv_block"):
        conv_block(x, w, b, backend="auto")
    assert "backend=reference" in caplog.text
    with pytest.raises(ValueError, match="unknown backend"):
        conv_block(x, w, b, backend="cudnn")


def test_auto_on_cpu_is_the_reference(seed):
    x, w, b = make_inputs(2, 3, 4, 4, 3, device="cpu")
    y = conv_block(x, w, b, pool_output=True, backend="auto")
    assert torch.equal(y, conv_block_ref(x, w, b, pool_output=True))


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come before."""
    def launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(cbm, "_launch", launch)


BAD = [
    ("non-4D", lambda: (torch.randn(3, 4, 4), torch.randn(2, 3, 3, 3), torch.zeros(2)), "4-D"),
    ("channels", lambda: (torch.randn(1, 4, 4, 4), torch.randn(2, 3, 3, 3), torch.zeros(2)), "4 channels"),
    ("even kernel", lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.zeros(2)), "odd k"),
    ("bias shape", lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), torch.zeros(3)), "bias"),
    ("dtype mix", lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3).half(), torch.zeros(2).half()),
     "dtype mix"),
    ("dtype mix bias", lambda: (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), torch.zeros(2).double()),
     "dtype mix"),
    ("int input", lambda: (torch.ones(1, 3, 4, 4, dtype=torch.int32), torch.randn(2, 3, 3, 3), torch.zeros(2)),
     "dtype"),
    ("not a tensor", lambda: ([[1.0]], torch.randn(2, 3, 3, 3), torch.zeros(2)), "torch.Tensor"),
]


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, backend, no_launch):
    _, make, match = case
    x, w, b = make()
    with pytest.raises(ValueError, match=match):
        conv_block(x, w, b, backend=backend)


def test_pool_too_small(no_launch):
    with pytest.raises(ValueError, match="too small"):
        conv_block(torch.randn(1, 3, 1, 1), torch.randn(2, 3, 3, 3), torch.zeros(2), pool_output=True,
                   backend="triton")


def test_cpu_tensors_to_triton_without_interpreter(monkeypatch, no_launch):
    monkeypatch.setattr(cbm, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        conv_block(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), torch.zeros(2), backend="triton")


@pytest.mark.gpu
def test_mixed_devices(no_launch):
    with pytest.raises(ValueError, match="one device"):
        conv_block(torch.randn(1, 3, 4, 4, device="cuda"), torch.randn(2, 3, 3, 3), torch.zeros(2),
                   backend="triton")


# ------------------------------------------------------------------------------------------------
# The benchmark's pure-Python parts
# ------------------------------------------------------------------------------------------------


def load_bench():
    """bench/bench_conv_block.py as a module (bench/ is not a package)."""
    if "bench_conv_block" not in sys.modules:
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            spec = importlib.util.spec_from_file_location("bench_conv_block", ROOT / "bench" / "bench_conv_block.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules["bench_conv_block"] = module  # dataclasses look their module up while building
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ROOT / "bench"))
    return sys.modules["bench_conv_block"]


@pytest.mark.parametrize("preset", PRESETS)
def test_bench_layer_enumeration(preset):
    """Every ConvBlock of encoder, decoder and critic, once per distinct shape, with the spatial
    size it really sees (checked by running the reference networks on meta tensors)."""
    bench = load_bench()
    layers = bench.preset_layers(preset)
    config = ACAIConfig.preset(preset)
    nets = {name: net.to("meta") for name, net in build_networks(config).items()}
    seen = {}
    for name, size in (("encoder", 32), ("decoder", config.latent_width), ("critic", 32)):
        x = torch.empty(2, nets[name].blocks[0].weight.shape[1], size, size, device="meta")
        for block in nets[name].blocks:
            cout, cin, k, _ = block.weight.shape
            key = (cin, cout, k, x.shape[-1], block.upsample_input, block.leaky_slope, block.pool_output)
            seen[key] = seen.get(key, 0) + 1
            x = block(x)
    got = {(l.cin, l.cout, l.k, l.size, l.upsample_input, l.leaky_slope, l.pool_output): l.count for l in layers}
    assert got == seen
    assert sum(l.count for l in layers) == sum(len(nets[n].blocks) for n in ("encoder", "decoder", "critic"))


def test_bench_flop_count():
    bench = load_bench()
    layer = bench.Layer(preset="x", cin=16, cout=32, k=3, size=8, upsample_input=True, leaky_slope=0.2,
                        pool_output=False, count=1)
    fwd = 2 * 64 * 16 * 16 * 32 * 16 * 9  # the conv runs at 16x16 after the upsample
    assert bench.flops(layer, 64, "fwd") == fwd
    assert bench.flops(layer, 64, "bwd") == 2 * fwd
    assert bench.flops(layer, 64, "fwd_bwd") == 3 * fwd


def test_bench_modelled_column():
    """The modelled time of a layer's fused launches: bwd is dx + dW, fwd_bwd all three, positive
    on every GPU the model knows."""
    bench = load_bench()
    layer = bench.Layer(preset="x", cin=64, cout=128, k=3, size=8, upsample_input=False, leaky_slope=0.2,
                        pool_output=True, count=1)
    for gpu in ("a100", "h100", "h200"):
        t = {d: bench.modelled_ms(layer, 64, d, gpu) for d in ("fwd", "bwd", "fwd_bwd")}
        assert 0 < t["fwd"] < t["fwd_bwd"] and t["fwd_bwd"] == pytest.approx(t["fwd"] + t["bwd"])


def test_bench_summary_stats():
    _common = sys.modules[load_bench().summarize.__module__]
    assert _common.summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))


# ------------------------------------------------------------------------------------------------
# GPU: bf16 on every preset's layers, every config, fp32 master weights, CUDA graphs
# ------------------------------------------------------------------------------------------------


def all_preset_layers():
    bench = load_bench()
    unique = {}
    for preset in PRESETS:
        for l in bench.preset_layers(preset):
            unique.setdefault((l.cin, l.cout, l.k, l.size, l.upsample_input, l.leaky_slope, l.pool_output), l)
    return list(unique.values())


def lowp_check(actual, expected, torch_lowp, name):
    assert not actual.isnan().any(), f"{name}: NaN (poisoned output not fully written?)"
    assert_close_lowp(actual, expected, torch_lowp, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", (64, 1024))
def test_gpu_bf16_every_preset_layer(batch):
    """bf16 fused block (autotuned) vs the fp32 reference, within 2x PyTorch's own bf16 error."""
    for l in all_preset_layers():
        torch.manual_seed(0)
        flags = dict(upsample_input=l.upsample_input, leaky_slope=l.leaky_slope, pool_output=l.pool_output)
        x, w, b = make_inputs(batch, l.cin, l.cout, l.size, l.k, dtype=torch.bfloat16, device="cuda")
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        y = conv_block(x, w, b, backend="triton", **flags)
        grad = torch.randn_like(y)
        got = (y,) + torch.autograd.grad(y, (x, w, b), grad)
        xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
        yf = conv_block_ref(xf, wf, bf, **flags)
        ref = (yf,) + torch.autograd.grad(yf, (xf, wf, bf), grad.float())
        xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
        yl = conv_block_ref(xl, wl, bl, **flags)
        lowp = (yl,) + torch.autograd.grad(yl, (xl, wl, bl), grad)
        for name, a, r, p in zip(("y", "dx", "dw", "db"), got, ref, lowp):
            lowp_check(a.float(), r, p.float(), f"{name} {l} batch {batch}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_gpu_every_config(dtype, monkeypatch):
    """Every config that the autotuner can choose, on realistic and odd shapes, outputs poisoned."""
    shapes = [(64, 64, 64, 32, 3, dict(upsample_input=False, leaky_slope=0.2, pool_output=True)),
              (64, 256, 512, 4, 3, dict(upsample_input=False, leaky_slope=0.2, pool_output=False)),
              (64, 64, 3, 16, 3, dict(upsample_input=True, leaky_slope=None, pool_output=False)),
              (3, 17, 5, 6, 3, dict(upsample_input=False, leaky_slope=0.2, pool_output=True)),
              (3, 2, 17, 5, 3, dict(upsample_input=True, leaky_slope=0.2, pool_output=True)),
              (3, 1, 16, 1, 1, dict(upsample_input=False, leaky_slope=None, pool_output=False))]
    if dtype == torch.float32:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # keep PyTorch's side exact
        check = fp32_check
    else:
        check = lowp_check
    # the split paths too: split-K variants of the >= 64-row tiles, dW pixel splits in two levels
    split_mnk = [mnk(64, 64, 64, 4, 3, 4), mnk(64, 128, 32, 4, 3, 3), mnk(128, 128, 32, 8, 3, 2)]
    split_dw = [dwc(16, 16, 64, 4, 1, 9, 37, 6), dwc(64, 64, 64, 4, 3, 1, 10, 3), dwc(32, 64, 32, 8, 1, 9, 5, 5)]
    run_configs(FWD_CONFIGS + split_mnk, DX_CONFIGS + split_mnk, DW_CONFIGS + split_dw, dtype=dtype,
                device="cuda", shapes=shapes, check=check)


@pytest.mark.gpu
def test_gpu_split_paths_in_a_cuda_graph(seed):
    """Split-K fwd/dx and the two-level dW, captured in a CUDA graph with preallocated counters and
    bf16 weights (the copy an optimizer step writes): two replays are bitwise equal to the eager
    launches (the reductions sum in a fixed order, whichever program finishes last) and leave the
    counters at zero."""
    x, w, b = (t.detach() for t in make_inputs(128, 256, 256, 8, 3, dtype=torch.bfloat16, device="cuda"))
    x = x.contiguous(memory_format=torch.channels_last)
    w16 = w.contiguous(memory_format=torch.channels_last)
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    fcfg, dcfg = mnk(64, 128, 32, 4, 3, 3), dwc(32, 64, 32, 8, 1, 9, 24, 5)
    counters = [torch.zeros(cbm.split_k_counter_size(), dtype=torch.int32, device="cuda") for _ in range(2)]
    dwc_counter = torch.zeros(cbm.dw_counter_size(3, 256, 256), dtype=torch.int32, device="cuda")
    dw_out = torch.empty(w.shape, device="cuda").contiguous(memory_format=torch.channels_last)
    db_out = torch.empty(256, device="cuda")

    def step():
        y, sign = conv_fwd(x, w16, b, **flags, config=fcfg, counter=counters[0])
        dx, _, _ = conv_bwd(torch.ones_like(y), x, w16, y, sign, weight_dtype=torch.float32,
                            bias_dtype=torch.float32, **flags, dx_config=fcfg, dw_config=dcfg,
                            dx_counter=counters[1], dw_counter=dwc_counter, dw_out=dw_out, db_out=db_out)
        return y, dx

    eager = [t.clone() for t in step()] + [dw_out.clone(), db_out.clone()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, e in zip(list(outs) + [dw_out, db_out], eager):
            assert torch.equal(a, e)
        assert not any(c.any() for c in counters + [dwc_counter])


@pytest.mark.gpu
def test_gpu_fp32_master_weights(seed):
    """bf16 activations with fp32 weight and bias: bf16 output, fp32 weight/bias gradients."""
    x, w, b = make_inputs(64, 32, 64, 16, 3, dtype=torch.float32, device="cuda")
    xb = x.detach().bfloat16().requires_grad_()
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    y = conv_block(xb, w, b, backend="triton", **flags)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (xb, w, b), grad)
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    yl = conv_block(xb, w, b, backend="reference", **flags)
    lowp = (yl,) + torch.autograd.grad(yl, (xb, w, b), grad)
    yf, ref = reference(xb.float(), w, b, grad.float(), flags)
    for name, a, r, p in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), (yf,) + ref, lowp):
        lowp_check(a.double(), r, p.double(), name)


@pytest.mark.gpu
def test_gpu_cuda_graph_sees_weight_updates(seed):
    """Captured forward + backward (fp32 master weights: the bf16 copy is recorded in the graph),
    then an in-place weight update: the replay uses the new weight."""
    x, w, b = make_inputs(64, 16, 16, 32, 3, dtype=torch.bfloat16, device="cuda")
    w = torch.nn.Parameter(w.detach().float())
    b = torch.nn.Parameter(b.detach().float())
    x = x.detach()
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: autotune and compile outside the capture
            y = conv_block(x, w, b, backend="triton", **flags)
            torch.autograd.grad(y.float().sum(), (w, b))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = conv_block(x, w, b, backend="triton", **flags)
        dw, db = torch.autograd.grad(y.float().sum(), (w, b))
    with torch.no_grad():
        w.mul_(-0.5)
        b.add_(0.1)
    graph.replay()
    torch.cuda.synchronize()
    y_new = conv_block(x, w, b, backend="triton", **flags)
    dw_new, db_new = torch.autograd.grad(y_new.float().sum(), (w, b))
    assert_close(y, y_new, atol=0, rtol=0, name="replayed y")
    assert_close(dw, dw_new, atol=0, rtol=0, name="replayed dw")


# ------------------------------------------------------------------------------------------------
# Config choice: table, heuristic, autotune on request
# ------------------------------------------------------------------------------------------------


def layer_launch_args(preset, batch, dtype=torch.bfloat16):
    """`launch_shape` of every fwd/dx/dw launch of a preset's step: {kind: [shape, ...]}."""
    nets = build_networks(ACAIConfig.preset(preset))
    out = {"fwd": [], "dx": [], "dw": []}
    for net, n in ((nets["encoder"], batch), (nets["decoder"], 2 * batch), (nets["critic"], 2 * batch)):
        size = 32 if net is not nets["decoder"] else 32 >> ACAIConfig.preset(preset).scales
        for blk in net.blocks:
            cout, cin, ks, _ = blk.weight.shape
            h = 2 * size if blk.upsample_input else size
            for name in out:
                out[name].append(ccfg.launch_shape(name, N=n, H=h, W=h, CIN=cin, COUT=cout, KS=ks,
                                                   UPSAMPLE=blk.upsample_input, ACT=blk.leaky_slope is not None,
                                                   POOL=blk.pool_output, dtype=dtype))
            size = h // 2 if blk.pool_output else h
    return out


@pytest.mark.parametrize("preset", ("lines", "mnist256", "cifar1024"))
@pytest.mark.parametrize("batch", (1, 64, 1024))
def test_heuristic_configs_fit_the_gpu_rules(preset, batch):
    """Every heuristic choice (the fallback without the cost model) is a legal GPU config, covers
    narrow channel counts without needless lanes, keeps the wide small-spatial layers in small M
    tiles (parallelism), and its fp32 tiles fit in shared memory."""
    for dtype in (torch.bfloat16, torch.float32):
        for name, shapes in layer_launch_args(preset, batch, dtype).items():
            for args in shapes:
                c = ccfg.heuristic_config(name, args)
                assert _legal(name, c), (name, args, c)
                if name == "dw":  # the heuristic's and the interpreter's dW counters fit what the engine allocates
                    assert c.kwargs["BLOCK_CI"] <= max(16, 2 * args["CIN"])
                    for d in (c, ccfg.choose_config("dw", args, torch.device("cpu"))[0]):
                        assert ccfg.dw_counters_needed(args, d) <= ccfg.dw_counter_size(
                            args["KS"], args["CIN"], args["COUT"]), (args, d)
                else:
                    n_dim = args["COUT"] if name == "fwd" else args["CIN"]
                    assert c.kwargs["BLOCK_N"] <= max(16, 2 * n_dim)
                itemsize = torch.empty((), dtype=dtype).element_size()
                assert ccfg.smem_bytes(name, c, itemsize) <= ccfg._SMEM_BUDGET, (name, args)
    small_wide = shape("fwd", 64, 256, 512, 4)
    assert ccfg.heuristic_config("fwd", small_wide).kwargs["BLOCK_M"] <= 64
    big = shape("fwd", 1024, 64, 64, 32)
    assert ccfg.heuristic_config("fwd", big).kwargs["BLOCK_M"] == 128


@pytest.mark.parametrize("gpu", ("a100", "h100", "h200"))
def test_chooser_fits_every_gpu(gpu):
    """choose_config(..., gpu=) on the CPU: every launch of lines and cifar1024 at batch 64 and 1024
    (bf16, one run and an array of 4) gets the cost model's pick, which fits that GPU (shared memory
    as Triton allocates it, no expected bf16 spills: cost.fits) and whose split counters fit what the
    engine allocates; where the heuristic would not fit (A100, cifar1024 at 1024), the model's does."""
    from acai_fast.ops import cost
    for preset, batch, runs in (("lines", 64, 1), ("lines", 64, 4), ("cifar1024", 64, 1), ("cifar1024", 1024, 1)):
        for name, shapes in layer_launch_args(preset, batch).items():
            for args in shapes:
                args = dict(args, RUNS=runs)
                c, source = ccfg.choose_config(name, args, gpu=gpu)
                assert source == "model" and _legal(name, c), (name, args, c)
                assert cost.fits(name, c, 2, gpu), (name, args, c)
                if name == "dw":
                    bound = ccfg.dw_counter_size(args["KS"], args["CIN"], args["COUT"])
                    assert ccfg.dw_counters_needed(args, c) <= bound
                elif c.kwargs["SPLIT_K"] > 1:
                    assert ccfg.output_tiles(name, args, c) * runs <= ccfg.split_k_counter_size(runs)


@pytest.fixture
def gpu_chooser(monkeypatch):
    """choose_config as on a GPU (interpreter off) that is no GPU the cost model knows, with the
    choice cache emptied before and after."""
    monkeypatch.setattr(ccfg, "INTERPRET", False)
    monkeypatch.setattr(ccfg, "_arch", lambda device: "sm90")
    monkeypatch.setattr(ccfg, "gpu_of", lambda device: None)
    caches = (ccfg.tuned_table, ccfg._choose_for_gpu, ccfg._device_target)
    for c in caches:
        c.cache_clear()
    yield
    for c in caches:
        c.cache_clear()


def test_choose_config_prefers_table_then_heuristic(tmp_path, monkeypatch, gpu_chooser):
    """A shape listed in ops/tuned/<arch>.json gets the table's config (keys it does not name take
    their defaults), an unlisted one the heuristic's where there is no model; ACAI_FAST_AUTOTUNE=1
    hands the choice to the launcher's timing."""
    args = layer_launch_args("lines", 64)["fwd"][3]
    key = ccfg.shape_key("fwd", args)
    table = {"configs": {key: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=2, num_stages=5)}}
    (tmp_path / "sm90.json").write_text(__import__("json").dumps(table))
    monkeypatch.setattr(ccfg, "TUNED_DIR", tmp_path)
    cfg, source = ccfg.choose_config("fwd", args, torch.device("cpu"))
    assert source == "table" and cfg.kwargs == dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, SPLIT_K=1)
    assert (cfg.num_warps, cfg.num_stages) == (2, 5)
    cfg, source = ccfg.choose_config("dx", args, torch.device("cpu"))
    assert source == "heuristic" and cfg.kwargs == ccfg.heuristic_config("dx", args).kwargs
    cfg, source = ccfg.choose_config("fwd", args, gpu="h100")  # the same table serves any sm_90 GPU
    assert source == "table"
    monkeypatch.setattr(ccfg, "AUTOTUNE", True)
    assert ccfg.choose_config("fwd", args, torch.device("cpu")) == (None, "autotune")
    with pytest.raises(ValueError, match="unknown gpu"):
        ccfg.choose_config("fwd", args, gpu="v100")


def test_launches_choose_their_config_from_the_shape(monkeypatch, gpu_chooser, seed):
    """The GPU path of every launcher (interpreter off): the launcher describes its launch with
    `launch_shape` and launches the heuristic's config (recorded here instead of run), its split
    counts on the grid."""
    launched = []

    class Recorder:
        def __init__(self, name, arg_names):
            self.name, self.arg_names = name, arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, grid, kwargs))

    monkeypatch.setattr(cbm, "_KERNELS", {k: Recorder(k, v.arg_names) for k, v in cbm._KERNELS.items()})
    x, w, b = (t.detach() for t in make_inputs(2, 5, 6, 64, 3))
    flags = dict(upsample_input=False, leaky_slope=0.2, pool_output=True)
    y, sign = conv_fwd(x, w, b, **flags)
    conv_bwd(torch.randn_like(y), x, w, y, sign, bias_dtype=b.dtype, **flags)
    assert [name for name, _, _ in launched] == ["fwd", "dx", "dw"]
    for name, grid, kwargs in launched:
        args = ccfg.launch_shape(name, N=2, H=64, W=64, CIN=5, COUT=6, KS=3, UPSAMPLE=False, ACT=True,
                                 POOL=True, dtype=torch.float32)
        expected = ccfg.heuristic_config(name, args)
        assert {k: kwargs[k] for k in expected.kwargs if k in kwargs} == {
            k: v for k, v in expected.kwargs.items() if k in kwargs}, name
        assert kwargs["num_warps"] == expected.num_warps and kwargs["KS"] == 3
        splits = expected.kwargs["SPLITS"] if name == "dw" else expected.kwargs["SPLIT_K"]
        assert grid[2] == ccfg.dw_split_plan(2 * 64 * 64, splits, expected.kwargs["BLOCK_P"])[0] \
            if name == "dw" else grid[2] == splits


def test_shipped_tables_are_well_formed():
    """Every shipped table parses, names its GPU, and holds legal configs for known kernels."""
    for path in ccfg.TUNED_DIR.glob("*.json"):
        data = __import__("json").loads(path.read_text())
        assert data.get("gpu") and isinstance(data.get("configs"), dict), path
        for key, c in data["configs"].items():
            assert key.split("|")[0] in ("fwd", "dx", "dw"), key
            assert c["num_warps"] in (1, 2, 4, 8, 16) and c["num_stages"] >= 1, key


# ------------------------------------------------------------------------------------------------
# Arrays of runs: one launch for R same-shaped models equals R single-run launches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ENGINE_FLAGS, ids=[flag_id(f) for f in ENGINE_FLAGS])
def test_array_of_runs_equals_single_runs(flags, seed):
    """R=3 runs with their own weights, inputs in row blocks of bigger per-run buffers (run strides
    that are not the runs' sizes), 3N-image gradients over an N-image forward, and a split dW
    reduction (32x32 images): each run's y, dx, dw, db equal its single-run launch bit for bit."""
    from acai_fast.ops.conv_block import empty_activation
    runs, n, cin, cout, size = 3, 2, 3, 5, (32 if flags["pool_output"] else 8)
    if flags["pool_output"]:
        assert ccfg.dw_heuristic_splits(n * size * size, 3, cin, cout) > 1  # the split reduction runs
    xs, ws, bs = zip(*[(t.detach() for t in make_inputs(n, cin, cout, size, 3)) for _ in range(runs)])
    big = empty_activation((n + 1, cin, size, size), torch.float32, DEVICE, runs)
    x = big[:, 1:]  # run stride (n + 1) images: a row block of a bigger buffer
    for r in range(runs):
        x[r].copy_(xs[r])
    w = torch.stack(ws)
    b = torch.stack(bs)
    y, sign = conv_fwd(x, w, b, **flags)
    assert y.shape == (runs, n, cout, *y.shape[-2:])
    g = torch.randn(runs, 2 * n, *y.shape[-3:], device=DEVICE)
    g = g.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels_last per run
    dx, dw, db = conv_bwd(g, x, w, y, sign, bias_dtype=b.dtype, **flags)
    for r in range(runs):
        y1, s1 = conv_fwd(xs[r], ws[r], bs[r], **flags)
        assert torch.equal(y[r], y1), f"run {r} y"
        dx1, dw1, db1 = conv_bwd(g[r], xs[r], ws[r], y1, s1, bias_dtype=b.dtype, **flags)
        assert torch.equal(dx[r], dx1) and torch.equal(dw[r], dw1) and torch.equal(db[r], db1), f"run {r}"
    with pytest.raises(ValueError, match="an array of runs needs"):
        conv_fwd(x, ws[0], bs[0], **flags)
