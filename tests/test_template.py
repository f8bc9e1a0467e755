"""internvl2_5 template: assistant-only labels, image spans, truncation, text-only dummy tile."""

from __future__ import annotations

import pytest
import torch

from helpers.images import jpeg_bytes
from vlm_core.config import DataConfig
from vlm_core.data.preprocess import make_preprocessor
from vlm_core.data.sample import Turn
from vlm_core.data.template import (
    IGNORE_INDEX,
    SampleRejected,
    TemplateTokens,
    encode_conversation,
    prepare_turns,
)
from vlm_core.data.tiling import num_tiles, vision_geometry


def turns(*pairs: tuple[str, str]) -> list[Turn]:
    return [Turn.model_validate({"from": f, "value": v}) for f, v in pairs]


def supervised_runs(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Decoded runs of consecutive supervised tokens (labels equal the ids where supervised)."""
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], input_ids[keep])
    runs, current = [], []
    for tok, k in zip(input_ids.tolist(), keep.tolist(), strict=True):
        if k:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture(scope="module")
def with_system(tokenizer, tiny_config):
    return make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=6, system_prompt="You are helpful."), tiny_config)


CONVERSATIONS = {
    "multi_turn_system_prompt": (
        turns(("human", "<image>\nWhat color is it?"), ("gpt", "It is red."), ("human", "Sure?"), ("gpt", "Yes, red.")),
        [(300, 200)],
    ),
    "multi_image_own_system": (
        turns(("system", "Describe the images."), ("human", "Left <image> right <image>?"),
              ("gpt", "A circle and a square."), ("human", "Colors?"), ("gpt", "red and blue")),
        [(100, 400), (500, 120)],
    ),
    "text_only": (turns(("human", "Say yes"), ("gpt", "yes"), ("human", "Say no"), ("gpt", "No!")), []),
    "image_without_placeholder": (turns(("human", "What is this?"), ("gpt", "a square")), [(64, 64)]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_supervised_tokens_are_exactly_the_replies(name, with_system, tokenizer):
    conv, sizes = CONVERSATIONS[name]
    images = [jpeg_bytes(w, h, (200, 20, 20), k) for k, (w, h) in enumerate(sizes)]
    sample = with_system(conv, images, name)
    replies = [t.value + "<|im_end|>" for t in conv if t.from_ == "gpt"]
    assert supervised_runs(tokenizer, sample.input_ids, sample.labels) == replies
    text = tokenizer.decode(sample.input_ids[sample.attention_mask.bool()])
    has_own_system = conv[0].from_ == "system"
    assert text.count("<|im_start|>system\n") == 1
    assert ("You are helpful." in text) != has_own_system  # the configured prompt only when none is given
    assert text.endswith("<|im_end|>\n")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_image_spans_have_tokens_per_tile_times_tiles(name, with_system, tokenizer, tiny_config):
    conv, sizes = CONVERSATIONS[name]
    images = [jpeg_bytes(w, h, (20, 200, 20), k) for k, (w, h) in enumerate(sizes)]
    sample = with_system(conv, images, name)
    geometry = vision_geometry(tiny_config)
    budget = max(1, 6 // max(1, len(sizes)))
    expected_tiles = [num_tiles(w, h, geometry.tile_size, 1, budget, True) for w, h in sizes]
    assert sample.tiles_per_image == expected_tiles
    ids = sample.input_ids.tolist()
    start, end, ctx = tokenizer.start_image_token_id, tokenizer.end_image_token_id, tokenizer.context_image_token_id
    spans = []
    for i, tok in enumerate(ids):
        if tok == start:
            j = ids.index(end, i)
            assert set(ids[i + 1 : j]) == {ctx}
            spans.append((i, j - i - 1))
    counts = [n for _, n in spans]
    if sizes:
        assert counts == [geometry.tokens_per_tile * t for t in expected_tiles]
        assert sample.attention_mask.all()
        assert sample.pixel_values.shape == (sum(expected_tiles), 3, geometry.tile_size, geometry.tile_size)
    else:  # text-only: one dummy tile, its span last, masked out of attention and loss
        assert counts == [geometry.tokens_per_tile]
        assert sample.pixel_values.shape == (1, 3, geometry.tile_size, geometry.tile_size)
        i = spans[0][0]
        assert i + geometry.tokens_per_tile + 2 == len(ids)
        assert not sample.attention_mask[i:].any() and sample.attention_mask[:i].all()
    assert (sample.labels[torch.tensor(ids) == ctx] == IGNORE_INDEX).all()
    assert sum(1 for t in ids if t == ctx) == geometry.tokens_per_tile * max(1, sum(expected_tiles))


def test_text_matches_the_tokenizer_chat_template(tokenizer):
    """Per-turn tokenisation gives the same ids as rendering the whole chat template (what inference sees)."""
    conv = [("system", "You are helpful."), ("user", "Say the word 7"), ("assistant", "7"),
            ("user", "And 8?"), ("assistant", " 8, then 9.")]
    enc = encode_conversation(conv, tokenizer, TemplateTokens.from_tokenizer(tokenizer), [])
    messages = [{"role": r, "content": t} for r, t in conv]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(expected)


def test_reply_merging_into_the_prefix_keeps_exact_labels():
    """A tokenizer that merges `assistant\\n\\n` across the label boundary: labels still cover only the reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm_core.model.tiny import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["assistant\n\nhello there"] * 200 + ["user\nhi"] * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"},
    )
    tokens = TemplateTokens.from_tokenizer(tokenizer)
    whole = tokenizer.encode("<|im_start|>assistant\n\nhello there<|im_end|>\n", add_special_tokens=False)
    assert whole[: len(tokens.prefix_ids["assistant"])] != list(tokens.prefix_ids["assistant"])  # it does merge
    enc = encode_conversation([("user", "hi"), ("assistant", "\nhello there")], tokenizer, tokens, [])
    labels = torch.tensor(enc.labels)
    ids = torch.tensor(enc.input_ids)
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "\nhello there<|im_end|>"


def test_placeholder_and_reserved_token_errors(preprocessor):
    img = jpeg_bytes(32, 32, (1, 2, 3))
    with pytest.raises(SampleRejected, match="2 <image> placeholder") as e:
        preprocessor(turns(("human", "<image><image>"), ("gpt", "x")), [img], "a")
    assert e.value.reason == "invalid"
    with pytest.raises(SampleRejected, match="1 <image> placeholder"):
        preprocessor(turns(("human", "<image>"), ("gpt", "x")), [], "b")
    with pytest.raises(SampleRejected, match="reserved token '<IMG_CONTEXT>'"):
        preprocessor(turns(("human", "hi <IMG_CONTEXT>"), ("gpt", "x")), [], "c")
    with pytest.raises(SampleRejected, match="no gpt turn") as e:
        preprocessor(turns(("human", "hi")), [], "d")
    assert e.value.reason == "no_labels"
    with pytest.raises(SampleRejected, match="cannot decode image") as e:
        preprocessor(turns(("human", "<image>"), ("gpt", "x")), [b"not a jpeg"], "e")
    assert e.value.reason == "invalid"
    assert prepare_turns(turns(("human", "q"), ("gpt", "a")), 1, None)[0] == ("user", "<image>\nq")


@pytest.fixture(scope="module")
def sizes(tokenizer, tiny_config):
    """Token counts of a reference sample to place cuts: one 64x64 image (1 tile), two replies."""
    pp = make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=1, max_seq_length=4096), tiny_config)
    conv = turns(("human", "<image>\nWhat color?"), ("gpt", "It is red."), ("human", "Sure?"), ("gpt", "Yes."))
    sample = pp(conv, [jpeg_bytes(64, 64, (200, 0, 0))], "ref")
    ids = sample.input_ids.tolist()
    return {"conv": conv, "len": len(ids), "img_start": ids.index(tokenizer.start_image_token_id),
            "img_end": ids.index(tokenizer.end_image_token_id),
            "first_label": int((sample.labels != IGNORE_INDEX).nonzero()[0])}


def cut(tokenizer, tiny_config, max_len: int, overlong: str = "truncate"):
    from vlm_core.data.preprocess import Preprocessor, PreprocessSettings

    settings = PreprocessSettings(geometry=vision_geometry(tiny_config), max_dynamic_patch=1,
                                  max_seq_length=max_len, overlong=overlong)
    return Preprocessor(tokenizer, settings)


def test_truncation_never_cuts_an_image_span(tokenizer, tiny_config, sizes):
    img = [jpeg_bytes(64, 64, (200, 0, 0))]
    with pytest.raises(SampleRejected, match="inside an image span") as e:
        cut(tokenizer, tiny_config, sizes["img_start"] + 5)(sizes["conv"], img, "x")
    assert e.value.reason == "image_cut"
    with pytest.raises(SampleRejected, match="leaves no assistant token") as e:
        cut(tokenizer, tiny_config, sizes["first_label"])(sizes["conv"], img, "x")
    assert e.value.reason == "no_labels"
    with pytest.raises(SampleRejected, match="overlong=skip") as e:
        cut(tokenizer, tiny_config, sizes["len"] - 1, "skip")(sizes["conv"], img, "x")
    assert e.value.reason == "too_long"
    # a cut after the first reply: kept, flagged, the image and part of the labels survive
    sample = cut(tokenizer, tiny_config, sizes["len"] - 3)(sizes["conv"], img, "x")
    assert sample.truncated and len(sample.input_ids) == sizes["len"] - 3
    assert sample.tiles_per_image == [1] and (sample.labels != IGNORE_INDEX).sum() > 0
    full = cut(tokenizer, tiny_config, sizes["len"])(sizes["conv"], img, "x")
    assert not full.truncated and len(full.input_ids) == sizes["len"]


def test_dummy_tile_changes_nothing_the_text_sees(tiny_model_dir, preprocessor, tokenizer):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    sample = preprocessor(turns(("human", "Say yes"), ("gpt", "yes")), [], "t")
    n = int(sample.attention_mask.sum())
    with torch.no_grad():
        with_tile = model(input_ids=sample.input_ids[None], attention_mask=sample.attention_mask[None],
                          pixel_values=sample.pixel_values).logits[0, :n]
        plain = model(input_ids=sample.input_ids[None, :n]).logits[0]
    assert torch.allclose(with_tile, plain, atol=1e-5)
