"""Rebuild the bundled sample corpus from WikiText-2 (raw, test split).

    python configs/sample_corpus/make_sample.py PATH/TO/wikitext-2/wiki.test.raw

Writes four shards of ~750 sentences: two JSONL, one gzipped JSONL, one plain text file.
"""

import gzip
import json
import re
import sys
from pathlib import Path

DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" 's", "'s"),
         (" ; ", "; "), (" : ", ": "), ("( ", "("), (" )", ")"), (" n't", "n't")]


def sentences(raw: str):
    for para in raw.splitlines():
        para = para.strip()
        if not para or para.startswith("="):  # blank lines and " = Heading = " lines
            continue
        for a, b in DETOK:
            para = para.replace(a, b)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            if 30 <= len(s) <= 400:
                yield s.strip()


def main(src: str, n: int = 3000, shards: int = 4) -> None:
    out = Path(__file__).parent
    sents = list(sentences(Path(src).read_text(encoding="utf-8")))[:n]
    per = -(-len(sents) // shards)
    for k in range(shards):
        chunk = sents[k * per : (k + 1) * per]
        if k == shards - 1:
            (out / f"part-{k:03d}.txt").write_text("".join(s + "\n" for s in chunk))
            continue
        lines = "".join(json.dumps({"id": f"wiki-{k:03d}-{i:05d}", "text": s}) + "\n" for i, s in enumerate(chunk))
        if k == shards - 2:
            with gzip.GzipFile(out / f"part-{k:03d}.jsonl.gz", "wb", mtime=0) as f:
                f.write(lines.encode())
        else:
            (out / f"part-{k:03d}.jsonl").write_text(lines)
    print(f"{len(sents)} sentences in {shards} shards under {out}")


if __name__ == "__main__":
    main(sys.argv[1])
