"""The `internvl2_5` ChatML template with assistant-only labels and image spans.

A conversation becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn (InternVL 2.5 / 3 / 3.5).
Each turn is tokenised on its own and the ids concatenated, as upstream does, so labels can never
drift from the text ("tokenization mismatch" is the classic cause of a zero loss upstream). Labels:
system and user turns -100; in assistant turns the `<|im_start|>assistant\\n` prefix and the trailing
`\\n` are -100 and the content plus `<|im_end|>` are trained. Each `<image>` placeholder becomes
`<img>` + `<IMG_CONTEXT>` × (tokens per tile × the image's tiles) + `</img>`, never trained.

The turn text is tokenised with an empty `<img></img>` pair per image and the context tokens are
inserted afterwards: `<img>`/`</img>` are special tokens, which split the text exactly where the
full span would, so the ids are the same as tokenising the expanded text, without pushing thousands
of `<IMG_CONTEXT>` strings through the tokenizer. When a reply starts with text the tokenizer would
merge into the prefix (e.g. a leading newline), the assistant turn falls back to tokenising prefix,
content and suffix separately, so the label boundary is always exact.

Truncation (`truncate`) never cuts inside an image span (the model would get fewer image tokens
than features: upstream's silent zero loss, InternVL issue #461); such samples, and samples left
with no supervised token, raise `SampleRejected` so callers can count and report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vlm_core.data.sample import CHATML_ROLES, IGNORE_INDEX, IMAGE_PLACEHOLDER, Turn, with_image_placeholder

RejectReason = Literal["too_long", "image_cut", "no_labels", "invalid"]


class SampleRejected(ValueError):
    """A sample that cannot be trained on as is; `reason` names the counter it belongs to."""

    def __init__(self, reason: RejectReason, message: str):
        super().__init__(message)
        self.reason: RejectReason = reason


@dataclass(frozen=True)
class TemplateTokens:
    """Token ids the template needs, read once from the tokenizer."""

    im_start: str
    im_end: str
    im_end_id: int
    img_start_id: int
    img_end_id: int
    img_context_id: int
    newline_ids: tuple[int, ...]
    prefix_ids: dict[str, tuple[int, ...]]  # role -> ids of "<|im_start|>{role}\n"
    reserved: tuple[str, ...]  # strings a conversation may not contain (they would break the structure)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TemplateTokens:
        """Read the ChatML and InternVL image tokens off an InternVL-hf tokenizer."""
        names = {
            "start_image_token": getattr(tokenizer, "start_image_token", None),
            "end_image_token": getattr(tokenizer, "end_image_token", None),
            "context_image_token": getattr(tokenizer, "context_image_token", None),
        }
        missing = [k for k, v in names.items() if v is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks {', '.join(missing)}: an InternVL-hf tokenizer declares <img>, </img> and "
                "<IMG_CONTEXT> as extra_special_tokens (model.path must point at an InternVL-hf checkpoint)"
            )
        im_start, im_end = "<|im_start|>", "<|im_end|>"
        vocab = tokenizer.get_vocab()
        for tok in (im_start, im_end):
            if tok not in vocab:
                raise ValueError(f"tokenizer has no {tok} token: the internvl2_5 template needs ChatML tokens")

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return cls(
            im_start=im_start,
            im_end=im_end,
            im_end_id=vocab[im_end],
            img_start_id=vocab[names["start_image_token"]],
            img_end_id=vocab[names["end_image_token"]],
            img_context_id=vocab[names["context_image_token"]],
            newline_ids=ids("\n"),
            prefix_ids={role: ids(f"{im_start}{role}\n") for role in CHATML_ROLES.values()},
            reserved=(im_start, im_end, *names.values()),
        )


@dataclass
class Encoded:
    """Token ids and labels of one conversation, with where each image span sits."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) incl. <img> and </img>

    @property
    def supervised_tokens(self) -> int:
        """Tokens the loss is computed on (position 0 is never a target after the shift)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def prepare_turns(
    turns: list[Turn], n_images: int, system_prompt: str | None, where: str = "sample"
) -> list[tuple[str, str]]:
    """(role, text) pairs in ChatML roles, validated; applies InternVL's placeholder rules.

    A single image without `<image>` gets `<image>\\n` prepended to the first user turn. Otherwise the
    number of placeholders must equal the number of images. `system_prompt` is added when the
    conversation has no system turn of its own.
    """
    spoken = with_image_placeholder([(t.from_, t.value) for t in turns], n_images)
    pairs = [(CHATML_ROLES[speaker], text) for speaker, text in spoken]
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in pairs)
    if n_images == 1 and count == 0:
        raise SampleRejected("invalid", f"{where}: one image but no human turn to put it in")
    if count != n_images:
        raise SampleRejected(
            "invalid",
            f"{where}: {count} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s); each image needs "
            f"exactly one {IMAGE_PLACEHOLDER} in the conversation, in order",
        )
    if not any(role == "assistant" for role, _ in pairs):
        raise SampleRejected("no_labels", f"{where}: no gpt turn, nothing to train on")
    if system_prompt is not None and not any(role == "system" for role, _ in pairs):
        pairs.insert(0, ("system", system_prompt))
    return pairs


def _expand_images(ids: list[int], image_tokens: list[int], tokens: TemplateTokens, where: str) -> list[int]:
    """Insert `<IMG_CONTEXT>` × n after each `<img>` of an `<img></img>` pair, consuming image_tokens."""
    out: list[int] = []
    for i, tok in enumerate(ids):
        out.append(tok)
        if tok == tokens.img_start_id:
            if i + 1 >= len(ids) or ids[i + 1] != tokens.img_end_id or not image_tokens:
                raise SampleRejected("invalid", f"{where}: malformed image placeholder")
            out.extend([tokens.img_context_id] * image_tokens.pop(0))
    return out


def encode_conversation(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    tokens: TemplateTokens,
    image_tokens: list[int],
    where: str = "sample",
) -> Encoded:
    """Token ids and labels for (role, text) pairs; image_tokens[k] = context tokens of image k."""
    pending = list(image_tokens)
    input_ids: list[int] = []
    labels: list[int] = []
    for role, text in pairs:
        for bad in tokens.reserved:
            if bad in text:
                raise SampleRejected(
                    "invalid", f"{where}: a {role} turn contains the reserved token {bad!r} as text; remove it"
                )
        body = text.replace(IMAGE_PLACEHOLDER, "<img></img>")
        turn = tokenizer.encode(f"{tokens.im_start}{role}\n{body}{tokens.im_end}\n", add_special_tokens=False)
        if role != "assistant":
            turn = _expand_images(turn, pending, tokens, where)
            input_ids += turn
            labels += [IGNORE_INDEX] * len(turn)
            continue
        prefix, suffix = list(tokens.prefix_ids[role]), [tokens.im_end_id, *tokens.newline_ids]
        clean = turn[: len(prefix)] == prefix and turn[-len(suffix) :] == suffix
        if clean:
            content = turn[len(prefix) : len(turn) - len(tokens.newline_ids)]
        else:  # the tokenizer merged across the boundary: tokenise the pieces on their own
            content = tokenizer.encode(body, add_special_tokens=False) + [tokens.im_end_id]
        content = _expand_images(content, pending, tokens, where)
        input_ids += prefix + content + list(tokens.newline_ids)
        labels += [IGNORE_INDEX] * len(prefix) + content + [IGNORE_INDEX] * len(tokens.newline_ids)
    spans = []
    start = None
    for i, tok in enumerate(input_ids):
        if tok == tokens.img_start_id:
            start = i
        elif tok == tokens.img_end_id and start is not None:
            spans.append((start, i + 1))
            for j in range(start, i + 1):
                labels[j] = IGNORE_INDEX  # image spans are never trained, even inside a reply
            start = None
    return Encoded(input_ids=input_ids, labels=labels, image_spans=spans)


def truncate(
    enc: Encoded, max_length: int, policy: Literal["truncate", "skip"], where: str = "sample"
) -> tuple[Encoded, bool]:
    """Cut to max_length tokens (or reject under policy 'skip'); return (encoded, was_truncated).

    Images whose span lies wholly past the cut are dropped with it (the caller drops their tiles);
    a cut inside a span rejects the sample; so does a cut that leaves no supervised token.
    """
    if len(enc.input_ids) <= max_length:
        if enc.supervised_tokens == 0:
            raise SampleRejected("no_labels", f"{where}: no supervised token (empty replies?)")
        return enc, False
    if policy == "skip":
        raise SampleRejected(
            "too_long", f"{where}: {len(enc.input_ids)} tokens > data.max_seq_length={max_length} (data.overlong=skip)"
        )
    for start, end in enc.image_spans:
        if start < max_length < end:
            raise SampleRejected(
                "image_cut",
                f"{where}: {len(enc.input_ids)} tokens; data.max_seq_length={max_length} would cut inside an image "
                f"span (tokens {start}..{end}); raise data.max_seq_length or lower data.max_dynamic_patch",
            )
    kept = Encoded(
        input_ids=enc.input_ids[:max_length],
        labels=enc.labels[:max_length],
        image_spans=[s for s in enc.image_spans if s[1] <= max_length],
    )
    if kept.supervised_tokens == 0:
        raise SampleRejected(
            "no_labels",
            f"{where}: {len(enc.input_ids)} tokens; cutting at data.max_seq_length={max_length} leaves no assistant "
            "token to train on; raise data.max_seq_length",
        )
    return kept, True
