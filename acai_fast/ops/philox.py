"""philox: the seeded generator of ACAI's mixing coefficients, alpha = 0.5 - |u - 0.5|.

u = Philox4x32-10 (Triton's tl.rand) from a device int64 state [seed, offset, counter] that every draw
advances on the device, so a draw can live in a CUDA graph and the whole sequence is fixed by the
seed. Here side by side: the state (`make_rng_state`), the reference in plain PyTorch
(`philox4x32_ref`, `philox_alpha_ref`), the one-program Triton draw and `draw_alpha`, how the
reference step draws its alphas. mix.py's kernels (and csrc/mix.cu) draw the same bits inside the mix.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _ext
from .._ext import HAS_TRITON

triton, tl = _ext.triton_modules()  # a stand-in without triton: only the reference can run
_ext.fix_triton_interpreter()

RNG_STATE_SIZE = 3  # int64 [seed, offset, counter]
_MAX_SEED = 2 ** 63  # the state holds the seed as int64
_M32 = 0xFFFFFFFF

def make_rng_state(seed: int, device, offset: int = 0) -> torch.Tensor:
    """The device-side generator state of `mix`: int64 [seed, offset, counter=0] on `device`.

    Every draw of N alphas uses Philox counters offset .. offset+N-1 and adds N to offset on the
    device (stream-ordered), so a CUDA graph that contains the draw gets fresh alphas on each replay
    and the whole sequence is fixed by the seed. The counter (element 2) is the kernel's ticket
    counter: it is 0 between launches and must not be touched. One state per stream of use."""
    if not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"mix: seed must be an int in [0, 2^63), got {seed!r}")
    if not isinstance(offset, int) or not 0 <= offset < _MAX_SEED:
        raise ValueError(f"mix: offset must be an int in [0, 2^63), got {offset!r}")
    return torch.tensor([seed, offset, 0], dtype=torch.int64, device=device)

def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a * b for a constant a and b an int64 tensor of values in [0, 2^32):
    split b in 16-bit halves so that no int64 product overflows."""
    pl, ph = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    return ((ph + (pl >> 16)) >> 16) & _M32, (((ph & 0xFFFF) << 16) + pl) & _M32

def philox4x32_ref(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-10 on int64 tensors holding uint32 values: exactly triton.language.random's
    philox_impl (and Random123's philox4x32_10; known-answer vectors in tests/test_mix.py)."""
    k0, k1 = k0 & _M32, k1 & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3

def philox_alpha_ref(state: torch.Tensor, n: int, *, advance: bool = True) -> torch.Tensor:
    """The n alphas that `mix` draws from `state`, as float32 (n,), and (advance=True) state's offset
    moved on by n, all on state's device without a host sync.

    w_i = the first word of Philox4x32-10(counter = offset + i, key = seed) (= tl.randint); x = w_i
    as int32 with x < 0 -> -x - 1 (Triton's uint_to_uniform_float; tl.rand = x * scale);
    y = min(x, 2^31 - 1 - x) in integers; alpha_i = float32(y) * scale, scale = float32(4.6566127342e-10).
    That is 0.5 - |u_i - 0.5| with u_i = tl.rand(seed, offset + i), to 2.4e-7, uniform on
    [0, 0.5); the fold is done in integers so that no FMA contraction (nvcc and Triton contract
    `x * scale - 0.5` by default) can make backends differ: all three give these bits."""
    seed, offset = state[0], state[1]
    ctr = offset + torch.arange(n, dtype=torch.int64, device=state.device)
    zero = torch.zeros_like(ctr)
    w, _, _, _ = philox4x32_ref(ctr & _M32, (ctr >> 32) & _M32, zero, zero, seed & _M32,
                                (seed >> 32) & _M32)
    x = torch.where(w >= 2 ** 31, w ^ _M32, w)  # as int32, x < 0 -> -x - 1
    y = torch.minimum(x, (2 ** 31 - 1) - x)
    alpha = y.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=state.device)
    if advance:
        state[1] += n
    return alpha

@triton.jit
def _alpha_draw_kernel(Alpha_ptr, State_ptr, N, BLOCK: tl.constexpr):
    """alpha_i = fold(tl.randint(seed, offset + i)) for i < N (the same bits as `_mix_fwd_kernel`'s
    draw and `philox_alpha_ref`), then offset += N. One program: every thread has read the offset
    (barrier) before it is advanced."""
    seed = tl.load(State_ptr)
    offset = tl.load(State_ptr + 1)
    for start in range(0, N, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        x = tl.randint(seed, offset + rows).to(tl.int32, bitcast=True)
        x = tl.where(x < 0, -x - 1, x)
        y = tl.minimum(x, 2147483647 - x)
        tl.store(Alpha_ptr + rows, y.to(tl.float32) * 4.6566127342e-10, mask=rows < N)
    tl.debug_barrier()
    tl.store(State_ptr + 1, offset + N)

def _check_state(op, state, device):
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"{op}: state must be a torch.Tensor from make_rng_state, got {type(state).__name__}")
    if state.dtype != torch.int64 or tuple(state.shape) != (RNG_STATE_SIZE,) or not state.is_contiguous():
        raise ValueError(f"{op}: state must be a contiguous int64 tensor of shape ({RNG_STATE_SIZE},) "
                         f"[seed, offset, counter] (see make_rng_state), got {state.dtype} "
                         f"{tuple(state.shape)}")
    if state.device != device:
        raise ValueError(f"{op}: state is on {state.device} but z on {device}; the generator state "
                         f"must live on z's device")

def make_rng_states(seeds, device) -> torch.Tensor:
    """The (runs, 3) int64 Philox states of an array of runs, one `make_rng_state(seed)` per run."""
    return torch.stack([make_rng_state(int(s), "cpu") for s in seeds]).to(device)

def draw_alpha(state: torch.Tensor, n: int, *, backend: str = "auto") -> torch.Tensor:
    """n mixing coefficients alpha = 0.5 - |u - 0.5| from the Philox `state` (float32 (n,)), the
    state's offset advanced by n on the device: exactly what `mix` would draw from the same state.
    How the reference step draws its alphas (one launch on a GPU, no host sync). backend: "auto"
    (triton for CUDA tensors when installed, else reference), "triton" or "reference"."""
    op = "draw_alpha"
    _check_state(op, state, state.device)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: n must be a positive int, got {n!r}")
    if backend == "auto":
        backend = "triton" if HAS_TRITON and state.is_cuda else "reference"
    if backend not in ("triton", "reference"):
        raise ValueError(f"{op}: unknown backend {backend!r}; valid: auto, triton, reference")
    _ext.check_backend_runs(op, backend, state.device)
    if backend == "reference":
        return philox_alpha_ref(state, n)
    alpha = torch.empty(n, dtype=torch.float32, device=state.device)
    with torch.cuda.device(state.device) if state.is_cuda else contextlib.nullcontext():
        _alpha_draw_kernel[(1,)](alpha, state, n, BLOCK=min(triton.next_power_of_2(n), 1024))
    return alpha
