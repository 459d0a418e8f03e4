"""A sweep's reports: results.json, results.md (every variant ranked), results.png (the best bars
and the base), heatmap.png (the first two axes), and best/config.yaml (the winner as a config the
corpus pipeline runs as is, its whitening artifact beside it). No secret reaches any of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from operators.config.secrets import redact, redact_text
from operators.evaluation.scoring import rows_for
from operators.evaluation.sweep import Sweep, Variant


def sweep_markdown(result: dict) -> str:
    runs = result["variants"]
    flat = [rows_for(r) for r in runs]
    cols = list(dict.fromkeys(k for f in flat for k in f))
    lines = [f"Sweep {result['sweep']}: {len(runs)} variants in {len(result['passes'])} forward pass(es), ranked by {result['rank_by']}.", "",
             "| # | variant | dim | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for i, (r, f) in enumerate(zip(runs, flat), start=1):
        cells = ["" if c not in f else f"{f[c]:.2f}" if np.isfinite(f[c]) else "n/a" for c in cols]
        lines.append(f"| {i} | {r['name']} | {r['dimension']} | " + " | ".join(cells) + " |")
    lines += ["", "STS: Spearman x 100 of cosine vs gold; clustering: V-measure x 100; classification: accuracy x 100.",
              "Labels say what each variant changes from the base config ('base': nothing). n/a: every vector alike, no correlation."]
    return "\n".join(lines) + "\n"


def write_sweep_reports(sweep: Sweep, result: dict, output: str) -> None:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "results.md").write_text(sweep_markdown(result))
    sweep_chart(result, out / "results.png")
    if len(sweep.axes) >= 2:
        sweep_heatmap(result, sweep.axes[:2], out / "heatmap.png")
    best = result["variants"][0]
    variant = next(v for v in sweep.variants if redact_text(v.label) == best["name"])
    write_best(variant, out / "best")


CHART_BARS = 30  # bars in results.png: the best ones and the base; every variant is in results.md


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_chart(result: dict, path: Path) -> None:
    """Horizontal bars, best on top, each labelled by what it changes from the base and its value
    written on it; the base's bar in red, shown even when it ranks below the best CHART_BARS."""
    plt = _pyplot()
    ranked = result["variants"]
    runs = ranked[:CHART_BARS]
    base = next((r for r in ranked if r["name"] == "base"), None)
    if base is not None and base not in runs:
        runs = runs + [base]
    values = [r["rank_score"] if np.isfinite(r["rank_score"]) else 0.0 for r in runs]
    labels = [f"#{ranked.index(r) + 1} {r['name']}" for r in runs]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.3 * len(runs) + 1.2)))
    colors = ["#d62728" if r["name"] == "base" else "#1f77b4" for r in runs]
    y = np.arange(len(runs))[::-1]
    ax.barh(y, values, color=colors)
    for yi, v, r in zip(y, values, runs):
        ax.text(v + 0.2, yi, f"{v:.2f}" if np.isfinite(r["rank_score"]) else "n/a", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    shown = [v for v in values if v > 0]
    ax.set_xlim(max(0.0, min(shown) - 3) if shown else 0.0, (max(shown) if shown else 1.0) + 3)
    ax.set_xlabel(f"{result['rank_by']} (x 100)")
    more = f"; the best {CHART_BARS} shown, all in results.md" if len(ranked) > CHART_BARS else ""
    ax.set_title(f"sweep {result['sweep']}: {len(ranked)} variants, {len(result['passes'])} forward pass(es){more}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_heatmap(result: dict, axes: tuple[str, str], path: Path) -> None:
    """The first two axes as rows and columns; each cell the best score over the other axes'
    values, written in it."""
    plt = _pyplot()
    runs = [r for r in result["variants"] if axes[0] in r["overrides"] and axes[1] in r["overrides"]]
    if not runs:
        return
    rows = list(dict.fromkeys(json.dumps(r["overrides"][axes[0]]) for r in runs))
    cols = list(dict.fromkeys(json.dumps(r["overrides"][axes[1]]) for r in runs))
    shown = lambda v: v.strip('"')  # noqa: E731  (a string value without its JSON quotes)
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in runs:
        i, j = rows.index(json.dumps(r["overrides"][axes[0]])), cols.index(json.dumps(r["overrides"][axes[1]]))
        if np.isfinite(r["rank_score"]):
            grid[i, j] = np.nanmax([grid[i, j], r["rank_score"]])
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 0.6 * len(rows) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if np.isnan(grid[i, j]) or grid[i, j] >= np.nanmean(grid) else "white")
    ax.set_xticks(range(len(cols)), [shown(c) for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [shown(r) for r in rows], fontsize=8)
    ax.set_xlabel(axes[1].rsplit(".", 1)[-1])
    ax.set_ylabel(axes[0].rsplit(".", 1)[-1])
    rest = " (best over the other axes)" if len(runs) > len(rows) * len(cols) else ""
    ax.set_title(f"{result['rank_by']} by {axes[0].rsplit('.', 1)[-1]} x {axes[1].rsplit('.', 1)[-1]}{rest}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best(variant: Variant, folder: Path) -> None:
    """The winning variant as a config the corpus pipeline runs as is, its whitening artifact
    copied beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tree = redact(variant.cfg.model_dump(mode="json"))  # credentials come from the environment, never from a file
    artifact = variant.cfg.whitening.artifact
    if artifact and Path(artifact).exists():
        dest = folder / "whitening.safetensors"
        shutil.copyfile(artifact, dest)
        tree["whitening"]["artifact"] = str(dest.resolve())
    # the label and path as JSON strings: one comment line each, whatever they hold (a newline in a label injects nothing)
    header = (f"# the best variant of a sweep: {json.dumps(redact_text(variant.label))}\n"
              f"# run it: python pipelines/embed_corpus.py --config {json.dumps(str(folder / 'config.yaml'))}\n")
    (folder / "config.yaml").write_text(header + yaml.safe_dump(tree, sort_keys=False))
