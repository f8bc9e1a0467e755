"""Every mistake in the data inputs gets one clear answer.

Three tables:

- FILE_CASES: a whole input is wrong (the meta JSON, an annotation file's encoding or emptiness, a
  repeat_time, no training sample left). `vlmft prepare` runs in-process on the session's Prefect
  server and must end with exit code 2 and one `vlmft: ...` line naming the input and the fix, with
  nothing written to data.shards (no manifest, no shard; only rejected.jsonl where the samples were
  read and rejected one by one).
- SAMPLE_CASES: one record is wrong. Preparation goes on; the record is in rejected.jsonl with its
  reason, file, line and id, and every good record is written.
- ACCEPTED_CASES: inputs that look odd but are fine (a UTF-8 byte order mark, CR-only line endings,
  InternVL's optional meta keys, extra turn keys) give all their samples.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import webdataset as wds

from helpers import data as D
from vlm_core.config import DataConfig, ModelConfig
from vlm_core.data import images, readers, validate
from vlm_core.data.shards import plan_shards, prepare_shards

GOOD = 16  # good records in the data set "a" of every case
DROP = object()  # a meta field left out


# ---------------------------------------------------------------- inputs on disk


def _good_lines(tmp: Path) -> list[bytes]:
    return [json.dumps(r).encode() for r in D.good_records(tmp / "a" / "images", GOOD, "a")]


def _entry(**fields) -> dict:
    entry = {"root": "a/images", "annotation": "a/ann.jsonl", **fields}
    return {k: v for k, v in entry.items() if v is not DROP}


def meta_with(**fields) -> Callable[[Path], Path]:
    """One data set "a" of GOOD records; its meta entry with `fields` changed (DROP removes one)."""

    def setup(tmp: Path) -> Path:
        D.write_jsonl(tmp / "a" / "ann.jsonl", D.good_records(tmp / "a" / "images", GOOD, "a"))
        return D.make_meta(tmp, {"a": _entry(**fields)})

    return setup


def meta_text(text: str) -> Callable[[Path], Path]:
    """data.meta with this exact text (UTF-8), next to a data set "a" of GOOD records."""
    return meta_bytes(text.encode())


def meta_bytes(data: bytes) -> Callable[[Path], Path]:
    """data.meta with these exact bytes, next to a data set "a" of GOOD records."""

    def setup(tmp: Path) -> Path:
        D.write_jsonl(tmp / "a" / "ann.jsonl", D.good_records(tmp / "a" / "images", GOOD, "a"))
        (tmp / "meta.json").write_bytes(data)
        return tmp / "meta.json"

    return setup


def meta_object(obj: object) -> Callable[[Path], Path]:
    """data.meta holding `obj` (a callable gets the records of "a", for LLaVA-shaped metas)."""

    def setup(tmp: Path) -> Path:
        records = D.good_records(tmp / "a" / "images", GOOD, "a")
        D.write_jsonl(tmp / "a" / "ann.jsonl", records)
        (tmp / "meta.json").write_text(json.dumps(obj(records) if callable(obj) else obj))
        return tmp / "meta.json"

    return setup


def annotation(make: Callable[[list[bytes]], bytes], name: str = "ann.jsonl", **fields) -> Callable[[Path], Path]:
    """Data set "a" whose annotation file holds make(good JSONL lines)."""

    def setup(tmp: Path) -> Path:
        (tmp / "a").mkdir(parents=True, exist_ok=True)
        (tmp / "a" / name).write_bytes(make(_good_lines(tmp)))
        return D.make_meta(tmp, {"a": _entry(annotation=f"a/{name}", **fields)})

    return setup


def _text(lines: list[bytes]) -> str:
    return b"\n".join(lines).decode() + "\n"


def _json_list(lines: list[bytes]) -> bytes:
    return b"[" + b",".join(lines) + b"]"


def meta_is_folder(tmp: Path) -> Path:
    meta_with()(tmp)
    return tmp / "a"


def names_collide(tmp: Path) -> Path:
    D.write_jsonl(tmp / "a" / "ann.jsonl", D.good_records(tmp / "a" / "images", GOOD, "a"))
    return D.make_meta(tmp, {"a b": _entry(), "a_b": _entry()})


def one_bad_of_two(tmp: Path) -> Path:
    """Data set "a" with GOOD good records, "b" with GOOD lines that are all broken JSON."""
    D.write_jsonl(tmp / "a" / "ann.jsonl", D.good_records(tmp / "a" / "images", GOOD, "a"))
    D.write_jsonl(tmp / "b" / "ann.jsonl", [], [b'{"id": '] * GOOD)
    return D.make_meta(tmp, {"a": _entry(), "b": {"root": "b", "annotation": "b/ann.jsonl"}})


def images_missing(tmp: Path) -> Path:
    """Every record names an image that is not there."""
    records = [{"id": f"m{i}", "image": f"gone{i}.jpg", "conversations": D.conv(("human", "Q?"), ("gpt", "A."))}
               for i in range(GOOD)]
    D.write_jsonl(tmp / "a" / "ann.jsonl", records)
    (tmp / "a" / "images").mkdir()
    return D.make_meta(tmp, {"a": _entry()})


# ---------------------------------------------------------------- whole-input errors: exit 2, one line


@dataclass
class FileCase:
    id: str
    setup: Callable[[Path], Path]  # writes the inputs, returns data.meta
    expect: list[str]  # substrings of the one `vlmft:` line
    overrides: list[str] = field(default_factory=list)
    leaves: set[str] = field(default_factory=set)  # what data.shards may hold afterwards (nothing: no folder)


FILE_CASES = [
    # meta JSON: repeat_time
    FileCase("repeat_time_nan", meta_with(repeat_time=float("nan")), ["data set 'a'", "repeat_time must be a finite "
             "number > 0", "got NaN"]),
    FileCase("repeat_time_inf", meta_with(repeat_time=float("inf")), ["repeat_time must be a finite", "got Infinity"]),
    FileCase("repeat_time_true", meta_with(repeat_time=True), ["repeat_time must be a finite number", "got true"]),
    FileCase("repeat_time_string", meta_with(repeat_time="2"), ["repeat_time must be a finite number", 'got "2"']),
    FileCase("repeat_time_zero", meta_with(repeat_time=0), ["repeat_time must be a finite number > 0", "got 0"]),
    FileCase("repeat_time_negative", meta_with(repeat_time=-2), ["repeat_time must be a finite number", "got -2"]),
    FileCase("repeat_time_above_one_not_whole", meta_with(repeat_time=1.5), ["repeat_time above 1 must be a whole "
             "number, got 1.5"]),
    FileCase("repeat_time_1e9", meta_with(repeat_time=1e9), ["data set 'a'", "repeat_time=1e+09", "10,000,000",
             "lower it"]),
    FileCase("repeat_time_times_lines_over_limit", meta_with(repeat_time=700_000), [
             "repeat_time=700000 x 16 records = 11,200,000 training samples", "10,000,000", "lower repeat_time"]),
    FileCase("repeat_time_keeps_no_record", meta_with(repeat_time=0.01), [
             "data set 'a': repeat_time=0.01 keeps floor(16 x 0.01) = 0 of its 16 records", "at least 0.0625"]),
    # meta JSON: other fields and keys
    FileCase("max_dynamic_patch_zero", meta_with(max_dynamic_patch=0), ["max_dynamic_patch must be an integer >= 1, "
             "got 0"]),
    FileCase("max_dynamic_patch_true", meta_with(max_dynamic_patch=True), ["max_dynamic_patch must be an integer",
             "got true"]),
    FileCase("max_dynamic_patch_float", meta_with(max_dynamic_patch=2.5), ["max_dynamic_patch", "got 2.5"]),
    FileCase("root_missing", meta_with(root=DROP), ["data set 'a': missing or non-string field(s) root"]),
    FileCase("root_not_a_string", meta_with(root=5), ["missing or non-string field(s) root"]),
    FileCase("annotation_empty_string", meta_with(annotation=""), ["field(s) annotation must not be empty"]),
    FileCase("unknown_key_typo", meta_with(repeat_times=2), ["data set 'a': unknown key 'repeat_times'; did you mean "
             "'repeat_time'?"]),
    FileCase("unknown_key", meta_with(weight=3), ["unknown key 'weight'", "a data set takes root, annotation"]),
    FileCase("data_augment_not_bool", meta_with(data_augment="yes"), ['data_augment must be true or false, got "yes"']),
    FileCase("length_negative", meta_with(length=-1), ["length must be an integer >= 0", "got -1"]),
    FileCase("duplicate_data_set", meta_text('{"a": {"root": "a/images", "annotation": "a/ann.jsonl"},\n'
             ' "a": {"root": "a/images", "annotation": "a/ann.jsonl", "repeat_time": 2}}'),
             ["data set 'a' appears twice", "the first would be silently dropped"]),
    FileCase("duplicate_key_in_data_set", meta_text('{"a": {"root": "a/images", "root": "elsewhere", '
             '"annotation": "a/ann.jsonl"}}'), ["data set 'a': key 'root' appears twice"]),
    FileCase("data_set_names_collide", names_collide, ["collide once reduced to [A-Za-z0-9_-]"]),
    # meta JSON: shape and file
    FileCase("meta_missing", lambda tmp: tmp / "nope.json", ["nope.json does not exist"]),
    FileCase("meta_is_a_folder", meta_is_folder, ["data.meta=", "is a folder; it must name the meta JSON file"]),
    FileCase("meta_not_json", meta_text("{oops"), ["data.meta=", "not valid JSON"]),
    FileCase("meta_not_utf8", meta_bytes(b'{"a": {"root": "caf\xe9", "annotation": "a/ann.jsonl"}}'),
             ["data.meta=", "not valid JSON", "can't decode byte 0xe9"]),
    FileCase("meta_empty_object", meta_text("{}"), ["expected an InternVL meta JSON", "got {}"]),
    FileCase("meta_scalar", meta_text("42"), ["expected an InternVL meta JSON", "got a JSON int"]),
    FileCase("meta_entry_not_an_object", meta_object({"a": "a/ann.jsonl", "b": _entry()}), [
             "data set 'a': expected an object {root, annotation, ...}, got str"]),
    FileCase("llava_record_as_a_dict", meta_object(lambda records: records[0]), [
             "looks like one LLaVA record", "or a LLaVA JSON list ([{id, image, conversations}, ...]"]),
    FileCase("llava_records_wrapped_in_a_dict", meta_object(lambda records: {"data": records}), [
             "whose values are not data sets", "LLaVA JSON list"]),
    FileCase("llava_list_empty", meta_text("[]"), ["annotation", "meta.json has no records", "; fill it"],
             ["data.image_root=a/images"]),
    FileCase("llava_list_without_image_root", meta_object(lambda records: records), ["is a LLaVA JSON list; set "
             "data.image_root"]),
    # annotation files
    FileCase("annotation_missing", meta_with(annotation="a/nope.jsonl"), ["a/nope.jsonl does not exist"]),
    FileCase("annotation_is_a_folder", meta_with(annotation="a/images"), ["data set 'a': annotation",
             "is a folder; it must name the annotation file"]),
    FileCase("annotation_utf16_le_bom", annotation(lambda ls: b"\xff\xfe" + _text(ls).encode("utf-16-le")), ["data set 'a': annotation", "is UTF-16-LE (it starts "
             "with the byte order mark FF FE)", "must be UTF-8", "iconv -f UTF-16LE -t UTF-8 ann.jsonl > ann.utf8.jsonl"]),
    FileCase("annotation_utf16_be_bom", annotation(lambda ls: b"\xfe\xff" + _text(ls).encode("utf-16-be")),
             ["is UTF-16-BE (it starts with the byte order mark FE FF)"]),
    FileCase("annotation_utf16_le_no_bom", annotation(lambda ls: _text(ls).encode("utf-16-le")),
             ["is UTF-16-LE (no byte order mark)"]),
    FileCase("annotation_utf16_be_no_bom", annotation(lambda ls: _text(ls).encode("utf-16-be")),
             ["is UTF-16-BE (no byte order mark)"]),
    FileCase("annotation_utf32_bom", annotation(lambda ls: _text(ls).encode("utf-32")), ["is UTF-32-LE"]),
    FileCase("annotation_gzip", annotation(lambda ls: gzip.compress(_text(ls).encode(), mtime=0)),
             ["is gzip-compressed", "decompress it"]),
    FileCase("annotation_empty", annotation(lambda ls: b""), ["data set 'a': annotation", "has no records (an empty "
             "file, blank lines only, or an empty list)", "fill it or remove the data set from data.meta="]),
    FileCase("annotation_blank_lines_only", annotation(lambda ls: b"\n  \n\t\r\n\n"), ["has no records"]),
    FileCase("annotation_bom_only", annotation(lambda ls: b"\xef\xbb\xbf\n"), ["has no records"]),
    FileCase("json_list_named_jsonl", annotation(_json_list), ["ann.jsonl holds one JSON list, not JSON lines: "
             "name it .json"]),
    FileCase("json_annotation_empty_list", annotation(lambda ls: b"[]", name="list.json"), ["has no records"]),
    FileCase("json_annotation_is_a_dict", annotation(lambda ls: ls[0], name="list.json"), [
             "a .json annotation file must hold a list of records", "got a JSON dict"]),
    FileCase("json_annotation_not_json", annotation(lambda ls: _json_list(ls)[:-1], name="list.json"),
             ["data set 'a': annotation", "not valid JSON"]),
    # nothing left to train on: the rejects are listed, no manifest, no shard
    FileCase("every_line_broken", annotation(lambda ls: b'{"id": \n' * GOOD), [
             "no training sample left in data set(s) a: 16 of 16 records rejected (invalid_json 16)",
             "rejected.jsonl"], ["data.max_reject_fraction=1.0"], {"rejected.jsonl"}),
    FileCase("every_image_missing", images_missing, ["no training sample left", "missing_image 16"],
             ["data.max_reject_fraction=1.0"], {"rejected.jsonl"}),
    FileCase("too_many_rejects", one_bad_of_two, ["16 of 32 samples rejected", "data.max_reject_fraction=5.0%",
             "rejected.jsonl"], [], {"rejected.jsonl"}),
]


@pytest.mark.integration
@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.id)
def test_whole_input_errors_are_one_line(case, prefect_server, tiny_model_dir, tmp_path, console):
    from vlmft.cli import main

    console.bind()
    capfd = console
    meta = case.setup(tmp_path)
    shards = tmp_path / "shards"
    capfd.readouterr()
    rc = main(["prepare", f"model.path={tiny_model_dir}", f"data.meta={meta}", f"data.shards={shards}",
               "data.samples_per_shard=8", *case.overrides])
    out, err = capfd.readouterr()
    last = err.rstrip("\n").splitlines()[-1]
    assert rc == 2, err[-3000:]
    assert last.startswith("vlmft: "), err[-3000:]
    for text in case.expect:
        assert text in last, last
    assert "Traceback" not in out + err
    left = {p.name for p in shards.iterdir()} - {".vlmft.lock"} if shards.exists() else set()
    assert left <= case.leaves, left
    assert "manifest.json" not in left and not any(name.endswith(".tar") for name in left)


# ---------------------------------------------------------------- one bad record: its reason in rejected.jsonl


@dataclass
class SampleCase:
    id: str
    bad: dict | bytes  # the record (or raw line) written after the good ones
    reason: str
    detail: str = ""  # a substring of the reject's detail
    rid: str | None = "bad"  # the id rejected.jsonl names
    model: bool = False  # run the length check with the tiny model


def _rec(image=None, turns=None, **extra) -> dict:
    rec = {"id": "bad", "conversations": turns if turns is not None else D.conv(("human", "<image>\nQ?"),
                                                                                 ("gpt", "A.")), **extra}
    if image is not None:
        rec["image"] = image
    return rec


def _text_rec(*turns: tuple[str, str]) -> dict:
    return _rec(turns=D.conv(*turns))


SAMPLE_CASES = [
    # new reasons
    SampleCase("empty_image_path", _rec(""), "empty_image_path", "field image is an empty path"),
    SampleCase("blank_image_path", _rec("  "), "empty_image_path", "field image is an empty path"),
    SampleCase("empty_image_path_in_list", _rec(["ok.jpg", ""], D.conv(("human", "<image><image>Q?"), ("gpt", "A."))),
               "empty_image_path", "field image[1] is an empty path"),
    SampleCase("reserved_im_end_in_reply", _text_rec(("human", "Q?"), ("gpt", "A.<|im_end|>")), "reserved_token",
               "conversations[1] (gpt) contains '<|im_end|>'"),
    SampleCase("reserved_im_start_in_question", _text_rec(("human", "<|im_start|>user Q?"), ("gpt", "A.")),
               "reserved_token", "conversations[0] (human) contains '<|im_start|>'"),
    SampleCase("reserved_img_context", _text_rec(("human", "see <IMG_CONTEXT>"), ("gpt", "A.")), "reserved_token",
               "'<IMG_CONTEXT>'"),
    SampleCase("reserved_img_start", _text_rec(("human", "Q?"), ("gpt", "use <img> tags")), "reserved_token",
               "conversations[1] (gpt) contains '<img>'"),
    SampleCase("reserved_img_end_in_system", _text_rec(("system", "close with </img>"), ("human", "Q?"), ("gpt", "A.")),
               "reserved_token", "conversations[0] (system) contains '</img>'"),
    SampleCase("reserved_token_with_the_length_check", _text_rec(("human", "Q?"), ("gpt", "A.<|im_end|>")),
               "reserved_token", "'<|im_end|>'", model=True),
    # reasons that were already there
    SampleCase("not_utf8", b'{"id": "latin1", "x": "caf\xe9"}', "not_utf8", "invalid continuation byte", None),
    SampleCase("invalid_json", b'{"id": "broken", "conversations": [', "invalid_json", "column", None),
    SampleCase("not_an_object", b"[1, 2]", "bad_record", "expected a JSON object, got list", None),
    SampleCase("image_not_a_path", _rec(7), "bad_record", "field 'image' must be a path"),
    SampleCase("conversations_not_a_list", _rec(turns={"from": "human"}), "bad_record", "must be a list"),
    SampleCase("turn_without_value", _rec(turns=[{"from": "human"}]), "bad_record", "conversations[0] must be an object"),
    SampleCase("unknown_speaker", _rec(turns=[{"from": "robot", "value": "x"}]), "bad_record", "'robot'"),
    SampleCase("video", _rec(video="v.mp4"), "video_not_supported", "convert frames"),
    SampleCase("empty_conversation", _rec(turns=[]), "empty_conversation"),
    SampleCase("only_a_system_turn", _text_rec(("system", "Be brief.")), "empty_conversation", "only a system turn"),
    SampleCase("first_turn_not_user", _text_rec(("gpt", "Hi."), ("human", "Q?")), "first_turn_not_user"),
    SampleCase("roles_not_alternating", _text_rec(("human", "Q?"), ("human", "Q2?"), ("gpt", "A.")),
               "roles_not_alternating", "conversations[1].from is 'human'"),
    SampleCase("last_turn_not_assistant", _text_rec(("human", "Q?")), "last_turn_not_assistant"),
    SampleCase("empty_assistant_reply", _text_rec(("human", "Q?"), ("gpt", "  ")), "empty_assistant_reply"),
    SampleCase("image_count_mismatch", _rec(["ok.jpg", "ok.jpg"]), "image_count_mismatch",
               "1 <image> placeholder(s) for 2 image(s)"),
    SampleCase("duplicate_id", {**_text_rec(("human", "Q?"), ("gpt", "A.")), "id": "a0"}, "duplicate_id",
               "id 'a0' is already used on line 1", "a0"),
    SampleCase("missing_image", _rec("gone.jpg"), "missing_image", "does not exist"),
    SampleCase("empty_image", _rec("zero.jpg"), "empty_image", "0 bytes"),
    SampleCase("truncated_image", _rec("truncated.jpg"), "truncated_image"),
    SampleCase("corrupt_image", _rec("corrupt.png"), "corrupt_image"),
    SampleCase("not_an_image", _rec("text.jpg"), "not_an_image"),
    SampleCase("decompression_bomb", _rec("bomb.png"), "decompression_bomb", "data.max_image_pixels=1000000"),
    SampleCase("path_with_dotdot", _rec("../outside.jpg"), "path_escapes_root", "leaves the dataset root"),
    SampleCase("absolute_path", _rec("/etc/hostname"), "path_escapes_root", "must be relative"),
    SampleCase("symlink_out_of_root", _rec("link_out.jpg"), "path_escapes_root", "outside the dataset root"),
    SampleCase("too_long", _text_rec(("human", "Q?"), ("gpt", " ".join(["red"] * 600))), "too_long",
               "tokens > data.max_seq_length=", model=True),
]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: c.id)
def test_a_bad_record_is_rejected_with_its_reason(case, tmp_path, request):
    folder = tmp_path / "a"
    D.bad_dataset(folder)  # its images: ok.jpg, zero.jpg, truncated.jpg, corrupt.png, bomb.png, link_out.jpg ...
    good = D.good_records(folder / "images", GOOD, "a")
    bad = case.bad if isinstance(case.bad, bytes) else json.dumps(case.bad).encode()
    D.write_jsonl(folder / "ann.jsonl", good, [bad])
    meta = D.make_meta(tmp_path, {"a": _entry()})
    out = tmp_path / "shards"
    cfg = DataConfig(meta=str(meta), shards=str(out), samples_per_shard=8, eval_fraction=0.0, max_reject_fraction=1.0,
                     max_image_pixels=1_000_000, max_seq_length=512, overlong="skip")
    model = ModelConfig(path=str(request.getfixturevalue("tiny_model_dir"))) if case.model else None
    manifest = prepare_shards(cfg, model=model)
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["line"], r["id"]) for r in rejected] == [(case.reason, GOOD + 1, case.rid)]
    assert rejected[0]["file"] == str(folder / "ann.jsonl") and case.detail in rejected[0]["detail"]
    assert manifest.train.samples == GOOD and manifest.rejected_by_reason == {case.reason: 1}


def test_every_reason_is_listed():
    """Each reason a case produces is in a REASONS tuple (or is one of the plan's own), and vice versa."""
    listed = set(readers.REASONS) | set(validate.REASONS) | set(images.REASONS) | {"duplicate_id", "too_long"}
    assert {c.reason for c in SAMPLE_CASES} == listed


# ---------------------------------------------------------------- odd but fine: every sample written


def _bom(lines: list[bytes]) -> bytes:
    return b"\xef\xbb\xbf" + _text(lines).encode()


def _appended_with_bom(lines: list[bytes]) -> bytes:
    half = len(lines) // 2
    return _text(lines[:half]).encode() + b"\xef\xbb\xbf" + _text(lines[half:]).encode()


ACCEPTED_CASES = [
    ("utf8_bom", annotation(_bom)),
    ("utf8_bom_where_two_files_were_joined", annotation(_appended_with_bom)),
    ("cr_only_line_endings", annotation(lambda ls: b"\r".join(ls) + b"\r")),
    ("crlf_line_endings", annotation(lambda ls: b"\r\n".join(ls) + b"\r\n")),
    ("json_list_with_bom", annotation(lambda ls: b"\xef\xbb\xbf" + _json_list(ls), name="list.json")),
    ("json_list_in_utf16", annotation(lambda ls: _json_list(ls).decode().encode("utf-16"), name="list.json")),
    ("internvl_optional_meta_keys", meta_with(data_augment=False, length=GOOD, repeat_time=1, max_dynamic_patch=6)),
    ("meta_with_bom", lambda tmp: (meta_with()(tmp), (tmp / "meta.json").write_bytes(
        b"\xef\xbb\xbf" + (tmp / "meta.json").read_bytes()))[0]),
]


@pytest.mark.parametrize("setup", [c[1] for c in ACCEPTED_CASES], ids=[c[0] for c in ACCEPTED_CASES])
def test_odd_but_valid_inputs_give_every_sample(setup, tmp_path):
    meta = setup(tmp_path)
    manifest = prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "out"), eval_fraction=0.0))
    assert manifest.train.samples == GOOD and manifest.rejected_by_reason == {}
    lines = sorted(json.loads(s["json"])["source"]["line"] for s in _samples(tmp_path / "out", manifest))
    assert lines == list(range(1, GOOD + 1))
    assert manifest.warnings == []


def _samples(folder: Path, manifest) -> list[dict]:
    return list(wds.WebDataset(manifest.shard_urls(str(folder)), shardshuffle=False, empty_check=False))


def test_extra_turn_keys_are_kept_and_named(tmp_path):
    records = D.good_records(tmp_path / "a" / "images", GOOD, "a")
    records[0]["conversations"][1]["weight"] = 0.5
    records[1]["conversations"][0]["lang"] = "en"
    D.write_jsonl(tmp_path / "a" / "ann.jsonl", records)
    meta = D.make_meta(tmp_path, {"a": _entry()})
    manifest = prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "out"), eval_fraction=0.0))
    assert manifest.train.samples == GOOD
    by_id = {json.loads(s["json"])["id"]: json.loads(s["json"]) for s in _samples(tmp_path / "out", manifest)}
    assert by_id["a0"]["conversations"][1] == {"from": "gpt", "value": "Answer 0.", "weight": 0.5}
    assert by_id["a1"]["conversations"][0]["lang"] == "en"
    assert manifest.warnings == ["data set 'a': 2 record(s) have turn keys besides from/value (lang, weight); they "
                                 "are kept in the shard records, but training does not use them"]


def test_data_augment_true_is_named_as_unused(tmp_path):
    meta = meta_with(data_augment=True)(tmp_path)
    manifest = prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "out"), eval_fraction=0.0))
    assert manifest.train.samples == GOOD
    assert manifest.warnings == ["data set 'a': data_augment=true is not used (vlmft does not augment images); its "
                                 "samples are trained as they are"]
    D.make_meta(tmp_path, {"a": _entry(data_augment=False)})  # not part of the fingerprint: still up to date
    plan = plan_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "out"), eval_fraction=0.0))
    assert plan.up_to_date and plan.manifest.warnings == []  # the notes of this planning, not the stored ones


def test_an_eval_fraction_over_half_is_a_warning(tmp_path):
    meta = meta_with()(tmp_path)
    manifest = prepare_shards(DataConfig(meta=str(meta), shards=str(tmp_path / "out"), eval_fraction=0.75))
    assert manifest.eval.samples == 12 and manifest.warnings == [
        "data.eval_fraction=0.75 holds out 12 of 16 usable samples for evaluation, leaving 4 for training; lower "
        "data.eval_fraction"]


@pytest.mark.integration
def test_an_eval_split_over_half_the_data_is_a_warning(prefect_server, tiny_model_dir, tmp_path):
    from prefect.logging.handlers import APILogHandler

    from flows.prepare_data import prepare_data
    from helpers.flow_runs import flow_run_logs
    from vlm_core.config import load_config
    from vlmft.cli import main

    meta = meta_with()(tmp_path)
    args = [f"model.path={tiny_model_dir}", f"data.meta={meta}", f"data.shards={tmp_path / 'shards'}",
            "data.eval_count=24"]
    note = ("data.eval_count=24 holds out 15 of 16 usable samples for evaluation, leaving 1 for training; lower "
            "data.eval_count")
    assert main(["prepare", *args]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["train"]["samples"] == 1 and manifest["warnings"] == [note]
    state = prepare_data(load_config(None, args), return_state=True)  # up to date: the note comes back again
    out = state.result()
    assert out["up_to_date"] and out["warnings"] == [note]
    APILogHandler().flush()
    assert note in flow_run_logs(state.state_details.flow_run_id)
    half = prepare_data(load_config(None, [*args[:2], f"data.shards={tmp_path / 'half'}", "data.eval_fraction=0.5"]))
    assert half["warnings"] == [] and half["train_samples"] == 8  # half is not more than half
