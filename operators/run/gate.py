"""The quality gate: score the run's configuration on gate.tasks and refuse to publish below a floor.

`check_gate_data` runs before any work (the tasks' names and data must check out before hours of
embedding: a missing file or an unreachable source fails the run with exit 2); `run_gate` scores with the evaluation stage and the embedding function it is handed,
its vectors cached per config fingerprint under CORPUS_EMBED_CACHE (cache.CACHE_DIR)/gate, so a
nightly run on an unchanged config scores from the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from operators.config.schema import PipelineConfig
from operators.evaluation.scoring import EmbedFn, evaluate, load_tasks, selected_tasks, task_score
from operators.io import cache


class GateError(RuntimeError):
    """The quality gate scored the configuration below a floor; nothing was published."""


@dataclass
class GateResult:
    scores: dict[str, float]
    floors: dict[str, float]
    passed: bool
    failed: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def require_passed(self) -> None:
        if not self.passed:
            raise GateError(
                "quality gate failed, nothing published: "
                + ", ".join(f"{t} {self.scores[t]:.2f} < {self.floors[t]:.2f}" for t in self.failed)
            )


def gate_eval_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the quality gate scores: eval.tasks replaced by gate.tasks."""
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"tasks": cfg.gate.tasks})})


def check_gate_data(cfg: PipelineConfig) -> None:
    """Load the gate's tasks now: a missing or malformed file fails before any work (EvalDataError)."""
    if cfg.gate.tasks:
        gate_cfg = gate_eval_config(cfg)
        load_tasks(gate_cfg, selected_tasks(gate_cfg))


def gate_cache_root() -> Path:
    return cache.CACHE_DIR / "gate"


def run_gate(cfg: PipelineConfig, prepared, embed_fn: EmbedFn, query_side=None) -> GateResult | None:
    """Score `cfg` on gate.tasks against gate.min_scores (any task the evaluation scores: STS,
    retrieval nDCG@10, ...); None when no gate is configured. `query_side`: see evaluation.evaluate."""
    if not cfg.gate.tasks:
        return None
    result = evaluate(gate_eval_config(cfg), prepared, embed_fn, str(gate_cache_root()), query_side=query_side)
    scores = {t: task_score(result, t) for t in cfg.gate.tasks}
    failed = sorted(t for t, s in scores.items() if t in cfg.gate.min_scores and s < cfg.gate.min_scores[t])
    return GateResult(scores, dict(cfg.gate.min_scores), not failed, failed)
