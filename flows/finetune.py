"""The end-to-end pipeline: prepare → train → (checkpoints to storage) → merge → evaluate → report.

    vlmft run --config configs/demo.yaml          # what `make run` does, on the bundled demo
    python -m vlmft run --config configs/demo.yaml

A failed run retried from the Prefect UI does not redo finished work: shards are skipped by their
fingerprint, training resumes from its newest complete checkpoint (or is skipped when the run folder
already holds a finished run of this configuration), uploads skip unchanged files and a merge of the
same inputs is a no-op.

With eval.enabled and a held-out split, the base model and the fine-tuned one then answer the same
held-out questions (greedy generation, vlm_core.infer) and both are scored per data set: a table
artifact compares them and a markdown artifact shows eval.examples questions with both answers.

`retrain` is the scheduled variant: it trains only when the run identity (every setting that changes
what the run learns, the data and the base model; vlm_core.identity) differs from the last successful
retrain's (kept in a Prefect Variable), and otherwise ends quickly, saying so.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.variables import Variable

from flows.merge import merge
from flows.prepare_data import prepare_data
from tasks.evaluate import evaluate_task
from tasks.prepare import plan_task
from tasks.storage import load_storage_credentials
from tasks.train import train_task
from vlm_core.checkpoints import run_url
from vlm_core.config import FinetuneConfig
from vlm_core.evaluate import comparison_rows, examples_markdown
from vlm_core.identity import compute_identity, differences, read_identity, with_run_dir
from vlm_core.infer import questions_from_shards
from vlm_core.model.load import resolve_model_path
from vlm_core.preflight import preflight
from vlm_core.report import loss_curve_png, loss_summary, read_curves

# The flow parameter's default. The Prefect UI's "Quick run" opens the run form when a parameter has none;
# with one it starts a run with the deployment's own parameters (deployments/finetune.yaml).
BUILT_IN_CONFIG = FinetuneConfig()


def report(cfg: FinetuneConfig, data: dict, trained: dict, merged: dict | None) -> None:
    out = Path(cfg.train.output_dir)
    curves = read_curves(out / "metrics.jsonl")
    png = loss_curve_png(curves, title=f"loss curve of {cfg.name}")
    (out / "loss_curve.png").write_bytes(png)
    create_markdown_artifact(
        f"# Loss curve of `{cfg.name}`\n\n![loss and eval loss](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
        f"Saved as `{out / 'loss_curve.png'}`.",
        key="loss-curve", description="Training loss (blue) and eval loss (red) per step.",
    )
    metrics = {"train samples": data["train_samples"], "eval samples": data["eval_samples"],
               "rejected samples": data["rejected"], "steps": trained.get("global_step"),
               "ranks": trained.get("world_size"), **loss_summary(trained)}
    create_table_artifact([{"metric": k, "value": v} for k, v in metrics.items()], key="final-metrics",
                          description="Data, training and evaluation summary of the run.")
    links = [f"- shards: `{cfg.data.shards}` (manifest.json, rejected.jsonl)", f"- run folder: `{out}`"]
    if cfg.storage.url:
        links.append(f"- checkpoints in storage: `{run_url(cfg.storage.url, trained['run_id'])}/checkpoint-N`")
    if merged:
        links.append(f"- merged model: `{merged.get('uploaded_to') or merged['out']}`")
    create_markdown_artifact("# Outputs\n\n" + "\n".join(links) + "\n", key="run-outputs",
                             description="Where this run's outputs are.")


def evaluate_models(cfg: FinetuneConfig, merged: dict) -> dict:
    """The base and the fine-tuned model answer the same held-out questions; both scored, side by side."""
    base = evaluate_task(cfg, str(resolve_model_path(cfg.model)), "base")  # the folder training started from
    tuned = evaluate_task(cfg, merged["out"], "tuned")
    slug = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    create_table_artifact(comparison_rows(base["metrics"], tuned["metrics"]), key=f"eval-{slug}",
                          description="Held-out answers of the base and the fine-tuned model: exact match, token F1 "
                          "and ANLS per data set.")
    if cfg.eval.examples:
        shown = questions_from_shards(cfg.data.shards, cfg.eval.examples)
        create_markdown_artifact(
            "# Held-out examples\n\n" + examples_markdown(shown, base["rows"], tuned["rows"], cfg.eval.examples),
            key=f"eval-examples-{slug}", description="Held-out questions answered by the base and the fine-tuned model.")
    return {"base": base["metrics"], "tuned": tuned["metrics"], "seconds": base["seconds"] + tuned["seconds"]}


@flow(name="finetune")
def finetune(cfg: FinetuneConfig = BUILT_IN_CONFIG) -> dict:
    """Prepare shards, train, upload checkpoints, publish the merged (or consolidated) model, and report."""
    if cfg.storage.url:
        load_storage_credentials(cfg)
    preflight(cfg, "run")  # all but the shards (not prepared yet): storage fails now, not after training
    data = prepare_data(cfg)
    cfg = with_run_dir(cfg, compute_identity(cfg))  # train.run_subdir: each identity gets a folder of its own
    trained = train_task(cfg)  # called directly: a cancellation must reach the subprocess owner
    merged = merge(cfg)  # LoRA: adapter merged into the base; full fine-tune: checkpoint consolidated
    evaluated = evaluate_models(cfg, merged) if cfg.eval.enabled and data["eval_samples"] else None
    report(cfg, data, trained, merged)
    return {"data": data, "train": trained, "merged": merged, "eval": evaluated}


@flow(name="retrain")
def retrain(cfg: FinetuneConfig = BUILT_IN_CONFIG) -> dict:
    """Scheduled retraining: run `finetune` only when the run identity (settings, data or base model)
    differs from the last successful retrain's. Each identity trains in a folder of its own."""
    log = get_run_logger()
    preflight(cfg, "run")  # a scheduled run with a broken setting fails before it reads the data
    plan = plan_task(cfg)
    identity = compute_identity(cfg, plan.fingerprint)
    key = f"retrain-{cfg.name}".lower().replace(".", "-")
    last = Variable.get(key, default=None)
    if last == identity.id:
        create_markdown_artifact(
            f"# Nothing to retrain\n\nThe settings, data and base model of `{cfg.name}` are unchanged since the last "
            f"successful retrain (run identity `{identity.id[:12]}`): no training was started.",
            key="retrain-decision", description="Why this scheduled run did or did not train.",
        )
        log.info("run identity %s unchanged: skipping training", identity.id[:12])
        return {"trained": False, "identity": identity.id}
    run_cfg = with_run_dir(cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_subdir": True})}), identity)
    before = read_identity(f"{cfg.train.output_dir.rstrip('/')}/{cfg.name}-{last[:8]}") if last else None
    changed = ", ".join(differences(identity, before)) if before else "the settings, data or base model"
    create_markdown_artifact(
        f"# Retraining\n\n`{cfg.name}` changed since the last successful retrain (run identity "
        f"`{(last or 'none')[:12]}` → `{identity.id[:12]}`; changed: {changed}): training in `{run_cfg.train.output_dir}`.",
        key="retrain-decision", description="Why this scheduled run did or did not train.",
    )
    result = finetune(run_cfg)
    Variable.set(key, identity.id, overwrite=True)
    return {"trained": True, "identity": identity.id, **result}
