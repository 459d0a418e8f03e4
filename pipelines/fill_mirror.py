"""Fill a mirror of the evaluation sources, for clusters without internet access.

    python pipelines/fill_mirror.py --mirror s3://my-bucket/corpus-embed-mirror/
    python pipelines/fill_mirror.py --mirror /data/mirror --set 'eval.tasks=[SciFact, STSBenchmark]'
    python pipelines/fill_mirror.py --mirror s3://bucket/mirror/ --from /media/usb/mirror   # from another mirror

Per task of eval.tasks (all of them when unset) and the named fit corpora (wikitext-2 by default,
--corpus to choose): find its files at the source (the Hub at the revision mteb pins, GitHub at the
commit pinned here; or the mirror given by --from), download each once into the cache, check it
(GitHub files against their pinned SHA-256), copy it to the mirror at the path the evaluation
reads it from (hf/datasets/<repo>/<file>, senteval/..., ...), and record its source, revision and
SHA-256 in the mirror's MIRROR.json. Point eval.mirror (or CORPUS_EMBED_MIRROR) at it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.config.schema import PipelineConfig
from operators.evaluation.eval_data import is_own, own_task_files
from operators.evaluation.mteb_tasks import mteb_task_files
from operators.evaluation.scoring import selected_tasks
from operators.io import cache
from operators.io.sources import CORPUS_NAMES, SourceError, Sources, corpus_files, fill_mirror
from operators.run import cli

logger = logging.getLogger("corpus_embed.fill_mirror")


def files_of(cfg: PipelineConfig, source: Sources, corpora: list[str]) -> list:
    """(task, file) for every task and corpus, all found at the source before anything is copied."""
    files = []
    for task in selected_tasks(cfg):
        files += [(task, f) for f in (own_task_files(task) if is_own(task) else mteb_task_files(task, source))]
    for name in corpora:
        found = corpus_files(name)
        if found is None:
            raise SourceError(f"--corpus {name}: not a named corpus ({', '.join(CORPUS_NAMES)})")
        files += [(f"corpus {name}", f) for f in found]
    return files


def run(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    source = Sources(args.source, str(cache.CACHE_DIR), cfg.eval.storage)
    files = files_of(cfg, source, args.corpus)
    entries = fill_mirror(source, args.mirror, files, cfg.eval.storage, logger.info)
    return {"mirror": args.mirror, "files": len(files), "manifest_files": len(entries)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", required=True, help="the mirror to fill: a local folder or fsspec URI (s3://bucket/prefix/)")
    p.add_argument("--from", dest="source", default=None, help="read from this mirror instead of the upstream sources")
    p.add_argument("--corpus", action="append", default=None, help="a named fit corpus to mirror too (repeatable; default wikitext-2)")


def summary(result: dict) -> str:
    return f"done: {result['files']} files in {result['mirror']} ({result['manifest_files']} in its MIRROR.json)"


def main(argv: list[str] | None = None) -> int:
    def work(cfg, args):
        args.corpus = args.corpus if args.corpus is not None else ["wikitext-2"]
        return run(cfg, args)

    return cli.main(__doc__, argv, work, summary, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
