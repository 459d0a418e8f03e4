"""What a sweep costs, side by side in one process on one Ray cluster: one variant alone, every
variant of the sweep in one pass, and (the baseline) every variant as its own evaluation run,
which is what the evaluation stage did before sweeps; then the post-processing fits: a sweep of
whitening k in {all, 256, 128} and ABTT D in {1, 2, 3} against a sweep of one whitening.

    python pipelines/benchmark_sweep.py                       # MiniLM, 12 layer/pooling variants, STS-B
    python pipelines/benchmark_sweep.py --sweep FILE --no-separate

Every run starts from an empty cache (its own folder under --output). Prints a table and writes
OUTPUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.evaluation.scoring import evaluate
from operators.evaluation.sweep import Sweep, load_sweep, run_sweep
from operators.evaluation.sweep_reports import write_sweep_reports
from operators.execution.stages import init_ray, ray_embed_fn
from operators.model.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def fits_for(ks: list[int]) -> list:
    """Whitening to all dims and to each k, and ABTT D = 1, 2, 3: six variants from one fit."""
    return [["whiten"], *[[{"whiten": k}] for k in ks], [{"remove_top_pcs": 1}], [{"remove_top_pcs": 2}], [{"remove_top_pcs": 3}]]


def timed_sweep(sweep: Sweep, out: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    result = run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), ray_embed_fn, str(out))
    write_sweep_reports(sweep, result, str(out))
    return time.perf_counter() - t, result


def fit_sweep(path: str, fits: list, output: Path, corpus: str, rows: int) -> Sweep:
    """The sweep file's base and settings with `fits` as its variants, fitted on `corpus`."""
    import yaml

    source = Path(path).resolve()
    spec = yaml.safe_load(source.read_text())
    tmp = output / f"fits-{len(fits)}.yaml"
    tmp.write_text(json.dumps({
        "base": str((source.parent / spec["base"]).resolve()),
        "set": {**(spec.get("set") or {}), "whitening.corpus": corpus, "whitening.max_sentences": rows},
        "variants": [{"postprocess": f} for f in fits],
    }))
    return load_sweep(tmp, output=str(output / f"fits-{len(fits)}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default=str(ROOT / "configs" / "sweeps" / "minilm-layers-pooling.yaml"))
    p.add_argument("--output", default="out/benchmark-sweep")
    p.add_argument("--no-separate", action="store_true", help="skip the baseline of one evaluation run per variant")
    p.add_argument("--fit-corpus", default="wikitext-2", help="a named corpus (through eval.mirror / CORPUS_EMBED_MIRROR) or a path")
    p.add_argument("--fit-rows", type=int, default=5000)
    p.add_argument("--whiten-ks", default="256,128", help="the whitening dimensions of the fits' sweep (below the model's)")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(args.sweep, output=str(out / "all"))
    init_ray(sweep.base)  # the cluster's start is no one's cost
    rows = []

    one = Sweep(sweep.name, sweep.base, sweep.variants[:1], sweep.rank_by, sweep.fits_dir)
    t_one, r_one = timed_sweep(one, out / "one")
    rows.append(("one variant (the base), one pass", 1, t_one, r_one["passes"]))
    t_all, r_all = timed_sweep(sweep, out / "all")
    rows.append((f"all {len(sweep.variants)} variants, shared passes", len(sweep.variants), t_all, r_all["passes"]))
    report = {"sweep": args.sweep, "variants": len(sweep.variants), "one_s": t_one, "sweep_s": t_all,
              "sweep_vs_one": t_all / t_one, "passes": r_all["passes"]}
    if not args.no_separate:
        shutil.rmtree(out / "separate", ignore_errors=True)
        t = time.perf_counter()
        for v in sweep.variants:
            prepared = prepare(v.cfg)
            evaluate(v.cfg, prepared, ray_embed_fn(v.cfg, prepared), str(out / "separate" / "cache"), v.label)
        t_sep = time.perf_counter() - t
        rows.append((f"all {len(sweep.variants)} variants, one evaluation run each (before sweeps)", len(sweep.variants), t_sep, None))
        report.update(separate_s=t_sep, separate_vs_sweep=t_sep / t_all)

    fits = fits_for([int(k) for k in args.whiten_ks.split(",")])
    t_f1, r_f1 = timed_sweep(fit_sweep(args.sweep, fits[:1], out, args.fit_corpus, args.fit_rows), out / "fits-1")
    t_f6, r_f6 = timed_sweep(fit_sweep(args.sweep, fits, out, args.fit_corpus, args.fit_rows), out / f"fits-{len(fits)}")
    rows.append(("whiten (one fit)", 1, t_f1, r_f1["passes"]))
    rows.append((f"whiten k=all/{args.whiten_ks.replace(',', '/')} + ABTT D=1/2/3 ({len(fits)} from one fit)", len(fits), t_f6, r_f6["passes"]))
    report.update(fit_one_s=t_f1, fit_six_s=t_f6, fit_six_vs_one=t_f6 / t_f1,
                  fit_texts_embedded={"one": sum(p["fit_texts"] for p in r_f1["passes"]), "six": sum(p["fit_texts"] for p in r_f6["passes"])})

    print(f"\n{'run':<72} {'variants':>8} {'seconds':>9} {'passes':>6} {'texts':>7} {'fit texts':>9}")
    for name, n, t, passes in rows:
        texts = sum(p["texts"] for p in passes) if passes else ""
        fit = sum(p["fit_texts"] for p in passes) if passes else ""
        print(f"{name:<72} {n:>8} {t:>9.1f} {len(passes) if passes else n:>6} {texts:>7} {fit:>9}")
    print(f"\nsweep of {len(sweep.variants)} / one variant: {report['sweep_vs_one']:.2f}x"
          + (f"; one run per variant / sweep: {report['separate_vs_sweep']:.1f}x" if "separate_s" in report else ""))
    print(f"six fitted variants / one: {report['fit_six_vs_one']:.2f}x; fit texts embedded: "
          f"{report['fit_texts_embedded']['six']} for six, {report['fit_texts_embedded']['one']} for one")
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
