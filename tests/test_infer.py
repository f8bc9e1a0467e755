"""Questions from shards and annotations; generation with every kind of model folder, batched = one at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import data as D
from helpers.images import jpeg_bytes
from helpers.shard_sets import demo_records, write_jsonl_set
from vlm_core.config import ConfigError, DataConfig, ModelConfig, load_config
from vlm_core.infer import (
    load_predictor,
    model_kind,
    question_from_prompt,
    questions_from_jsonl,
    questions_from_meta,
    questions_from_shards,
)
from vlm_core.safe_load import UnsafeCheckpointError

DATA = DataConfig(max_dynamic_patch=2, max_seq_length=1024)


@pytest.fixture(scope="module")
def loose(tmp_path_factory) -> Path:
    """12 records (text-only, one image, two images + two turns) as JSONL + image files."""
    return write_jsonl_set(tmp_path_factory.mktemp("infer-loose"), demo_records(12))


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return load_predictor(str(tiny_model_dir), data=DATA)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as training saves it; nothing trained."""
    from vlm_core.model import build_for_training

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=float32", "lora.enabled=true", "lora.r=4"])
    model = build_for_training(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("infer-adapter") / "checkpoint-1"
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Questions


def test_questions_from_shards_are_the_first_eval_samples_in_order(tiny_model_dir, tmp_path):
    shards = D.training_shards(tmp_path, tiny_model_dir, n=20, samples_per_shard=3, eval_count=7)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["eval"]["samples"] == 7 and len(manifest["eval"]["shards"]) == 3
    every = questions_from_shards(str(shards), 100)
    assert len(every) == 7 and [q.id for q in every] == [q.id for q in questions_from_shards(str(shards), 100)]
    first = questions_from_shards(str(shards), 4)
    assert [q.id for q in first] == [q.id for q in every[:4]]  # the first N, across shard boundaries
    records = {f"s{i}": r for i, r in enumerate(D.good_records(tmp_path / "x", 20))}
    for q in every:
        record = records[q.id]
        conv = record["conversations"]
        assert q.dataset == "d" and q.turns[-1].from_ == "human"
        assert q.reference == conv[-1]["value"]  # the last gpt answer
        assert [t.value for t in q.turns] == [t["value"] for t in conv[:-1]] or q.id.endswith(("4", "9"))
        assert len(q.images) == sum(t.value.count("<image>") for t in q.turns)
    assert questions_from_shards(str(shards), 5, split="train")[0].id not in {q.id for q in every}


def test_questions_from_jsonl_and_meta(loose):
    qs = questions_from_jsonl(str(loose))
    assert [q.id for q in qs] == [f"s{i:05d}" for i in range(12)]
    text, one, two = qs[0], qs[1], qs[2]
    assert (text.prompt, text.reference, text.images) == ("Say the word 0", "0", [])
    assert one.prompt == "<image>\nWhat color is the image?" and one.reference == "It is green 1." and len(one.images) == 1
    # multi-turn: the last gpt answer, given everything before it (system, first question and answer)
    assert [t.from_ for t in two.turns] == ["system", "human", "gpt", "human"]
    assert two.prompt == "Which sample?" and two.reference == "2" and len(two.images) == 2
    assert one.images[0] == (loose.parent / "img/00001_0.jpg").read_bytes()  # a valid RGB JPEG is kept as is
    meta = D.make_meta(loose.parent, {"demo": {"root": ".", "annotation": loose.name}})
    assert [q.id for q in questions_from_meta(str(meta), max_samples=5)] == [q.id for q in qs[:5]]
    assert questions_from_jsonl(str(loose), max_samples=3)[2].dataset == "demo"


def test_a_question_without_an_answer_has_an_empty_reference(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(40, 30, (200, 30, 30)))
    D.write_jsonl(tmp_path / "ask.jsonl", [{"id": "q1", "image": "a.jpg",
                                            "conversations": [{"from": "human", "value": "Colour?"}]}])
    [q] = questions_from_jsonl(str(tmp_path / "ask.jsonl"))
    assert q.reference == "" and q.prompt == "<image>\nColour?" and len(q.images) == 1


@pytest.mark.parametrize(("line", "says"), [
    (b'{"id": "x", "conversations": [', ["bad.jsonl:2", "invalid_json"]),
    (json.dumps({"id": "x", "image": "missing.jpg", "conversations": D.conv(("human", "Q?"), ("gpt", "A."))}).encode(),
     ["bad.jsonl:2", "field 'image'", "missing.jpg", "does not exist"]),
    (json.dumps({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}).encode(),
     ["bad.jsonl:2", "conversations[0].from"]),
])
def test_a_bad_annotation_line_names_file_line_and_field(tmp_path, line, says):
    good = {"id": "ok", "conversations": D.conv(("human", "Q?"), ("gpt", "A."))}
    D.write_jsonl(tmp_path / "bad.jsonl", [good], [line])
    with pytest.raises(ConfigError) as err:
        questions_from_jsonl(str(tmp_path / "bad.jsonl"))
    for text in says:
        assert text in str(err.value), str(err.value)


def test_question_from_prompt(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(40, 30, (200, 30, 30)))
    q = question_from_prompt("What colour?", [str(tmp_path / "a.jpg"), str(tmp_path / "a.jpg")])
    assert q.prompt == "<image>\n<image>\nWhat colour?" and len(q.images) == 2
    assert question_from_prompt("Say hi.", []).images == []
    with pytest.raises(ConfigError, match=r"--image .*none\.jpg does not exist"):
        question_from_prompt("Q?", [str(tmp_path / "none.jpg")])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ConfigError, match="not_an_image"):
        question_from_prompt("Q?", [str(tmp_path / "text.jpg")])
    with pytest.raises(ConfigError, match="1 <image> placeholder"):
        question_from_prompt("<image> Q?", [str(tmp_path / "a.jpg")] * 2)


# ---------------------------------------------------------------------------------------------------
# Generation


def test_batched_answers_equal_one_at_a_time_and_repeat(predictor, loose):
    qs = questions_from_jsonl(str(loose))[:8]  # text-only, one-image and two-image questions, mixed in batches
    seen = []
    batched = predictor.predict(qs, max_new_tokens=6, batch_size=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 8), (6, 8), (8, 8)]
    assert batched == predictor.predict(qs, max_new_tokens=6, batch_size=1)
    assert batched == predictor.predict(qs, max_new_tokens=6, batch_size=3)
    assert len(batched) == 8 and all(isinstance(a, str) for a in batched)
    assert len(set(batched)) > 3  # the answers depend on the question (a random model, but not a constant one)


def test_the_prompt_is_the_training_template_with_the_generation_prompt(predictor, loose):
    q = questions_from_jsonl(str(loose))[2]  # system + two images + a first answer
    sample = predictor.preprocessor.generation_prompt(q.turns, q.images, q.id)
    text = predictor.tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<img>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\nBoth are blue.<|im_end|>\n"
                         "<|im_start|>user\nWhich sample?<|im_end|>\n<|im_start|>assistant\n")
    assert (sample.input_ids == predictor.preprocessor.tokens.img_context_id).sum() == 16 * sum(sample.tiles_per_image)
    assert sample.pixel_values.shape[0] == sum(sample.tiles_per_image) and len(sample.tiles_per_image) == 2
    # the same conversation with its answer, as training sees it, starts with exactly these ids
    full = predictor.preprocessor(q.turns + [q.turns[-1].model_validate({"from": "gpt", "value": "2"})], q.images, q.id)
    assert torch.equal(full.input_ids[: len(sample.input_ids)], sample.input_ids)
    text_only = predictor.preprocessor.generation_prompt(questions_from_jsonl(str(loose))[0].turns, [], "t")
    assert text_only.pixel_values.shape[0] == 0 and not text_only.tiles_per_image  # no dummy tile


def test_lora_adapter_answers_like_its_merged_model(tiny_model_dir, adapter_dir, predictor, loose, tmp_path):
    from vlm_core.merge import merge_lora

    qs = questions_from_jsonl(str(loose))[:6]
    lora = load_predictor(str(adapter_dir), data=DATA)  # the base comes from adapter_config.json
    assert lora.kind == "lora"
    merge_lora(ModelConfig(path=str(tiny_model_dir), dtype="float32"), str(adapter_dir), tmp_path / "merged", data=DATA)
    merged = load_predictor(str(tmp_path / "merged"), data=DATA)
    assert merged.kind == "model"
    answers = lora.predict(qs, max_new_tokens=6)
    assert answers == merged.predict(qs, max_new_tokens=6)
    assert answers != predictor.predict(qs, max_new_tokens=6)  # the adapter changes what the model says
    assert load_predictor(str(adapter_dir), base=str(tiny_model_dir), data=DATA).predict(qs[:3], 6) == answers[:3]


def test_an_adapter_whose_base_is_gone_names_both(adapter_dir, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        load_predictor(str(moved))
    said = str(err.value)
    assert f"LoRA adapter {moved}" in said and str(tmp_path / "gone-base") in said and "--base" in said
    with pytest.raises(ConfigError, match="from --base"):
        load_predictor(str(moved), base=str(tmp_path / "also-gone"))


def test_a_full_training_checkpoint_and_a_url(tiny_model_dir, predictor, loose, tmp_path):
    import fsspec

    qs = questions_from_jsonl(str(loose))[:4]
    expected = predictor.predict(qs, max_new_tokens=5)
    ckpt = tmp_path / "checkpoint-3"  # what the Trainer saves for a full fine-tune: weights, config, state
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    torch.save({"python": [1, 2]}, ckpt / "rng_state.pth")
    assert model_kind(ckpt) == "checkpoint"
    assert load_predictor(str(ckpt), data=DATA).predict(qs, max_new_tokens=5) == expected
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_model_dir) + "/", "/infer-model/", recursive=True)
    remote = load_predictor("memory://infer-model", data=DATA, cache_dir=str(tmp_path / "cache"))
    assert remote.predict(qs, max_new_tokens=5) == expected


class Touch:
    """Unpickled by a full unpickler, this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_crafted_checkpoint_is_refused_before_it_runs(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    torch.save({"state": Touch(tmp_path / "pwned")}, ckpt / "rng_state.pth")
    with pytest.raises(UnsafeCheckpointError, match="rng_state.pth"):
        load_predictor(str(ckpt))
    assert not (tmp_path / "pwned").exists()


def test_what_is_not_a_model_says_so(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match="is not a model: expected a model folder"):
        load_predictor(str(tmp_path / "notes"))
    with pytest.raises(ConfigError, match="no such folder"):
        load_predictor(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no folder at that URL"):
        load_predictor("memory://infer-none", cache_dir=str(tmp_path / "cache"))


def test_generative_eval_during_training_answers_with_the_training_model_and_leaves_it_as_it_was(
        tiny_model_dir, predictor, loose):
    """eval.during_training's scorer on a LoRA model as training holds it (train mode, dropout, gradient
    checkpointing): the answers of the same weights loaded for inference, and afterwards the same mode, weights,
    gradients, config and random number state as before."""
    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.evaluate import evaluate
    from vlm_core.model import build_for_training
    from vlm_core.trainer import GenerativeEval

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=float32", "model.gradient_checkpointing=true",
                             "lora.enabled=true", "lora.r=4", "lora.dropout=0.2"])
    model = build_for_training(cfg).train()  # fresh adapters (lora_B = 0): the base model's answers
    questions = questions_from_jsonl(str(loose))[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    scorer = GenerativeEval(questions, make_preprocessor(predictor.tokenizer, DATA, model.config), 8, 2)
    scores = scorer.run(model, predictor.tokenizer, torch.device("cpu"), step=0)
    expected = evaluate(predictor, questions, max_new_tokens=8, batch_size=2).metrics["overall"]
    assert {k: scores[k] for k in ("exact_match", "f1", "anls")} == {k: expected[k] for k in ("exact_match", "f1", "anls")}
    assert scores["generation_runtime"] > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert model.config.use_cache is False  # gradient checkpointing's setting, untouched
