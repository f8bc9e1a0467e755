"""The `vlmft` command line.

Every subcommand takes `--config PATH` and any number of `key.path=value` overrides, parsed by
`vlm_core.config.load_config`, so a value means the same on the command line, in YAML, in the
Prefect UI form and in the training subprocess. Subcommands import what they run lazily, so
`vlmft --help` and config checks stay fast.

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

from vlm_core.config import FinetuneConfig, load_config, to_json, to_yaml
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

    out = train(cfg)
    print(f"trained {out.get('global_step')} steps on {out.get('world_size')} rank(s); final eval loss "
          f"{out.get('final_eval_loss')}; checkpoints in {out.get('output_dir', cfg.train.output_dir)} "
          f"(run {out.get('run_id')})")
    return 0


def _cmd_run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from flows.finetune import finetune

    out = finetune(cfg)
    t, d = out["train"], out["data"]
    run_dir = Path(t.get("output_dir", cfg.train.output_dir))
    evals = [json.loads(x).get("eval_loss") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e is not None]
    print(f"\ndone: {d['train_samples']} train / {d['eval_samples']} eval samples ({d['rejected']} rejected) in {d['shards']}")
    print(f"trained {t.get('global_step')} steps on {t.get('world_size')} rank(s) as run {t.get('run_id')}; "
          f"checkpoints in {run_dir}")
    if evals:
        print(f"eval loss: {evals[0]:.3f} at the start -> {evals[-1]:.3f} at the end")
    if out["merged"]:
        print(f"merged model: {out['merged'].get('uploaded_to') or out['merged']['out']}")
    print(f"loss curve: {run_dir / 'loss_curve.png'}")
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
        cfg = load_config(args.config, args.overrides)
        if args.command in PREFECT_COMMANDS:
            terminal.set_prefect_defaults()
            terminal.hide_user_error_tracebacks(_user_errors())
            if args.command != "deploy":  # deploy needs a real server: Prefect says so without one
                terminal.start_temporary_server()
        commands = {"config": _cmd_config, "prepare": _cmd_prepare, "train": _cmd_train, "merge": _cmd_merge,
                    "run": _cmd_run, "deploy": _cmd_deploy}
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
