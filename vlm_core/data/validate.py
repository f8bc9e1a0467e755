"""Check one annotation record's structure before any image is read.

These are the mistakes that upstream InternVL either crashes on deep inside training or silently
trains around (issues #429, #893): wrong roles, empty replies, `<image>` placeholders that do not
match the images, an empty image path, chat-template tokens written as text. Each raises
`RecordReject` with a stable reason and a detail naming the field.

Keys of a turn other than `from` and `value` (e.g. a per-turn `weight`) are kept with the turn and
listed in `CheckedRecord.extra_turn_keys`, so the caller can say that training does not use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vlm_core.data.sample import IMAGE_PLACEHOLDER, RESERVED_TOKENS, SPEAKERS, with_image_placeholder

# The prepare step's length check (built by vlm_core.data.length from the tokenizer and tile geometry):
# (turns, [(width, height)], the data set's max_dynamic_patch or None) -> None when the sample fits,
# else the reject detail.
LengthCheck = Callable[[list[dict], list[tuple[int, int]], "int | None"], "str | None"]

REASONS = (
    "bad_record",
    "video_not_supported",
    "empty_image_path",
    "empty_conversation",
    "first_turn_not_user",
    "roles_not_alternating",
    "last_turn_not_assistant",
    "empty_assistant_reply",
    "reserved_token",
    "image_count_mismatch",
)


class RecordReject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class CheckedRecord:
    """A structurally valid record: id, turns (placeholder added when InternVL would), image paths."""

    id: str | None
    conversations: list[dict]
    images: list[str]
    extra_turn_keys: set[str] = field(default_factory=set)  # turn keys besides from/value, kept as given


def _images(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        paths, names = [image], ["image"]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        paths, names = list(image), [f"image[{i}]" for i in range(len(image))]
    else:
        raise RecordReject("bad_record", f"field 'image' must be a path or a list of paths, got {type(image).__name__}")
    for path, name in zip(paths, names, strict=True):
        if not path.strip():
            raise RecordReject("empty_image_path", f"field {name} is an empty path; name the image file, or drop "
                               "the field for a text-only sample")
    return paths


def _turns(record: dict) -> list[dict]:
    conv = record.get("conversations")
    if conv is None or conv == []:
        raise RecordReject("empty_conversation", "field 'conversations' is missing or empty")
    if not isinstance(conv, list):
        raise RecordReject("bad_record", f"field 'conversations' must be a list, got {type(conv).__name__}")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordReject("bad_record", f"conversations[{i}] must be an object with a string 'value'")
        if turn.get("from") not in SPEAKERS:
            raise RecordReject(
                "bad_record", f"conversations[{i}].from is {turn.get('from')!r}; expected system, human or gpt"
            )
        turns.append(dict(turn))
    return turns


def _check_reserved(turns: list[dict]) -> None:
    for i, turn in enumerate(turns):
        for token in RESERVED_TOKENS:
            if token in turn["value"]:
                raise RecordReject(
                    "reserved_token",
                    f"conversations[{i}] ({turn['from']}) contains {token!r}, a chat-template token that would break "
                    "the sample's structure; remove it from the text",
                )


def _check_roles(turns: list[dict]) -> None:
    body = turns[1:] if turns[0]["from"] == "system" else turns
    if not body:
        raise RecordReject("empty_conversation", "only a system turn")
    if body[0]["from"] != "human":
        raise RecordReject("first_turn_not_user", f"the first turn after the system prompt is {body[0]['from']!r}")
    offset = len(turns) - len(body)
    for i, turn in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise RecordReject(
                "roles_not_alternating", f"conversations[{i + offset}].from is {turn['from']!r}, expected {expected!r}"
            )
    if body[-1]["from"] != "gpt":
        raise RecordReject("last_turn_not_assistant", "the conversation ends with a user turn that has no reply")
    for i, turn in enumerate(turns):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise RecordReject("empty_assistant_reply", f"conversations[{i}].value is empty")


def check_record(record: object) -> CheckedRecord:
    """Validate one record; raise RecordReject with the reason and the offending field."""
    if not isinstance(record, dict):
        raise RecordReject("bad_record", f"expected a JSON object, got {type(record).__name__}")
    if "video" in record:
        raise RecordReject("video_not_supported", "video samples are not supported yet; convert frames to images")
    images = _images(record)
    turns = _turns(record)
    _check_roles(turns)
    _check_reserved(turns)
    spoken = with_image_placeholder([(t["from"], t["value"]) for t in turns], len(images))
    turns = [{**t, "value": v} for t, (_, v) in zip(turns, spoken, strict=True)]
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(images):
        raise RecordReject(
            "image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)"
        )
    raw_id = record.get("id")
    extra = {k for t in turns for k in t if k not in ("from", "value")}
    return CheckedRecord(None if raw_id is None else str(raw_id), turns, images, extra)
