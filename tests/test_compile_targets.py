"""Every Triton kernel the trainers launch, at every config the package can choose, compiled for the
A100 (sm_80) and the H100 / H200 (sm_90) without a GPU (acai_fast.ops.aot).

"Every config the package can choose": one eager training step of each distinct preset network
(lines, mnist32, mnist256, svhn32 = celeba32, cifar256 = svhn256 = celeba256, cifar1024) at batch
64 and 1024 (and an array of ARRAY_RUNS runs at batch 64), fp32 and bf16 activations, traced on the
CPU (launches recorded, not run) while conv_block chooses each conv launch's config for the target
GPU (`choose_config(..., gpu=)`: a tuned table's entry, else the cost model's pick). The other
kernels (mix, losses, probe, Adam) size their own launches; they are traced as launched.

Checks, cheapest first:
- the chosen conv configs fit by the model's account (cost.smem_estimate within the GPU's
  per-block limit, no bf16 spills: cost.spills, which reads the compiled spills), for the A100,
  H100 and H200;
- cost.smem_estimate is never below what Triton allocates for any candidate of the config lists,
  fp32 and bf16, sm_80 and sm_90 (COMPILED_SMEM: compiles recorded by `python
  tests/test_compile_targets.py --measure`, which also writes acai_fast/ops/compiled_spills.json);
- the chooser never returns a config over a limit, even for a GPU whose limit is tiny;
- compiled: one representative per class of the traced launches (see `compile_class`: conv
  kernels by target, tiles, warps, stages and compute dtype, in their heaviest layer variant; the
  other kernels by all their constexprs) for its GPU: it compiles, its shared memory fits, bf16
  kernels do not spill, bf16 conv kernels use tensor-core MMA (wgmma on sm_90 where the MMA tile
  has >= 64 rows), and smem_estimate bounds the real allocation. The representatives stand for
  the distinct specialisations (~800 over the three GPUs, ~30 min of compiling on two cores);
  `python tests/test_compile_targets.py --all` compiles every one.
- the bf16 picks are not configs that spilled when compiled (acai_fast/ops/compiled_spills.json).
Cost (2 busy cores): the traces ~15-70 s; the compiles ~2-3 s each cold, ~0 with Triton's disk
cache (~/.triton/cache); the measured totals are in the commit that added this file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import pathlib
import sys

if __name__ == "__main__":  # the traces run the launchers under the interpreter (set before any kernel import)
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.ops import aot, conv_block, conv_kernels, cost

HERE = pathlib.Path(__file__).resolve().parent
COMPILED_SMEM = HERE / "compile_targets.json"  # measured candidates (written by --measure)
SPILLS_JSON = pathlib.Path(aot.__file__).with_name("compiled_spills.json")

# One preset per distinct network (the others share one of these: svhn32 = celeba32; svhn256 =
# celeba256 = cifar256).
PRESETS = ("lines", "mnist32", "mnist256", "svhn32", "cifar256", "cifar1024")
BATCHES = (64, 1024)
ARRAY_RUNS = 4  # the array case: ARRAY_RUNS runs at batch 64
DTYPES = (torch.float32, torch.bfloat16)
GPUS = ("a100", "h100", "h200")
CONV = {"_conv_fwd_kernel": "fwd", "_conv_bwd_dx_kernel": "dx", "_conv_bwd_dw_kernel": "dw"}
# Config keys of a conv launch (the rest of its constexprs are flags of the layer).
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "BLOCK_CI", "BLOCK_CO", "BLOCK_P", "TAPS",
               "SPLITS", "REDUCE_GROUP")


def _chooses_for_gpus() -> bool:
    return "gpu" in inspect.signature(conv_block.choose_config).parameters


@contextlib.contextmanager
def choosing_for(gpu: str):
    """conv_block's launches take the config `choose_config(..., gpu=gpu)` gives (what that GPU
    would run) instead of the interpreter's. Before the chooser took gpu= (issue 18): the
    heuristic, which is what a GPU ran then (no tuned table exists)."""
    original = conv_block.choose_config
    if _chooses_for_gpus():
        def chooser(name, args, device=None, gpu_=None):
            return original(name, args, gpu=gpu)
    else:
        def chooser(name, args, device=None):
            return conv_block.heuristic_config(name, args), "heuristic"
    conv_block.choose_config = chooser
    try:
        yield
    finally:
        conv_block.choose_config = original


@functools.lru_cache(maxsize=None)
def traced_steps(preset: str, batch: int, runs: int | None, dtype: torch.dtype) -> dict:
    """{gpu: the Triton launches of one fused training step (with labels: the probe too) with the
    conv configs that GPU would run}, recorded on the CPU (not run). dtype: the activations' (a
    bf16 step is traced on the CPU by setting the engine's dtype, as engine.launches.trace_launches
    does)."""
    torch.manual_seed(0)
    config = ACAIConfig.preset(preset, batch=batch)
    trainer = ACAITrainer(config, backend="fused", device="cpu", cuda_graph=False, dtype="fp32", runs=runs)
    trainer.engine.dtype = dtype
    lead = (runs,) if runs else ()
    x = torch.rand(*lead, batch, config.colors, 32, 32) * 2 - 1
    labels = torch.randint(0, config.nclass, (*lead, batch))
    steps = {}
    for gpu in GPUS:
        with choosing_for(gpu), aot.recording_launches() as launches:
            trainer.step(x, labels)
        steps[gpu] = tuple(launches)
    return steps


def cases():
    """(preset, batch, runs, dtype): every traced step."""
    for preset in PRESETS:
        for dtype in DTYPES:
            for batch in BATCHES:
                yield preset, batch, None, dtype
            yield preset, 64, ARRAY_RUNS, dtype


def all_launches(gpu: str) -> list[aot.Launch]:
    return [launch for case in cases() for launch in traced_steps(*case)[gpu]]


def conv_config(launch_kwargs: dict) -> dict:
    """The config (BLOCK_*, split keys, num_warps, num_stages) a conv launch ran with."""
    cfg = {k: v for k, v in launch_kwargs.items() if k in CONFIG_KEYS}
    cfg.update(num_warps=launch_kwargs.get("num_warps", 4), num_stages=launch_kwargs.get("num_stages", 3))
    return cfg


def compute_itemsize(signature: dict, kind: str) -> int:
    """Bytes per element of a conv launch's compute dtype (y's in fwd, dL/dy's in dx/dW)."""
    return 2 if signature["Y_ptr" if kind == "fwd" else "G_ptr"] in ("*bf16", "*fp16") else 4


def spec_kind_config(spec: aot.Specialisation):
    kind = CONV.get(spec.name)
    if kind is None:
        return None, None, None
    cfg = conv_config(dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages))
    return kind, cfg, compute_itemsize(dict(spec.signature), kind)


def compile_class(spec: aot.Specialisation) -> tuple:
    """What one compile stands for. Conv kernels: kernel, target, tiles (BLOCK_*, TAPS, split-K on
    or off), warps, stages and compute dtype; their layer flags (activation, sign source, pool,
    upsample, bias, kernel size), the split count and the integer specialisations (divisibility by
    16, values of 1) are left out, and the class is compiled in its heaviest variant (see
    `heaviness`). Other kernels: everything but the integer specialisations."""
    names = aot.constexpr_names(spec.kernel)
    ce = dict(spec.constexprs)
    if spec.name in CONV:
        sig = dict(spec.signature)
        tiles = tuple((k, ce[k]) for k in CONFIG_KEYS if k in ce and k != "SPLIT_K")
        return (spec.kernel, spec.arch, tiles, ce.get("SPLIT_K", 1) > 1, spec.num_warps, spec.num_stages,
                sig["Y_ptr" if spec.name == "_conv_fwd_kernel" else "G_ptr"])
    ptrs = tuple(t for _, t in spec.signature if t.startswith("*"))
    return (spec.kernel, spec.arch, tuple((k, v) for k, v in spec.constexprs if k in names), spec.num_warps,
            spec.num_stages, ptrs)


def heaviness(spec: aot.Specialisation) -> tuple:
    """How much shared memory and how many registers a conv launch's flags add, to pick each class's
    worst case (measured: dx's upsample re-gathers the A tile with the sign of y, + num_stages A
    tiles; pool, activation, an fp32 operand in a bf16 kernel and the split epilogues add less)."""
    ce, sig = dict(spec.constexprs), dict(spec.signature)
    fp32_operands = sum(sig.get(k) == "*fp32" for k in ("X_ptr", "W_ptr"))
    sign = not ce.get("GRAD_IS_DZ")  # a gradient given as dz gathers no sign beside it
    return (4 * bool(ce.get("UPSAMPLE")) + 3 * bool(ce.get("POOL")) + 2 * bool(ce.get("ACT") and sign)
            + bool(ce.get("SIGN_FROM_OUT") and sign) + 2 * bool(ce.get("INPUT_ACT")) + bool(ce.get("SPLIT"))
            + fp32_operands, spec.label())


def representatives(specs) -> list[aot.Specialisation]:
    """One specialisation per compile_class, its heaviest (ties broken by label: deterministic)."""
    best = {}
    for s in specs:
        key = compile_class(s)
        if key not in best or heaviness(s) > heaviness(best[key]):
            best[key] = s
    return list(best.values())


def target_specs(gpus=GPUS) -> dict:
    """{Specialisation: set of GPUs whose step launches it}, over every traced case."""
    out = {}
    for gpu in gpus:
        arch = cost.GPUS[gpu].arch
        for launch in all_launches(gpu):
            out.setdefault(launch.specialise(arch), set()).add(gpu)
    return out


def _compile(specs, jobs=2):
    try:
        return aot.compile_in_subprocess(specs, jobs=jobs)
    except RuntimeError as exc:
        if "no NVIDIA backend" in str(exc):
            pytest.skip(str(exc))
        raise


def smem_limit(arch: str) -> int:
    return min(g.smem_per_block for g in cost.GPUS.values() if g.arch == arch)


# ------------------------------------------------------------------------------------------------
# The chooser's picks fit, by the model's account (no compile)
# ------------------------------------------------------------------------------------------------


def unfit_picks(gpu: str, measured_spills: bool) -> set[str]:
    """The conv configs chosen for `gpu` in any traced step that do not fit it: shared memory as
    cost.smem_estimate bounds Triton's allocation over the per-block limit, or in bf16 a spill,
    expected by cost.spills or (measured_spills) measured (acai_fast/ops/compiled_spills.json,
    for the GPU's arch)."""
    limit, arch = cost.GPUS[gpu].smem_per_block, cost.GPUS[gpu].arch
    spilling = {cost.spill_key(e["kind"], e["config"]) for e in  # tiles, warps, stages, split or taps
                json.loads(SPILLS_JSON.read_text())["bf16_spills"] if e["arch"] == arch}
    bad = set()
    for launch in all_launches(gpu):
        kind = CONV.get(launch.name)
        if kind is None:
            continue
        cfg = conv_config(launch.kwargs)
        itemsize = compute_itemsize(dict(launch.specialise(arch).signature), kind)
        smem = cost.smem_estimate(kind, cfg, itemsize)
        spills = itemsize == 2 and (cost.spills(kind, cfg, arch) or measured_spills and
                                    cost.spill_key(kind, cfg) in spilling)
        if smem > limit or spills:
            bad.add(f"{kind} {cost.describe_config(kind, cfg)} itemsize {itemsize}: ~{smem} B"
                    + (", spills" if spills else ""))
    return bad


@pytest.mark.parametrize("gpu", GPUS)
def test_chosen_configs_fit(gpu):
    """Every conv config chosen for `gpu` in any traced step fits it by the model's account."""
    if not _chooses_for_gpus():
        pytest.xfail("conv_block.choose_config has no gpu= yet: the heuristic's picks (what a GPU ran "
                     "before issue 18) exceed the A100's limit")
    bad = unfit_picks(gpu, measured_spills=False)
    assert not bad, f"{gpu} ({cost.GPUS[gpu].smem_per_block} B) would run configs that do not fit:\n" + \
        "\n".join(sorted(bad))


@pytest.mark.parametrize("gpu", GPUS)
def test_chosen_configs_do_not_spill_when_compiled(gpu):
    """No bf16 conv config chosen for `gpu` is one that spilled registers when compiled for its arch."""
    bad = unfit_picks(gpu, measured_spills=True)
    assert not bad, f"{gpu} would run configs that spill:\n" + "\n".join(sorted(bad))


def test_chooser_never_exceeds_a_tiny_limit():
    """best_config over the config lists for a GPU whose per-block shared memory is tiny returns
    only configs whose estimate fits it (or None), never the fastest regardless of the limit."""
    lists = dict(fwd=conv_block.FWD_CONFIGS, dx=conv_block.DX_CONFIGS, dw=conv_block.DW_CONFIGS)
    shape = dict(N=64, H=32, W=32, CIN=64, COUT=64, KS=3, UPSAMPLE=False, ACT=True, POOL=False)
    for limit in (24 * 1024, 48 * 1024, 100 * 1024):
        tiny = dataclasses.replace(cost.GPUS["h100"], smem_per_block=limit)
        for kind, candidates in lists.items():
            for dtype in DTYPES:
                args = dict(shape, dtype=dtype)  # conv_block's launch-shape dict
                best = cost.best_config(kind, args, candidates, tiny)
                itemsize = torch.empty((), dtype=dtype).element_size()
                if best is not None:
                    assert cost.smem_estimate(kind, best, itemsize) <= limit, (kind, limit, best)
                else:
                    assert all(cost.smem_estimate(kind, c, itemsize) > limit or
                               (itemsize == 2 and cost.spills(kind, c, tiny.arch)) for c in candidates)


# ------------------------------------------------------------------------------------------------
# smem_estimate against Triton's allocations (recorded compiles of every candidate)
# ------------------------------------------------------------------------------------------------


def measured_rows() -> list[dict]:
    return json.loads(COMPILED_SMEM.read_text())["rows"]


def test_smem_estimate_bounds_every_measured_candidate():
    """For every candidate config of FWD/DX/DW_CONFIGS, fp32 and bf16, sm_80 and sm_90, in every
    structural variant the presets use: cost.smem_estimate >= the shared memory Triton allocates
    (dynamic + the static part the cubin reserves), so `fits` never passes a config that does not."""
    under = []
    for row in measured_rows():
        est = cost.smem_estimate(row["kind"], row["config"], row["itemsize"])
        if est < row["shared"] + row["static_shared"]:
            under.append(f"{row['kind']} {cost.describe_config(row['kind'], row['config'])} {row['dtype']} "
                         f"{row['arch']} {row['variant']}: estimate {est} < {row['shared']}+{row['static_shared']}")
    assert not under, "smem_estimate below Triton's allocation:\n" + "\n".join(under)


def test_measurements_cover_the_config_lists():
    """The recorded compiles are those of today's kernels (their source), Triton and config lists:
    re-run `python tests/test_compile_targets.py --measure` when one changes."""
    import triton
    recorded = json.loads(COMPILED_SMEM.read_text())
    assert recorded["kernels"] == aot.source_hash(conv_kernels), \
        f"conv_kernels' kernels changed since the recorded compiles: run `python {__file__} --measure`"
    assert recorded["triton"] == triton.__version__, \
        f"recorded with triton {recorded['triton']}, this is {triton.__version__}: run `python {__file__} --measure`"
    rows = recorded["rows"]
    measured = {(r["kind"], r["dtype"], r["arch"], r["variant"], json.dumps(r["config"], sort_keys=True))
                for r in rows}
    variants, variant_ks = set(), {}
    for launch in all_launches("h100"):
        kind = CONV.get(launch.name)
        if kind:
            spec = launch.specialise("sm90")
            key = (kind, "bf16" if compute_itemsize(dict(spec.signature), kind) == 2 else "fp32",
                   layer_variant(spec, kind))
            variants.add(key + (launch.kernel,))
            variant_ks.setdefault(key, set()).add(f"KS{launch.kwargs.get('KS')}")
    missing = []
    for kind, dtype, variant, kernel in sorted(variants, key=str):
        for cfg, warps, stages in candidate_configs(kind, kernel):
            if cfg.get("TAPS", 1) > 1 and "KS3" not in variant_ks.get((kind, dtype, variant), ()):
                continue
            key = json.dumps(cost.config_dict(dict(cfg, num_warps=warps, num_stages=stages)), sort_keys=True)
            missing += [f"{kind} {dtype} {arch} {variant} {key}" for arch in aot.TARGETS
                        if (kind, dtype, arch, variant, key) not in measured]
    assert not missing, (f"{len(missing)} candidate compiles not recorded (run `python {__file__} --measure`), "
                         f"e.g.:\n" + "\n".join(missing[:10]))


def test_spill_list_is_what_was_measured():
    """acai_fast/ops/compiled_spills.json (read by the cost model's spill rule) lists exactly the
    measured bf16 candidates that spill."""
    spilling = {(r["kind"], json.dumps(r["config"], sort_keys=True), r["arch"]) for r in measured_rows()
                if r["dtype"] == "bf16" and r["spill_bytes"] > 0}
    listed = {(e["kind"], json.dumps(e["config"], sort_keys=True), e["arch"])
              for e in json.loads(SPILLS_JSON.read_text())["bf16_spills"]}
    assert listed == spilling


# ------------------------------------------------------------------------------------------------
# The traced launches, compiled
# ------------------------------------------------------------------------------------------------


def check_report(r: aot.CompileReport, spills: bool = True) -> list[str]:
    """What is wrong with one compiled launch (empty: nothing); spills: check bf16 spills too."""
    if r.error:
        return [f"{r.spec.label()}: compile failed: {r.error.splitlines()[0]}"]
    problems = []
    if r.smem_total > smem_limit(r.spec.arch):
        problems.append(f"{r.summary()}: over the {smem_limit(r.spec.arch)} B limit")
    ptrs = {t for _, t in r.spec.signature if t.startswith("*")}
    kind, cfg, itemsize = spec_kind_config(r.spec)
    bf16 = itemsize == 2 if kind else "*bf16" in ptrs
    if spills and bf16 and r.spill_bytes:
        problems.append(f"{r.summary()}: spills in bf16")
    if kind:
        est = cost.smem_estimate(kind, cfg, itemsize)
        if est < r.smem_total:
            problems.append(f"{r.summary()}: smem_estimate {est} B is below it")
        if bf16 and not (r.mma or r.wgmma):
            problems.append(f"{r.summary()}: no tensor-core MMA in bf16")
        # sm_90: wgmma wherever the MMA's M tile (BLOCK_M; dW: BLOCK_CI, its u^T @ dz) is >= 64, the
        # warpgroup MMA's minimum (measured: every candidate; smaller tiles get mma.sync)
        m_tile = cfg.get("BLOCK_M", cfg.get("BLOCK_CI", 0))
        if bf16 and r.spec.arch == "sm90" and m_tile >= 64 and not r.wgmma:
            problems.append(f"{r.summary()}: no wgmma on sm_90 for a {m_tile}-row MMA tile")
    return problems


@functools.lru_cache(maxsize=None)
def compiled_representatives() -> tuple:
    """The representatives of every traced launch, compiled for their GPUs' archs (once a session)."""
    return tuple(_compile(representatives(target_specs())))


def test_traced_launches_compile_for_their_gpus():
    """One representative per compile_class of every traced launch, compiled for its GPU's arch
    (A100: sm_80; H100, H200: sm_90): it compiles, fits, uses tensor cores in bf16 and
    smem_estimate bounds it (see check_report; spills: the next test)."""
    if not _chooses_for_gpus():
        pytest.xfail("conv_block.choose_config has no gpu= yet: the heuristic's picks exceed the A100's limit")
    problems = [p for r in compiled_representatives() for p in check_report(r, spills=False)]
    assert not problems, "\n".join(problems)


def test_traced_bf16_launches_do_not_spill():
    """No compiled bf16 representative spills registers."""
    if not _chooses_for_gpus():
        pytest.xfail("conv_block.choose_config has no gpu= yet")
    problems = [p for r in compiled_representatives() for p in check_report(r) if p.endswith("spills in bf16")]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Measuring (python tests/test_compile_targets.py --measure | --all)
# ------------------------------------------------------------------------------------------------


def candidate_configs(kind: str, kernel) -> list[tuple[dict, int, int]]:
    """(kwargs, num_warps, num_stages) of every config of the kind's list, plus, where the kernel has
    a split-K axis, each >= 64-row tile with SPLIT_K = 2 (one split count stands for all: the code
    is the same for any S > 1)."""
    lists = dict(fwd=conv_block.FWD_CONFIGS, dx=conv_block.DX_CONFIGS, dw=conv_block.DW_CONFIGS)
    out = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in lists[kind]]
    if "SPLIT_K" in aot.constexpr_names(kernel):
        out += [(dict(k, SPLIT_K=2), w, st) for k, w, st in out if k["BLOCK_M"] >= 64]
    return out


def layer_variant(spec: aot.Specialisation, kind: str) -> str:
    """The flags of a conv launch that change its shared memory or registers: the epilogue
    (upsample, pool; dx: the previous block's activation applied, INPUT_ACT), the activation and
    where its sign comes from (none when the gradient is given as dz: GRAD_IS_DZ), and operands read
    in another dtype than the compute dtype (an fp32 image batch or fp32 master weights feeding bf16
    tiles)."""
    ce, sig = dict(spec.constexprs), dict(spec.signature)
    dtype = "bf16" if compute_itemsize(sig, kind) == 2 else "fp32"
    parts = [k.lower() for k in ("UPSAMPLE", "POOL") if ce.get(k)]
    parts.append(("act(dz given)" if ce.get("GRAD_IS_DZ") else "act(sign of y)" if ce.get("SIGN_FROM_OUT")
                  else "act(sign map)" if kind != "fwd" else "act") if ce.get("ACT") else "linear")
    parts += ["input act"] * bool(ce.get("INPUT_ACT"))  # dx's epilogue: the previous block's lrelu'
    parts += [f"{k[0]}:{sig[k][1:]}" for k in ("X_ptr", "W_ptr") if sig.get(k, "*" + dtype)[1:] != dtype]
    return ",".join(parts)


def measure_candidates(jobs: int = 2) -> tuple[list[dict], list[str]]:
    """Compile every candidate config (`candidate_configs`) in every layer variant the presets
    launch (`layer_variant`: a traced launch of that variant, its config replaced; dW with its
    split epilogue on), fp32 and bf16, for sm_80 and sm_90."""
    variants = {}  # (kind, compute dtype, variant) -> a traced launch (a 3x3 one where there is one)
    for launch in all_launches("h100"):
        kind = CONV.get(launch.name)
        if kind is None:
            continue
        spec = launch.specialise("sm90")
        dtype = "bf16" if compute_itemsize(dict(spec.signature), kind) == 2 else "fp32"
        key = (kind, dtype, layer_variant(spec, kind))
        if key not in variants or (launch.kwargs.get("KS") == 3 and variants[key].kwargs.get("KS") != 3):
            variants[key] = launch
    specs, meta = [], {}
    for (kind, dtype, variant), launch in sorted(variants.items(), key=lambda kv: kv[0]):
        names = aot.constexpr_names(launch.kernel)
        for cfg, warps, stages in candidate_configs(kind, launch.kernel):
            if cfg.get("TAPS", 1) > 1 and launch.kwargs.get("KS") != 3:
                continue  # all-taps programs exist for 3x3 kernels only (a 1x1 layer runs TAPS = 1)
            kwargs = dict(launch.kwargs, **{k: v for k, v in cfg.items() if k in names},
                          num_warps=warps, num_stages=stages)
            if "SPLIT" in names:
                kwargs["SPLIT"] = True
            for arch in aot.TARGETS:
                s = aot.specialise(launch.kernel, launch.args, kwargs, arch)
                specs.append(s)
                meta[s] = dict(kind=kind, config=cost.config_dict(dict(cfg, num_warps=warps, num_stages=stages)),
                               dtype=dtype, itemsize=2 if dtype == "bf16" else 4, arch=arch, variant=variant)
    print(f"{len(specs)} compiles: {len(variants)} layer variants x candidates x 2 targets", flush=True)
    rows, failed = [], []
    for r in aot.compile_in_subprocess(specs, jobs=jobs):
        if r.error:
            failed.append(f"{r.spec.label()}: {r.error.splitlines()[0]}")
            continue
        rows.append(dict(meta[r.spec], shared=r.shared, static_shared=r.static_shared, registers=r.registers,
                         spill_bytes=r.spill_bytes, mma=r.mma, wgmma=r.wgmma))
    return rows, failed


def _write_measurements(rows: list[dict]) -> None:
    import triton
    COMPILED_SMEM.write_text(json.dumps(dict(
        triton=triton.__version__, kernels=aot.source_hash(conv_kernels), note="written by `python tests/test_compile_targets.py --measure`: "
        "every candidate config compiled (acai_fast.ops.aot) in each structural variant the presets launch",
        rows=rows), indent=1) + "\n")
    spills = {}
    for r in rows:
        if r["dtype"] == "bf16" and r["spill_bytes"] > 0:
            key = (r["kind"], json.dumps(r["config"], sort_keys=True), r["arch"])
            spills[key] = max(spills.get(key, 0), r["spill_bytes"])
    SPILLS_JSON.write_text(json.dumps(dict(
        triton=triton.__version__,
        note="bf16 conv configs that spill registers when compiled (tests/test_compile_targets.py "
             "--measure); the cost model's spill rule reads this list",
        bf16_spills=[dict(kind=k, config=json.loads(c), arch=a, spill_bytes=b)
                     for (k, c, a), b in sorted(spills.items())]), indent=1) + "\n")


def _record_traced_spills() -> None:
    """Compile the representatives of today's traced launches (what the chooser picks for each GPU)
    and add the bf16 conv configs among them that spill to compiled_spills.json's traced_spills
    (kept across runs): a layer variant the candidate measurement does not cover (a 1x1 dW, a
    REDUCE_GROUP of 1, which Triton specialises) can spill where the measured one did not. The
    chooser then avoids them; re-run until it reports nothing new."""
    data = json.loads(SPILLS_JSON.read_text())
    traced = {(e["kind"], json.dumps(e["config"], sort_keys=True), e["arch"]): e for e in data.get("traced_spills", [])}
    new = 0
    for r in _compile(representatives(target_specs())):
        kind, cfg, itemsize = spec_kind_config(r.spec)
        if kind and itemsize == 2 and not r.error and r.spill_bytes:
            key = (kind, json.dumps(cost.config_dict(cfg), sort_keys=True), r.spec.arch)
            new += key not in traced
            traced[key] = dict(kind=kind, config=cost.config_dict(cfg), arch=r.spec.arch,
                               spill_bytes=r.spill_bytes, seen=r.spec.label())
            print("spills:", r.summary())
    data["traced_spills"] = [traced[k] for k in sorted(traced)]
    SPILLS_JSON.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{new} new traced spills recorded ({len(traced)} in all)")


def _main(argv) -> None:
    import time
    start = time.perf_counter()
    if "--measure" in argv:
        rows, failed = measure_candidates()
        _write_measurements(rows)
        if failed:
            print(f"{len(failed)} candidate compiles FAILED:\n" + "\n".join(failed))
        for r in rows:
            est = cost.smem_estimate(r["kind"], r["config"], r["itemsize"])
            print(f"{r['kind']:3} {cost.describe_config(r['kind'], r['config']):28} {r['dtype']} {r['arch']} "
                  f"{r['variant']:24} smem {r['shared'] + r['static_shared']:7} est {est:7} "
                  f"regs {r['registers']:3} spill {r['spill_bytes']:5} {'wgmma' if r['wgmma'] else 'mma' if r['mma'] else '-'}")
    if "--measure-traced" in argv:
        _record_traced_spills()
    if "--all" in argv or "--representatives" in argv:
        targets = target_specs()
        print(f"traced in {time.perf_counter() - start:.0f} s: {len(targets)} distinct specialisations, "
              f"{len(representatives(targets))} classes")
        specs = list(targets) if "--all" in argv else representatives(targets)
        for r in _compile(specs):
            problems = check_report(r)
            print(r.summary(), f"[{','.join(sorted(targets[r.spec]))}]", "; ".join(problems) if problems else "")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    _main(sys.argv[1:])
