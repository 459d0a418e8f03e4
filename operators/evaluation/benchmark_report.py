"""The benchmark's reports: per phase the rates, padding efficiency and peak memory of a run
(phase_result), the ratios against the baseline and the no-op ceiling (add_ratios), the scale
points' costs per shard and row (scale_ratios), the engines against sentence-transformers'
backends (engine_ratios), and each as a table (format_report, format_scale_report,
format_engines_report, summarize). Measuring is throughput.py's."""

from __future__ import annotations

import json
from pathlib import Path

from operators.evaluation.throughput import peak_tflops

# a pipeline variant -> the sentence-transformers backend it is measured against
ST_BACKEND = {"torch": "torch", "onnx": "onnx", "onnx:int8": "onnx:int8", "openvino": "openvino", "openvino:int8": "openvino"}


def model_flops_per_token(resolved) -> float | None:
    """Forward FLOPs per token: 2 x the non-embedding parameters (attention scores left out: small
    at sentence lengths)."""
    if not resolved.layer_parameters:
        return None
    return 2.0 * resolved.layer_parameters


def phase_result(record, peak_rss_bytes: int) -> dict:
    """A pipeline phase's figures from its run record."""
    c, secs = record.counts, record.seconds
    return {
        "rows": c.rows_written, "seconds": secs, "rows_per_s": c.rows_written / secs, "tokens": c.tokens,
        "tokens_per_s": c.tokens / secs, "padding_efficiency": c.padding_efficiency, "peak_rss_bytes": peak_rss_bytes,
        "steady_rows_per_s": record.steady_rows_per_s,
    }


def marginal_rows_per_s(big: dict, small: dict) -> float | None:
    """The rows a phase adds over the same phase on fewer rows, per second it adds: the fixed costs
    of a run (preparation, actor start, model load) cancel out. None when the larger run was not slower."""
    rows, secs = big["rows"] - small["rows"], big["seconds"] - small["seconds"]
    return rows / secs if rows > 0 and secs > 0 else None


def add_ratios(report: dict, resolved) -> dict:
    """The headline figures and ratios, from the phases a report holds."""
    p = report["pipeline"]
    report["pipeline_rows_per_s"] = p["rows_per_s"]
    report["pipeline_tokens_per_s"] = p["tokens_per_s"]
    report["padding_efficiency"] = p["padding_efficiency"]
    report["peak_rss_bytes"] = p["peak_rss_bytes"]
    report["baseline_rows_per_s"] = report.get("baseline", {}).get("rows_per_s")
    report["noop_rows_per_s"] = report.get("noop", {}).get("rows_per_s")
    if report["baseline_rows_per_s"]:
        report["pipeline_vs_baseline"] = p["rows_per_s"] / report["baseline_rows_per_s"]
    if report["noop_rows_per_s"]:
        report["noop_vs_pipeline"] = report["noop_rows_per_s"] / p["rows_per_s"]
        n_steady, p_steady = report["noop"].get("steady_rows_per_s"), p.get("steady_rows_per_s")
        report["noop_steady_rows_per_s"] = n_steady
        if n_steady and p_steady:
            report["noop_vs_pipeline_steady"] = n_steady / p_steady
    if "pipeline_small" in report:
        report["peak_rss_ratio_vs_small"] = p["peak_rss_bytes"] / report["pipeline_small"]["peak_rss_bytes"]
        report["pipeline_marginal_rows_per_s"] = marginal_rows_per_s(p, report["pipeline_small"])
    if "noop_small" in report:
        report["noop_marginal_rows_per_s"] = marginal_rows_per_s(report["noop"], report["noop_small"])
        if report["noop_marginal_rows_per_s"] and report["pipeline_marginal_rows_per_s"]:
            report["noop_vs_pipeline_marginal"] = report["noop_marginal_rows_per_s"] / report["pipeline_marginal_rows_per_s"]
    per_token = model_flops_per_token(resolved)
    if per_token:
        report["model_parameters_estimate"] = resolved.parameters
        report["model_layer_parameters_estimate"] = resolved.layer_parameters
        report["model_tflops"] = per_token * p["tokens_per_s"] / 1e12
        peak = peak_tflops(report["device"])
        report["model_flops_utilisation"] = report["model_tflops"] / peak if peak else None
    return report


def write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def format_report(r: dict) -> str:
    gib = 1 / 2**30
    lines = [f"device: {r['device']}; model {r['model']} ({r['dtype']}, {r['pooling']}); {r['docs']} docs"]
    for name in ("pipeline", "baseline", "noop", "pipeline_small", "noop_small", "warmup"):
        x = r.get(name)
        if not x:
            continue
        if "error" in x:
            lines.append(f"  {name:15s} unavailable: {x['error']}")
            continue
        steady = f"  steady {x['steady_rows_per_s']:9.1f} rows/s" if x.get("steady_rows_per_s") else ""
        lines.append(
            f"  {name:15s} {x['rows']:>8d} rows in {x['seconds']:7.1f}s  {x['rows_per_s']:9.1f} rows/s  "
            f"{x['tokens_per_s']:10.0f} tokens/s  peak RSS {x['peak_rss_bytes'] * gib:5.2f} GiB{steady}"
        )
    lines.append(f"  padding efficiency (real / padded tokens): {r['padding_efficiency']:.3f}")
    if "pipeline_vs_baseline" in r:
        lines.append(f"  pipeline / sentence-transformers encode: {r['pipeline_vs_baseline']:.2f}x")
    if "noop_vs_pipeline" in r:
        lines.append(f"  no-op data path / pipeline: {r['noop_vs_pipeline']:.1f}x end to end"
                     + (f", {r['noop_vs_pipeline_steady']:.1f}x in steady state" if r.get("noop_vs_pipeline_steady") else ""))
    if r.get("noop_vs_pipeline_marginal"):
        lines.append(f"  marginal rates (rows over the {r['memory_scale']}x smaller run): pipeline {r['pipeline_marginal_rows_per_s']:.1f} rows/s, "
                     f"no-op {r['noop_marginal_rows_per_s']:.0f} rows/s: {r['noop_vs_pipeline_marginal']:.1f}x")
    if "peak_rss_ratio_vs_small" in r:
        lines.append(f"  peak RSS at {r['memory_scale']}x the documents: {r['peak_rss_ratio_vs_small']:.2f}x")
    if "model_tflops" in r:
        util = r.get("model_flops_utilisation")
        lines.append(f"  model FLOP rate: {r['model_tflops'] * 1e3:.1f} GFLOP/s" + (f", {util:.1%} of the GPU's peak" if util else ""))
    return "\n".join(lines)


def scale_ratios(report: dict) -> dict:
    """Per point: milliseconds per shard and microseconds per row; then for the no-op and the model
    runs of one row count, the most shards against the fewest (driver peak RSS, wall time per row;
    the targets: <= 1.3x and <= 1.5x), and for one giant shard against one of a tenth of its rows
    (peak RSS of every process: the target <= 1.3x; and PSS, which counts the object store's
    shared pages once)."""
    points = report["points"]
    for p in points + ([report["plan"]] if report.get("plan") else []):
        p["ms_per_shard"] = 1e3 * p["seconds"] / max(p["shards"], 1)
        p["us_per_row"] = 1e6 * p["seconds"] / max(p["rows_in"], 1)
    for kind, noop in (("noop", True), ("model", False)):
        same = [p for p in points if p["noop"] == noop and not p.get("setup") and p["shards"] > 1]
        rows = max((p["rows_in"] for p in same), default=0)
        same = [p for p in same if p["rows_in"] == rows]
        if len(same) >= 2:
            lo, hi = min(same, key=lambda p: p["shards"]), max(same, key=lambda p: p["shards"])
            report[f"{kind}_shards"] = [lo["shards"], hi["shards"]]
            report[f"{kind}_driver_rss_ratio"] = hi["driver_peak_rss_bytes"] / lo["driver_peak_rss_bytes"]
            report[f"{kind}_time_per_row_ratio"] = hi["us_per_row"] / lo["us_per_row"]
    giants = sorted((p for p in points if p["shards"] == 1 and p["noop"]), key=lambda p: p["rows_in"])
    if len(giants) >= 2:  # the two largest: --giant-rows and a tenth of it
        report["giant_rows"] = [giants[-2]["rows_in"], giants[-1]["rows_in"]]
        report["giant_peak_rss_ratio"] = giants[-1]["peak_rss_bytes"] / giants[-2]["peak_rss_bytes"]
        if giants[-1].get("peak_pss_bytes") and giants[-2].get("peak_pss_bytes"):
            report["giant_peak_pss_ratio"] = giants[-1]["peak_pss_bytes"] / giants[-2]["peak_pss_bytes"]
    return report


def format_scale_report(r: dict) -> str:
    mib = 1 / 2**20
    lines = [f"scale: {r['cpus']} CPUs, model {r['model']}",
             "  run      shards      rows    wall s  ms/shard  us/row   plan s  driver peak MiB  all procs MiB (RSS, PSS)"]
    for p in r["points"] + ([dict(r["plan"], label="plan")] if r.get("plan") else []):
        label = p.get("label") or ("noop" if p["noop"] else "model")
        lines.append(
            f"  {label:6s} {p['shards']:>8d} {p['rows_in']:>9d} {p['seconds']:9.1f} {p['ms_per_shard']:9.2f} {p['us_per_row']:7.1f}"
            f" {p['plan_s']:8.1f} {p['driver_peak_rss_bytes'] * mib:16.0f} {p['peak_rss_bytes'] * mib:14.0f} {p.get('peak_pss_bytes', 0) * mib:6.0f}"
            + ("  (all up to date)" if p.get("again") and not p.get("shards_embedded") else f"  ({p['attempts']} attempts, {p.get('nodes_killed', 0)} nodes killed)" if p.get("attempts") else "")
        )
    for kind in ("noop", "model"):
        if f"{kind}_shards" in r:
            lo, hi = r[f"{kind}_shards"]
            lines.append(f"  {kind}: {hi} shards vs {lo}: driver peak RSS {r[kind + '_driver_rss_ratio']:.2f}x, "
                         f"wall time per row {r[kind + '_time_per_row_ratio']:.2f}x")
    if "giant_rows" in r:
        lines.append(f"  one shard of {r['giant_rows'][1]} rows vs one of {r['giant_rows'][0]}: peak RSS {r['giant_peak_rss_ratio']:.2f}x"
                     + (f", peak PSS {r['giant_peak_pss_ratio']:.2f}x (shared pages counted once)" if "giant_peak_pss_ratio" in r else ""))
    return "\n".join(lines)


def engine_ratios(report: dict) -> dict:
    """Per variant: against the pipeline on torch, against sentence-transformers on the matching
    backend and on its fastest one."""
    engines, st = report["engines"], report.get("sentence_transformers", {}).get("backends", {})
    torch_rate = engines.get("torch", {}).get("rows_per_s")
    fastest = max(st.values(), key=lambda b: b["rows_per_s"], default=None)
    for v, r in engines.items():
        if torch_rate:
            r["vs_pipeline_torch"] = r["rows_per_s"] / torch_rate
        same = st.get(ST_BACKEND[v])
        if same:
            r["vs_st_same_backend"] = r["rows_per_s"] / same["rows_per_s"]
        if fastest:
            r["vs_st_fastest"] = r["rows_per_s"] / fastest["rows_per_s"]
    if fastest:
        report["st_fastest_backend"] = next(k for k, b in st.items() if b is fastest)
    return report


def format_engines_report(r: dict) -> str:
    st = r.get("sentence_transformers", {}).get("backends", {})
    lines = [f"engines on {r['docs']} docs, {r['model']}, {r['cpus']} CPUs",
             "| pipeline | rows/s | steady rows/s | vs pipeline torch | vs ST same backend | vs ST fastest | warm-up + export s |",
             "|---|---|---|---|---|---|---|"]

    def x(v):
        return f"{v:.2f}x" if v else "-"

    for v, e in r["engines"].items():
        lines.append(f"| {v} | {e['rows_per_s']:.1f} | {e.get('steady_rows_per_s') or 0:.1f} | {x(e.get('vs_pipeline_torch'))} | "
                     f"{x(e.get('vs_st_same_backend'))} ({ST_BACKEND[v]}) | {x(e.get('vs_st_fastest'))} | {e['warmup_s']:.1f} |")
    for b, s in st.items():
        lines.append(f"sentence-transformers {b}: {s['rows_per_s']:.1f} rows/s")
    if "error" in r.get("sentence_transformers", {}):
        lines.append(r["sentence_transformers"]["error"])
    return "\n".join(lines)


def summarize(report: dict) -> str:
    if "engines" in report:
        return format_engines_report(report)
    return format_scale_report(report) if "points" in report else format_report(report) if "docs" in report else json.dumps(report)
