"""Shard preparation on real files: round trip, determinism, no-op reruns, every bad input, S3, crashes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from helpers import data as D
from vlm_core.config import ConfigError, DataConfig
from vlm_core.data.manifest import read_manifest
from vlm_core.data.shards import PrepareError, plan_shards, prepare_shards


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def good_data(tmp_path) -> Path:
    D.write_jsonl(tmp_path / "a" / "ann.jsonl", D.good_records(tmp_path / "a" / "images", 30, "a"))
    llava = D.good_records(tmp_path / "b" / "imgs", 12, "b")
    (tmp_path / "b" / "list.json").write_text(json.dumps(llava))
    return D.make_meta(tmp_path, {
        "alpha": {"root": "a/images", "annotation": "a/ann.jsonl", "repeat_time": 2, "max_dynamic_patch": 4},
        "beta": {"root": "b/imgs", "annotation": "b/list.json", "repeat_time": 0.5},
    })


def _cfg(meta: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"meta": str(meta), "shards": str(out), "samples_per_shard": 8, "eval_fraction": 0.1, **kw})


def _read_all(folder: Path, split: str = "train") -> list[dict]:
    """Read shards with plain webdataset, no project code."""
    urls = [str(folder / s["name"]) for s in json.loads((folder / "manifest.json").read_text())[split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_round_trip_with_plain_webdataset(good_data, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare_shards(_cfg(good_data, out), workers=2)
    samples = _read_all(out) + _read_all(out, "eval")
    # alpha: 30 lines x 2 repeats (eval lines once); beta: first 6 of 12 records
    a, b = manifest.datasets["alpha"], manifest.datasets["beta"]
    assert (a.lines, a.selected, b.lines, b.selected) == (30, 30, 12, 6)
    assert a.train + a.eval + b.train + b.eval == len(samples) == manifest.train.samples + manifest.eval.samples
    assert a.train == 2 * (30 - a.eval) and b.train == 6 - b.eval and a.eval + b.eval >= 1
    originals = {}
    for line in (tmp_path / "a" / "ann.jsonl").read_text().splitlines():
        r = json.loads(line)
        originals[("alpha", r["id"])] = (r, tmp_path / "a" / "images")
    for r in json.loads((tmp_path / "b" / "list.json").read_text()):
        originals[("list", r["id"])] = (r, tmp_path / "b" / "imgs")
    seen = set()
    for s in samples:
        rec = json.loads(s["json"])
        assert "." not in s["__key__"]
        ds = "alpha" if rec["source"]["dataset"] == "alpha" else "list"
        orig, root = originals[(ds, rec["id"])]
        images = [orig["image"]] if isinstance(orig.get("image"), str) else orig.get("image", [])
        assert [im["path"] for im in rec["images"]] == images
        for i, (ref, path) in enumerate(zip(rec["images"], images, strict=True)):
            assert ref["member"] == f"img{i}.jpg"
            assert s[f"img{i}.jpg"] == (root / path).read_bytes()  # original bytes kept
        turns = [dict(t) for t in orig["conversations"]]
        if len(images) == 1 and "<image>" not in "".join(t["value"] for t in turns):
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        assert rec["conversations"] == turns
        seen.add((ds, rec["id"], s["__key__"]))
    assert len(seen) == len(samples)


def test_same_inputs_same_bytes_and_rerun_is_a_noop(good_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare_shards(_cfg(good_data, one), workers=1)
    m2 = prepare_shards(_cfg(good_data, two), workers=2)
    assert m1 == m2
    names = sorted(p.name for p in one.glob("*.tar"))
    assert names and names == sorted(p.name for p in two.glob("*.tar"))
    assert all(_sha(one / n) == _sha(two / n) for n in names)
    assert all(_sha(one / s.name) == s.sha256 for s in m1.train.shards + m1.eval.shards)
    assert (one / "rejected.jsonl").read_bytes() == (two / "rejected.jsonl").read_bytes()

    stamps = {p.name: p.stat().st_mtime_ns for p in one.iterdir()}
    t = time.perf_counter()
    plan = plan_shards(_cfg(good_data, one))
    m3 = prepare_shards(_cfg(good_data, one))
    assert plan.up_to_date and m3 == m1 and time.perf_counter() - t < 5
    assert {p.name: p.stat().st_mtime_ns for p in one.iterdir()} == stamps  # nothing rewritten

    # a changed input changes the fingerprint, and the shards follow
    img = tmp_path / "a" / "images" / "a0000.jpg"
    img.write_bytes(D.jpeg(41, 33, seed=999))
    m4 = prepare_shards(_cfg(good_data, one))
    assert m4.fingerprint != m1.fingerprint
    assert any(s.sha256 not in {x.sha256 for x in m1.train.shards + m1.eval.shards} for s in m4.train.shards + m4.eval.shards)
    # so does a changed setting
    assert plan_shards(_cfg(good_data, one, max_image_pixels=10**6)).fingerprint != m4.fingerprint


@pytest.mark.parametrize("image_check", ["decode", "verify"])
def test_every_bad_input_is_rejected_with_its_reason(tmp_path, image_check):
    records, raw, expected = D.bad_dataset(tmp_path / "bad")
    D.write_jsonl(tmp_path / "bad" / "ann.jsonl", records, raw)
    D.write_jsonl(tmp_path / "good" / "ann.jsonl", D.good_records(tmp_path / "good" / "images", 10))
    meta = D.make_meta(tmp_path, {"bad": {"root": "bad/images", "annotation": "bad/ann.jsonl"},
                                  "good": {"root": "good/images", "annotation": "good/ann.jsonl"}})
    out = tmp_path / "shards"
    cfg = _cfg(meta, out, max_image_pixels=1_000_000, max_reject_fraction=0.9, eval_fraction=0.0,
               image_check=image_check)
    manifest = prepare_shards(cfg)
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        assert r["dataset"] == "bad" and r["file"].endswith("bad/ann.jsonl") and r["line"] >= 1 and r["detail"]
    assert by_reason == expected
    assert manifest.rejected_by_reason == expected
    # every input line is either in a shard or in rejected.jsonl, exactly once
    total_lines = len(records) + len(raw)
    written = {(json.loads(s["json"])["source"]["dataset"], json.loads(s["json"])["source"]["line"])
               for s in _read_all(out)}
    rejected_lines = {(r["dataset"], r["line"]) for r in rejected}
    assert not written & rejected_lines
    assert {line for ds, line in written | rejected_lines if ds == "bad"} == set(range(1, total_lines + 1))
    assert manifest.datasets["good"].train == 10 and manifest.datasets["bad"].rejected == sum(expected.values())
    assert manifest.datasets["bad"].train == 1  # the first "good-dup" record
    detail = {r["reason"]: r["detail"] for r in rejected}
    assert "data.max_image_pixels=1000000" in detail["decompression_bomb"]
    assert "already used on line 15" in detail["duplicate_id"]


def test_too_many_rejects_fail_the_run_with_counts(tmp_path):
    records, raw, expected = D.bad_dataset(tmp_path / "bad")
    D.write_jsonl(tmp_path / "bad" / "ann.jsonl", records, raw)
    meta = D.make_meta(tmp_path, {"bad": {"root": "bad/images", "annotation": "bad/ann.jsonl"}})
    out = tmp_path / "shards"
    with pytest.raises(PrepareError) as e:
        prepare_shards(_cfg(meta, out, max_image_pixels=1_000_000, max_reject_fraction=0.5))
    n = sum(expected.values())
    assert f"{n} of {n + 1} samples rejected" in str(e.value)
    assert "path_escapes_root 3" in str(e.value) and "data.max_reject_fraction=50.0%" in str(e.value)
    assert not (out / "manifest.json").exists() and (out / "rejected.jsonl").exists() and not list(out.glob("*.tar"))


def test_bad_meta_names_file_and_field(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"x": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1.5}}))
    with pytest.raises(ConfigError, match=r"data set 'x': repeat_time above 1 must be a whole number"):
        prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "s")))
    meta.write_text(json.dumps({"x": {"annotation": "a.jsonl"}}))
    with pytest.raises(ConfigError, match=r"'x': missing or non-string field\(s\) root"):
        prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "s")))
    meta.write_text("[]")
    with pytest.raises(ConfigError, match="set data.image_root"):
        prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_shards(DataConfig(meta=str(tmp_path / "nope.json"), shards=str(tmp_path / "s")))


def test_split_by_bytes_and_eval_count(good_data, tmp_path):
    out = tmp_path / "shards"
    m = prepare_shards(_cfg(good_data, out, max_shard_bytes=8 * 1024, eval_count=3))
    assert m.eval.samples == 3
    for s in m.train.shards:  # members (512-byte header + padded data) fit max_shard_bytes, or it is one sample
        with tarfile.open(out / s.name) as tar:
            members = sum(512 + -(-ti.size // 512) * 512 for ti in tar)
        assert members <= 8 * 1024 or s.samples == 1
    assert max(s.samples for s in m.train.shards) < 8 and len(m.train.shards) > 10


@pytest.mark.integration
def test_s3_inputs_and_outputs(s3_server, good_data, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("data")
    fs.put(str(tmp_path / "a"), "data/in/a", recursive=True)
    fs.put(str(tmp_path / "b"), "data/in/b", recursive=True)
    fs.put_file(str(good_data), "data/in/meta.json")
    cfg = _cfg(Path("x"), Path("x")).model_copy(update={"meta": "s3://data/in/meta.json", "shards": "s3://data/shards"})
    manifest = prepare_shards(cfg, workers=2)
    local = prepare_shards(_cfg(good_data, tmp_path / "local"))
    # same images and records (paths in source.file differ): same sample count and image bytes per key
    assert manifest.train.samples == local.train.samples and manifest.eval.samples == local.eval.samples
    remote = read_manifest("s3://data/shards")
    assert remote == manifest
    for s in manifest.train.shards:
        data = fs.cat_file(f"data/shards/{s.name}")
        assert hashlib.sha256(data).hexdigest() == s.sha256
    urls = [f"pipe:{sys.executable} -c \"import s3fs,sys; sys.stdout.buffer.write(s3fs.S3FileSystem().cat_file('data/shards/{s.name}'))\""
            for s in manifest.train.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(got) == manifest.train.samples
    assert prepare_shards(cfg) == manifest and plan_shards(cfg).up_to_date


KILL_SCRIPT = """
import sys
from vlm_core.config import DataConfig
from vlm_core.data.shards import prepare_shards
prepare_shards(DataConfig(meta=sys.argv[1], shards=sys.argv[2], samples_per_shard=5, eval_fraction=0.0), workers=1)
"""


@pytest.mark.integration
def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path):
    recs = D.good_records(tmp_path / "d" / "images", 400)
    for r in recs:  # bigger images so the run lasts long enough to be killed
        for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])):
            (tmp_path / "d" / "images" / p).write_bytes(D.jpeg(400, 300, seed=hash(p) % 1000))
    D.write_jsonl(tmp_path / "d" / "ann.jsonl", recs)
    meta = D.make_meta(tmp_path, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(meta), str(out)], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    finished = list(out.glob("*.tar"))
    assert finished and len(finished) < 80
    for shard in finished:  # every file with a shard's name is a whole tar of whole samples
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert names and all(n.count(".") >= 1 for n in names)
    manifest = prepare_shards(DataConfig(meta=str(meta), shards=str(out), samples_per_shard=5, eval_fraction=0.0))
    assert manifest.train.samples == 400 and not list(out.glob("*.tmp-*"))
    clean = prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "clean"), samples_per_shard=5,
                                      eval_fraction=0.0))
    assert manifest == clean


def test_samples_too_long_for_the_model_are_rejected(tmp_path, tiny_model_dir):
    from vlm_core.config import ModelConfig

    img = tmp_path / "d" / "images"
    img.mkdir(parents=True)
    for i in range(3):
        (img / f"big{i}.jpg").write_bytes(D.jpeg(300, 200, seed=i))
    (img / "small.jpg").write_bytes(D.jpeg(40, 40, seed=9))  # square: one tile
    turns = D.conv(("human", "<image>\n<image>\n<image>\nCompare."), ("gpt", "They differ."))
    long_reply = D.conv(("human", "<image>\nDescribe."), ("gpt", " ".join(["red"] * 300)))
    records = [
        {"id": "three", "image": ["big0.jpg", "big1.jpg", "big2.jpg"], "conversations": turns},  # cut inside an image
        {"id": "long", "image": "big0.jpg", "conversations": long_reply},  # text cut: allowed, trained truncated
        {"id": "short", "image": "small.jpg", "conversations": D.conv(("human", "Q?"), ("gpt", "A."))},
    ]
    D.write_jsonl(tmp_path / "d" / "ann.jsonl", records)
    meta = D.make_meta(tmp_path, {"d": {"root": "d/images", "annotation": "d/ann.jsonl", "max_dynamic_patch": 6}})
    model = ModelConfig(path=str(tiny_model_dir))
    cfg = _cfg(meta, tmp_path / "out", max_seq_length=128, eval_fraction=0.0, max_reject_fraction=1.0)
    manifest = prepare_shards(cfg, model=model)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejected] == [("three", "too_long")]
    assert "would cut inside an image span" in rejected[0]["detail"]
    assert manifest.train.samples == 2
    skip = prepare_shards(cfg.model_copy(update={"overlong": "skip", "shards": str(tmp_path / "skip")}), model=model)
    rejected = [json.loads(x) for x in (tmp_path / "skip" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejected) == ["long", "three"] and skip.train.samples == 1
    # the tokenizer and tile geometry are part of the fingerprint
    assert skip.fingerprint != prepare_shards(cfg.model_copy(update={"overlong": "skip",
                                                                     "shards": str(tmp_path / "nomodel")})).fingerprint
