"""acai_fast.ops.cost: the calibration pin, per-launch arithmetic on hand-computed cases, the limits
best_config respects, and the modelled profile of a whole step on the CPU (a dry run)."""
import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from acai_fast.ops import conv_block as cb
from acai_fast.ops import cost

H100 = cost.GPUS["h100"]


def cfg(**kw):
    """A flat config dict: BLOCK_* (and split keys), num_warps, num_stages."""
    return dict(kw)


# ------------------------------------------------------------------------------------------------
# Calibration: the fit to the measured H100 conv table is pinned
# ------------------------------------------------------------------------------------------------

def test_calibration_is_pinned():
    """The fitted constants reproduce ANCHORS.md's plain-Triton conv table (the model's best over
    cost.ANCHOR_CANDIDATES, as an autotuner would pick): rms 1.06x, every row within 0.85x-1.10x."""
    rows = cost.calibration()
    assert len(rows) == len(cost.ANCHOR_CONV_FWD_H100) == 10
    assert cost.rms_log_error(rows) <= 1.065, rows
    for r in rows:
        assert 0.85 <= r["ratio"] <= 1.10, r
    assert cost.FIT == cost.Constants(step_us=0.26, fixed_us=3.0, l2_eff=0.52, mma_eff=0.63)


def test_fit_lands_on_the_pinned_constants():
    """From a neutral start the fit converges to FIT (each constant within 12%): FIT is the fit's
    result, not a hand-set value, and the fit is well posed on the anchors."""
    fitted = cost.fit_constants(start=cost.Constants(0.5, 1.0, 0.3, 0.4), rounds=4)
    for f in dataclasses.fields(cost.Constants):
        assert getattr(fitted, f.name) == pytest.approx(getattr(cost.FIT, f.name), rel=0.12), fitted
    assert cost.rms_log_error(cost.calibration(constants=fitted)) <= 1.065


def test_model_to_wall_factor_is_stated():
    # bench/model_old_engine.py: 0.78 / 0.71 / 0.71 of the measured steps of the engine at 1aa7db1
    assert cost.MODEL_TO_WALL == pytest.approx(0.73)


# ------------------------------------------------------------------------------------------------
# Per-launch arithmetic on small cases computed by hand
# ------------------------------------------------------------------------------------------------

SMALL = cost.ConvShape(N=1, H=8, W=8, CIN=16, COUT=24, KS=3, itemsize=2, x_itemsize=2, w_itemsize=4)


def test_fwd_small_case_by_hand():
    c = cost.conv_cost("fwd", SMALL, cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2), "h100")
    # M = 64 pixels: 2 row tiles x 1 column tile; 9 taps x ceil(16/16) = 9 K steps
    assert c.ctas == 2
    assert c.flops == 2 * 32 * 32 * 16 * 9 * 2           # issued: the 32-wide tile over 24 channels
    assert c.useful_flops == 2 * 64 * 24 * 9 * 16
    # HBM: x (64 px x 16 ch x 2 B) + fp32 weights (9 x 16 x 24 x 4) + bias (24 x 4) + y (64 x 24 x 2)
    assert c.hbm_bytes == 2048 + 13824 + 96 + 3072
    # L2: A gathered per tap (9 x 64 x 16 x 2) + the weights streamed by each of 2 row tiles + y
    assert c.l2_bytes == 18432 + 2 * 13824 + 3072
    # shared memory (smem_estimate): 1 pipelined stage of A (32x16 x 2 B) and of the fp32 weight tile
    # (16x32 x 4 B) + sm_90's bf16 operand tiles ((512 + 512) x 2 B) + 1 KB static
    assert c.smem == 1024 + 2048 + 2048 + 1024 == cost.smem_estimate("fwd", cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16,
                                                                      num_warps=4, num_stages=2), 2, False)
    # registers: (32x32 + 32x16 + 16x32) / 128 threads = 16 elements -> 48 regs -> 1536 per warp,
    # 6144 per CTA: 10 CTAs per SM by registers (shared memory would allow 233,472 // 8,704 = 26)
    assert c.slots == 132 * 10
    assert c.waves == pytest.approx(2 / 1320)
    # time: gap 1.0 + fixed 3.0, then the latency chain 9 x 0.26 dominates compute, L2 and HBM
    assert c.terms["latency"] == pytest.approx(9 * 0.26)
    assert c.time_us == pytest.approx(1.0 + 3.0 + 9 * 0.26)
    assert c.bound == "launch"


def test_dx_split_k_by_hand():
    c = cost.conv_cost("dx", SMALL, cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=4, num_warps=4,
                                        num_stages=2), "h100")
    # rows 64 (2 tiles), columns Cin 16 (1 tile), K: 9 taps x ceil(24/16) = 18 steps cut into
    # ranges of ceil(18/4) = 5: 4 non-empty ranges -> 8 CTAs of at most 5 steps
    assert c.ctas == 8
    assert c.terms["latency"] == pytest.approx(5 * 0.26)
    assert c.flops == 2 * 32 * 16 * 16 * 18 * 2 and c.useful_flops == 2 * 64 * 16 * 9 * 24
    # the last program of each tile sums 4 fp32 partials of 32x16: 4 x max(0.2 us, 2 KB at 64 B/clk)
    assert c.terms["tail"] == pytest.approx(4 * 0.2)
    plain = cost.conv_cost("dx", SMALL, cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2), "h100")
    assert plain.ctas == 2 and plain.terms["tail"] == 0
    # the partials (8 CTAs x 32x16 fp32) are written and read once more through L2
    assert c.l2_bytes - plain.l2_bytes == 2 * 8 * 32 * 16 * 4


DW = cost.ConvShape(N=2, H=8, W=8, CIN=16, COUT=16, KS=3, itemsize=2, x_itemsize=2, pix_per_split=64)


def test_dw_by_hand_one_tap_and_all_taps():
    base = cfg(BLOCK_CI=16, BLOCK_CO=16, BLOCK_P=64, num_warps=4, num_stages=2)
    c = cost.conv_cost("dw", DW, base, "h100")
    # P = 128 pixels in 2 splits of 64 (from the launch's PIX_PER_SPLIT); 9 taps x 1 x 1 tiles x 2
    assert c.ctas == 18
    assert c.flops == c.useful_flops == 2 * 128 * 16 * 16 * 9
    # L2: dz (G 2 B + int8 sign) re-read by each of 9 tap programs + u per tap + dW fp32 + partials
    dz, u, dw, partials = 9 * 2048 * 3, 9 * 128 * 16 * 2, 9 * 16 * 16 * 4, 2 * 18 * 16 * 16 * 4
    assert c.l2_bytes == dz + u + dw + partials
    assert c.terms["tail"] == pytest.approx(2 * 0.2)  # the last of 2 splits sums 2 partials
    taps = cost.conv_cost("dw", DW, {**base, "TAPS": 9}, "h100")
    assert taps.ctas == 2 and taps.flops == c.flops
    assert taps.terms["latency"] == pytest.approx(0.26)  # 1 chunk: its 9 tap dots wait for one load step
    assert taps.l2_bytes == 2048 * 3 + u + dw + 2 * 2 * 9 * 16 * 16 * 4  # dz read once
    with pytest.raises(ValueError, match="TAPS"):
        cost.conv_cost("dw", DW, {**base, "TAPS": 2}, "h100")


def test_dz_handed_down_the_chain_by_hand():
    """A dx/dW launch reading dz (GRAD_IS_DZ) gathers 2 B per bf16 element instead of G + the sign
    (2 B more: the sign read off the bf16 y); a dx applying its input's activation (INPUT_ACT) reads
    x once more per output element. The kernels' named arguments carry both flags."""
    dx_cfg = cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    sign = dataclasses.replace(SMALL, SIGN_FROM_OUT=True)
    plain, dz = (cost.conv_cost("dx", dataclasses.replace(sign, GRAD_IS_DZ=f), dx_cfg, "h100") for f in (False, True))
    rows, taps, cout = SMALL.N * SMALL.H * SMALL.W, 9, SMALL.COUT  # one column tile: every tap of every row
    assert plain.l2_bytes - dz.l2_bytes == taps * rows * cout * 2
    assert plain.hbm_bytes - dz.hbm_bytes == rows * cout * 2  # the sign source (y), read once
    act = cost.conv_cost("dx", dataclasses.replace(sign, GRAD_IS_DZ=True, INPUT_ACT=True), dx_cfg, "h100")
    dx_elems = SMALL.N * SMALL.HX * SMALL.WX * SMALL.CIN
    assert act.l2_bytes - dz.l2_bytes == act.hbm_bytes - dz.hbm_bytes == dx_elems * SMALL.x_itemsize
    dw_cfg = cfg(BLOCK_CI=16, BLOCK_CO=16, BLOCK_P=64, num_warps=4, num_stages=2)
    dw_sign = dataclasses.replace(DW, SIGN_FROM_OUT=True)
    dw_plain, dw_dz = (cost.conv_cost("dw", dataclasses.replace(dw_sign, GRAD_IS_DZ=f), dw_cfg, "h100")
                       for f in (False, True))
    assert dw_plain.l2_bytes - dw_dz.l2_bytes == 9 * 2048 * 2  # 9 tap programs re-read 2048 sign bytes
    args = dict(G_ptr=torch.empty(1, 2, 8, 8, 24, dtype=torch.bfloat16), DX_ptr=torch.empty(1, 2, 8, 8, 16,
                dtype=torch.bfloat16), W_ptr=torch.empty(1, 24, 16, 3, 3), N=2, H=8, W=8, CIN=16, COUT=24, KS=3,
                UPSAMPLE=False, ACT=True, POOL=False, SIGN_FROM_OUT=True, GRAD_IS_DZ=True, INPUT_ACT=True)
    shape = cost.conv_shape("dx", args)
    assert shape.GRAD_IS_DZ and shape.INPUT_ACT and "dz-in dz-out" in shape.label()
    assert not cost.conv_shape("dw", args).INPUT_ACT  # an epilogue of dx only
    launch = cost.conv_shape("dx", cb.launch_shape("dx", N=2, H=8, W=8, CIN=16, COUT=24, KS=3, UPSAMPLE=False,
                                                   ACT=True, POOL=False, dtype=torch.bfloat16, GRAD_IS_DZ=True))
    assert launch.GRAD_IS_DZ and not launch.INPUT_ACT
    # the epilogue's x tile counts in the spill rule: dx 128x256x32 w8 spilled 16-24 B with it (sm_90),
    # 128x128x32 w8 did not
    wide, narrow = (cfg(BLOCK_M=128, BLOCK_N=N, BLOCK_K=32, num_warps=8, num_stages=3) for N in (256, 128))
    plain_shape = dataclasses.replace(sign, GRAD_IS_DZ=True)
    act_shape = dataclasses.replace(plain_shape, INPUT_ACT=True)
    # (the rule alone: the compiled list has 128x256x32 w8 spilling in other variants too)
    assert cost.register_elements("dx", wide, plain_shape) <= cost.SPILL_LIMIT["dx"] < \
        cost.register_elements("dx", wide, act_shape)
    assert cost.spills("dx", wide, shape=act_shape)
    assert cost.register_elements("dx", wide, act_shape) == 304
    assert cost.register_elements("dx", wide, dataclasses.replace(act_shape, UPSAMPLE=True)) == 208  # BM/4 rows
    assert cost.register_elements("dx", narrow, act_shape) == 160 and not cost.spills("dx", narrow, shape=act_shape)
    assert cost.best_config("dx", act_shape, [wide, narrow], "h100") is narrow


def test_dw_split_counts_and_two_level_reduction():
    base = cfg(BLOCK_CI=16, BLOCK_CO=16, BLOCK_P=16, num_warps=4, num_stages=2)
    one = cost.conv_cost("dw", DW, {**base, "SPLITS": 8}, "h100")
    assert one.ctas == 9 * 8 and one.terms["tail"] == pytest.approx(8 * 0.2)
    two = cost.conv_cost("dw", DW, {**base, "SPLITS": 8, "REDUCE_GROUP": 2}, "h100")
    # groups of 2 (2 steps), then the 4 group sums (4 steps), plus one more ticket round trip
    assert two.terms["tail"] == pytest.approx((2 + 4 + 1) * 0.2)


def test_waves_and_occupancy_by_hand():
    shape = cost.ConvShape(N=64, H=32, W=32, CIN=16, COUT=16, KS=3)
    config = cfg(BLOCK_M=128, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    # smem 2 x (128x16 x 2 + 16x16 x 4) + (2048 + 256) x 2 + 1 KB = 15,872 B (what Triton allocates on
    # sm_90): 13 per SM by shared memory; registers (2048 + 2048 + 256) / 128 = 34 elements -> 66 regs
    # -> 2304 per warp: 7 per SM
    assert cost.smem_estimate("fwd", config, 2, reshape_epilogue=False) == 15872
    assert cost.ctas_per_sm("fwd", config, 2, H100, False) == 7
    c = cost.conv_cost("fwd", shape, config, "h100")
    assert c.ctas == 512 and c.slots == 924 and c.waves == pytest.approx(512 / 924)
    # the pool's 2x2 epilogue reuses the pipeline's buffers (measured): the same 15,872 B, and on an
    # A100 registers bind too (167,936 // 16,896 = 9 by shared memory)
    pooled = dataclasses.replace(shape, POOL=True)
    assert cost.smem_estimate("fwd", config, 2, reshape_epilogue=True) == 15872 == cost.smem_estimate("fwd", config, 2)
    assert cost.conv_cost("fwd", pooled, config, "a100").slots == 108 * 7


def test_streaming_launches_by_hand():
    adam = cost.adam_cost(1000, 2, block=256, weight_copy_itemsize=2, gpu="h100")
    assert adam.hbm_bytes == 1000 * 2 * (28 + 2) and adam.ctas == 8
    # 8 programs stream at most 8 x 50 GB/s: the launch is bound by its few programs, not HBM
    assert adam.terms["hbm"] == pytest.approx(60000 / (8 * 50e9) * 1e6)
    assert cost.multi_tensor_launches([100] * 40, 4) == [(36, 3600), (4, 400)]
    assert cost.multi_tensor_launches([320 * 65536 + 1], 4) == [(320, 320 * 65536), (1, 1)]
    mix = cost.mix_cost(64, 64, 1, 2, gpu="h100")
    assert mix.ctas == 32 and mix.hbm_bytes == 2 * 64 * 64 * 2
    probe = cost.probe_cost(1024, 1024, 10, rows_per_program=None, gpu="h100")
    many = cost.probe_cost(1024, 1024, 10, rows_per_program=32, d_chunk=256, gpu="h100")
    assert probe.ctas == 1 and many.ctas == 32 * 4 and many.time_us < probe.time_us / 10


# ------------------------------------------------------------------------------------------------
# Shared memory, spills, and best_config within every limit
# ------------------------------------------------------------------------------------------------

# What Triton allocated for configs the heuristic picked (issue 18: compiled for sm_80/sm_90).
COMPILED_SMEM = [("dx", cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4), 2, 212_992),
                 ("dx", cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3), 4, 196_608),
                 ("dw", cfg(BLOCK_CI=32, BLOCK_CO=64, BLOCK_P=128, num_warps=4, num_stages=3), 4, 196_608),
                 ("dw", cfg(BLOCK_CI=16, BLOCK_CO=64, BLOCK_P=128, num_warps=4, num_stages=3), 4, 180_224)]


@pytest.mark.parametrize("kind, config, itemsize, allocated", COMPILED_SMEM)
def test_smem_estimate_is_never_below_what_triton_allocated(kind, config, itemsize, allocated):
    assert cost.smem_estimate(kind, config, itemsize) >= allocated  # epilogue unknown: the larger


def test_smem_estimate_by_epilogue():
    """dx 128x128x64 w8 s4 bf16 with fp32 weights allocated 212,992 B on sm_80 (exactly the sm_80
    bound) and 230,400 B on sm_90 (tests/compile_targets.json); the 2x2 epilogue changes nothing
    (measured). It fits neither bound on an A100; on an H100 only with a bf16 weight copy."""
    big = cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    assert cost.smem_estimate("dx", big, 2, reshape_epilogue=False) == cost.smem_estimate("dx", big, 2, reshape_epilogue=True)
    assert cost.smem_estimate("dx", big, 2, arch="sm80") == 212_992
    assert cost.smem_estimate("dx", big, 2) >= 230_400
    assert not cost.fits("dx", big, 2, "a100", reshape_epilogue=False)
    assert cost.smem_estimate("dx", big, 2, w_itemsize=2) <= cost.GPUS["h100"].smem_per_block


def test_spill_rule_matches_what_ptxas_reported():
    """cost.spills answers from real compiles where there are some (acai_fast/ops/compiled_spills.json,
    per arch: every candidate of the config lists in every layer variant the presets launch), and
    from the register rule for configs nobody compiled."""
    data = json.loads((Path(cost.__file__).with_name("compiled_spills.json")).read_text())
    listed = data["bf16_spills"] + data.get("traced_spills", [])
    assert listed, "the compiled spills list is empty"
    for e in listed:
        assert cost.spills(e["kind"], e["config"], e["arch"]), e
        assert cost.spills(e["kind"], e["config"])  # arch None: spills on either
    by_arch = {a: {cost.spill_key(e["kind"], e["config"]) for e in listed if e["arch"] == a} for a in ("sm80", "sm90")}
    # a config that spilled on one arch only is refused there and allowed on the other
    one_arch = [(e, other) for e in listed for other in ({"sm80", "sm90"} - {e["arch"]})
                if cost.spill_key(e["kind"], e["config"]) not in by_arch[other]
                and cost.register_elements(e["kind"], e["config"]) <= cost.SPILL_LIMIT[e["kind"]]
                and (e["kind"], *(e["config"][k] for k in (("BLOCK_CI", "BLOCK_CO", "BLOCK_P") if e["kind"] == "dw"
                                                              else ("BLOCK_M", "BLOCK_N", "BLOCK_K"))),
                     e["config"]["num_warps"]) not in cost.KNOWN_SPILLS]
    for e, other in one_arch:
        assert not cost.spills(e["kind"], e["config"], other), (e, other)
    # never compiled: the rule (tiles of 256 x 256 per 4 warps hold far more than 255 registers)
    huge = cfg(BLOCK_M=256, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=3)
    assert cost.spills("fwd", huge, "sm90") and cost.spills("fwd", huge, "sm80")
    small = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
    assert cost.spill_key("fwd", small) not in by_arch["sm90"] | by_arch["sm80"]
    assert not cost.spills("fwd", small, "sm90")


# Layer shapes of lines and cifar1024 (forward; dx and dW use the same numbers), at batch 64 and 1024.
LAYERS = [(16, 16, 32, False, False), (16, 16, 32, False, True), (16, 32, 16, False, False),
          (64, 64, 32, False, False), (128, 128, 16, False, True), (256, 256, 8, False, True),
          (256, 512, 4, False, False), (128, 256, 2, False, False), (256, 16, 2, False, False),
          (64, 32, 8, True, False), (16, 1, 32, False, False), (1, 16, 32, False, False)]
HUGE = [cfg(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=5),
        cfg(BLOCK_CI=128, BLOCK_CO=128, BLOCK_P=256, num_warps=8, num_stages=5)]


@pytest.mark.parametrize("gpu", list(cost.GPUS))
@pytest.mark.parametrize("itemsize", [2, 4])
def test_best_config_never_exceeds_the_gpu(gpu, itemsize):
    lists = dict(fwd=cb.FWD_CONFIGS + HUGE[:1], dx=cb.DX_CONFIGS + HUGE[:1],
                 dw=cb.DW_CONFIGS + HUGE[1:] + [cfg(BLOCK_CI=32, BLOCK_CO=64, BLOCK_P=128, num_warps=4, num_stages=3)])
    limit = cost.GPUS[gpu].smem_per_block
    for batch in (64, 1024):
        for cin, cout, size, up, pool in LAYERS:
            shape = cost.ConvShape(N=batch, H=size, W=size, CIN=cin, COUT=cout, UPSAMPLE=up, POOL=pool,
                                   itemsize=itemsize, x_itemsize=itemsize, pix_per_split=4096)
            for kind, candidates in lists.items():
                chosen = cost.best_config(kind, shape, candidates, gpu)
                assert chosen is not None, (kind, shape)
                assert cost.smem_estimate(kind, chosen, itemsize) <= limit, (kind, shape, chosen)
                assert itemsize == 4 or not cost.spills(kind, chosen, cost.GPUS[gpu].arch), (kind, shape, chosen)


def test_best_config_refuses_a_faster_config_over_the_limit():
    """The huge tile would be modelled fastest on a GPU with unlimited shared memory; on the real
    ones it is over the per-block limit, so best_config takes the other (and None when alone)."""
    shape = cost.ConvShape(N=1024, H=32, W=32, CIN=256, COUT=256)
    small = cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    roomy = dataclasses.replace(H100, smem_per_block=1 << 30, smem_per_sm=1 << 30)
    assert cost.conv_cost("fwd", shape, HUGE[0], roomy).time_us < cost.conv_cost("fwd", shape, small, roomy).time_us
    for gpu in cost.GPUS:
        assert cost.best_config("fwd", shape, [HUGE[0], small], gpu) is small
        assert cost.best_config("fwd", shape, [HUGE[0]], gpu) is None
        assert cost.conv_cost("fwd", shape, HUGE[0], gpu).bound == "no fit"
    spilling = cfg(BLOCK_CI=32, BLOCK_CO=64, BLOCK_P=128, num_warps=4, num_stages=2)
    assert cost.best_config("dw", shape, [spilling], "h100") is None  # bf16: spills are refused


def test_best_config_reads_the_kernels_named_arguments():
    """conv_block.choose_config hands best_config the launch's named arguments (tensors and
    constexprs): the same shape as the ConvShape written out."""
    x = torch.empty(1, 64, 32, 32, 16, dtype=torch.bfloat16)
    w = torch.empty(1, 16, 16, 3, 3)
    args = dict(X_ptr=x, W_ptr=w, Y_ptr=torch.empty(1, 64, 32, 32, 16, dtype=torch.bfloat16), N=64, H=32, W=32,
                CIN=16, COUT=16, HO=32, WO=32, KS=3, UPSAMPLE=False, ACT=True, POOL=False, HAS_BIAS=True,
                SAVE_SIGN=False)
    shape = cost.conv_shape("fwd", args)
    assert shape == cost.ConvShape(N=64, H=32, W=32, CIN=16, COUT=16, itemsize=2, x_itemsize=2, w_itemsize=4)
    assert cost.best_config("fwd", args, cb.FWD_CONFIGS, "h100") is cost.best_config("fwd", shape, cb.FWD_CONFIGS)
    with pytest.raises(ValueError, match="unknown GPU"):
        cost.get_gpu("v100")


# ------------------------------------------------------------------------------------------------
# The modelled profile end to end on the CPU (a dry run of the fused step)
# ------------------------------------------------------------------------------------------------

def test_profile_model_command_end_to_end(tmp_path, capsys):
    """`acai-fast profile --model h100 --preset lines --batch 64`: one row per launch of the step
    (count_launches' Triton, probe and Adam launches, without the CPU-only input checks), each
    conv launch with an H100 config, and totals that add up."""
    from acai_fast.cli import main
    from acai_fast.config import ACAIConfig
    from acai_fast.engine import count_launches
    from acai_fast.engine.launches import CPU_ONLY_OPS
    from acai_fast.trainer import ACAITrainer

    out_json, out_csv = tmp_path / "lines.json", tmp_path / "lines.csv"
    assert main(["profile", "--model", "h100", "--preset", "lines", "--batch", "64", "--json", str(out_json),
                 "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "MODEL, not a measurement" in printed and "model-to-wall" in printed
    data = json.loads(out_json.read_text())
    launches, summary = data["launches"], data["summary"]

    config = ACAIConfig.preset("lines")
    trainer = ACAITrainer(config, backend="fused", device="cpu", dtype="fp32")
    x, y = torch.rand(64, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (64,))
    count_launches(trainer, x, y, dry_run=True)
    count = count_launches(trainer, x, y, dry_run=True)
    expected = count.total - sum(count.torch_ops.get(op, 0) for op in CPU_ONLY_OPS)
    assert len(launches) == summary["launches"] == expected
    assert sum(r["pass"] in ("forward", "dx", "dW") for r in launches) == sum(
        count.triton[k] for k in ("_conv_fwd_kernel", "_conv_bwd_dx_kernel", "_conv_bwd_dw_kernel"))
    # the launches add up to the one-stream time; the step (weight gradients on side streams) is
    # no longer than that and no shorter than the main stream's launches or any shared resource
    assert sum(r["us"] for r in launches) == pytest.approx(summary["serial_us"], rel=1e-3)
    main_us = sum(r["us"] for r in launches if r["pass"] != "dW")
    assert main_us * (1 - 1e-3) <= summary["model_us"] <= summary["serial_us"] * (1 + 1e-3)
    assert summary["model_us"] == pytest.approx(max(summary["critical_us"], summary["shared_us"]))
    assert summary["wall_us"] == pytest.approx(summary["model_us"] / cost.MODEL_TO_WALL)
    assert {r["stream"] for r in launches if r["pass"] == "dW"} == {"side0", "side1"}  # the engine's side streams
    assert {r["stream"] for r in launches if r["pass"] != "dW"} == {"main"}
    for r in launches:
        assert r["bound"] in ("launch", "latency", "compute", "l2", "hbm", "tail"), r
        assert r["us"] >= cost.LAUNCH_GAP_US and r["ctas"] >= 1
        if r["pass"] in ("forward", "dx", "dW"):
            assert r["config_source"] in ("table", "model", "heuristic") and r["layer"].split(".")[0] in (
                "encoder", "decoder", "critic"), r
    assert data["meta"]["modelled"] is True and data["meta"]["dtype"] == "bfloat16"
    assert out_csv.read_text().count("\n") == len(launches) + 1


def test_profile_model_of_an_array_and_other_gpus():
    """An array of runs is one launch per layer for all runs (the same launch count as one run),
    costlier per launch; the A100 (fewer SMs, less bandwidth) is modelled slower than the H100."""
    from acai_fast.config import ACAIConfig
    from acai_fast.engine.launches import model_launches, trace_launches
    from acai_fast.trainer import ACAITrainer

    config = ACAIConfig.preset("lines", batch=16)
    one = ACAITrainer(config, backend="fused", device="cpu", dtype="fp32")
    two = ACAITrainer(config, backend="fused", device="cpu", dtype="fp32", runs=2)
    x = torch.rand(2, 16, 1, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (2, 16))
    t1 = trace_launches(one, x[0], y[0], dtype=torch.bfloat16)
    t2 = trace_launches(two, x, y, dtype=torch.bfloat16)
    r1, r2 = model_launches(t1, "h100"), model_launches(t2, "h100")
    assert [r["kernel"] for r in r1 if r["kernel"].startswith("_")] == \
        [r["kernel"] for r in r2 if r["kernel"].startswith("_")]
    assert sum(r["useful_flops"] for r in r2) == pytest.approx(2 * sum(r["useful_flops"] for r in r1), rel=1e-6)
    assert sum(r["time_us"] for r in model_launches(t1, "a100")) > sum(r["time_us"] for r in r1)
    conv = [launch for launch in t1.launches if launch.kernel == "_conv_fwd_kernel"]
    assert conv[0].args["Y_ptr"].dtype == torch.bfloat16 and conv[0].args["Y_ptr"].device.type == "meta"
    assert conv[0].layer == "encoder.blocks.0" and {"BLOCK_M", "num_warps"} <= set(conv[0].config)


def test_the_step_hands_dz_down_every_chain():
    """In a traced lines step, every block with a leaky ReLU and no pool that has a successor in its
    chain (encoder, decoder, critic) gets dL/dz: its successor's dx applies its activation (INPUT_ACT)
    and its own dx and dW read dz (GRAD_IS_DZ); no other launch does; the critic's 3N-row dx passes
    included. The model then charges those launches the gradient alone."""
    from acai_fast.config import ACAIConfig
    from acai_fast.engine.launches import model_launches, trace_launches
    from acai_fast.trainer import ACAITrainer

    trainer = ACAITrainer(ACAIConfig.preset("lines", batch=16), backend="fused", device="cpu", dtype="fp32")
    trace = trace_launches(trainer, torch.rand(16, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (16,)),
                           dtype=torch.bfloat16)
    blocks = {}
    for net in ("encoder", "decoder", "critic"):
        chain = getattr(trainer.model, net).blocks
        for i, b in enumerate(chain):
            qualifies = [c.leaky_slope is not None and not c.pool_output for c in chain]
            blocks[f"{net}.blocks.{i}"] = (i + 1 < len(chain) and qualifies[i], i > 0 and qualifies[i - 1])
    seen = set()
    for launch in trace.launches:
        kind = {"_conv_bwd_dx_kernel": "dx", "_conv_bwd_dw_kernel": "dw"}.get(launch.kernel)
        if kind is None:
            continue
        dz_in, dz_out = blocks[launch.layer]
        assert launch.args["GRAD_IS_DZ"] == dz_in, (launch.layer, kind)
        if kind == "dx":
            assert launch.args["INPUT_ACT"] == dz_out, launch.layer
        seen.add((launch.layer, kind, dz_in))
    assert ("critic.blocks.1", "dx", True) in seen and ("decoder.blocks.8", "dw", True) in seen
    assert sum(dz_in for dz_in, _ in blocks.values()) == 5 + 9 + 5  # encoder, decoder, critic
    rows = {(r["layer"], r["pass"]): r for r in model_launches(trace, "h100")}
    assert "dz-in" in rows[("critic.blocks.1", "dx")]["shape"] and "dz-out" in rows[("critic.blocks.2", "dx")]["shape"]


def test_measured_beside_modelled_matches_kernels_by_name():
    """The GPU profile's table (acai_fast.profiling.measured_vs_model) on a synthetic GPU trace of 2
    steps: modelled kernels matched to measured ones by name, per step; unmatched ones on each side."""
    from acai_fast.profiling import format_measured_vs_model, measured_vs_model

    events = [dict(cat="kernel", name="_conv_fwd_kernel", dur=10.0, ts=i) for i in range(4)]
    events += [dict(cat="kernel", name="void at::native::multi_tensor_apply_kernel<...>", dur=20.0, ts=9)]
    model = [dict(kernel="_conv_fwd_kernel", time_us=4.0), dict(kernel="_conv_fwd_kernel", time_us=6.0),
             dict(kernel="_fused_adam_", time_us=8.0)]
    rows = {r["kernel"]: r for r in measured_vs_model(events, model, steps=2)}
    conv = rows["_conv_fwd_kernel"]
    assert conv["calls"] == 2 and conv["measured_us"] == 20.0 and conv["model_calls"] == 2 and conv["model_us"] == 10.0
    assert rows["_fused_adam_"]["measured_us"] is None and rows["_fused_adam_"]["model_us"] == 8.0
    other = rows["void at::native::multi_tensor_apply_kernel<...>"]
    assert other["measured_us"] == 10.0 and other["model_us"] is None
    text = format_measured_vs_model(list(rows.values()), "H100 SXM 80GB")
    assert "0.50" in text and "_conv_fwd_kernel" in text


def test_step_time_with_weight_gradients_on_side_streams():
    """The modelled step schedule (profiling.step_time_us) on hand-made rows: side launches overlap
    the main stream's after their fork point, launches on one side stream queue behind each other,
    on two they do not, and the main stream waits for every side stream before the probe and Adam;
    overlap is credited only where the GPU has room (one GPU of programs, shared L2)."""
    from acai_fast.profiling import step_time_us

    def row(pass_, us, waves=0.1, l2=0.0, stream=None):
        return {"pass": pass_, "stream": stream or ("side0" if pass_ == "dW" else "main"), "time_us": us,
                "waves": waves, "terms": {"l2": l2, "hbm": 0.0, "compute": 0.0}}

    rows = [row("forward", 10), row("dx", 4), row("dW", 8), row("dx", 4), row("dW", 8), row("adam", 2)]
    t = step_time_us(rows)
    assert t["serial_us"] == 36
    # main: 10 + 4 = 14 | dW from 14 to 22 | dx 14 -> 18 | dW 22 -> 30 (queued) | join at 30, adam -> 32
    assert t["critical_us"] == 32 and t["step_us"] == 32
    two = [dict(r, stream="side1") if i == 4 else r for i, r in enumerate(rows)]
    # the second dW on its own stream starts at 18, when the dx before it is done: 26; join at 26 -> 28
    assert step_time_us(two)["critical_us"] == 28
    full = [row(r["pass"], r["time_us"], waves=2.0, stream=r["stream"]) for r in two]  # every launch fills the GPU
    assert step_time_us(full)["step_us"] == 36  # no room to overlap: the serial time
    l2_bound = [dict(r, terms={"l2": r["time_us"], "hbm": 0.0, "compute": 0.0}) for r in two]
    assert step_time_us(l2_bound)["step_us"] == 36  # the L2 is shared: no gain either


def test_model_puts_the_weight_gradients_on_the_engines_side_streams():
    """The traced dW launches take the engine's side streams in turn, as _SideStreams.fork does; every
    other launch is on the main stream."""
    from acai_fast.config import ACAIConfig
    from acai_fast.engine.fused_step import SIDE_STREAMS
    from acai_fast.engine.launches import model_step
    from acai_fast.trainer import ACAITrainer

    trainer = ACAITrainer(ACAIConfig.preset("lines"), backend="fused", device="cpu", dtype="fp32")
    rows = model_step(trainer, torch.rand(8, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (8,)), "h100")
    dw = [r["stream"] for r in rows if r["pass"] == "dW"]
    assert SIDE_STREAMS >= 2 and len(dw) == 32
    assert dw == [f"side{i % SIDE_STREAMS}" for i in range(len(dw))]
    assert all(r["stream"] == "main" for r in rows if r["pass"] != "dW")


# The README's modelled table (H100, bf16, no tuned table): launches per step and the modelled step
# time, pinned so that a change to a kernel, a config list or the model cannot move them unnoticed,
# and held against the targets of the issue that set them (wall = model / MODEL_TO_WALL).
MODELLED_STEPS = [  # (preset, batch, runs, launches, model_us, target wall_us)
    ("lines", 64, 1, 101, 535.0, 800.0),
    ("cifar1024", 64, 1, 84, 1486.0, 3000.0),
    ("cifar1024", 1024, 1, 84, 22620.0, 38000.0),
    ("lines", 64, 16, 101, 4196.0, 7000.0),
]


@pytest.mark.parametrize("preset,batch,runs,launches,model_us,target_us", MODELLED_STEPS,
                         ids=[f"{p}-b{b}-r{r}" for p, b, r, *_ in MODELLED_STEPS])
def test_modelled_step_is_pinned_and_within_target(tmp_path, capsys, preset, batch, runs, launches, model_us,
                                                   target_us):
    from acai_fast.cli import main

    out = tmp_path / "model.json"
    argv = ["profile", "--model", "h100", "--preset", preset, "--batch", str(batch), "--json", str(out)]
    assert main(argv + (["--runs", str(runs)] if runs > 1 else [])) == 0
    capsys.readouterr()
    summary = json.loads(out.read_text())["summary"]
    assert summary["launches"] == launches
    # 0.5%: the model is deterministic arithmetic on the traced shapes; only the last digit may move
    assert summary["model_us"] == pytest.approx(model_us, rel=5e-3), summary
    assert summary["wall_us"] <= target_us, summary


def test_engine_forks_each_weight_gradient_onto_the_next_side_stream(monkeypatch):
    """The engine's _SideStreams as a GPU would drive them (CUDA streams replaced by stand-ins that
    note which one each fork enters): one fork per dW launch, the streams taken in turn from the
    first every step, the current stream made to wait for all of them once at the end. Together with
    the test above, the model's schedule is the engine's."""
    from acai_fast.config import ACAIConfig
    from acai_fast.engine import count_launches
    from acai_fast.engine import fused_step
    from acai_fast.trainer import ACAITrainer

    events = []

    class Stream:
        made = 0

        def __init__(self, device=None):
            self.index, Stream.made = Stream.made, Stream.made + 1
            self.device = device

        def wait_stream(self, other):
            events.append(("wait", self.index, other.index))

    main_stream = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main_stream)

    @contextlib.contextmanager
    def entered(stream):
        events.append(("enter", stream.index))
        yield

    monkeypatch.setattr(torch.cuda, "stream", entered)
    trainer = ACAITrainer(ACAIConfig.preset("lines"), backend="fused", device="cpu", dtype="fp32")
    trainer.engine._side = fused_step._SideStreams(torch.device("cuda"))
    sides = [s.index for s in trainer.engine._side.streams]
    assert len(sides) == fused_step.SIDE_STREAMS
    x, y = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (8,))
    for _ in range(2):  # the turn starts over every step
        events.clear()
        count = count_launches(trainer, x, y, dry_run=True)
        entered_ = [e[1] for e in events if e[0] == "enter"]
        assert len(entered_) == count.triton["_conv_bwd_dw_kernel"] == 32
        assert entered_ == [sides[i % len(sides)] for i in range(len(entered_))]
        forks = [e for e in events if e[0] == "wait" and e[1] in sides]
        assert forks == [("wait", s, main_stream.index) for s in entered_]  # each after the main stream's queue
        joins = [e for e in events if e[0] == "wait" and e[1] == main_stream.index]
        assert joins == [("wait", main_stream.index, s) for s in sides]
        assert trainer.engine._side._held == []
