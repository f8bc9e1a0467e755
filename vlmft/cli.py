"""The `vlmft` command line.

Every subcommand takes `--config PATH` and any number of `key.path=value` overrides, parsed by
`vlm_core.config.load_config`, so a value means the same on the command line, in YAML, in the
Prefect UI form and in the training subprocess. Subcommands import what they run lazily, so
`vlmft --help` and config checks stay fast. `current` and `promote` read a config only when one is
given (`--name` and `--storage` can stand in for it) and run without Prefect, except that a config's
`storage.secret_block` is read from the Prefect server (PREFECT_API_URL) for its credentials.

A user error (tasks.errors: config, data, storage, a locked folder, a failed training rank) ends the
command with exit code 2 and one `vlmft: ...` line; Prefect's console log shows it without a
traceback (vlmft.terminal), the run's log in Prefect keeps the traceback. Any other exception is a
bug and shows its traceback. Ctrl-C ends the command with exit code 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm_core.config import ConfigError, FinetuneConfig, load_config, to_json, to_yaml
from vlmft import terminal

PREFECT_COMMANDS = ("prepare", "train", "merge", "run", "deploy")


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: printed as one message, exit code 2. Imported late so that
    `vlmft config` and `--help` do not pay for torch and webdataset."""
    from tasks.errors import user_errors

    return user_errors()


def _config_args() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, help="YAML config file (default: built-in defaults)")
    common.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.learning_rate=1e-4"
    )
    return common


def _cmd_config(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    print(to_json(cfg) if args.format == "json" else to_yaml(cfg), end="")
    return 0


def _cmd_prepare(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from flows.prepare_data import prepare_data

    flow = prepare_data
    if args.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            print("vlmft: --task-runner dask needs the prefect-dask package (pip install prefect-dask)", file=sys.stderr)
            return 2
        flow = prepare_data.with_options(task_runner=DaskTaskRunner())
    out = flow(cfg)
    state = "up to date" if out["up_to_date"] else "written"
    print(f"shards {state}: {out['train_samples']} train / {out['eval_samples']} eval samples in {out['shards']} "
          f"({out['rejected']} rejected, see rejected.jsonl there)")
    return 0


def _cmd_merge(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from flows.merge import merge

    out = merge(cfg, adapter=args.adapter, out=args.out)
    state = "already up to date" if out["skipped"] else "written"
    print(f"merged model {state}: {out['out']} (max |Δlogit| {out['max_abs_diff']:.3g})"
          + (f", uploaded to {out['uploaded_to']}" if "uploaded_to" in out else ""))
    return 0


def _cmd_train(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from flows.train import train
    from vlm_core.report import loss_summary

    out = train(cfg)
    print(f"\ntrained {out.get('global_step')} steps on {out.get('world_size')} rank(s) as run {out.get('run_id')}; "
          f"checkpoints in {out.get('output_dir', cfg.train.output_dir)}")
    print(_losses(loss_summary(out)))
    return 0


def _losses(losses: dict[str, float | None]) -> str:
    """The run's losses (vlm_core.report.loss_summary) on one line: 'last logged train loss 4.201, ...'."""
    return "; ".join(f"{name} {value}" for name, value in losses.items() if value is not None)


def _cmd_run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from flows.finetune import finetune
    from vlm_core.report import loss_summary

    out = finetune(cfg)
    t, d = out["train"], out["data"]
    run_dir = Path(t.get("output_dir", cfg.train.output_dir))
    print(f"\ndone: {d['train_samples']} train / {d['eval_samples']} eval samples ({d['rejected']} rejected) in {d['shards']}")
    print(f"trained {t.get('global_step')} steps on {t.get('world_size')} rank(s) as run {t.get('run_id')}; "
          f"checkpoints in {run_dir}")
    print(_losses(loss_summary(t)))
    if out["merged"]:
        print(f"merged model: {out['merged'].get('uploaded_to') or out['merged']['out']}")
    if out.get("eval"):
        from vlm_core.evaluate import comparison_table

        print(f"held-out answers, base vs fine-tuned ({out['eval']['seconds']:.0f} s):")
        print(comparison_table(out["eval"]["base"], out["eval"]["tuned"]))
    if out.get("promotion"):
        p = out["promotion"]
        print(f"{'promoted' if p['promoted'] else 'not promoted'}: {p['reason']}"
              + (f" (pointer: {p['pointer']})" if p["promoted"] else ""))
    print(f"loss curve: {run_dir / 'loss_curve.png'}")
    return 0


def _questions(cfg: FinetuneConfig, args: argparse.Namespace) -> list:
    """The questions --prompt/--image or --data asks (shards: the held-out split)."""
    from vlm_core import infer
    from vlm_core.data.manifest import read_manifest

    if (args.prompt is None) == (args.data is None):
        raise ConfigError("predict: give either --prompt (with --image files) or --data (annotations or shards)")
    if args.prompt is not None:
        return [infer.question_from_prompt(args.prompt, args.image)]
    if args.image:
        raise ConfigError("predict: --image goes with --prompt; with --data the images come from the annotations")
    data, limit = args.data, args.max_samples
    if read_manifest(data) is not None:
        questions = infer.questions_from_shards(data, limit)
        if not questions:
            raise ConfigError(f"--data {data}: the shards hold no held-out samples; prepare them with data.eval_count "
                              "(or data.eval_fraction) above 0, or pass an annotation file")
        return questions
    if data.endswith(".jsonl") or (data.endswith(".json") and args.image_root):
        return infer.questions_from_jsonl(data, args.image_root, max_samples=limit)
    if data.endswith(".json"):
        return infer.questions_from_meta(data, max_samples=limit)
    raise ConfigError(f"--data {data}: expected a JSONL annotation file, a meta JSON (or a LLaVA JSON list with "
                      "--image-root) or a prepared shard folder, and there is no manifest.json there")


def _cmd_predict(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from vlm_core.evaluate import evaluate, metrics_table, write_predictions
    from vlm_core.infer import load_predictor

    questions = _questions(cfg, args)
    predictor = load_predictor(args.model, base=args.base, data=cfg.data, dtype=args.dtype or cfg.model.dtype,
                               cache_dir=cfg.model.cache_dir, attn_implementation=cfg.model.attn_implementation)
    max_new_tokens = args.max_new_tokens or cfg.eval.max_new_tokens
    batch_size = args.batch_size or cfg.eval.batch_size
    if args.prompt is not None:
        print(predictor.predict(questions, max_new_tokens, batch_size)[0])
        return 0
    with Progress(transient=True) as bar:
        job = bar.add_task("answering", total=len(questions))
        result = evaluate(predictor, questions, max_new_tokens, batch_size,
                          progress=lambda done, total: bar.update(job, completed=done))
    out = write_predictions(result.rows, args.out)
    print(f"{len(result.rows)} answers in {result.seconds:.1f} s ({result.samples_per_second:.2f} samples/s) "
          f"written to {out}")
    if any(r["reference"] for r in result.rows):
        print(metrics_table(result.metrics))
    else:
        print("no reference answers in the data: nothing to score")
    return 0


def _cmd_deploy(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from deployments.deploy import deploy_all

    ids = deploy_all(cfg, pool=args.pool, cron=args.cron)
    for name, dep_id in ids.items():
        print(f"deployment {name}: {dep_id}")
    print(f"start a worker with: prefect worker start --pool {args.pool}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from vlm_core.demo import SAMPLES, write_demo_data

    meta = write_demo_data(args.folder, n=SAMPLES if args.samples is None else args.samples, seed=args.seed)
    print(f"demo data written; use data.meta={meta}")
    return 0


def _pointer_place(args: argparse.Namespace) -> tuple[str, str, FinetuneConfig | None]:
    """(storage URL, run name, config or None) of `vlmft current` / `vlmft promote`: the flags, else the
    config's storage.url and name. The storage must exist: a typo must not read as "no current model"."""
    from vlm_core.config import ConfigError
    from vlm_core.storage import check_bucket, check_scheme

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    name = args.name or (cfg.name if cfg else None)
    storage = args.storage or (cfg.storage.url if cfg else None)
    if not name:
        raise ConfigError(f"{args.command} needs a run name: pass --name NAME, or --config FILE to use its name")
    if not storage:
        where = f"{args.config} sets no storage.url" if cfg else "no --storage given"
        raise ConfigError(f"{args.command} needs the storage: {where}; pass --storage URL (the storage.url the model was "
                          "published to), or --config FILE with storage.url set")
    check_scheme("--storage", storage)
    if cfg is not None and cfg.storage.secret_block and "://" in storage:  # its Secret block, from the Prefect server
        terminal.set_prefect_defaults()  # as for the flow commands: no telemetry, Ctrl-C safe temporary server
        terminal.start_temporary_server()
        from tasks.storage import load_storage_credentials

        load_storage_credentials(cfg)
    check_bucket("--storage", storage)
    if "://" not in storage and not Path(storage).is_dir():
        raise ConfigError(f"--storage {storage}: no such folder; pass the storage.url the model was published to")
    return storage, name, cfg


def _describe_current(doc: dict) -> str:
    metric, lineage = doc["metric"], doc.get("lineage") or {}
    value = metric.get("value")
    shown = f"{metric['name']} {value:.3f}" if isinstance(value, int | float) else f"{metric['name']} not measured"
    commit = lineage.get("git_commit")
    lines = [f"current model of {doc['name']}: {doc['model']}",
             f"  {shown}; promoted {doc['promoted_at']} ({doc.get('reason') or 'no reason recorded'})",
             f"  replaced: {doc.get('previous') or 'nothing (the first model of this name)'}"]
    if lineage.get("run_id"):
        lines.append(f"  run {lineage['run_id']} (identity {str(lineage.get('identity'))[:12]}), data fingerprint "
                     f"{str(lineage.get('data_fingerprint'))[:12]}, config hash {str(lineage.get('config_hash'))[:12]}, "
                     f"vlm-finetune {lineage.get('version')}" + (f" at commit {commit[:12]}" if commit else ""))
    if doc.get("lineage_url"):
        lines.append(f"  full lineage: {doc['lineage_url']}")
    return "\n".join(lines)


def _cmd_current(args: argparse.Namespace) -> int:
    from vlm_core.promote import pointer_url, read_current

    storage, name, _ = _pointer_place(args)
    doc = read_current(storage, name)
    if args.json:
        print(json.dumps(doc, indent=1))
    elif doc is None:
        print(f"no current model of {name}: nothing promoted yet ({pointer_url(storage, name)} does not exist)")
    else:
        print(_describe_current(doc))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from vlm_core.promote import promote, read_model_lineage, read_model_metrics

    storage, name, cfg = _pointer_place(args)
    lineage = read_model_lineage(args.model)
    metrics = read_model_metrics(args.model)
    recorded = ((lineage or {}).get("config") or {}).get("eval") or {}
    metric = cfg.eval.metric if cfg else recorded.get("metric", "exact_match")
    doc = promote(storage, name, args.model, metrics, metric, lineage, reason="promoted by hand with vlmft promote")
    value = doc["metric"]["value"]
    shown = f"{metric} {value:.3f}" if value is not None else f"no {metric} recorded with it"
    print(f"current model of {name} is now {doc['model']} ({shown})")
    print(f"it replaced: {doc['previous'] or 'nothing (there was no current model)'}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from vlm_core.model.tiny import build_tiny_model

    folder = build_tiny_model(args.folder, seed=args.seed)
    print(f"tiny InternVL written to {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmft", description="Fine-tune InternVL-style models with Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _config_args()
    p = sub.add_parser("config", parents=[common], help="validate a config and print it in full")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p = sub.add_parser("prepare", parents=[common], help="validate data and write WebDataset shards + manifest")
    p.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                   help="where shard groups run: the default thread pool, or a local Dask cluster")
    sub.add_parser("train", parents=[common], help="train on prepared shards (torchrun / deepspeed subprocess)")
    p = sub.add_parser("merge", parents=[common], help="merge a LoRA adapter into its base model (or consolidate a full "
                       "fine-tune's ZeRO-3 checkpoint), verified")
    p.add_argument("--adapter", help="checkpoint folder or URL: a LoRA adapter, or a full fine-tune's "
                   "checkpoint when lora.enabled=false (default: the run's newest complete checkpoint)")
    p.add_argument("--out", help="merged model folder (default: train.output_dir/merged)")
    sub.add_parser("run", parents=[common], help="the whole pipeline: prepare, train, upload, merge, report")
    p = sub.add_parser("deploy", parents=[common], help="register the deployments on the Prefect server")
    p.add_argument("--pool", default="vlm-training", help="process work pool (created with concurrency 1)")
    p.add_argument("--cron", default="0 3 * * *", help="schedule of the retrain-nightly deployment (UTC)")
    p = sub.add_parser("current", parents=[common], help="show the current (promoted) model of a run name")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--storage", help="storage URL or folder (default: the config's storage.url)")
    p.add_argument("--json", action="store_true", help="print the pointer document (current.json) as it is")
    p = sub.add_parser("promote", parents=[common], help="make a published model the current one by hand (or roll back)")
    p.add_argument("--model", required=True, help="folder or URL of a published model (e.g. STORAGE/runs/NAME-ID/merged)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--storage", help="storage URL or folder (default: the config's storage.url)")
    p = sub.add_parser("predict", parents=[common], help="answer a prompt, or score a model's answers on annotations "
                       "or held-out shards (data and eval settings from the config)")
    p.add_argument("--model", required=True, help="model folder or URL: a merged model, a LoRA adapter or a "
                   "training checkpoint")
    p.add_argument("--base", help="base model folder or URL of a LoRA adapter (default: the one in its "
                   "adapter_config.json)")
    p.add_argument("--prompt", help="a question to answer; its answer is printed")
    p.add_argument("--image", action="append", default=[], help="an image for --prompt (repeat for several)")
    p.add_argument("--data", help="questions with reference answers: an InternVL JSONL, a meta JSON, a LLaVA JSON "
                   "list (with --image-root) or a prepared shard folder (its held-out split)")
    p.add_argument("--image-root", help="image folder of a JSONL or LLaVA JSON file (default: the file's folder)")
    p.add_argument("--out", default="predictions.jsonl", help="where the answers go, one JSON line each")
    p.add_argument("--max-samples", type=int, help="answer only the first N questions (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: eval.max_new_tokens)")
    p.add_argument("--batch-size", type=int, help="questions answered together (default: eval.batch_size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: model.dtype)")
    p = sub.add_parser("demo-data", help="write the generated demo data set")
    p.add_argument("folder", type=Path)
    p.add_argument("--samples", type=int, default=None, help="number of samples (default: vlm_core.demo.SAMPLES)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("tiny-model", help="write the tiny random InternVL used by tests and the demo")
    p.add_argument("folder", type=Path)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tiny-model":
            return _cmd_tiny_model(args)
        if args.command == "demo-data":
            return _cmd_demo_data(args)
        if args.command in ("current", "promote"):  # no Prefect, and a config only when given
            return _cmd_current(args) if args.command == "current" else _cmd_promote(args)
        cfg = load_config(args.config, args.overrides)
        if args.command in PREFECT_COMMANDS:
            terminal.set_prefect_defaults()
            terminal.hide_user_error_tracebacks(_user_errors())
            if args.command != "deploy":  # deploy needs a real server: Prefect says so without one
                terminal.start_temporary_server()
        commands = {"config": _cmd_config, "prepare": _cmd_prepare, "train": _cmd_train, "merge": _cmd_merge,
                    "run": _cmd_run, "deploy": _cmd_deploy, "predict": _cmd_predict}
        return commands[args.command](cfg, args)
    except KeyboardInterrupt:
        print("vlmft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"vlmft: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
