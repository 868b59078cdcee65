"""`acai-fast profile --model GPU`: the modelled profile of a traced step (acai_fast.engine.launches,
acai_fast.ops.cost): the table, the step's time with the weight gradients on side streams, the
JSON/CSV outputs, and on a GPU the measured kernels beside the modelled ones."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path


from .traces import top_kernels

log = logging.getLogger("acai_fast")


# ------------------------------------------------------------------------------------------------
# The modelled profile (`acai-fast profile --model GPU`): every launch of a traced step as the cost
# model (acai_fast.ops.cost) sees it on a GPU; rows from acai_fast.engine.launches.model_launches
# ------------------------------------------------------------------------------------------------

MODEL_COLUMNS = ("index", "layer", "pass", "stream", "kernel", "shape", "config", "config_source", "ctas",
                 "waves", "gflop", "useful_gflop", "hbm_mb", "l2_mb", "smem_kb", "us", "bound")


def model_table(rows: list[dict]) -> list[dict]:
    """Modelled launches in display units (MODEL_COLUMNS): GFLOP, MB, KB, microseconds."""
    return [dict(index=r["index"], layer=r["layer"], **{"pass": r["pass"]}, stream=r.get("stream", "main"),
                 kernel=r["kernel"], shape=r["shape"],
                 config=r["config"], config_source=r["config_source"], ctas=r["ctas"], waves=r["waves"],
                 gflop=round(r["flops"] / 1e9, 4), useful_gflop=round(r["useful_flops"] / 1e9, 4),
                 hbm_mb=round(r["hbm_bytes"] / 1e6, 3), l2_mb=round(r["l2_bytes"] / 1e6, 3),
                 smem_kb=round(r["smem"] / 1024, 1), us=round(r["time_us"], 2), bound=r["bound"]) for r in rows]


def step_time_us(rows: list[dict]) -> dict:
    """A modelled step's time with the weight gradients on side streams (rows' "stream": "main",
    or the name of a side stream), in us:
    serial: every launch after the other, one stream;
    critical: the streams' schedule (a side launch starts when its stream is free and everything
      queued before it on the main stream is done; the main stream waits for every side stream
      before the probe and Adam, where the engine joins them);
    shared: what launches running side by side still share: no more than one GPU of programs at a
      time (each launch's time x min(1, waves)), and the L2, HBM and tensor-core throughputs (the
      sums of the launches' l2 / hbm / compute terms: each is the time that resource alone needs);
    step = max(critical, shared): overlap is credited only where the GPU has room for it."""
    serial = main = occupancy = 0.0
    sides: dict[str, float] = {}
    resources = dict(l2=0.0, hbm=0.0, compute=0.0)
    for r in rows:
        t = r["time_us"]
        if not math.isfinite(t):
            continue
        serial += t
        occupancy += t * min(1.0, r.get("waves") or 1.0)
        for k in resources:
            resources[k] += (r.get("terms") or {}).get(k, 0.0)
        stream = r.get("stream") or "main"
        if stream != "main":
            sides[stream] = max(sides.get(stream, 0.0), main) + t
        else:
            if r["pass"] in ("probe", "adam"):
                main = max(main, *sides.values())  # the engine joins the side streams before the probe and Adam
            main += t
    critical = max(main, *sides.values())
    shared = max(occupancy, *resources.values())
    return dict(serial_us=serial, critical_us=critical, shared_us=shared, step_us=max(critical, shared))


def model_summary(rows: list[dict], *, model_to_wall: float, peak_flops: float | None = None) -> dict:
    """Totals of a modelled step: launches, modelled us (`step_time_us`: the schedule over the streams;
    serial_us: one launch after the other), ~wall us (modelled / model_to_wall), FLOPs (issued,
    useful), HBM and L2 bytes, us by bound and by pass (serial sums), launches that do not fit the
    GPU (no_fit: left out of the times, which are then those of the launches that fit), and the
    FLOP floor (useful FLOPs at `peak_flops`)."""
    fit = [r for r in rows if math.isfinite(r["time_us"])]  # a launch over the GPU's limits: inf

    def by(key):
        out: dict[str, float] = {}
        for r in fit:
            out[r[key]] = out.get(r[key], 0.0) + r["time_us"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    times = step_time_us(rows)
    total = times["step_us"]
    useful = sum(r["useful_flops"] for r in rows)
    return dict(launches=len(rows), model_us=total, serial_us=times["serial_us"],
                critical_us=times["critical_us"], shared_us=times["shared_us"],
                wall_us=total / model_to_wall, model_to_wall=model_to_wall,
                flops=sum(r["flops"] for r in rows), useful_flops=useful,
                hbm_bytes=sum(r["hbm_bytes"] for r in rows), l2_bytes=sum(r["l2_bytes"] for r in rows),
                by_bound=by("bound"), by_pass=by("pass"), no_fit=sum(r["bound"] == "no fit" for r in rows),
                flop_floor_us=useful / peak_flops * 1e6 if peak_flops else None)


def format_model_report(rows: list[dict], summary: dict, *, title: str, top: int = 10) -> str:
    """What `acai-fast profile --model` prints: every launch in order, the totals, the largest."""
    table = model_table(rows)
    widths = dict(index=3, layer=17, **{"pass": 11}, shape=34, config=32)
    head = (f"{'#':>3} {'layer':<17} {'pass':<11} {'shape':<34} {'config':<32} {'CTAs':>6} {'waves':>6} "
            f"{'GFLOP':>7} {'HBM MB':>7} {'L2 MB':>8} {'us':>8}  bound")

    def line(r):
        cut = {k: (str(r[k]) if len(str(r[k])) <= w else str(r[k])[:w - 1] + "~") for k, w in widths.items()}
        return (f"{r['index']:>3} {cut['layer'] or '-':<17} {cut['pass']:<11} {cut['shape']:<34} {cut['config']:<32} "
                f"{r['ctas']:>6} {r['waves']:>6.2f} {r['gflop']:>7.3f} {r['hbm_mb']:>7.2f} {r['l2_mb']:>8.1f} "
                f"{r['us']:>8.1f}  {r['bound']}")

    s = summary
    fits = f" (the {s['launches'] - s['no_fit']} that fit this GPU)" if s["no_fit"] else ""
    out = [f"{title}",
           f"MODEL, not a measurement: {s['launches']} launches, {s['model_us'] / 1e3:.3f} ms per step modelled{fits} "
           f"(~{s['wall_us'] / 1e3:.3f} ms wall at the model-to-wall factor {s['model_to_wall']}: wall ~ model / "
           f"{s['model_to_wall']}; weight gradients on side streams: {s['serial_us'] / 1e3:.3f} ms on one "
           f"stream); "
           f"{s['useful_flops'] / 1e9:.2f} GFLOP useful ({s['flops'] / 1e9:.2f} issued), "
           f"{s['hbm_bytes'] / 1e6:.1f} MB HBM, {s['l2_bytes'] / 1e6:.1f} MB L2"
           + (f"; FLOP floor {s['flop_floor_us'] / 1e3:.3f} ms" if s.get("flop_floor_us") else ""),
           "", head]
    out += [line(r) for r in table]
    if s["no_fit"]:
        out.append(f"\n{s['no_fit']} launch(es) marked 'no fit': their configs need more shared memory (as "
                   f"cost.smem_estimate bounds what Triton allocates) than this GPU allows per block: they would "
                   f"fail to launch; the step's time above leaves them out")
    share = lambda us: f"{us / 1e3:8.3f} ms {100 * us / (s['serial_us'] or 1):5.1f}%"  # noqa: E731
    out += ["", "(by bound and by pass: one-stream sums)", "by bound:  " + ";  ".join(f"{k} {share(v).strip()}" for k, v in s["by_bound"].items()),
            "by pass:   " + ";  ".join(f"{k} {share(v).strip()}" for k, v in s["by_pass"].items()),
            "", f"largest {min(top, len(table))} launches:"]
    out += [line(r) for r in sorted(table, key=lambda r: -r["us"] if math.isfinite(r["us"]) else 0.0)[:top]]
    out.append("\nbounds: launch = the ~1 us graph gap + fixed cost; latency = the K loop's chain of "
               "dependent steps over the waves; compute = tensor-core/FMA time; l2 / hbm = bytes at the "
               "fitted bandwidths; tail = serial split reductions (acai_fast/ops/cost.py)")
    return "\n".join(out)


def write_model_outputs(rows: list[dict], summary: dict, meta: dict, *, json_path=None, csv_path=None) -> None:
    """The modelled profile as JSON ({meta, summary, launches (with every term)}) and/or CSV (one
    row per launch, MODEL_COLUMNS)."""
    if json_path is not None:
        launches = [dict(t, terms=r["terms"]) for t, r in zip(model_table(rows), rows)]
        clean = json.loads(json.dumps(dict(meta=meta, summary=summary, launches=launches),
                                      default=str).replace("Infinity", "null"))
        Path(json_path).write_text(json.dumps(clean, indent=1) + "\n")
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MODEL_COLUMNS)
            writer.writeheader()
            writer.writerows(model_table(rows))


def measured_vs_model(events: list[dict], model_rows: list[dict], steps: int) -> list[dict]:
    """Per kernel, the measured GPU time of a profile (trace events of `steps` steps) beside the
    modelled time of one step: [{kernel, calls, measured_us, model_calls, model_us}] per step.
    Matched by name (a measured kernel whose name starts with the modelled kernel's name; best
    effort: PyTorch's fused ops show under their CUDA kernels' names and stay unmatched)."""
    measured = {r["name"]: r for r in top_kernels(events, n=10 ** 6)}
    model: dict[str, list] = {}
    for r in model_rows:
        model.setdefault(r["kernel"], []).append(r["time_us"])
    out, used = [], set()
    for kernel, times in model.items():
        hits = [name for name in measured if name.startswith(kernel) and name not in used]
        used.update(hits)
        calls = sum(measured[n]["calls"] for n in hits) / steps
        us = sum(measured[n]["total_us"] for n in hits) / steps
        out.append(dict(kernel=kernel, calls=calls, measured_us=us if hits else None, model_calls=len(times),
                        model_us=sum(times)))
    for name, r in measured.items():
        if name not in used:
            out.append(dict(kernel=name, calls=r["calls"] / steps, measured_us=r["total_us"] / steps,
                            model_calls=0, model_us=None))
    return sorted(out, key=lambda r: -max(r["measured_us"] or 0.0, r["model_us"] or 0.0))


def format_measured_vs_model(rows: list[dict], gpu_name: str) -> str:
    lines = [f"measured beside modelled ({gpu_name}), per step; the model excludes host and graph overheads",
             f"{'kernel':<48} {'calls':>6} {'measured us':>12} {'model calls':>11} {'model us':>9} {'model/meas':>10}"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 48 else r["kernel"][:45] + "..."
        meas = f"{r['measured_us']:.1f}" if r["measured_us"] is not None else "-"
        mod = f"{r['model_us']:.1f}" if r["model_us"] is not None else "-"
        ratio = f"{r['model_us'] / r['measured_us']:.2f}" if r["measured_us"] and r["model_us"] is not None else "-"
        lines.append(f"{name:<48} {r['calls']:>6.1f} {meas:>12} {r['model_calls']:>11} {mod:>9} {ratio:>10}")
    return "\n".join(lines)
