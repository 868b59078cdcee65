"""aot: compile the package's Triton kernels for a GPU (sm_80: A100; sm_90: H100/H200) on a machine
without one, and report what that GPU would see: shared memory as Triton allocates it, registers,
spills, and whether tensor-core MMA was emitted (mma.sync; wgmma on sm_90).

Two steps, because Triton decides at import whether a kernel is interpreted (TRITON_INTERPRET=1):
1. `specialise(kernel, args, kwargs, arch)`, in any process (the CPU interpreter's included): bind a
   launch's arguments the way Triton's JIT binds them on that GPU (pointer element types, integers
   divisible by 16 or equal to 1, constexprs, num_warps / num_stages) -> a `Specialisation`: plain,
   hashable, JSON-able data, one per distinct compiled kernel (equal ones compile once).
2. `compile_specialisation(spec)`, in a process where the interpreter is off (`compile_in_subprocess`
   starts such processes and feeds them JSON): `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 80 | 90, 32))` with the ptxas Triton ships (sm_90 -> sm_90a), then the
   cubin's resource usage from `cuobjdump -res-usage` (also shipped) -> a `CompileReport`.
Compiles are cached per specialisation within a process (`compile_specialisation` is memoised) and
across processes by Triton's own on-disk cache (~/.triton/cache, TRITON_CACHE_DIR).
Limits: NVIDIA targets only (the triton wheel's NVIDIA backend); what runs is not checked here, only
what the compiler makes of it (the kernels' numerics are tested against their references).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# arch name -> CUDA compute capability of the target
TARGETS = {"sm80": 80, "sm90": 90}


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One kernel as the GPU compiler sees one launch of it (equal specialisations compile to the
    same binary). kernel: "module:name"; signature: ((parameter, type), ...) with types such as
    "*bf16", "i32", "fp32" or "constexpr"; constexprs: ((parameter, value), ...); attrs:
    ((parameter, "D"), ...) for the pointers and integers the JIT marks divisible by 16."""
    kernel: str
    arch: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    def constexpr(self, name, default=None):
        return dict(self.constexprs).get(name, default)

    def label(self) -> str:
        """Short and readable: kernel, constexprs that are not flags, warps/stages, pointer types."""
        blocks = [f"{k}={v}" for k, v in self.constexprs
                  if isinstance(v, int) and not isinstance(v, bool) and k.isupper()]
        ptrs = sorted({t[1:] for _, t in self.signature if t.startswith("*")})
        return (f"{self.name}[{' '.join(blocks)} w{self.num_warps} s{self.num_stages} "
                f"{'/'.join(ptrs)}] {self.arch}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Specialisation":
        tup = lambda pairs: tuple(tuple(p) for p in pairs)  # noqa: E731
        return cls(d["kernel"], d["arch"], tup(d["signature"]), tup(d["constexprs"]), tup(d["attrs"]),
                   int(d["num_warps"]), int(d["num_stages"]))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the compiler made of one specialisation for its target.

    shared: bytes of dynamic shared memory Triton asks for at launch (its metadata.shared: every
        pipeline stage's tiles, layout conversions, reductions); static_shared: bytes the cubin
        reserves itself (cuobjdump's SHARED). The launch fails unless shared + static_shared fits
        the GPU's per-block opt-in limit (A100 166,912 B; H100 232,448 B).
    registers: per thread (255 is the hardware's maximum); stack_bytes: the stack frame per thread
        (cuobjdump's STACK); spill_bytes: the bytes of registers ptxas spilled to it (its "spill
        stores", read from `ptxas -v` when the stack is not empty).
    mma / wgmma: the PTX holds mma.sync / wgmma.mma_async (tensor-core MMA).
    seconds: compile time in this process (about 0 when Triton's disk cache held the kernel).
    error: the compiler's message when it failed (the other fields are then 0 / False)."""
    spec: Specialisation
    shared: int = 0
    static_shared: int = 0
    registers: int = 0
    stack_bytes: int = 0
    spill_bytes: int = 0
    mma: bool = False
    wgmma: bool = False
    seconds: float = 0.0
    error: str | None = None

    @property
    def smem_total(self) -> int:
        return self.shared + self.static_shared

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CompileReport":
        return cls(**{**d, "spec": Specialisation.from_json(d["spec"])})

    def summary(self) -> str:
        if self.error:
            return f"{self.spec.label()}: FAILED {self.error.splitlines()[0] if self.error else ''}"
        tc = "wgmma" if self.wgmma else "mma.sync" if self.mma else "no MMA"
        return (f"{self.spec.label()}: smem {self.shared} B (+{self.static_shared} static), "
                f"{self.registers} regs, {self.spill_bytes} B spilled, {tc}")


# ------------------------------------------------------------------------------------------------
# 0. Record launches (any process)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One Triton launch as its launcher made it: the kernel (compiled or interpreted), its positional
    arguments, its keyword arguments (constexprs, num_warps, num_stages) and its grid (a tuple)."""
    kernel: object
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return getattr(self.kernel, "fn", self.kernel).__name__

    def specialise(self, arch: str) -> "Specialisation":
        return specialise(self.kernel, self.args, self.kwargs, arch)


@contextlib.contextmanager
def recording_launches(run: bool = False):
    """Within this scope every Triton kernel launch is recorded (yields the list of `Launch`, filled
    in as launches happen) and, unless `run`, not run (its outputs keep whatever was in memory): the
    launches of a full-size step on the CPU in seconds, bf16 included, under the interpreter.
    Valid for the package's launchers, whose launch decisions never depend on tensor values."""
    from triton.runtime import interpreter, jit
    launches = []
    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def record(self, *args, grid, warmup, _original=original, **kwargs):
            if not warmup:
                named = dict(zip(getattr(self, "arg_names", ()), args), **kwargs)
                g = grid(named) if callable(grid) else grid
                launches.append(Launch(self, args, dict(kwargs), tuple(g)))
            if run or warmup:
                return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        cls.run = record
        patched.append((cls, original))
    try:
        yield launches
    finally:
        for cls, original in patched:
            cls.run = original


# ------------------------------------------------------------------------------------------------
# 1. Specialise a launch (any process)
# ------------------------------------------------------------------------------------------------


def kernel_path(kernel) -> str:
    """"module:name" of a Triton kernel (compiled or interpreted), importable in another process."""
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


@functools.lru_cache(maxsize=None)
def _backend(arch: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    if arch not in TARGETS:
        raise ValueError(f"aot: unknown target {arch!r}; valid: {', '.join(TARGETS)}")
    return make_backend(GPUTarget("cuda", TARGETS[arch], 32))


@functools.lru_cache(maxsize=None)
def _binder(fn, arch: str):
    """Triton's own argument binder for `fn` (the raw Python function) on target `arch`."""
    from triton.runtime.jit import KernelParam, create_function_from_signature
    sig = inspect.signature(fn)
    params = [KernelParam(i, p, False, False) for i, p in enumerate(sig.parameters.values())]
    return create_function_from_signature(sig, params, _backend(arch)), [p.name for p in params]


def constexpr_names(kernel) -> frozenset:
    """The parameters a kernel declares tl.constexpr (not those Triton specialises to a constant
    because an integer argument was 1). kernel: the kernel or its "module:name"."""
    from triton.runtime.jit import KernelParam
    fn = _resolve(kernel) if isinstance(kernel, str) else kernel
    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return frozenset(p.name for i, p in enumerate(params) if KernelParam(i, p, False, False).is_constexpr)


def source_hash(module) -> str:
    """A short hash of the source of every Triton function (kernels and jit helpers) a module
    defines: recorded compiles of its kernels are stale when it changes."""
    import hashlib
    module = importlib.import_module(module) if isinstance(module, str) else module
    h = hashlib.sha256()
    for name in sorted(vars(module)):
        fn = getattr(vars(module)[name], "fn", None)
        if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
            h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def specialise(kernel, args=(), kwargs=None, arch: str = "sm90") -> Specialisation:
    """The Specialisation that launching `kernel[grid](*args, **kwargs)` on GPU `arch` compiles:
    kwargs hold the constexprs and num_warps / num_stages (Triton's defaults 4 / 3 otherwise).
    Tensors may live on any device (the CPU's included): only their dtype and the alignment of
    their data pointer matter, as on the GPU."""
    kwargs = dict(kwargs or {})
    num_warps = int(kwargs.pop("num_warps", 4))
    num_stages = int(kwargs.pop("num_stages", 3))
    binder, names = _binder(getattr(kernel, "fn", kernel), arch)
    bound, specialization, _ = binder(*args, **kwargs)
    signature, constexprs, attrs = [], [], []
    for name, (ty, spec) in zip(names, specialization):
        signature.append((name, ty))
        if ty == "constexpr":
            value = bound[name]
            constexprs.append((name, value.value if hasattr(value, "value") else value))
        elif isinstance(spec, str) and spec:
            attrs.append((name, spec))
    return Specialisation(kernel_path(kernel), arch, tuple(signature), tuple(constexprs), tuple(attrs),
                          num_warps, num_stages)


# ------------------------------------------------------------------------------------------------
# 2. Compile it (interpreter off)
# ------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict:
    """{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def _spill_stores(ptx: str, arch: str) -> int:
    """Bytes of spill stores `ptxas -v` reports for the PTX (the ptxas and options Triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(TARGETS[arch]).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(TARGETS[arch])}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    return sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", done.stderr + done.stdout))


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def compile_specialisation(spec: Specialisation) -> CompileReport:
    """Compile `spec` for its target and read its resources (memoised per specialisation). Needs
    a process with the interpreter off; `compile_in_subprocess` provides one from anywhere."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = _resolve(spec.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"aot: {spec.kernel} is not a compiled Triton kernel here (TRITON_INTERPRET=1 at "
                           f"import?); compile in a process without it (compile_in_subprocess)")
    backend = _backend(spec.arch)
    attrs = {(fn.arg_names.index(name),): backend.parse_attr(desc) for name, desc in spec.attrs}
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[spec.arch], 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - reported, the caller decides
        return CompileReport(spec, error=f"{type(exc).__name__}: {exc}"[:4000])
    ptx = compiled.asm["ptx"]
    stack = usage.get("STACK", 0)
    return CompileReport(spec, shared=int(compiled.metadata.shared), static_shared=usage.get("SHARED", 0),
                         registers=usage.get("REG", 0), stack_bytes=stack,
                         spill_bytes=_spill_stores(ptx, spec.arch) if stack else 0,
                         mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
                         seconds=round(time.perf_counter() - start, 3))


def compile_in_subprocess(specs, *, jobs: int = 1, timeout: float = 1800) -> list[CompileReport]:
    """Compile `specs` (deduplicated, order kept) in `jobs` fresh interpreters with TRITON_INTERPRET
    unset (`python -m acai_fast.ops.aot`); one report per distinct specialisation. A RuntimeError
    names what went wrong when a process fails (not: when a kernel fails to compile, see
    CompileReport.error)."""
    unique = list(dict.fromkeys(specs))
    if not unique:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    chunks = [unique[i::jobs] for i in range(max(1, min(jobs, len(unique))))]
    procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in chunks]
    reports = {}
    try:
        outs = [p.communicate(json.dumps([s.to_json() for s in chunk]), timeout=timeout)
                for p, chunk in zip(procs, chunks)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            if "No module named 'triton.backends.nvidia'" in err:
                raise RuntimeError("aot: this triton has no NVIDIA backend")
            raise RuntimeError(f"aot: the compile process failed (exit {p.returncode}):\n{err[-3000:]}")
        for line in out.splitlines():
            if line.startswith("{"):
                r = CompileReport.from_json(json.loads(line))
                reports[r.spec] = r
    return [reports[s] for s in unique]


def main() -> None:
    """Read a JSON list of specialisations on stdin, print one JSON report per line."""
    for d in json.load(sys.stdin):
        print(json.dumps(compile_specialisation(Specialisation.from_json(d)).to_json()), flush=True)


if __name__ == "__main__":
    main()
