"""sentence-transformers' `encode` on each of its CPU backends, in one process: the baselines of
`pipelines/benchmark.py --engines`.

Standalone (the standard library and sentence-transformers only): its onnx and openvino backends
need optimum-onnx and optimum-intel, which pin an older transformers than the pipeline's, so it
runs in an environment of its own (`make bench-env`) and reports JSON on its last line:

    .venv-st/bin/python pipelines/st_baseline.py --model FOLDER --texts texts.jsonl \\
        --backends torch,onnx,onnx:int8,openvino --max-length 256 --workdir /tmp/st

Backends as a user sets them up from sentence-transformers' efficiency guide: `backend="onnx"`
on optimum's export, `export_dynamic_quantized_onnx_model(..., "avx2")` for onnx:int8, and
`backend="openvino"` on optimum-intel's export. The exports run on a copy of the model folder
under --workdir, before any timing; each backend is timed over all texts after a 64-text warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def load(backend: str, folder: str):
    from sentence_transformers import SentenceTransformer

    if backend == "torch":
        return SentenceTransformer(folder, device="cpu")
    if backend in ("onnx", "onnx:int8"):
        if not os.path.exists(f"{folder}/onnx/model.onnx"):
            from optimum.exporters.onnx import main_export

            main_export(folder, output=f"{folder}/onnx-export", task="feature-extraction", library_name="transformers")
            os.makedirs(f"{folder}/onnx", exist_ok=True)
            shutil.copy(f"{folder}/onnx-export/model.onnx", f"{folder}/onnx/model.onnx")
        model = SentenceTransformer(folder, backend="onnx", device="cpu", model_kwargs={"file_name": "onnx/model.onnx"})
        if backend == "onnx":
            return model
        if not os.path.exists(f"{folder}/onnx/model_quint8_avx2.onnx"):
            from sentence_transformers import export_dynamic_quantized_onnx_model

            export_dynamic_quantized_onnx_model(model, "avx2", folder)
        return SentenceTransformer(folder, backend="onnx", device="cpu", model_kwargs={"file_name": "onnx/model_quint8_avx2.onnx"})
    if backend == "openvino":
        if not os.path.exists(f"{folder}/openvino/openvino_model.xml"):
            from optimum.intel import OVModelForFeatureExtraction

            OVModelForFeatureExtraction.from_pretrained(folder, export=True).save_pretrained(f"{folder}/openvino")
        return SentenceTransformer(folder, backend="openvino", device="cpu", model_kwargs={"file_name": "openvino/openvino_model.xml"})
    raise SystemExit(f"--backends: unknown backend {backend!r} (torch, onnx, onnx:int8, openvino)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a sentence-transformers model folder")
    p.add_argument("--texts", required=True, help="JSONL with a 'text' field per line")
    p.add_argument("--backends", default="torch,onnx,onnx:int8,openvino")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", required=True, help="where the model copy and its exports go")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = os.path.join(args.workdir, "st-model")
    if not os.path.exists(folder):
        shutil.copytree(args.model, folder)
    with open(args.texts) as f:
        texts = [json.loads(line)["text"] for line in f]
    import sentence_transformers
    import transformers

    report: dict = {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__, "backends": {}}
    for backend in args.backends.split(","):
        model = load(backend, folder)
        if args.max_length:
            model.max_seq_length = args.max_length
        model.encode(texts[:64], batch_size=args.batch_size)
        started = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size)
        secs = time.perf_counter() - started
        report["backends"][backend] = {"rows": len(texts), "seconds": secs, "rows_per_s": len(texts) / secs}
        print(f"sentence-transformers {backend}: {len(texts) / secs:.1f} rows/s", file=sys.stderr, flush=True)
        del model
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
