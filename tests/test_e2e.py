"""End to end against a real `prefect server start`, a real process worker and a real S3 server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import s3fs

from deployments.deploy import deploy_all, start_worker
from deployments.serve import start_server, stop, wait_healthy
from helpers.flow_runs import flow_run_artifacts, flow_run_log_records
from helpers.servers import free_port
from tasks.process import process_tree
from vlm_core.config import FinetuneConfig, load_config
from vlm_core.demo import write_demo_data
from vlm_core.storage import is_complete, list_complete

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration  # a Prefect server and worker, moto_server, training processes


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, s3_server):
    """A real Prefect API server (SQLite) and a process worker on pool `e2e`, stopped by PID."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    server = start_server(root / "home", port, root / "server.log")
    api = f"http://127.0.0.1:{port}/api"
    saved = os.environ.get("PREFECT_API_URL")
    worker = None
    try:
        wait_healthy(api, server)
        os.environ["PREFECT_API_URL"] = api  # the worker and the flow runs it starts
        os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "1"
        with temporary_settings({PREFECT_API_URL: api}):
            from deployments.deploy import ensure_pool

            ensure_pool("e2e")
            worker = start_worker("e2e", root / "worker.log")
            yield api
    finally:
        if worker:
            stop(worker, second_sigint_after=2)
        stop(server)
        os.environ.pop("PREFECT_WORKER_QUERY_SECONDS", None)
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir, s3_server) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    meta = write_demo_data(root / "data", n=36)
    fs = s3fs.S3FileSystem()
    if not fs.exists("e2e-bucket"):
        fs.mkdir("e2e-bucket")
    return {"root": root, "meta": meta, "model": tiny_model_dir}


def _cfg(demo: dict, name: str, *extra: str) -> FinetuneConfig:
    r = demo["root"]
    return load_config(None, [
        f"name={name}", f"data.meta={demo['meta']}", f"data.shards={r / name / 'shards'}", "data.eval_count=4",
        "data.max_dynamic_patch=2", "data.num_workers=0", f"model.path={demo['model']}", "model.dtype=float32",
        "lora.enabled=true", "lora.r=4", f"train.output_dir={r / name / 'train'}", "train.max_steps=4",
        "train.per_device_batch_size=2", "train.learning_rate=2e-3", "train.bf16=false", "train.save_steps=2",
        "train.eval_steps=2", "train.logging_steps=1", "train.launcher=python", "train.deepspeed=none",
        "storage.url=s3://e2e-bucket", "logging.report_to=[]", *extra])


def _call(method: str, url: str, **kw) -> httpx.Response:
    """A REST call that retries the 503s a SQLite-backed Prefect server answers under load."""
    for attempt in range(20):
        r = httpx.request(method, url, timeout=30, **kw)
        if r.status_code != 503:
            return r
        time.sleep(0.5 * (attempt + 1))
    return r


def _wait(api: str, run_id: str, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = _call("GET", f"{api}/flow_runs/{run_id}").json()
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def _trigger(api: str, dep_id: str, cfg: FinetuneConfig) -> str:
    """The REST call the UI's Run button makes."""
    r = _call("POST", f"{api}/deployments/{dep_id}/create_flow_run",
              json={"parameters": {"cfg": cfg.model_dump(mode="json")}, "state": {"type": "SCHEDULED"}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run_summaries(output_dir: str) -> dict[str, dict]:
    """{run id: run_summary.json} of the finished runs under a train.output_dir with train.run_subdir on."""
    found = [json.loads(p.read_text()) for p in Path(output_dir).glob("*/run_summary.json")]
    return {s["run_id"]: s for s in found}


STEP_LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) \| [\d.e+-]+ samples/s \| [\d,]+ tokens/s \| loss (.+) \| ETA \d+:\d\d:\d\d$")


def test_quick_run_of_the_deployed_demo_on_a_fresh_server(prefect_api, tmp_path):
    """`make serve` + `make deploy`, then the UI's "Quick run": the run starts with the deployment's own
    parameters (deployments/finetune.yaml, only its folders moved out of the repository), writes the demo
    data it needs, trains and reports; its log is never quiet for long and shows progress. Its rendezvous
    port is held by another process (as by a second run on the same worker): the run moves to a free one."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = load_config(ROOT / "deployments" / "finetune.yaml", [
        f"data.meta={tmp_path / 'data' / 'meta.json'}", f"data.shards={tmp_path / 'shards'}",
        f"model.path={tmp_path / 'tiny-internvl'}", f"train.output_dir={tmp_path / 'train'}",
        f"storage.url={tmp_path / 'storage'}", f"train.master_port={busy.getsockname()[1]}"])
    ids = deploy_all(cfg, pool="e2e")
    dep = _call("GET", f"{prefect_api}/deployments/{ids['finetune']}").json()
    assert "cfg" not in (dep["parameter_openapi_schema"].get("required") or [])  # else the UI opens the form
    r = _call("POST", f"{prefect_api}/deployments/{ids['finetune']}/create_flow_run",  # what Quick run sends
              json={"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}})
    assert r.status_code == 201, r.text
    run = r.json()["id"]
    fr = _wait(prefect_api, run, timeout=900)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    assert (tmp_path / "data" / "meta.json").is_file()  # written by the run (data.write_demo_if_missing)

    arts = flow_run_artifacts(run)
    metrics = {r["metric"]: r["value"] for r in json.loads(arts["final-metrics"].data)}
    assert metrics["steps"] == cfg.train.max_steps and metrics["ranks"] == cfg.train.nproc_per_node
    [summary] = [json.loads(p.read_text()) for p in (tmp_path / "train").glob("*/run_summary.json")]
    last = summary["losses"][str(max(map(int, summary["losses"])))]
    assert metrics["last logged train loss"] == float(f"{last:.4g}") != last  # 4 significant digits, not 16
    assert metrics["mean train loss over the run"] == float(f"{summary['train_loss']:.4g}")
    assert all(v == float(f"{v:.4g}") for v in metrics.values() if isinstance(v, float))
    assert arts["training-progress"].data == 100.0

    # the training task's log, from launch to the end: never quiet for more than 15 s
    logs = flow_run_log_records(run)
    task = next(log.task_run_id for log in logs if log.message.startswith("launching: "))
    train = [log for log in logs if log.task_run_id == task]
    begin = next(i for i, log in enumerate(train) if log.message.startswith("launching: "))
    times = [log.timestamp.timestamp() for log in train[begin:]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= 15, [(str(log.timestamp), log.message) for log in train]
    messages = [log.message for log in train]
    assert any(m.startswith("loading the model from") for m in messages)
    port = busy.getsockname()[1]
    assert any(m.startswith(f"train.master_port={port} is in use on this machine") for m in messages), messages[:20]
    busy.close()
    progress = [m for m in messages if STEP_LINE.match(m)]
    assert STEP_LINE.match(progress[0]).group(1) == "1" and progress[-1].startswith(f"step {cfg.train.max_steps}/")

    # the demo visibly learns: held-out colour and shape questions answered right far above chance (25 %
    # and 33 %; training on images shuffled across samples reaches about that), the random base answers none
    table = {row["dataset"]: row for row in json.loads(arts["eval-demo"].data)}
    for kind in ("colour", "shape"):
        assert table[kind]["count"] >= 12 and table[kind]["tuned EM"] >= 0.9 and table[kind]["base EM"] <= 0.1, table
    assert "Promoted" in arts["promotion-demo"].data

    # the published folder answers a held-out colour question with plain transformers, no project code
    from vlm_core.infer import questions_from_shards

    question = next(q for q in questions_from_shards(cfg.data.shards, None) if q.dataset == "colour")
    (tmp_path / "q.png").write_bytes(question.images[0])
    [merged] = (tmp_path / "storage" / "runs").glob("*/merged")
    code = (
        "import sys\nfrom PIL import Image\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(merged)!r})\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(merged)!r})\n"
        "messages = [{'role': 'user', 'content': [{'type': 'image', 'image': Image.open('q.png').convert('RGB')},\n"
        f"                                      {{'type': 'text', 'text': {question.prompt.replace('<image>', '').strip()!r}}}]}}]\n"
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,\n"
        "                                       return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)\n"
        "print('ANSWER', processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip())\n"
        "print('PROJECT', sorted(m for m in sys.modules if m.split('.')[0] in ('vlm_core', 'tasks', 'flows', 'vlmft')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("ANSWER ", "PROJECT ")))
    assert printed["PROJECT"] == "[]" and printed["ANSWER"] == question.reference, (printed, question.reference)


def test_ui_triggered_deployment_runs_the_whole_pipeline(prefect_api, demo):
    cfg = _cfg(demo, "ui-run", "train.run_subdir=true")  # as deployments/finetune.yaml has it
    ids = deploy_all(cfg, pool="e2e")
    dep = _call("GET", f"{prefect_api}/deployments/{ids['finetune']}").json()
    props = dep["parameter_openapi_schema"]["definitions"]["TrainConfig"]["properties"]
    assert props["deepspeed"]["enum"] == ["none", "zero1", "zero2", "zero3", "zero3_offload"]
    assert "Peak learning rate" in props["learning_rate"]["description"]
    run = _trigger(prefect_api, ids["finetune"], cfg)
    fr = _wait(prefect_api, run)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    # every output exists: shards + manifest locally, checkpoints and the merged model in storage
    assert (Path(cfg.data.shards) / "manifest.json").is_file()
    [run_id] = _run_summaries(cfg.train.output_dir)
    assert run_id.startswith("ui-run-")
    assert list_complete(f"s3://e2e-bucket/runs/{run_id}", "checkpoint-") == ["checkpoint-2", "checkpoint-4"]
    assert is_complete(f"s3://e2e-bucket/runs/{run_id}/merged")
    arts = flow_run_artifacts(run)
    assert {"loss-curve", "final-metrics", "run-outputs", "eval-ui-run", "eval-examples-ui-run"} <= set(arts)
    compared = {r["dataset"]: r for r in json.loads(arts["eval-ui-run"].data)}  # base vs tuned, on the held-out 4
    kinds = {"colour", "shape", "same_colour", "text"}  # the demo's data sets, one per question type
    assert "overall" in compared and set(compared) - {"overall"} <= kinds and compared["overall"]["count"] == 4
    assert sum(row["count"] for name, row in compared.items() if name != "overall") == 4
    assert "data:image/png;base64," in arts["eval-examples-ui-run"].data
    metrics = {r["metric"]: r["value"] for r in json.loads(arts["final-metrics"].data)}
    assert metrics["steps"] == 4 and metrics["train samples"] == 32
    assert f"s3://e2e-bucket/runs/{run_id}/merged" in arts["run-outputs"].data

    # one field changed in the form: a new run in a folder of its own that trains from step 0, never the old
    # run's checkpoints under the new settings
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-3})})
    assert _wait(prefect_api, _trigger(prefect_api, ids["finetune"], changed))["state"]["type"] == "COMPLETED"
    runs = _run_summaries(cfg.train.output_dir)
    [new_id] = set(runs) - {run_id}
    assert runs[new_id]["global_step"] == 4 and runs[new_id]["resumed_from"] is None
    assert runs[new_id]["losses"] != runs[run_id]["losses"]
    assert list_complete(f"s3://e2e-bucket/runs/{new_id}", "checkpoint-") == ["checkpoint-2", "checkpoint-4"]
    assert is_complete(f"s3://e2e-bucket/runs/{new_id}/merged")

    bad = _call("POST", f"{prefect_api}/deployments/{ids['finetune']}/create_flow_run",
                json={"parameters": {"cfg": {**cfg.model_dump(mode="json"), "train": {"deepspeed": "zero9"}}}})
    assert bad.status_code == 409 and "deepspeed" in bad.text


def test_cancelling_a_training_run_leaves_no_process(prefect_api, demo):
    cfg = _cfg(demo, "cancel", "train.max_steps=5000", "train.save_steps=10000", "train.eval_steps=10000")
    ids = deploy_all(cfg, pool="e2e")
    run = _trigger(prefect_api, ids["finetune"], cfg)
    pid_file = Path(cfg.train.output_dir) / "train.pid"
    deadline = time.time() + 300
    while time.time() < deadline and not (Path(cfg.train.output_dir) / "metrics.jsonl").exists():
        assert _call("GET", f"{prefect_api}/flow_runs/{run}").json()["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING")
        time.sleep(0.5)
    tree = process_tree(int(pid_file.read_text()))
    assert any("vlm_core.train" in " ".join(p.cmdline()) for p in tree)
    _call("POST", f"{prefect_api}/flow_runs/{run}/set_state",
          json={"state": {"type": "CANCELLING"}, "force": True}).raise_for_status()
    assert _wait(prefect_api, run, 120)["state"]["type"] == "CANCELLED"
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], f"training processes survived: {[p.pid for p in alive]}"


def test_scheduled_retrain_trains_only_when_data_changed(prefect_api, demo):
    from vlm_core.demo import write_demo_data

    data = demo["root"] / "retrain-data"
    meta = write_demo_data(data, n=24)
    cfg = _cfg(demo, "nightly", f"data.meta={meta}", "train.max_steps=2", "lora.enabled=false")
    ids = deploy_all(cfg, pool="e2e", cron="30 2 * * *")
    dep = _call("GET", f"{prefect_api}/deployments/{ids['retrain-nightly']}").json()
    assert dep["schedules"][0]["schedule"]["cron"] == "30 2 * * *" and dep["schedules"][0]["active"]

    decisions = []
    for change in (None, None, "data", "setting"):
        if change == "data":
            with open(data / "text.jsonl", "a") as f:
                f.write(json.dumps({"id": "new", "conversations": [{"from": "human", "value": "Say red."},
                                                                   {"from": "gpt", "value": "red"}]}) + "\n")
        if change == "setting":  # same data, another learning rate: a different run, so it retrains
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-3})})
        run = _trigger(prefect_api, ids["retrain-nightly"], cfg)
        assert _wait(prefect_api, run)["state"]["type"] == "COMPLETED"
        decisions.append(flow_run_artifacts(run)["retrain-decision"].data)
    assert decisions[0].startswith("# Retraining") and decisions[1].startswith("# Nothing to retrain")
    assert decisions[2].startswith("# Retraining") and "data (shard fingerprint)" in decisions[2]
    assert decisions[3].startswith("# Retraining") and "changed: train.learning_rate)" in decisions[3]
    assert len(_run_summaries(cfg.train.output_dir)) == 3  # one run folder per run identity


def test_failed_after_training_then_retried_does_not_train_again(prefect_server, demo):
    from flows.finetune import finetune

    s3fs.S3FileSystem().mkdir("retry-bucket")
    # a merge tolerance no real merge meets: the run fails after training, at the verification of the merge
    cfg = _cfg(demo, "retry", "storage.url=s3://retry-bucket", "lora.merge_tolerance=1e-30")
    state = finetune(cfg, return_state=True)
    assert state.type.value == "FAILED" and "tolerance 1e-30" in str(state.message)
    summary = Path(cfg.train.output_dir) / "run_summary.json"
    first = summary.read_text()
    # the retry, with the tolerance fixed: a merge-only setting, so the same run identity and no new training
    out = finetune(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"merge_tolerance": None})}))
    assert summary.read_text() == first
    launches = [x for x in (Path(cfg.train.output_dir) / "train.log").read_text().splitlines() if x.startswith("$ ")]
    assert len(launches) == 1  # training ran once
    run_id = json.loads(first)["run_id"]
    assert list_complete(f"s3://retry-bucket/runs/{run_id}", "checkpoint-") == ["checkpoint-2", "checkpoint-4"]
    assert out["merged"]["uploaded_to"] == f"s3://retry-bucket/runs/{run_id}/merged"
    for model in ("base", "tuned"):  # both answered the 4 held-out questions, scored per data set
        held_out = out["eval"][model]["datasets"]
        assert set(held_out) <= {"colour", "shape", "same_colour", "text"} and out["eval"][model]["overall"]["count"] == 4
        assert sum(d["count"] for d in held_out.values()) == 4


def test_only_a_better_model_becomes_current(prefect_server, demo):
    """Promotion against a real S3 server: the first evaluated model becomes current; a model trained
    with a learning rate too small to learn anything is published with its card but leaves the pointer
    byte for byte as it was, because the current model, re-evaluated in the same run, answers better."""
    from flows.finetune import finetune
    from vlm_core.promote import pointer_url

    fs = s3fs.S3FileSystem()
    fs.mkdir("promote-bucket")
    meta = write_demo_data(demo["root"] / "promo-data", n=120)
    learns = _cfg(demo, "promo", f"data.meta={meta}", "data.eval_count=16", "storage.url=s3://promote-bucket",
                  "lora.enabled=false", "train.max_steps=60", "train.per_device_batch_size=4", "train.save_steps=60",
                  "train.eval_steps=60", "train.learning_rate=1e-3", "train.run_subdir=true", "eval.examples=0")
    first = finetune(learns)
    assert first["promotion"]["promoted"], first["promotion"]
    tuned, base = first["eval"]["tuned"]["overall"], first["eval"]["base"]["overall"]
    assert tuned["exact_match"] > base["exact_match"]  # it learned something the random base cannot answer
    pointer = pointer_url("s3://promote-bucket", "promo")
    doc = json.loads(fs.cat(pointer))
    assert doc["model"] == first["merged"]["uploaded_to"] and doc["metric"]["value"] == tuned["exact_match"]
    card = fs.cat(f"{doc['model']}/README.md").decode()
    assert card.startswith("---\n") and "model-index" in card
    lineage = json.loads(fs.cat(f"{doc['model']}/lineage.json"))
    assert lineage["metrics"]["overall"] == tuned and lineage["identity"] == doc["identity"]
    before = fs.cat(pointer)

    stuck = learns.model_copy(update={"train": learns.train.model_copy(update={"learning_rate": 1e-9})})
    second = finetune(stuck)
    assert not second["promotion"]["promoted"]
    assert second["eval"]["tuned"]["overall"]["exact_match"] < second["eval"]["current"]["overall"]["exact_match"]
    assert second["eval"]["current"]["overall"] == tuned  # the current model, answered again: the same answers
    assert fs.cat(pointer) == before  # the pointer did not move
    kept = second["merged"]["uploaded_to"]
    assert kept != doc["model"] and is_complete(kept) and fs.exists(f"{kept}/lineage.json")
    assert "the current model stays" in second["promotion"]["reason"]
