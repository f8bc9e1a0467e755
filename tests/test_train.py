"""Distributed training on CPU with real processes: torchrun + DeepSpeed ZeRO-2/3, LoRA, kill and resume,
two node agents, bad configs caught before launch, and the Prefect task killing the whole group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from helpers.servers import free_port
from tasks.process import process_tree
from vlm_core.config import ConfigError, FinetuneConfig, load_config, to_json, to_yaml
from vlm_core.identity import IdentityMismatch
from vlm_core.launch import check_run, command, thread_env


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    return D.training_shards(tmp_path_factory.mktemp("train-data"), tiny_model_dir, 20, 6, 4)


def _cfg(tiny_model_dir, shards, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(None, [
        "name=t", f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.shards={shards}",
        "data.max_dynamic_patch=2", "data.num_workers=1", "data.shuffle_buffer=8", f"train.output_dir={out}",
        "train.per_device_batch_size=2", "train.learning_rate=3e-3", "train.warmup_ratio=0", "train.bf16=false",
        "train.lr_scheduler=constant", "train.logging_steps=1", "train.save_steps=3", "train.eval_steps=4",
        "train.max_steps=8", "train.nproc_per_node=2", "train.deepspeed=zero2", f"train.master_port={free_port()}",
        "logging.report_to=[]", *extra])


def _launch(cfg: FinetuneConfig, wait: bool = True):
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(to_json(cfg))
    log = open(out / "train.log", "ab")
    proc = subprocess.Popen(command(cfg, out / "run.json"), env={**os.environ, **thread_env(cfg)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        assert proc.wait(timeout=300) == 0, (out / "train.log").read_text()[-4000:]
    return proc


def _summary(out: Path) -> dict:
    return json.loads((out / "run_summary.json").read_text())


def _rank_ids(out: Path, rank: int, steps_per_epoch: int) -> list[str]:
    rows = [json.loads(x) for x in (out / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
    return [i for r in rows if r["step"] < steps_per_epoch for i in r["ids"]]


@pytest.mark.integration
def test_two_ranks_zero2_train_on_disjoint_samples_and_learn(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "z2"
    cfg = _cfg(tiny_model_dir, shards, out, "train.max_steps=16", "logging.report_to=[tensorboard]",
               "eval.during_training=true", "eval.max_samples=4", "eval.max_new_tokens=8")
    _launch(cfg)
    s = _summary(out)
    assert s["world_size"] == 2 and s["global_step"] == 16
    # 16 training samples, 2 ranks x batch 2: 4 steps per epoch; within an epoch the ranks never share a sample
    r0, r1 = _rank_ids(out, 0, 4), _rank_ids(out, 1, 4)
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1) and len(set(r0) | set(r1)) == 16
    losses = [s["losses"][str(i)] for i in range(1, 17)]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4  # a small set is being memorised
    assert set(s["eval_losses"]) == {"4", "8", "12", "16"} and s["final_eval_loss"] < s["eval_losses"]["4"]
    # eval loss is normalised like the training loss (the Trainer's own token-count normaliser made it ~3x lower)
    assert 0.5 < s["eval_losses"]["4"] / s["losses"]["4"] < 2
    for step in (3, 6, 9, 12, 15):
        ck = out / f"checkpoint-{step}"
        assert (ck / "checkpoint_complete.json").is_file() == (step >= 12)  # save_total_limit=3 keeps the newest
    assert (out / "checkpoint-15" / "global_step15").is_dir()  # DeepSpeed's ZeRO shards
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics) and all("data/samples" in m for m in metrics)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8, 12, 16]  # the final eval is step 16's, once
    _assert_tensorboard_has_the_counters_of_both_ranks(out, metrics)
    _assert_generative_scores_at_every_eval(out, [4, 8, 12, 16])
    scores = _generative_scores(out)
    assert scores[16]["f1"] > scores[4]["f1"]  # answered by the weights being trained: it starts to get words right


def _assert_generative_scores_at_every_eval(out: Path, steps: list[int]) -> None:
    """eval.during_training under 2 ranks: exact match, F1 and ANLS in [0, 1] at each eval step, written once
    (by the main process) in metrics.jsonl and in TensorBoard as eval/<metric>."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scores = _generative_scores(out)
    assert sorted(scores) == steps
    assert all(0.0 <= v <= 1.0 for s in scores.values() for v in s.values())
    [logdir] = {p.parent for p in out.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    for m in GENERATIVE:
        assert {e.step: e.value for e in events.Scalars(f"eval/{m}")} == pytest.approx({t: s[m] for t, s in scores.items()})


def _rank_count(rows: list[dict], name: str, before_step: int) -> int:
    """A data counter of one rank before an optimizer step, from its micro-batch rows (samples/rankN.jsonl)."""
    def count(stats: dict) -> int:
        return sum(v for k, v in stats.items() if k.startswith("skipped_")) if name == "skipped" else stats[name]

    return sum(count(row["stats"]) for row in rows if row["step"] < before_step)


def _assert_tensorboard_has_the_counters_of_both_ranks(out: Path, metrics: list[dict]) -> None:
    """TensorBoard, read by its own reader: every data counter at every logged step is the sum of what the
    two ranks read before that step, the throughput is there, and so is the whole run config as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [logdir] = {p.parent for p in out.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    ranks = [[json.loads(x) for x in (out / "samples" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for name in ("samples", "images", "tiles", "text_only", "truncated", "skipped", "padded"):
        logged = {e.step: e.value for e in events.Scalars(f"train/data/{name}")}
        assert set(logged) == {m["step"] for m in metrics}, name
        for step, value in logged.items():
            assert value == sum(_rank_count(rows, name, step) for rows in ranks), (name, step, value)
    assert all(_rank_count(rows, "tiles", 17) > 0 for rows in ranks)  # rank 0's count alone would not do
    assert events.Scalars("train/train_tokens_per_second")[-1].value > 0
    assert events.Scalars("train/train_samples_per_second")[-1].value > 0
    [config] = events.Tensors("vlmft_config/text_summary")
    assert "max_dynamic_patch: 2" in config.tensor_proto.string_val[0].decode()
    steps = [json.loads(x.split(" ", 1)[1]) for x in (out / "train.log").read_text().splitlines()
             if x.startswith("VLMFT_PROGRESS ") and '"kind": "step"' in x]
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 16 and all(e["tokens_per_s"] > 0 for e in steps)


@pytest.mark.integration
def test_zero3_and_lora_adapter_only_checkpoints(tiny_model_dir, shards, tmp_path):
    gen = ("eval.during_training=true", "eval.max_samples=3", "eval.max_new_tokens=6", "eval.batch_size=2")
    z3 = tmp_path / "z3"
    _launch(_cfg(tiny_model_dir, shards, z3, "train.deepspeed=zero3", "train.max_steps=4", *gen))
    s = _summary(z3)
    assert s["world_size"] == 2 and s["global_step"] == 4 and s["final_eval_loss"] is not None
    assert list(_generative_scores(z3)) == [4]  # generation under ZeRO-3's partitioned weights, in lockstep
    assert (z3 / "final" / "model.safetensors").stat().st_size > 100_000  # gathered from the ZeRO-3 shards

    lora = tmp_path / "lora"
    _launch(_cfg(tiny_model_dir, shards, lora, "lora.enabled=true", "lora.r=4", "train.max_steps=4", *gen))
    s = _summary(lora)
    assert list(_generative_scores(lora)) == [4]  # the peft model answers
    assert s["world_size"] == 2 and s["losses"]["4"] < s["losses"]["1"]
    ck = lora / "checkpoint-3"
    assert (ck / "adapter_model.safetensors").is_file() and (ck / "adapter_config.json").is_file()
    adapter_cfg = json.loads((ck / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # loadable from any folder
    assert not (ck / "model.safetensors").exists()
    assert (ck / "adapter_model.safetensors").stat().st_size < 0.5 * (tiny_model_dir / "model.safetensors").stat().st_size


@pytest.mark.integration
def test_sigkill_after_checkpoint_then_resume_matches_unbroken_run(tiny_model_dir, shards, tmp_path):
    full = tmp_path / "full"
    _launch(_cfg(tiny_model_dir, shards, full, "train.max_steps=9", "train.save_total_limit=null"))
    reference = _summary(full)["losses"]

    broken = tmp_path / "broken"
    cfg = _cfg(tiny_model_dir, shards, broken, "train.max_steps=9", "train.save_total_limit=null")
    proc = _launch(cfg, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not (broken / "checkpoint-3" / "checkpoint_complete.json").exists():
        assert proc.poll() is None, (broken / "train.log").read_text()[-3000:]
        time.sleep(0.05)
    # the training machine dies: every process of the run at once (the ranks sit in sessions of their own)
    tree = process_tree(proc.pid)
    for p in tree:
        p.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    done = sorted(int(p.name.split("-")[1]) for p in broken.glob("checkpoint-*") if (p / "checkpoint_complete.json").exists())
    assert done and done[-1] < 9
    _launch(cfg)  # train.resume_from=auto
    s = _summary(broken)
    assert s["resumed_from"].endswith(f"checkpoint-{done[-1]}") and s["global_step"] == 9
    for step in range(done[-1] + 1, 10):
        assert abs(s["losses"][str(step)] - reference[str(step)]) < 1e-4, (step, s["losses"], reference)


@pytest.mark.integration
def test_two_node_agents_form_one_job(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        cfg = _cfg(tiny_model_dir, shards, out, "train.nnodes=2", "train.nproc_per_node=1", f"train.node_rank={node}",
                   f"train.master_port={port}", "train.max_steps=3")
        procs.append(_launch(cfg, wait=False))
    for p in procs:
        assert p.wait(timeout=300) == 0, (out / "train.log").read_text()[-4000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["global_step"] == 3
    assert not set(_rank_ids(out, 0, 99)) & set(_rank_ids(out, 1, 99))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.deepspeed=zero3_offload"], "needs CUDA GPUs"),
        (["train.global_batch_size=6"], "train.global_batch_size=6 is not divisible by"),
        (["train.bf16=true"], "train.bf16=true with DeepSpeed needs a GPU"),
        (["train.launcher=python"], "train.launcher=python starts one process"),
    ],
)
def test_bad_run_config_fails_before_launch(tiny_model_dir, shards, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_run(_cfg(tiny_model_dir, shards, tmp_path / "x", *overrides))


def test_missing_shards_fail_before_launch(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json.*vlmft prepare"):
        check_run(_cfg(tiny_model_dir, tmp_path / "nothing", tmp_path / "x"))


def test_global_batch_size_sets_accumulation(tiny_model_dir, shards, tmp_path):
    from vlm_core.launch import gradient_accumulation

    assert gradient_accumulation(_cfg(tiny_model_dir, shards, tmp_path, "train.global_batch_size=16")) == 4


def test_a_busy_rendezvous_port_moves_a_one_node_run_only():
    import socket

    from vlm_core.launch import free_rendezvous_port, port_in_use

    with socket.socket() as busy:  # another run's rendezvous store, listening on 127.0.0.1
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use(port)
        one_node = load_config(None, [f"train.master_port={port}", "train.nproc_per_node=2"])
        moved, said = free_rendezvous_port(one_node)
        new = moved.train.master_port
        assert new != port and not port_in_use(new) and said.startswith(f"train.master_port={port} is in use")
        assert moved.model_copy(update={"train": moved.train.model_copy(update={"master_port": port})}) == one_node
        for agreed in (["train.nnodes=2", "train.node_rank=0"],  # several nodes agreed on the port: it stays
                       ["train.launcher=python"]):  # one process: no rendezvous
            cfg = load_config(None, [f"train.master_port={port}", *agreed])
            assert free_rendezvous_port(cfg) == (cfg, None)
    assert not port_in_use(port) and free_rendezvous_port(one_node) == (one_node, None)  # free again: kept


FLOW_SCRIPT = """
import sys
from flows.train import train
from vlm_core.config import from_json
train(from_json(open(sys.argv[1]).read()))
"""


@pytest.mark.integration
def test_sigterm_to_the_flow_process_kills_the_training_group(prefect_server, tiny_model_dir, shards, tmp_path):
    """What a Prefect worker does on cancel: SIGTERM the flow process only. No rank may survive."""
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "cancel"
    cfg = _cfg(tiny_model_dir, shards, out, "train.max_steps=500", "train.save_steps=1000")
    out.mkdir()
    (out / "cfg.json").write_text(to_json(cfg))
    # the API of a running server, as a worker gives its flow processes: without one the flow process would
    # start a temporary server of its own, which a SIGTERM to the flow process leaves running
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": PREFECT_API_URL.value()}
    flow = subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, str(out / "cfg.json")], env=env,
                            stdout=open(tmp_path / "flow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        assert flow.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
        time.sleep(0.2)
    tree = process_tree(int((out / "train.pid").read_text()))
    ranks = [p for p in tree if "vlm_core.train" in " ".join(p.cmdline())]
    assert len(ranks) >= 3  # the torchrun launcher + 2 ranks (+ their DataLoader workers)
    flow.send_signal(signal.SIGTERM)
    flow.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == [], f"training processes survived the cancel: {[p.pid for p in alive]}"


@pytest.mark.integration
def test_train_flow_single_process_resume_and_trackers(prefect_server, tiny_model_dir, shards, tmp_path):
    """Plain python launcher without DeepSpeed: the full-weight resume path, TensorBoard and offline W&B."""
    from prefect.settings import PREFECT_API_URL

    from flows.train import train
    from helpers.flow_runs import flow_run_artifacts
    from helpers.wandb_offline import run_config

    def cfg(out, steps):
        return _cfg(tiny_model_dir, shards, out, "train.launcher=python", "train.nproc_per_node=1",
                    "train.deepspeed=none", f"train.max_steps={steps}", "train.save_steps=2",
                    "train.save_total_limit=null", "logging.report_to=[tensorboard, wandb]")

    unbroken = train(cfg(tmp_path / "a", 4))
    first = train(cfg(tmp_path / "b", 2))
    assert first["global_step"] == 2 and first["world_size"] == 1
    # more steps is another run (max_steps shapes the schedule): not continued in the old run's folder ...
    with pytest.raises(IdentityMismatch, match=r"train.max_steps\)"):
        train(cfg(tmp_path / "b", 4))
    # the same refusal on the command line: one line naming both runs and the changed setting
    (tmp_path / "b.yaml").write_text(to_yaml(cfg(tmp_path / "b", 2)))
    res = subprocess.run([Path(sys.executable).parent / "vlmft", "train", "--config", tmp_path / "b.yaml",
                          "train.learning_rate=1e-4"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith(f"vlmft: train.output_dir={tmp_path / 'b'} belongs to run "
                                                   f"{first['identity'][:12]}")
    assert "(different: train.learning_rate)" in last and "train.resume_from=PATH" in last
    # ... unless asked for: continue checkpoint-2 on purpose, recorded as the new run's parent
    ckpt = tmp_path / "b" / "checkpoint-2"
    state = train(cfg(tmp_path / "b", 4).model_copy(update={"train": cfg(tmp_path / "b", 4).train.model_copy(
        update={"resume_from": str(ckpt)})}), return_state=True)
    resumed = state.result()
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert resumed["parent"] == {"checkpoint": str(ckpt.resolve()), "identity": first["identity"]}
    assert resumed["identity"] != first["identity"] and resumed["run_id"] == f"t-{resumed['identity'][:8]}"
    for step in ("3", "4"):
        assert abs(resumed["losses"][step] - unbroken["losses"][step]) < 1e-5
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert arts["training-progress"].data == 100.0 and "steps: 4" in arts["training-summary"].data
    assert list((tmp_path / "b").rglob("events.out.tfevents.*"))  # TensorBoard
    runs = list((tmp_path / "b" / "wandb").glob("offline-run-*"))  # W&B, offline, no network
    assert len(runs) == 2  # the first run and the one that continued it
    for run in runs:  # the whole FinetuneConfig in the run config, next to the Trainer's own arguments
        config = run_config(run)
        assert config["data"]["max_dynamic_patch"] == 2 and config["train"]["loss_reduction"] == "square"
        assert config["lora"] == cfg(tmp_path / "b", 4).lora.model_dump(mode="json") and config["learning_rate"] == 3e-3


GENERATIVE = ("exact_match", "f1", "anls")


def _generative_scores(out: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of the eval records in metrics.jsonl that carry generative scores."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {m: r[f"eval_{m}"] for m in GENERATIVE} for r in rows if "eval_exact_match" in r}


@pytest.mark.integration
def test_generative_eval_during_training_is_logged_and_leaves_training_alone(tiny_model_dir, shards, tmp_path):
    """eval.during_training: exact match, F1 and ANLS at every evaluation (step 0 included) in metrics.jsonl
    and TensorBoard, and the training losses step for step those of the same run without it. A full fine-tune:
    its CPU runs repeat to the last bit, LoRA's do not (its losses differ from step 2 between identical runs).
    The model's mode, weights and random number state are checked directly in test_infer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def cfg(out: Path, *extra: str) -> FinetuneConfig:
        return _cfg(tiny_model_dir, shards, out, "train.launcher=python", "train.nproc_per_node=1",
                    "train.deepspeed=none", "train.max_steps=4", "train.eval_steps=2", "train.eval_on_start=true",
                    "train.save_steps=100", *extra)

    _launch(cfg(tmp_path / "plain"))
    _launch(cfg(tmp_path / "gen", "eval.during_training=true", "eval.max_samples=3", "eval.max_new_tokens=6",
                "eval.batch_size=2", "logging.report_to=[tensorboard]"))
    plain, gen = _summary(tmp_path / "plain"), _summary(tmp_path / "gen")
    assert gen["losses"] == plain["losses"] and len(gen["losses"]) == 4  # the same floats, step for step
    assert gen["eval_losses"] == plain["eval_losses"]
    scores = _generative_scores(tmp_path / "gen")
    assert sorted(scores) == [0, 2, 4]
    assert all(0.0 <= v <= 1.0 for s in scores.values() for v in s.values())
    assert _generative_scores(tmp_path / "plain") == {}
    [logdir] = {p.parent for p in (tmp_path / "gen").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    for m in GENERATIVE:
        assert {e.step: e.value for e in events.Scalars(f"eval/{m}")} == pytest.approx(
            {step: s[m] for step, s in scores.items()})
    assert all(e.value > 0 for e in events.Scalars("eval/generation_runtime"))


@pytest.mark.integration
def test_packing_trains_the_same_losses_as_unpacked_under_two_ranks_and_accumulation(tiny_model_dir, shards, tmp_path):
    """The Trainer path of train.packing: 2 ranks, ZeRO-2, 2 accumulation steps, batch 4 packed into rows; the
    logged loss of every step equals the unpacked run's (same samples per step, same per-sample weights)."""
    runs = {}
    for name, extra in (("plain", ()), ("packed", ("train.packing=true", "train.pack_max_tokens=1024"))):
        out = tmp_path / name
        _launch(_cfg(tiny_model_dir, shards, out, "train.max_steps=3", "train.per_device_batch_size=4",
                     "train.gradient_accumulation_steps=2", "train.eval_steps=100", "data.max_seq_length=1024",
                     "train.loss_reduction=square", *extra))
        runs[name] = _summary(out)
    assert runs["packed"]["global_step"] == runs["plain"]["global_step"] == 3
    for step in ("1", "2", "3"):
        assert runs["packed"]["losses"][step] == pytest.approx(runs["plain"]["losses"][step], abs=2e-4), step
    assert runs["packed"]["data"]["data/samples"] == runs["plain"]["data"]["data/samples"] == 3 * 2 * 2 * 4
