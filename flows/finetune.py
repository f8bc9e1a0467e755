"""The end-to-end pipeline: prepare → train → (checkpoints to storage) → merge → evaluate → report.

    vlmft run --config configs/demo.yaml          # what `make run` does, on the bundled demo
    python -m vlmft run --config configs/demo.yaml

A failed run retried from the Prefect UI does not redo finished work: shards are skipped by their
fingerprint, training resumes from its newest complete checkpoint (or is skipped when the run folder
already holds a finished run of this configuration), uploads skip unchanged files and a merge of the
same inputs is a no-op.

With eval.enabled and a held-out split, the base model, the fine-tuned one and the current model of
`name` (if one was promoted before) then answer the same held-out questions (greedy generation,
vlm_core.infer) and are scored per data set: a table artifact compares base and fine-tuned, a markdown
artifact shows eval.examples questions with both answers. The published folder gets its model card and
lineage.json, and last of all the fine-tuned model becomes the current one
(`{storage.url}/{name}/current.json`, vlm_core.promote) only if its eval.metric is at least the current
model's plus eval.promotion_margin; the `promotion-{name}` artifact says why or why not.

`retrain` is the scheduled variant: it trains only when the run identity (every setting that changes
what the run learns, the data and the base model; vlm_core.identity) differs from the last successful
retrain's (kept in a Prefect Variable), and otherwise ends quickly, saying so.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.variables import Variable

from flows.merge import merge
from flows.prepare_data import prepare_data
from tasks.evaluate import evaluate_task
from tasks.prepare import plan_task
from tasks.promote import promote_task
from tasks.storage import load_storage_credentials, upload_folder_task
from tasks.train import train_task
from vlm_core.checkpoints import run_url
from vlm_core.config import FinetuneConfig
from vlm_core.evaluate import comparison_rows, examples_markdown
from vlm_core.identity import RunIdentity, compute_identity, differences, read_identity, with_run_dir
from vlm_core.infer import questions_from_shards
from vlm_core.lineage import build_lineage, write_model_card
from vlm_core.model.load import resolve_model_path
from vlm_core.preflight import preflight
from vlm_core.promote import decide, model_location, pointer_url, read_current
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
    """The base, the fine-tuned and the current model answer the same held-out questions; all scored.

    The current model (the one `{storage.url}/{name}/current.json` names) is evaluated again here rather
    than trusted from its pointer: promotion compares numbers from the same samples, code and settings.
    """
    base = evaluate_task(cfg, str(resolve_model_path(cfg.model)), "base")  # the folder training started from
    tuned = evaluate_task(cfg, merged["out"], "tuned")
    current = read_current(cfg.storage.url, cfg.name) if cfg.storage.url and cfg.eval.promote else None
    candidate = model_location(merged.get("uploaded_to") or merged["out"])
    if current is None or model_location(current["model"]) == candidate:
        against = tuned["metrics"] if current else None  # a rerun of the current model: the same answers
    else:
        against = evaluate_task(cfg, current["model"], "current")["metrics"]
    slug = _slug(cfg.name)
    create_table_artifact(comparison_rows(base["metrics"], tuned["metrics"]), key=f"eval-{slug}",
                          description="Held-out answers of the base and the fine-tuned model: exact match, token F1 "
                          "and ANLS per data set.")
    if cfg.eval.examples:
        shown = questions_from_shards(cfg.data.shards, cfg.eval.examples)
        create_markdown_artifact(
            "# Held-out examples\n\n" + examples_markdown(shown, base["rows"], tuned["rows"], cfg.eval.examples),
            key=f"eval-examples-{slug}", description="Held-out questions answered by the base and the fine-tuned model.")
    return {"base": base["metrics"], "tuned": tuned["metrics"], "current": against,
            "current_model": current["model"] if current else None, "seconds": base["seconds"] + tuned["seconds"]}


def publish_and_promote(cfg: FinetuneConfig, identity: RunIdentity, merged: dict, evaluated: dict | None,
                        started_at: datetime) -> dict:
    """Model card and lineage into the published folder; then, only if the evaluation says so, the pointer.

    The pointer is the last write of the run: a crash anywhere before it leaves the previous current model
    in place, and a candidate that is not promoted stays published with its card and metrics.
    """
    model_url = merged.get("uploaded_to") or merged["out"]
    metrics = evaluated["tuned"] if evaluated else None
    lineage = build_lineage(cfg, identity, metrics=metrics, flow_run_id=str(flow_run.id or "") or None,
                            started_at=started_at, ended_at=datetime.now(UTC), model_url=model_url)
    write_model_card(merged["out"], cfg, metrics, lineage)
    if merged.get("uploaded_to"):  # the card and lineage.json join the upload (unchanged files are skipped)
        upload_folder_task(cfg, merged["out"], merged["uploaded_to"])
    decision = None
    if evaluated is None:
        reason = "not evaluated (eval.enabled=false or no held-out samples), so not promoted"
    elif not cfg.storage.url:
        reason = "storage.url is not set: there is no current-model pointer to move"
    else:
        decision = decide(metrics, evaluated["current"], cfg.eval.metric, cfg.eval.promotion_margin)
        reason = decision.reason if cfg.eval.promote else f"eval.promote=false, not promoted ({decision.reason})"
    promoted = bool(decision and decision.promote and cfg.eval.promote)
    if promoted:
        done = promote_task(cfg, model_url, metrics, lineage, decision.reason, evaluated["current_model"])
        if isinstance(done, str):  # another run was promoted while this one evaluated: it was never compared
            promoted, reason = False, done
    where = pointer_url(cfg.storage.url, cfg.name) if cfg.storage.url else None
    create_markdown_artifact(
        f"# {'Promoted' if promoted else 'Not promoted'}\n\n- candidate: `{model_url}`\n"
        f"- current model before this run: `{(evaluated or {}).get('current_model') or 'none'}`\n"
        f"- decision: {reason}\n" + (f"- pointer: `{where}`\n" if where else ""),
        key=f"promotion-{_slug(cfg.name)}", description="Whether this run's model became the current one, and why.")
    return {"promoted": promoted, "reason": reason, "model": model_url, "pointer": where}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@flow(name="finetune")
def finetune(cfg: FinetuneConfig = BUILT_IN_CONFIG) -> dict:
    """Prepare shards, train, upload checkpoints, publish the merged (or consolidated) model, and report."""
    if cfg.storage.url:
        load_storage_credentials(cfg)
    preflight(cfg, "run")  # all but the shards (not prepared yet): storage fails now, not after training
    started_at = datetime.now(UTC)
    data = prepare_data(cfg)
    identity = compute_identity(cfg)
    cfg = with_run_dir(cfg, identity)  # train.run_subdir: each identity gets a folder of its own
    trained = train_task(cfg)  # called directly: a cancellation must reach the subprocess owner
    merged = merge(cfg)  # LoRA: adapter merged into the base; full fine-tune: checkpoint consolidated
    evaluated = evaluate_models(cfg, merged) if cfg.eval.enabled and data["eval_samples"] else None
    promotion = publish_and_promote(cfg, identity, merged, evaluated, started_at)  # the pointer is written last
    report(cfg, data, trained, merged)
    return {"data": data, "train": trained, "merged": merged, "eval": evaluated, "promotion": promotion}


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
