"""CUDA paths, for a machine with a GPU: `pytest -m gpu tests/operators/test_gpu.py`.
Skipped without one (CI has none). Half-precision forwards on the GPU against float32 on the CPU,
each text alone: the tolerances the README states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.embed import Embedder
from tests.conftest import sample_sentences
from tests.operators.test_throughput_path import spec_for, texts_of_mixed_length

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4}  # float32: TF32 matmuls may be on


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_buckets_equal_cpu_float32(minilm_path, dtype):
    texts = texts_of_mixed_length(200)
    gpu = Embedder(spec_for(minilm_path, dtype=dtype, model_kw={"device": "cuda"}, pooling="mean", normalize=True))
    assert gpu.device.type == "cuda" and gpu.batch_size == 256
    cpu = Embedder(spec_for(minilm_path, batch_size=1, model_kw={"device": "cpu"}, pooling="mean", normalize=True))
    got = gpu.embed_texts(texts)[0]
    want = np.stack([cpu.embed_texts([t])[0][0] for t in texts])
    assert np.abs(got - want).max() <= TOLERANCE[dtype]


def test_postprocessing_runs_on_the_device(minilm_path):
    e = Embedder(spec_for(minilm_path, dtype="float16", model_kw={"device": "cuda"}, pooling="mean", normalize=True))
    assert next(e.model.parameters()).device.type == "cuda"
    assert e.attn_implementation in ("sdpa", "flash_attention_2", "eager")
    vecs = e.embed_texts(sample_sentences(8))[0]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-3)
