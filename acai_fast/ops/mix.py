"""mix: ACAI's latent mixing (SPEC.md section 2) as one fused op: z_mix[i] = alpha_i z[i] + (1 - alpha_i) z[N-1-i].

alpha is given, or drawn inside the kernel (alpha = 0.5 - |u - 0.5|, u = Philox4x32-10 from a device
int64 state [seed, offset, counter] that the kernel advances), so the op can live in a CUDA graph and
is reproducible from a seed (the generator, its reference and `draw_alpha`: philox.py). Backends: CUDA
(csrc/mix.cu), Triton and the PyTorch reference (here); all three draw bit-identical alphas.
Limits: fp32/bf16, contiguous z, alpha gets no gradient.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .. import _ext
from .._ext import BACKENDS, HAS_TRITON, INTERPRET  # noqa: F401  (re-exported for callers)
from .philox import (RNG_STATE_SIZE, _alpha_draw_kernel, _check_state, draw_alpha,  # noqa: F401
                     make_rng_state, make_rng_states, philox4x32_ref, philox_alpha_ref)

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run

logger = logging.getLogger(__name__)
_ext.fix_triton_interpreter()

DTYPES = (torch.float32, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Reference (plain PyTorch); the seeded generator of alpha is in philox.py
# ------------------------------------------------------------------------------------------------


def _rows(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha.reshape(-1, *([1] * (like.dim() - 1)))  # (N,) -> (N, 1, ..., 1)


def mix_ref(z: torch.Tensor, alpha: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """z_mix = alpha * z + (1 - alpha) * z.flip(0), the SPEC's expression; alpha (N,) or (N,1,1,1).
    upcast: compute in fp32 (and return fp32); else in z's dtype."""
    if upcast:
        z = z.float()
    a = _rows(alpha, z).to(z.dtype)
    return a * z + (1 - a) * z.flip(0)


def mix_bwd_ref(g: torch.Tensor, alpha: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """dL/dz from g = dL/dz_mix: dz[i] = alpha_i g[i] + (1 - alpha_{N-1-i}) g[N-1-i]."""
    if upcast:
        g = g.float()
    a = _rows(alpha, g).to(g.dtype)
    return a * g + ((1 - a) * g).flip(0)


# ------------------------------------------------------------------------------------------------
# Triton kernels
#
# Both views are (N, D) row-major, D = numel / N. One program per (pair p, column block): rows
# i = p and j = N-1-p, p < ceil(N/2) (i == j for the middle row of an odd batch: both stores then
# write the same values). Every element of z (or g) is read once and written once.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mix_fwd_kernel(Z_ptr, Zmix_ptr, Alpha_ptr, State_ptr, N, D, stride_zr, stride_mr,
                    DRAW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward: z_mix[i] = a_i z[i] + (1 - a_i) z[j], z_mix[j] = a_j z[j] + (1 - a_j) z[i], fp32 math.

    DRAW: a = fold(tl.randint(seed, offset + row)) (see `philox_alpha_ref`; = 0.5 - |tl.rand - 0.5|
    to 2.4e-7) with seed, offset = State[0], State[1];
    programs of column block 0 store a_i, a_j to Alpha; the last program to finish (ticket from an
    atomic on State[2], after a barrier so that every read of the offset is done) stores
    offset + N and resets the ticket counter. Otherwise a = Alpha[row].
    Runs (grid axis 2): run r mixes its own rows with its own alphas, drawn from its own state
    State[r] (seeds differ per run), its z and z_mix moved by their run strides."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    run = tl.program_id(2).to(tl.int64)
    Z_ptr += run * stride_zr
    Zmix_ptr += run * stride_mr
    Alpha_ptr += run * N
    State_ptr += run * 3
    i = pid_p.to(tl.int64)
    j = N - 1 - i
    two = tl.arange(0, 2)
    rows = tl.where(two == 0, i, j)  # (2,): i, j
    if DRAW:
        seed = tl.load(State_ptr)
        offset = tl.load(State_ptr + 1)
        x = tl.randint(seed, offset + rows).to(tl.int32, bitcast=True)  # randint gives uint32
        x = tl.where(x < 0, -x - 1, x)
        y = tl.minimum(x, 2147483647 - x)
        a2 = y.to(tl.float32) * 4.6566127342e-10
    else:
        a2 = tl.load(Alpha_ptr + rows)
    ai = tl.sum(tl.where(two == 0, a2, 0.0))
    aj = tl.sum(tl.where(two == 1, a2, 0.0))

    cols = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    zi = tl.load(Z_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
    zj = tl.load(Z_ptr + j * D + cols, mask=mask, other=0.0).to(tl.float32)
    out_ty = Zmix_ptr.dtype.element_ty
    tl.store(Zmix_ptr + i * D + cols, (ai * zi + (1.0 - ai) * zj).to(out_ty), mask=mask)
    tl.store(Zmix_ptr + j * D + cols, (aj * zj + (1.0 - aj) * zi).to(out_ty), mask=mask)

    if DRAW:
        tl.store(Alpha_ptr + rows, a2, mask=(two < 2) & (pid_c == 0))
        tl.debug_barrier()
        ticket = tl.atomic_add(State_ptr + 2, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.store(State_ptr + 1, offset + N)
            tl.store(State_ptr + 2, 0)


@triton.jit
def _mix_bwd_kernel(G_ptr, Alpha_ptr, Dz_ptr, N, D, stride_gr, stride_dr,
                    ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward: dz[i] (+)= a_i g[i] + (1 - a_j) g[j], dz[j] (+)= a_j g[j] + (1 - a_i) g[i], fp32
    math, one rounding to dz's dtype; both rows of dz are read before either is written.
    Runs: grid axis 2, as in the forward."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    run = tl.program_id(2).to(tl.int64)
    G_ptr += run * stride_gr
    Dz_ptr += run * stride_dr
    Alpha_ptr += run * N
    i = pid_p.to(tl.int64)
    j = N - 1 - i
    ai = tl.load(Alpha_ptr + i)
    aj = tl.load(Alpha_ptr + j)
    cols = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    gi = tl.load(G_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
    gj = tl.load(G_ptr + j * D + cols, mask=mask, other=0.0).to(tl.float32)
    di = ai * gi + (1.0 - aj) * gj
    dj = aj * gj + (1.0 - ai) * gi
    if ACCUMULATE:
        di += tl.load(Dz_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
        dj += tl.load(Dz_ptr + j * D + cols, mask=mask, other=0.0).to(tl.float32)
    out_ty = Dz_ptr.dtype.element_ty
    tl.store(Dz_ptr + i * D + cols, di.to(out_ty), mask=mask)
    tl.store(Dz_ptr + j * D + cols, dj.to(out_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers (checks, then one launch of the chosen backend)
# ------------------------------------------------------------------------------------------------


def _triton_grid(n, d, runs=1):
    block_d = min(triton.next_power_of_2(d), 1024)
    return ((n + 1) // 2, triton.cdiv(d, block_d), runs), block_d


def _check_z(op, name, z):
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 1 or z.shape[0] < 1 or z.numel() < 1:
        raise ValueError(f"{op}: {name} must be (N, ...) with N >= 1 and at least one element, "
                         f"got shape {tuple(z.shape)}")
    if z.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} dtype {z.dtype} is not supported; use float32 or bfloat16")
    if not z.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {z.stride()} for shape "
                         f"{tuple(z.shape)}); call .contiguous() first")
    if z.numel() >= 2 ** 31:
        raise ValueError(f"{op}: {name} has {z.numel()} elements; at most 2^31 - 1 are supported")


def _check_alpha(op, alpha, n, device):
    if not isinstance(alpha, torch.Tensor):
        raise ValueError(f"{op}: alpha must be a torch.Tensor, got {type(alpha).__name__}")
    if alpha.numel() != n or alpha.dim() < 1 or alpha.shape[0] != n:
        raise ValueError(f"{op}: alpha must have N={n} values, shape ({n},) or ({n}, 1, ..., 1), "
                         f"got shape {tuple(alpha.shape)}")
    if alpha.dtype != torch.float32:
        raise ValueError(f"{op}: alpha must be float32 (whatever z's dtype), got {alpha.dtype}")
    if alpha.device != device:
        raise ValueError(f"{op}: alpha is on {alpha.device} but z on {device}; put them on one device")
    if not alpha.is_contiguous():
        raise ValueError(f"{op}: alpha must be contiguous")
    if alpha.requires_grad:
        raise ValueError(f"{op}: alpha requires grad, but mix gives alpha no gradient (ACAI never "
                         f"learns it); pass alpha.detach()")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any byte of memory."""
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_output(op, name, out, src_name, src):
    """`out` (written by the kernel) matches `src` (read by it) and does not overlap it: each
    program reads two rows of src and writes the same two rows of out."""
    _check_z(op, name, out)
    if out.shape != src.shape or out.dtype != src.dtype or out.device != src.device:
        raise ValueError(f"{op}: {name} must match {src_name} (shape {tuple(src.shape)}, {src.dtype}, "
                         f"{src.device}), got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if _overlap(out, src):
        raise ValueError(f"{op}: {name} and {src_name} share memory; the kernel reads two rows of "
                         f"{src_name} and writes the same two rows of {name}, so they must not overlap")


def _check_inputs(op, z, alpha, state):
    _check_z(op, "z", z)
    if (alpha is None) == (state is None):
        raise ValueError(f"{op}: pass exactly one of alpha (given mixing weights) and state "
                         f"(draw them; see make_rng_state)")
    if alpha is not None:
        _check_alpha(op, alpha, z.shape[0], z.device)
    else:
        _check_state(op, state, z.device)


def mix_fwd(z: torch.Tensor, alpha: torch.Tensor | None = None, *, state: torch.Tensor | None = None,
            out: torch.Tensor | None = None, backend: str = "auto",
            poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: (z_mix in z's dtype and shape, alpha float32 (N,)).

    out: where to write z_mix (contiguous, z's shape and dtype, not overlapping z), e.g. the second
    half of the decoder's input buffer; default a new tensor.
    Exactly one of alpha (float32, (N,) or (N, 1, ..., 1); returned as an (N,) view) and state
    (from `make_rng_state`; alpha is drawn and state's offset advanced by N on the device).
    backend: "auto" | "cuda" | "triton" | "reference" (see acai_fast._ext.resolve_backend).
    poison: fill the outputs with NaN before the launch (tests)."""
    op = "mix"
    _check_inputs(op, z, alpha, state)
    n, d = z.shape[0], z.numel() // z.shape[0]
    name = _ext.resolve_backend(op, z, backend)
    _ext.check_backend_runs(op, name, z.device)
    logger.debug("mix_fwd: backend=%s (asked %s) z %s %s draw=%s", name, backend, tuple(z.shape),
                 z.dtype, state is not None)

    if out is not None:
        _check_output(op, "out", out, "z", z)
    if name == "reference":
        if state is not None:
            alpha = philox_alpha_ref(state, n)
        z_mix = mix_ref(z, alpha, upcast=True).to(z.dtype)
        return (out.copy_(z_mix) if out is not None else z_mix), alpha.view(n)

    z_mix = out if out is not None else torch.empty_like(z)
    alpha_out = alpha.view(n) if alpha is not None else torch.empty(n, dtype=torch.float32, device=z.device)
    if poison:
        z_mix.fill_(float("nan"))
        if state is not None:
            alpha_out.fill_(float("nan"))
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        if name == "cuda":
            _ext.extension().mix_fwd(z.data_ptr(), z_mix.data_ptr(), alpha_out.data_ptr(),
                                     state.data_ptr() if state is not None else 0, n, d,
                                     _ext.dtype_code(z.dtype), _ext.stream_handle(z.device))
        else:
            grid, block_d = _triton_grid(n, d)
            _mix_fwd_kernel[grid](z, z_mix, alpha_out, state if state is not None else alpha_out, n, d,
                                  0, 0, DRAW=state is not None, BLOCK_D=block_d)
    return z_mix, alpha_out


def mix_bwd(g: torch.Tensor, alpha: torch.Tensor, *, dz: torch.Tensor | None = None,
            backend: str = "auto", poison: bool = False) -> torch.Tensor:
    """Backward launcher: dL/dz from g = dL/dz_mix (contiguous, z's dtype and shape) and the forward's
    alpha. dz=None: a fresh tensor; dz given (g's shape and dtype, contiguous, not overlapping g): the
    result is ADDED into it in place (fp32 math, one rounding) and dz is returned; that is how the
    fused trainer adds the mix path to the gradient z already has from the ae path."""
    op = "mix_bwd"
    _check_z(op, "g", g)
    n, d = g.shape[0], g.numel() // g.shape[0]
    _check_alpha(op, alpha, n, g.device)
    if dz is not None:
        _check_output(op, "dz", dz, "g", g)
    name = _ext.resolve_backend(op, g, backend)
    _ext.check_backend_runs(op, name, g.device)
    logger.debug("mix_bwd: backend=%s (asked %s) g %s %s accumulate=%s", name, backend,
                 tuple(g.shape), g.dtype, dz is not None)

    if name == "reference":
        r = mix_bwd_ref(g, alpha, upcast=True)
        if dz is None:
            return r.to(g.dtype)
        return dz.copy_(dz.float() + r)

    accumulate = dz is not None
    if dz is None:
        dz = torch.empty_like(g)
        if poison:
            dz.fill_(float("nan"))
    with torch.cuda.device(g.device) if g.is_cuda else contextlib.nullcontext():
        if name == "cuda":
            _ext.extension().mix_bwd(g.data_ptr(), alpha.data_ptr(), dz.data_ptr(), n, d,
                                     _ext.dtype_code(g.dtype), accumulate, _ext.stream_handle(g.device))
        else:
            grid, block_d = _triton_grid(n, d)
            _mix_bwd_kernel[grid](g, alpha, dz, n, d, 0, 0, ACCUMULATE=accumulate, BLOCK_D=block_d)
    return dz


def _check_runs(op, name, t, runs):
    """An array tensor: (runs, N, ...) with every run contiguous (any run stride)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != runs:
        raise ValueError(f"{op}: {name} must be (runs={runs}, N, ...), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    _check_z(op, f"{name}[0]", t[0])


def mix_fwd_runs(z: torch.Tensor, state: torch.Tensor, *, out: torch.Tensor | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`mix_fwd` for an array of R runs in one launch: z (R, N, ...) with every run contiguous (any
    run stride, e.g. row blocks of a bigger buffer), state (R, 3) (one Philox stream per run, see
    make_rng_states) -> (z_mix (R, N, ...) or into `out`, alpha (R, N)). R = 1 is exactly
    `mix_fwd` (and may use the CUDA twin); R > 1 runs the Triton kernel (or the reference)."""
    op = "mix"
    runs = state.shape[0] if isinstance(state, torch.Tensor) and state.dim() == 2 else -1
    if runs < 1 or tuple(state.shape[1:]) != (RNG_STATE_SIZE,):
        raise ValueError(f"{op}: state of an array must be (runs, {RNG_STATE_SIZE}) int64 (make_rng_states)")
    _check_runs(op, "z", z, runs)
    if out is not None:
        _check_runs(op, "out", out, runs)
    if runs == 1:
        z_mix, alpha = mix_fwd(z[0], state=state[0], out=out[0] if out is not None else None, backend=backend)
        return (out if out is not None else z_mix.unsqueeze(0)), alpha.unsqueeze(0)
    name = _ext.resolve_backend(op, z, backend)
    name = "triton" if name == "cuda" else name  # the CUDA twin has no run axis
    _ext.check_backend_runs(op, name, z.device)
    n, d = z.shape[1], z[0].numel() // z.shape[1]
    if out is None:
        out = torch.empty_like(z)
    if name == "reference":
        alphas = []
        for r in range(runs):
            z_mix, alpha = mix_fwd(z[r], state=state[r], backend="reference")
            out[r].copy_(z_mix)
            alphas.append(alpha)
        return out, torch.stack(alphas)
    alpha = torch.empty(runs, n, dtype=torch.float32, device=z.device)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        grid, block_d = _triton_grid(n, d, runs)
        _mix_fwd_kernel[grid](z, out, alpha, state, n, d, z.stride(0), out.stride(0), DRAW=True,
                              BLOCK_D=block_d)
    return out, alpha


def mix_bwd_runs(g: torch.Tensor, alpha: torch.Tensor, *, dz: torch.Tensor,
                 backend: str = "auto") -> torch.Tensor:
    """`mix_bwd` with dz given (accumulate), for an array of R runs in one launch: g and dz
    (R, N, ...) with every run contiguous, alpha (R, N). Returns dz."""
    op = "mix_bwd"
    runs = g.shape[0] if isinstance(g, torch.Tensor) and g.dim() >= 2 else -1
    _check_runs(op, "g", g, runs)
    _check_runs(op, "dz", dz, runs)
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (runs, g.shape[1]):
        raise ValueError(f"{op}: alpha of an array must be (runs, N) = {(runs, g.shape[1])}")
    if runs == 1:
        mix_bwd(g[0], alpha[0], dz=dz[0], backend=backend)
        return dz
    name = _ext.resolve_backend(op, g, backend)
    name = "triton" if name == "cuda" else name
    _ext.check_backend_runs(op, name, g.device)
    if name == "reference":
        for r in range(runs):
            mix_bwd(g[r], alpha[r], dz=dz[r], backend="reference")
        return dz
    n, d = g.shape[1], g[0].numel() // g.shape[1]
    with torch.cuda.device(g.device) if g.is_cuda else contextlib.nullcontext():
        grid, block_d = _triton_grid(n, d, runs)
        _mix_bwd_kernel[grid](g, alpha, dz, n, d, g.stride(0), dz.stride(0), ACCUMULATE=True,
                              BLOCK_D=block_d)
    return dz


# ------------------------------------------------------------------------------------------------
# Autograd and the functional op
# ------------------------------------------------------------------------------------------------


class MixFunction(torch.autograd.Function):
    """The fused mix: one launch forward, one backward. Saves alpha (N floats) only."""

    @staticmethod
    def forward(ctx, z, alpha, state, backend):
        z_mix, alpha_out = mix_fwd(z, alpha, state=state, backend=backend)
        ctx.save_for_backward(alpha_out)
        ctx.backend = backend
        ctx.mark_non_differentiable(alpha_out)
        return z_mix, alpha_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z_mix, _grad_alpha):
        (alpha,) = ctx.saved_tensors
        dz = None
        if ctx.needs_input_grad[0]:
            dz = mix_bwd(grad_z_mix.contiguous(), alpha, backend=ctx.backend)
        return dz, None, None, None


def mix(z: torch.Tensor, alpha: torch.Tensor | None = None, *, state: torch.Tensor | None = None,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """ACAI's latent mixing, differentiable in z: (z_mix, alpha).

    z: (N, ...) latents, float32 or bfloat16, contiguous. Either alpha (float32, (N,) or
    (N, 1, ..., 1); no gradient) or state (from `make_rng_state(seed, device)`: alpha drawn on the
    device, alpha_i = 0.5 - |u_i - 0.5|, and the state advanced, so CUDA-graph replays draw fresh
    values). Returns z_mix (z's dtype and shape) and alpha as float32 (N,).
    backend: "auto" (cuda if acai_fast._C is built and z is on a GPU, else triton on a GPU, else
    reference), "cuda", "triton" (CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or "reference";
    the choice is logged at DEBUG level (`acai_fast._ext.resolve_backend` returns it).
    """
    name = _ext.resolve_backend("mix", z, backend)
    if name != "reference":
        return MixFunction.apply(z, alpha, state, name)
    _check_inputs("mix", z, alpha, state)  # the reference path: autograd through PyTorch ops
    n = z.shape[0]
    alpha = alpha.reshape(n) if alpha is not None else philox_alpha_ref(state, n)
    return mix_ref(z, alpha, upcast=True).to(z.dtype), alpha
