"""Config mistakes and pre-flight failures, as a user meets them: `vlmft ...` ends with exit code 2 and
one line that names the key or file and the fix, before anything is written or started.

One table, driven in-process through `vlmft.cli.main`. For every case: exit code 2; the last line of
stderr starts with "vlmft: " and holds the expected text; nothing appears in the working directory;
no run.json, train.log or shard anywhere; no process is started; no bucket is created.
Config cases fail while the config loads (no server needed); pre-flight cases run the real flows on
the session's Prefect test server, and S3 cases against the session's moto server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from helpers import data as D
from helpers.servers import free_port
from vlm_core.config import load_config
from vlmft.cli import main

TRAIN = ["name=t", "model.path={model}", "model.dtype=float32", "data.shards={shards}", "train.output_dir={out}",
         "train.deepspeed=none", "train.bf16=false", "train.launcher=python", "train.max_steps=1",
         "data.num_workers=0", "logging.report_to=[]"]
PREPARE = ["model.path={model}", "data.meta={meta}", "data.shards={tmp}/shards"]
RUN = [*TRAIN[:3], *PREPARE[1:], *TRAIN[4:]]
MERGE = ["model.path={model}", "lora.enabled=true", "train.output_dir={out}", "data.shards={tmp}/no-shards"]


class Case(NamedTuple):
    id: str
    argv: list[str]  # after `vlmft`; {tmp}, {model}, {shards}, {meta}, {out} are filled in
    needles: list[str]  # each must be in the last line of stderr
    setup: Callable[[Path], None] | None = None  # writes the bad input under tmp
    needs: tuple[str, ...] = ()  # "prefect" (a flow runs), "s3" (moto server)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return setup


def _model(config: bytes) -> Callable[[Path], None]:
    return _write("model/config.json", config)


def _read_only(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def _unreachable_endpoint(tmp: Path) -> None:
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # restored by the test


# root ignores file modes, so there the read-only folder is one no process may write in
RO = "{tmp}/ro/out" if os.geteuid() != 0 else "/sys/vlmft-test-out"

CONFIG_CASES = [
    # numbers: finite, and train.max_steps=0 does not mean "one step"
    Case("learning_rate_inf", ["train", "train.learning_rate=.inf"], ["train.learning_rate: must be a finite number (got inf)"]),
    Case("learning_rate_nan", ["train", "train.learning_rate=.nan"], ["train.learning_rate: must be a finite number"]),
    Case("max_grad_norm_inf", ["train", "train.max_grad_norm=.inf"], ["train.max_grad_norm: must be a finite number"]),
    Case("save_steps_inf", ["train", "train.save_steps=.inf"], ["train.save_steps:", "finite"]),
    Case("eval_fraction_nan", ["prepare", "data.eval_fraction=.nan"], ["data.eval_fraction: must be a finite number"]),
    Case("yaml_merge_tolerance_inf", ["merge", "--config", "{tmp}/c.yaml"], ["lora.merge_tolerance: must be a finite number"],
         _write("c.yaml", b"lora:\n  merge_tolerance: .inf\n")),
    Case("json_nan", ["config", "--config", "{tmp}/c.json"], ["train.num_epochs: must be a finite number"],
         _write("c.json", b'{"train": {"num_epochs": NaN}}')),
    Case("max_steps_0", ["train", "train.max_steps=0"], ["train.max_steps: must be at least 1, or -1"]),
    Case("max_steps_minus_2", ["train", "train.max_steps=-2"], ["train.max_steps: must be greater than or equal to -1"]),
    # folders: never empty (the working directory), output folders local
    Case("output_dir_empty", ["train", "train.output_dir="], ["train.output_dir: must not be empty", "set a path"]),
    Case("output_dir_blank", ["run", "--config", "{tmp}/c.yaml"], ["train.output_dir: must not be empty"],
         _write("c.yaml", b"train:\n  output_dir: '  '\n")),
    Case("output_dir_url", ["train", "train.output_dir=s3://b/runs"], ["train.output_dir: must be a local folder", "storage.url"]),
    Case("shards_empty", ["prepare", "data.shards="], ["data.shards: must not be empty"]),
    Case("model_path_empty", ["train", "model.path="], ["model.path: must not be empty"]),
    Case("cache_dir_url", ["train", "model.cache_dir=s3://b/cache"], ["model.cache_dir: must be a local folder"]),
    # the config file itself
    Case("yaml_latin1", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml is not UTF-8 text (byte 0xe9", "save it as UTF-8"],
         _write("c.yaml", "name: café\n".encode("latin-1"))),
    Case("yaml_utf16", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml is UTF-16 text; save it as UTF-8"],
         _write("c.yaml", "name: x\n".encode("utf-16"))),
    Case("yaml_utf16_no_bom", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml is UTF-16 text"],
         _write("c.yaml", "name: x\n".encode("utf-16-le"))),
    Case("yaml_list", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml: expected a mapping of config sections"],
         _write("c.yaml", b"- train\n- data\n")),
    Case("yaml_scalar", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml: expected a mapping"], _write("c.yaml", b"just text\n")),
    Case("yaml_syntax", ["train", "--config", "{tmp}/c.yaml"], ["{tmp}/c.yaml: not valid YAML", "at line 2, column 1"],
         _write("c.yaml", b"train: [unclosed\n")),
    Case("yaml_duplicate_key", ["train", "--config", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml: not valid YAML", "key 'learning_rate' is given twice (lines 2 and 3); keep one"],
         _write("c.yaml", b"train:\n  learning_rate: 1.0e-4\n  learning_rate: 2.0e-4\n")),
    Case("yaml_section_not_mapping", ["train", "--config", "{tmp}/c.yaml"], ["train: must be a valid dictionary", "(got 5)"],
         _write("c.yaml", b"train: 5\n")),
    Case("yaml_unknown_key", ["train", "--config", "{tmp}/c.yaml"], ["train.lerning_rate: unknown key; did you mean 'train.learning_rate'?"],
         _write("c.yaml", b"train:\n  lerning_rate: 0.1\n")),
    Case("config_missing", ["train", "--config", "{tmp}/nope.yaml"], ["config file {tmp}/nope.yaml does not exist"]),
    Case("config_is_folder", ["train", "--config", "{tmp}"], ["config file {tmp} is a folder"]),
    # overrides
    Case("override_unknown_key", ["train", "train.lerning_rate=1"], ["unknown key train.lerning_rate; did you mean 'train.learning_rate'?"]),
    Case("override_no_value", ["train", "train.max_steps"], ["expected key.path=value"]),
    Case("override_not_a_section", ["train", "train.max_steps.x=1"], ["train.max_steps is a setting, not a section; use train.max_steps=VALUE"]),
    Case("override_bad_yaml", ["train", "train.learning_rate=["], ["the value is not valid YAML", "line 1, column 2"]),
    Case("bad_choice", ["train", "train.deepspeed=zero9"], ["train.deepspeed: must be one of 'none', 'zero1'", "(got 'zero9')"]),
    Case("two_errors_one_line", ["train", "model.dtype=fp8", "data.max_dynamic_patch=0"],
         ["data.max_dynamic_patch: must be greater than or equal to 1 (got 0); model.dtype: must be one of"]),
    # cross-field rules
    Case("tiles", ["train", "data.min_dynamic_patch=8", "data.max_dynamic_patch=4"], ["data.min_dynamic_patch (8) must not exceed"]),
    Case("node_rank", ["train", "train.nnodes=2", "train.node_rank=2"], ["train.node_rank (2) must be below train.nnodes (2)"]),
    Case("unfreeze", ["train", "model.freeze_vision=false", "model.unfreeze_vision_layers=1"], ["model.unfreeze_vision_layers only applies"]),
    Case("lora_no_target", ["train", "lora.enabled=true", "lora.llm=false"], ["neither lora.llm nor lora.vision"]),
    Case("name_pattern", ["train", "name=my run"], ["name: String should match pattern"]),
]

NOT_INTERNVL = json.dumps({"model_type": "llama"}).encode()
PREFLIGHT_CASES = [
    # launch settings (check_run), before the train task takes the folder
    Case("global_batch", ["train", *TRAIN, "train.global_batch_size=3", "train.per_device_batch_size=2"],
         ["train.global_batch_size=3 is not divisible by", "pick a multiple of 2"], needs=("prefect",)),
    Case("bf16_deepspeed_cpu", ["train", *TRAIN, "train.bf16=true", "train.deepspeed=zero2"],
         ["train.bf16=true with DeepSpeed needs a GPU"], needs=("prefect",)),
    Case("zero3_offload_cpu", ["train", *TRAIN, "train.deepspeed=zero3_offload"],
         ["train.deepspeed=zero3_offload", "use train.deepspeed=zero3"], needs=("prefect",)),
    Case("python_launcher_two_ranks", ["train", *TRAIN, "train.nproc_per_node=2"],
         ["train.launcher=python starts one process"], needs=("prefect",)),
    Case("no_shards", ["train", *TRAIN, "data.shards={tmp}/nothing"],
         ["data.shards={tmp}/nothing: no manifest.json", "vlmft prepare"], needs=("prefect",)),
    Case("run_global_batch_before_prepare", ["run", *RUN, "train.global_batch_size=3", "train.per_device_batch_size=2"],
         ["train.global_batch_size=3 is not divisible by"], needs=("prefect",)),
    # a setting transformers' processor cannot reproduce in the published model: refused before training
    Case("run_without_thumbnail", ["run", *RUN, "data.use_thumbnail=false"],
         ["data.use_thumbnail=false cannot be published", "data.max_dynamic_patch=1"], needs=("prefect",)),
    Case("merge_without_thumbnail", ["merge", *MERGE, "data.use_thumbnail=false"],
         ["data.use_thumbnail=false cannot be published"], needs=("prefect",)),
    # the model folder
    Case("model_not_internvl", ["train", *TRAIN, "model.path={tmp}/model"], ["model.path={tmp}/model", "model_type 'llama', not 'internvl'"],
         _model(NOT_INTERNVL), ("prefect",)),
    Case("prepare_model_not_internvl", ["prepare", *PREPARE, "model.path={tmp}/model"], ["model_type 'llama', not 'internvl'"],
         _model(NOT_INTERNVL), ("prefect",)),
    Case("run_model_not_internvl", ["run", *RUN, "model.path={tmp}/model"], ["model_type 'llama', not 'internvl'"],
         _model(NOT_INTERNVL), ("prefect",)),
    Case("merge_model_not_internvl", ["merge", *MERGE, "model.path={tmp}/model"], ["model_type 'llama', not 'internvl'"],
         _model(NOT_INTERNVL), ("prefect",)),
    Case("model_internvl_chat", ["train", *TRAIN, "model.path={tmp}/model"], ["original InternVL format", "-hf"],
         _model(json.dumps({"model_type": "internvl_chat"}).encode()), ("prefect",)),
    Case("model_config_not_json", ["train", *TRAIN, "model.path={tmp}/model"], ["model.path={tmp}/model: config.json is not valid JSON"],
         _model(b"{not json"), ("prefect",)),
    Case("model_config_not_object", ["train", *TRAIN, "model.path={tmp}/model"], ["config.json holds a list, not an object"],
         _model(b"[1, 2]"), ("prefect",)),
    Case("model_missing", ["train", *TRAIN, "model.path={tmp}/nomodel"], ["model.path={tmp}/nomodel: folder does not exist",
                                                                          "model.build_tiny_if_missing=true"], needs=("prefect",)),
    Case("model_is_file", ["train", *TRAIN, "model.path={tmp}/model.bin"], ["model.path={tmp}/model.bin is a file"],
         _write("model.bin", b"x"), ("prefect",)),
    Case("model_url_missing_bucket", ["train", *TRAIN, "model.path=s3://missing-bucket/model"], ["model.path=s3://missing-bucket/model: "
                                                                                             "no config.json at that URL"],
         needs=("prefect", "s3")),
    # the output folder
    Case("output_dir_is_file", ["train", *TRAIN, "train.output_dir={tmp}/out.txt"], ["train.output_dir={tmp}/out.txt is a file, not a folder"],
         _write("out.txt", b"x"), ("prefect",)),
    Case("output_dir_under_file", ["train", *TRAIN, "train.output_dir={tmp}/out.txt/run"],
         ["train.output_dir={tmp}/out.txt/run: {tmp}/out.txt is a file"], _write("out.txt", b"x"), ("prefect",)),
    Case("output_dir_read_only", ["train", *TRAIN, f"train.output_dir={RO}"], [f"train.output_dir={RO}: cannot write in",
                                                                              "point train.output_dir at a folder you can write to"],
         _read_only, ("prefect",)),
    Case("run_output_dir_is_file", ["run", *RUN, "train.output_dir={tmp}/out.txt"], ["train.output_dir={tmp}/out.txt is a file"],
         _write("out.txt", b"x"), ("prefect",)),
    Case("shards_dir_is_file", ["prepare", *PREPARE, "data.shards={tmp}/shards.tar"], ["data.shards={tmp}/shards.tar is a file"],
         _write("shards.tar", b"x"), ("prefect",)),
    # URL schemes
    Case("storage_unknown_scheme", ["train", *TRAIN, "storage.url=foo://bucket/runs"],
         ["storage.url=foo://bucket/runs: unknown URL scheme 'foo://'", "s3://bucket/prefix"], needs=("prefect",)),
    Case("shards_unknown_scheme", ["prepare", *PREPARE, "data.shards=foo://x/shards"], ["data.shards=foo://x/shards: unknown URL scheme 'foo://'"],
         needs=("prefect",)),
    Case("meta_unknown_scheme", ["prepare", *PREPARE, "data.meta=foo://x/meta.json"], ["data.meta=foo://x/meta.json: unknown URL scheme"],
         needs=("prefect",)),
    Case("model_unknown_scheme", ["train", *TRAIN, "model.path=foo://m"], ["model.path=foo://m: unknown URL scheme 'foo://'"], needs=("prefect",)),
    Case("resume_unknown_scheme", ["train", *TRAIN, "train.resume_from=foo://ckpt"], ["train.resume_from=foo://ckpt: unknown URL scheme"],
         needs=("prefect",)),
    Case("storage_scheme_not_installed", ["train", *TRAIN, "storage.url=gs://bucket/runs"],
         ["storage.url=gs://bucket/runs: the gs:// scheme needs a package that is not installed"], needs=("prefect",)),
    Case("merge_storage_unknown_scheme", ["merge", *MERGE, "storage.url=foo://b"], ["storage.url=foo://b: unknown URL scheme"],
         needs=("prefect",)),
    # storage and buckets: checked before any work, never created
    Case("storage_missing_bucket", ["train", *TRAIN, "storage.url=s3://missing-bucket/runs"],
         ["storage.url=s3://missing-bucket/runs: bucket 'missing-bucket' does not exist", "create it first or fix storage.url"],
         needs=("prefect", "s3")),
    Case("run_storage_missing_bucket", ["run", *RUN, "storage.url=s3://missing-bucket/runs"],
         ["bucket 'missing-bucket' does not exist"], needs=("prefect", "s3")),
    Case("merge_storage_missing_bucket", ["merge", *MERGE, "storage.url=s3://missing-bucket"],
         ["bucket 'missing-bucket' does not exist"], needs=("prefect", "s3")),
    Case("shards_missing_bucket", ["prepare", *PREPARE, "data.shards=s3://missing-bucket/shards"],
         ["data.shards=s3://missing-bucket/shards: bucket 'missing-bucket' does not exist, and it is never created implicitly",
          "fix data.shards"], needs=("prefect", "s3")),
    Case("train_shards_missing_bucket", ["train", *TRAIN, "data.shards=s3://missing-bucket/shards"],
         ["bucket 'missing-bucket' does not exist"], needs=("prefect", "s3")),
    Case("meta_missing_bucket", ["prepare", *PREPARE, "data.meta=s3://missing-bucket/meta.json"],
         ["data.meta=s3://missing-bucket/meta.json: bucket 'missing-bucket' does not exist"], needs=("prefect", "s3")),
    Case("storage_url_without_bucket", ["train", *TRAIN, "storage.url=s3://"], ["storage.url=s3://: the URL names no bucket"],
         needs=("prefect",)),
    Case("storage_unreachable", ["train", *TRAIN, "storage.url=s3://some-bucket/runs"],
         ["storage.url: checking the bucket of s3://some-bucket/runs failed", "cannot be reached; check AWS_ENDPOINT_URL"], _unreachable_endpoint,
         ("prefect", "s3")),
    Case("storage_local_is_file", ["train", *TRAIN, "storage.url={tmp}/store.txt"], ["storage.url={tmp}/store.txt is a file"],
         _write("store.txt", b"x"), ("prefect",)),
]

CASES = [pytest.param(c, id=c.id) for c in CONFIG_CASES] + [
    pytest.param(c, id=c.id, marks=pytest.mark.integration) for c in PREFLIGHT_CASES]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meta")
    D.write_jsonl(root / "d" / "ann.jsonl", D.good_records(root / "d" / "images", 4))
    return D.make_meta(root, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})


def _buckets() -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return set(fs.ls(""))


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_before_any_work(case: Case, request, tmp_path, monkeypatch, console):
    import s3fs

    for need in case.needs:
        request.getfixturevalue({"prefect": "prefect_server", "s3": "s3_server"}[need])
    places = {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    for name, fixture in [("model", "tiny_model_dir"), ("meta", "meta")]:
        if any("{" + name + "}" in a for a in case.argv):
            places[name] = str(request.getfixturevalue(fixture))
    if any("{shards}" in a for a in case.argv):
        places["shards"] = str(request.getfixturevalue("demo_data")["shards"])
    buckets = set()
    if "s3" in case.needs:
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_server"))  # restored after the test
        buckets = _buckets()
    if case.setup:
        case.setup(tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()  # a setup may have changed the endpoint
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    console.bind()
    capfd = console
    capfd.readouterr()

    code = main([a.format(**places) for a in case.argv])

    out, err = capfd.readouterr()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2, err[-3000:]
    assert last.startswith("vlmft: "), err[-3000:]
    for needle in case.needles:
        assert needle.format(**places) in last
    if not case.needs:  # the config fails before any flow: nothing else is printed
        assert "Traceback" not in out + err and err.strip() == last
    assert "Traceback" not in out + err
    assert list(work.iterdir()) == []  # nothing written to the working directory
    written = {p.name for p in tmp_path.rglob("*")}
    assert not written & {"run.json", "train.log", "manifest.json", "run_identity.json", ".vlmft.lock"}
    assert not (tmp_path / "shards").exists() and not (tmp_path / "out").exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children  # no process started
    if "s3" in case.needs:
        s3fs.S3FileSystem.clear_instance_cache()
        os.environ["AWS_ENDPOINT_URL"] = request.getfixturevalue("s3_server")
        assert _buckets() == buckets  # no bucket created
    if os.path.isdir(tmp_path / "ro"):
        (tmp_path / "ro").chmod(0o755)  # let pytest clean up


def test_a_utf8_config_with_byte_order_mark_loads(tmp_path):
    (tmp_path / "c.yaml").write_bytes("\ufeffname: bom\ntrain:\n  max_steps: 3\n".encode())
    assert load_config(tmp_path / "c.yaml").train.max_steps == 3


@pytest.mark.integration
@pytest.mark.parametrize("step", ["prepare", "train", "run", "merge"])
def test_good_settings_pass_preflight_and_leave_no_trace(step, s3_server, tiny_model_dir, demo_data, meta, tmp_path,
                                                         monkeypatch):
    """The table's base settings pass, so each case fails for its one mistake; the probes leave nothing."""
    import s3fs

    from vlm_core.preflight import preflight

    fs = s3fs.S3FileSystem()
    if not fs.exists("preflight-ok"):
        fs.mkdir("preflight-ok")
    monkeypatch.chdir(tmp_path)
    places = {"tmp": str(tmp_path), "out": str(tmp_path / "out"), "model": str(tiny_model_dir), "meta": str(meta),
              "shards": str(demo_data["shards"])}
    base = {"prepare": PREPARE, "train": TRAIN, "run": RUN, "merge": MERGE}[step]
    for storage in ["storage.url=s3://preflight-ok/runs", "storage.url={tmp}/store"]:
        preflight(load_config(None, [a.format(**places) for a in [*base, storage]]), step)
    fs.invalidate_cache()
    assert fs.find("preflight-ok") == [] and list(tmp_path.iterdir()) == []
