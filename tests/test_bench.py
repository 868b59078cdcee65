"""bench/: the analytic FLOP count against torch's FLOP counter, the plain-PyTorch baseline step
against the trainer's reference step, the throughput benchmark's CPU mode end to end (JSON, CSV, PNG,
every variant run or skipped with a reason), the cold/warm first-step runner, the speed-up columns,
the K-run baselines of --array (vmap, grouped convs) against the single-run plain step run by run
(float64), the --array CPU mode end to end, output paths checked before any work, and
bench_fused_ops' callables against the current op signatures (CPU, Triton interpreter)."""
import csv
import dataclasses
import pathlib
import sys
import tempfile

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.networks import count_parameters
from acai_fast.ops.mix import philox_alpha_ref
from helpers import strict_json

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import baselines  # noqa: E402
import bench_fused_ops  # noqa: E402
import flops  # noqa: E402
import throughput as tp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_flops_match_torch_counter():
    # lines at batch 2 in every test here: the CPU's conv primitives are made once per shape
    config = ACAIConfig.preset("lines", batch=2)
    x, labels = tp.batch_data(config, 2, CPU, 0)
    trainer = ACAITrainer(config, backend="reference", device="cpu")
    with FlopCounterMode(display=False) as counter:
        trainer.step(x, labels)
    analytic = flops.step_flops(config, 2)
    assert analytic["total"] == counter.get_total_flops()
    assert analytic["forward"] + analytic["backward"] == analytic["total"]
    plain = baselines.PlainACAIStep(config, CPU)
    with FlopCounterMode(display=False) as counter:
        plain.step(x, labels)
    assert analytic["total"] == counter.get_total_flops()


def test_flops_match_anchors_at_batch_64():
    # ANCHORS.md, torch's FLOP counter on an H100 run at batch 64: lines 27.9 GFLOP, mnist256 22.2,
    # svhn256 349, cifar1024 355 (x16 at batch 1024: the count is linear in the batch).
    for preset, gflop in (("lines", 27.9), ("mnist256", 22.2), ("svhn256", 349), ("cifar1024", 355)):
        config = ACAIConfig.preset(preset)
        assert flops.step_flops(config, 64)["total"] / 1e9 == pytest.approx(gflop, rel=2e-3), preset
        assert flops.step_flops(config, 1024)["total"] == 16 * flops.step_flops(config, 64)["total"]
    lines = ACAIConfig.preset("lines")
    assert flops.step_bytes(lines, 64, 2) < flops.step_bytes(lines, 64, 4) < flops.step_bytes(lines, 128, 4)


def test_plain_networks_match_spec():
    for preset, counts in (("lines", (627_472, 313_985, 627_472)), ("cifar1024", (2_655_936, 1_329_795, 2_655_936))):
        layers = flops.network_layers(ACAIConfig.preset(preset))
        nets = [baselines.plain_chain(layers[k]) for k in ("encoder", "decoder", "critic")]
        assert tuple(count_parameters(n) for n in nets) == counts
        assert tuple(sum(layer.params for layer in layers[k]) for k in ("encoder", "decoder", "critic")) == counts


def test_plain_step_is_the_reference_step():
    """The baseline computes the SPEC step: from the trainer's weights and alphas, the same losses
    and the same parameters after one update."""
    config = ACAIConfig.preset("lines", batch=2)
    x, labels = tp.batch_data(config, 2, CPU, 1)
    trainer = ACAITrainer(config, backend="reference", device="cpu", seed=3)
    plain = baselines.PlainACAIStep(config, CPU, seed=99).load_from(trainer)
    alpha = philox_alpha_ref(trainer.alpha_state.clone(), 2, advance=False)
    ours = plain.step(x, labels, alpha=alpha)
    theirs = trainer.step(x, labels)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-7, msg=k)
    for mine, ref in ((plain.encoder, trainer.encoder), (plain.decoder, trainer.decoder),
                      (plain.critic, trainer.critic), (plain.probe, trainer.probe)):
        for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_cpu_mode_writes_every_variant(tmp_path, capsys):
    out = tmp_path / "out.json"
    code = tp.main(["--device", "cpu", "--presets", "lines", "--batches", "2", "--steps", "1", "--warmup", "0",
                    "--variants", "eager_fp32,eager_bf16,graph_bf16,compile,fused,fused_graph,reference",
                    "--json", str(out), "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "out.png")])
    captured = capsys.readouterr()
    assert code == 0
    assert "CPU numbers" in captured.out and "x fp32" in captured.out
    payload = strict_json(out.read_text())
    assert payload["device"] == "cpu" and "CPU" in payload["note"]
    env = payload["environment"]
    assert env["torch"] == torch.__version__ and env["timestamp"] and "commit" in env and env["cpu"]
    rows = {r["variant"]: r for r in payload["results"]}
    assert list(rows) == ["eager_fp32", "eager_bf16", "graph_bf16", "compile", "fused", "fused_graph", "reference"]
    for v in ("eager_fp32", "eager_bf16", "reference"):
        r = rows[v]
        assert r["status"] == "ok" and r["reason"] is None, r
        assert r["steps_timed"] == 1 and 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["images_per_s"] == pytest.approx(2 / r["ms_median"] * 1e3)
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["ms_median"])
        assert r["gflop_per_step"] == pytest.approx(flops.step_flops(ACAIConfig.preset("lines"), 2)["total"] / 1e9)
        assert r["launches"] > 100 and "convolution x53" in r["launches_detail"]  # 11 + 2x10 + 2x11 convs
        assert r["first_step_s"] > 0 and r["peak_mem_mib"] is None  # no CUDA memory on the CPU
    assert rows["eager_fp32"]["speedup_vs_eager_fp32"] == pytest.approx(1.0)
    best = min(("eager_fp32", "eager_bf16", "reference"), key=lambda v: rows[v]["ms_median"])
    assert all(r["best_plain_variant"] == best for r in rows.values())
    assert rows[best]["speedup_vs_best_plain"] == pytest.approx(1.0)
    assert rows["graph_bf16"]["status"] == rows["fused_graph"]["status"] == "skipped"
    assert "CUDA graphs need a CUDA GPU" in rows["graph_bf16"]["reason"]
    assert "--compile" in rows["compile"]["reason"] and "--fused-cpu" in rows["fused"]["reason"]
    assert rows["fused"]["ms_median"] is None and rows["fused"]["gflop_per_step"] > 0
    table = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["variant"] for r in table] == list(rows) and table[0]["device"] == "cpu"
    assert table[0]["commit"] == (env["commit"] or "")
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert "arrays" not in payload and "array" not in payload["arguments"]  # the single-run output as before


def test_first_step_child(capsys):
    """--child: what each fresh process of the cold/warm measurement runs."""
    assert tp.main(["--device", "cpu", "--child", "lines:2:eager_fp32"]) == 0
    assert strict_json(capsys.readouterr().out.strip().splitlines()[-1])["first_step_s"] > 0


def test_first_step_cold_then_warm_share_a_fresh_cache(tmp_path):
    """The two processes get one new, shared compile cache, and their times come back in order.
    (A stand-in for python records what it was given: the real child is tested above.)"""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR $*\" >> {log}\n"
                    f"n=$(wc -l < {log})\necho noise\necho \"{{\\\"first_step_s\\\": $n.5}}\"\n")
    fake.chmod(0o755)
    args = tp.parse_args(["--device", "cpu"])[0]
    cold, warm, error = tp.first_step_cold_warm(tp.Case("lines", 2, "fused"), CPU, args, python=str(fake))
    assert (cold, warm, error) == (1.5, 2.5, None)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0] == calls[1]
    triton_dir, inductor_dir = calls[0].split()[:2]
    assert triton_dir.startswith(tempfile.gettempdir()) and "acai_bench_cache_" in triton_dir
    assert inductor_dir.startswith(triton_dir.rsplit("/", 1)[0])
    assert not pathlib.Path(triton_dir).parent.exists()  # removed afterwards
    assert "--child lines:2:fused" in calls[0] and "--device cpu" in calls[0]
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    cold, warm, error = tp.first_step_cold_warm(tp.Case("lines", 2, "fused"), CPU, args, python=str(fake))
    assert cold is None and warm is None and "broken" in error


def test_speedup_columns():
    def r(variant, ms, preset="lines"):
        return tp.Result(tp.Case(preset, 64, variant), ms_median=ms)
    rows = tp.speedups([r("eager_fp32", 17.0), r("eager_bf16", 20.0), r("graph_bf16", 3.5), r("fused_graph", 0.5),
                        tp.Result(tp.Case("lines", 64, "fused"), status="failed", reason="x"),
                        r("fused_graph", 2.0, preset="cifar1024")])
    by = {(x["preset"], x["variant"]): x for x in rows}
    assert by["lines", "fused_graph"]["speedup_vs_eager_fp32"] == pytest.approx(34.0)
    assert by["lines", "fused_graph"]["speedup_vs_best_plain"] == pytest.approx(7.0)
    assert by["lines", "eager_bf16"]["best_plain_variant"] == "graph_bf16"
    assert by["lines", "fused"]["speedup_vs_eager_fp32"] is None
    assert by["cifar1024", "fused_graph"]["speedup_vs_eager_fp32"] is None  # no baseline in its group


def test_bad_arguments():
    for argv in (["--device", "cpu", "--variants", "magic"], ["--device", "cpu", "--presets", "nope"],
                 ["--device", "cpu", "--batches", "x"]):
        with pytest.raises(SystemExit) as exc:
            tp.parse_args(argv)
        assert exc.value.code == 2


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    """--json, --csv and --plot (single runs and --array): a missing folder, a file where the folder
    should be, or a folder as the path: one line on stderr and exit 2 before anything is measured
    (nothing on stdout, no folder made). (An unwritable folder says so the same way; not testable
    here as root.)"""
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "missing" / "out", "does not exist"), (tmp_path / "file" / "out", "does not exist"),
             (tmp_path, "is a folder")]
    for option in ("--json", "--csv", "--plot"):
        for path, message in cases:
            for mode in ([], ["--array", "2"]):
                with pytest.raises(SystemExit) as exc:
                    tp.main(["--device", "cpu", *mode, option, str(path)])
                out, err = capsys.readouterr()
                assert exc.value.code == 2 and out == "", (option, path)
                assert err.count("\n") == 1 and f"{option} {path}: " in err and message in err, err
    assert not (tmp_path / "missing").exists()


# A tiny ACAI (3 colours, so that the grouped layout's channel blocks are tested) and 3 runs that
# differ in seed, advweight and reg.
TINY = ACAIConfig(colors=3, image_size=8, latent_width=2, depth=3, latent=2, advdepth=4, batch=4)
SEEDS, ADVWEIGHT, REG = [0, 7, 3], [0.5, 1.0, 0.0], [0.2, 0.5, 0.1]


@pytest.fixture
def float64():
    """Networks, data and Adam in float64 (the default dtype) for the test's duration."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("baseline", ["vmap", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_array_baselines_are_the_plain_step(baseline, channels_last, float64):
    """Each run of the K-run baselines takes the SPEC step: two steps from the same weights and alphas
    give every run the losses and parameters of PlainACAIStep run alone.

    In float64, because the point is the algebra (run k's slice of a grouped conv or of a vmap is run
    k's own step), not the rounding. In fp32 the two sum in other orders (grouped convs, batched
    reductions) and Adam's first steps amplify the rounding of a gradient near zero: the update
    lr*g/(|g|+eps) moves by up to lr/eps = 1e4 times a change of g, so fp32 rounding moved an encoder
    bias by 1-2e-7 (measured, run 1 parameter 5, on AMD and Intel CPUs alike), over any tolerance
    that still catches a slip of the algebra. In float64 (u = 1.1e-16) the losses, sums of at most a
    few thousand terms, agree to n*u ~ 1e-13 relative (measured <= 2.1e-15): rtol 1e-12; a gradient's
    rounding is at most n*u*sum|terms| ~ 1e-15 here, which two Adam steps move a parameter by at most
    2 * lr/eps * 1e-15 = 2e-11 (measured <= 1.2e-16): atol 1e-10, three orders under fp32's rounding,
    so a run that took another run's advweight, reg, alpha or batch fails."""
    cls = dict(vmap=baselines.VmapACAIStep, grouped=baselines.GroupedACAIStep)[baseline]
    array = cls(TINY, CPU, SEEDS, advweight=ADVWEIGHT, reg=REG, channels_last=channels_last)
    singles = [baselines.PlainACAIStep(dataclasses.replace(TINY, advweight=a, reg=r), CPU, seed=s)
               for s, a, r in zip(SEEDS, ADVWEIGHT, REG)]
    assert array.ae_params[0].dtype == singles[0].ae_params[0].dtype == torch.float64
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.rand(3, 4, 3, 8, 8, generator=g) * 2 - 1
        labels = torch.randint(0, 10, (3, 4), generator=g)
        alpha = torch.rand(3, 4, generator=g) * 0.5
        losses = array.step(array.prepare(x), labels, alpha=alpha)
        for k, single in enumerate(singles):
            for name, value in single.step(x[k], labels[k], alpha=alpha[k]).items():
                assert losses[name].shape == (3,) and losses[name].dtype == torch.float64
                torch.testing.assert_close(losses[name][k], value, rtol=1e-12, atol=0,
                                           msg=f"step {step} run {k} {name}")
    for k, single in enumerate(singles):
        mine = array.run_parameters(k)
        theirs = single.ae_params + single.critic_params + single.probe_params
        for i, (p, q) in enumerate(zip(mine, theirs, strict=True)):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=f"run {k} parameter {i}")


def test_array_cpu_mode(tmp_path, capsys):
    """--array 1,2 on the CPU: the plain K-run variants run eagerly, the fused ones are skipped with the
    reason; images/s, FLOPs and launches count every run; JSON (arrays), CSV and PNG."""
    out = tmp_path / "arrays.json"
    code = tp.main(["--device", "cpu", "--array", "1,2", "--batches", "2", "--steps", "1", "--warmup", "0",
                    "--json", str(out), "--csv", str(tmp_path / "arrays.csv"), "--plot", str(tmp_path / "arrays.png")])
    captured = capsys.readouterr()
    assert code == 0
    assert "CPU numbers" in captured.out and "x plain" in captured.out and "x fused" in captured.out
    payload = strict_json(out.read_text())
    assert payload["device"] == "cpu" and "CPU" in payload["note"] and "results" not in payload
    assert payload["arguments"]["array"] == [1, 2] and "vmap" in payload["array_model"]
    rows = {(r["runs"], r["variant"]): r for r in payload["arrays"]}
    assert list(rows) == [(k, v) for k in (1, 2) for v in tp.ARRAY_VARIANTS]
    lines2 = flops.step_flops(ACAIConfig.preset("lines"), 2)["total"] / 1e9
    for (k, v), r in rows.items():
        assert r["preset"] == "lines" and r["batch"] == 2
        assert r["gflop_per_step"] == pytest.approx(k * lines2)
        if v.startswith("fused"):
            assert r["status"] == "skipped" and "--fused-cpu" in r["reason"] and r["images_per_s"] is None
            continue
        assert r["status"] == "ok" and r["note"] == "eager: CUDA graphs need a CUDA GPU", r
        assert r["steps_timed"] == 1 and 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["images_per_s"] == pytest.approx(k * 2 / r["ms_median"] * 1e3)
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["ms_median"])
        assert r["launches"] > 100 and r["first_step_s"] > 0 and r["peak_mem_mib"] is None
        assert r["speedup_vs_fused_sequential"] is None  # skipped here
        assert r["speedup_vs_plain_sequential"] == pytest.approx(
            r["images_per_s"] / rows[k, "plain_sequential"]["images_per_s"])
    # Launches of the whole array: K one-run steps one after another; the grouped convs stay one
    # launch per layer for all runs (53 convs: 11 encoder + 2x10 decoder + 2x11 critic).
    assert rows[2, "plain_sequential"]["launches"] == 2 * rows[1, "plain_sequential"]["launches"]
    assert "convolution x53" in rows[2, "grouped"]["launches_detail"]
    assert rows[2, "grouped"]["launches"] < 1.1 * rows[1, "grouped"]["launches"]
    table = list(csv.DictReader((tmp_path / "arrays.csv").open()))
    assert [(int(r["runs"]), r["variant"]) for r in table] == list(rows) and table[0]["device"] == "cpu"
    assert (tmp_path / "arrays.png").read_bytes()[:4] == b"\x89PNG"


def test_array_speedup_columns():
    def r(variant, ips, runs=4):
        ms = runs * 64 / ips * 1e3
        return tp.Result(tp.Case("lines", 64, variant, runs), images_per_s=ips, ms_median=ms,
                         ms_p20=ms, ms_p80=ms, tflops=1.0)
    rows = tp.speedups([r("fused_array", 6000.0), r("fused_sequential", 1000.0), r("plain_sequential", 200.0),
                        tp.Result(tp.Case("lines", 64, "vmap", 4), status="failed", reason="oom"),
                        r("fused_array", 900.0, runs=1)])
    by = {(x["runs"], x["variant"]): x for x in rows}
    assert by[4, "fused_array"]["speedup_vs_fused_sequential"] == pytest.approx(6.0)
    assert by[4, "fused_array"]["speedup_vs_plain_sequential"] == pytest.approx(30.0)
    assert by[4, "plain_sequential"]["speedup_vs_plain_sequential"] == pytest.approx(1.0)
    assert by[4, "vmap"]["speedup_vs_plain_sequential"] is None
    assert by[1, "fused_array"]["speedup_vs_fused_sequential"] is None  # no baseline at K=1
    table = tp.ARRAYS.table(rows)  # as on a GPU: no CPU note
    assert "30.00x" in table and "failed: oom" in table and "CPU numbers" not in table


def test_array_bad_arguments():
    for argv in (["--array", "x"], ["--array", "0"], ["--array", "2", "--compile"], ["--array", "2", "--quick"],
                 ["--array", "2", "--variants", "eager_fp32"], ["--variants", "vmap"]):
        with pytest.raises(SystemExit) as exc:
            tp.parse_args(["--device", "cpu", *argv])
        assert exc.value.code == 2, argv
    args = tp.parse_args(["--device", "cpu", "--array", "1,4"])[0]
    assert args.array == [1, 4] and args.variants == list(tp.ARRAY_VARIANTS) and args.presets == ["lines"]


def test_bench_fused_ops_callables_run_on_cpu():
    """Each op's eager and Triton callables run (one forward+backward) with today's signatures."""
    cases = bench_fused_ops.cases([2], "fp32")
    assert {c.op for c in cases} == set(bench_fused_ops.OPS)
    for case in cases:
        assert bench_fused_ops.bytes_moved(case) > 0
        for variant in ("eager", "triton"):
            bench_fused_ops.make_fn(case, variant, device="cpu")()


@pytest.mark.gpu
def test_gpu_mode_small(tmp_path):
    """On a GPU (scripts/gpu_check.sh tests): the CUDA paths at a small size, before the real run."""
    out = tmp_path / "gpu.json"
    code = tp.main(["--device", "cuda", "--presets", "lines", "--batches", "8", "--steps", "5", "--warmup", "3",
                    "--min-seconds", "0.2", "--first-step", "none",
                    "--variants", "eager_fp32,eager_bf16,graph_bf16,fused,fused_graph", "--json", str(out)])
    assert code == 0
    payload = strict_json(out.read_text())
    assert payload["device"] == "cuda" and payload["environment"]["gpu"] and payload["note"] is None
    for r in payload["results"]:
        assert r["status"] == "ok", r
        assert r["steps_timed"] >= 5 and r["ms_median"] > 0 and r["peak_mem_mib"] > 0
        assert r["launches"] > 0
        if payload["nvml"]["available"]:
            assert r["gpu_samples"] >= 1


@pytest.mark.gpu
def test_gpu_array_small(tmp_path):
    """On a GPU (scripts/gpu_check.sh tests): every array variant at a small size, in CUDA graphs."""
    out = tmp_path / "arrays.json"
    code = tp.main(["--device", "cuda", "--array", "1,2", "--batches", "8", "--steps", "5", "--warmup", "3",
                    "--min-seconds", "0.1", "--json", str(out)])
    assert code == 0
    payload = strict_json(out.read_text())
    for r in payload["arrays"]:
        assert r["status"] == "ok", r
        assert r["steps_timed"] >= 5 and r["ms_median"] > 0 and r["peak_mem_mib"] > 0 and r["launches"] > 0
        if r["variant"] in ("fused_array", "fused_sequential", "grouped", "plain_sequential"):
            assert r["note"] is None, r  # captured in CUDA graphs (vmap may fall back: its note says so)
