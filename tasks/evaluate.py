"""Prefect task: answer the held-out questions with one model and score the answers (vlm_core.evaluate).

The flow calls it once per model (the base and the fine-tuned one) on the same questions: the first
eval.max_samples samples of the held-out shards, in manifest order.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.storage import load_storage_credentials
from vlm_core.config import FinetuneConfig
from vlm_core.evaluate import evaluate
from vlm_core.infer import load_predictor, questions_from_shards


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{label}")
def evaluate_task(cfg: FinetuneConfig, model: str, label: str, base: str | None = None) -> dict:
    """{"label", "model", "metrics", "seconds", "rows"} of `model` (folder or URL; `base` for a LoRA adapter)."""
    load_storage_credentials(cfg)
    log = get_run_logger()
    questions = questions_from_shards(cfg.data.shards, cfg.eval.max_samples)
    predictor = load_predictor(model, base=base, data=cfg.data, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
                               attn_implementation=cfg.model.attn_implementation)
    log.info("%s model %s: answering %d held-out questions on %s", label, model, len(questions), predictor.device)

    def progress(done: int, total: int) -> None:
        log.info("%s: %d/%d questions answered", label, done, total)

    result = evaluate(predictor, questions, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress)
    overall = result.metrics["overall"]
    log.info("%s: exact match %.3f, F1 %.3f, ANLS %.3f on %d questions (%.1f s, %.2f samples/s)", label,
             overall["exact_match"], overall["f1"], overall["anls"], overall["count"], result.seconds,
             result.samples_per_second)
    return {"label": label, "model": model, "metrics": result.metrics, "seconds": result.seconds, "rows": result.rows}
