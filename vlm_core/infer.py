"""Answer questions with a model: held-out shard samples or a user's annotations in, generated text out.

What a fine-tune learned shows in its answers, so this is generation exactly as the model was
trained to answer: every prompt goes through the project's own `Preprocessor` (the same template,
tiling and image-token expansion as training) and ends with the generation prompt
`<|im_start|>assistant\\n`; decoding is greedy and stops at `<|im_end|>`. Prompts are generated in
batches, left-padded so that every row's answer starts at the same position; batching changes no
answer (tested against one question at a time).

`load_predictor` loads once what a run leaves behind, whatever the kind: a merged or consolidated
model folder, a LoRA adapter (merged into its base in memory), a full fine-tune's training checkpoint
(full weights or ZeRO shards), each as a folder or an fsspec URL. Pickle-based files of a checkpoint
are read only through vlm_core.safe_load, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlm_core.config import ConfigError, DataConfig
from vlm_core.data.images import ImageReject, check_image, join_under_root, read_image_bytes
from vlm_core.data.loader import ShardRun, iter_shard
from vlm_core.data.manifest import read_manifest
from vlm_core.data.preprocess import ModelSample, Preprocessor, make_preprocessor
from vlm_core.data.readers import DatasetSpec, read_bytes, read_meta, read_records
from vlm_core.data.sample import IMAGE_PLACEHOLDER, ShardSample, Turn
from vlm_core.data.template import SampleRejected
from vlm_core.data.validate import RecordReject, check_record
from vlm_core.model.load import DTYPES, check_model_folder, fetch_to_cache, pick_attn_implementation

DEFAULT_CACHE = "~/.cache/vlm_finetune/models"
MAX_IMAGE_PIXELS = DataConfig.model_fields["max_image_pixels"].default
ModelKind = Literal["model", "lora", "checkpoint"]
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Questions


@dataclass
class Question:
    """One question: the conversation up to and including its last human turn, and the expected answer."""

    id: str
    dataset: str
    turns: list[Turn]  # ends with a human turn
    images: list[bytes]  # the images of `turns`, in text order
    reference: str = ""  # the gpt answer that followed (empty when there is none)
    max_dynamic_patch: int | None = None  # the data set's tile budget (as in training); None: data.max_dynamic_patch

    @property
    def prompt(self) -> str:
        """The text of the last human turn."""
        return self.turns[-1].value


def split_last_answer(turns: list[Turn]) -> tuple[list[Turn], str]:
    """(the turns before the last gpt turn, that turn's text); a conversation ending with a human turn is
    returned whole, with reference "". Multi-turn samples are asked their last question, with all before it."""
    last = max((i for i, t in enumerate(turns) if t.from_ == "gpt"), default=None)
    if last is None or last < len(turns) - 1:
        return list(turns), ""
    return list(turns[:last]), turns[last].value


def _question(qid: str, dataset: str, turns: list[Turn], images: list[bytes], max_dynamic_patch: int | None) -> Question:
    context, reference = split_last_answer(turns)
    shown = sum(t.value.count(IMAGE_PLACEHOLDER) for t in context)  # images of the kept turns only
    return Question(qid, dataset, context, list(images[:shown]), reference, max_dynamic_patch)


def questions_from_shards(shards: str, max_samples: int | None, split: str = "eval") -> list[Question]:
    """The first `max_samples` (None: all) samples of a split of prepared shards (path or fsspec URL), in
    manifest order: the same questions every time. An empty split gives []."""
    manifest = read_manifest(shards)
    if manifest is None:
        raise ConfigError(f"{shards.rstrip('/')}/manifest.json not found: not a prepared shard folder (or an "
                          "incomplete one); run `vlmft prepare` first")
    info = getattr(manifest, split)
    out: list[Question] = []
    for url, shard in zip(manifest.shard_urls(shards, split), info.shards, strict=True):
        left = None if max_samples is None else max_samples - len(out)
        if left is not None and left <= 0:
            break
        take = shard.samples if left is None else min(shard.samples, left)
        for item in iter_shard(ShardRun(url, 0, take)):
            record = ShardSample.model_validate_json(item["json"])
            members = {k: v for k, v in item.items() if isinstance(v, bytes)}
            missing = [ref.member for ref in record.images if ref.member.lower() not in members]
            if missing:
                raise ConfigError(f"{url} key {item['__key__']}: image member(s) {missing} missing from the shard; "
                                  "re-run the prepare step")
            images = [members[ref.member.lower()] for ref in record.images]
            out.append(_question(record.id, record.source.dataset, record.conversations, images,
                                 record.max_dynamic_patch))
    return out


def _load_image(root: str, rel: str, where: str) -> bytes:
    """An annotation's image, checked and converted exactly as the prepare step stores it in a shard."""
    try:
        return check_image(read_image_bytes(root, rel), join_under_root(root, rel), MAX_IMAGE_PIXELS).data
    except ImageReject as exc:
        raise ConfigError(f"{where}: field 'image' {rel!r}: {exc.reason}: {exc.detail}") from None


def _questions_of(spec: DatasetSpec, max_samples: int | None) -> list[Question]:
    raw = read_bytes(spec.annotation, f"annotation {spec.annotation}", "an annotation file (JSONL, or a JSON list)")
    out: list[Question] = []
    for rec in read_records(spec, raw):
        if max_samples is not None and len(out) >= max_samples:
            break
        where = f"{spec.annotation}:{rec.line}"
        if rec.reason:
            raise ConfigError(f"{where}: {rec.reason}: {rec.detail}")
        record = rec.record
        conv = record.get("conversations") if isinstance(record, dict) else None
        asks = isinstance(conv, list) and conv and isinstance(conv[-1], dict) and conv[-1].get("from") == "human"
        if asks:  # a question without an answer: checked as if it had one
            record = {**record, "conversations": [*conv, {"from": "gpt", "value": "-"}]}
        try:
            ok = check_record(record)
        except RecordReject as exc:
            raise ConfigError(f"{where}: {exc.reason}: {exc.detail}") from None
        turns = [Turn.model_validate(t) for t in (ok.conversations[:-1] if asks else ok.conversations)]
        images = [_load_image(spec.root, p, where) for p in ok.images]
        out.append(_question(ok.id or f"{spec.name}:{rec.line}", spec.name, turns, images, spec.max_dynamic_patch))
    return out


def questions_from_jsonl(path: str, image_root: str | None = None, *, max_samples: int | None = None) -> list[Question]:
    """Questions from one InternVL JSONL (or LLaVA JSON list) annotation file, images under `image_root`
    (default: the file's folder). A conversation may end with a human turn (no reference answer).
    A bad line fails with its file, line and field."""
    name = posixpath.splitext(posixpath.basename(path))[0]
    root = image_root or posixpath.dirname(path) or "."
    return _questions_of(DatasetSpec(name, root, path, 1.0, None), max_samples)


def questions_from_meta(meta: str, image_root: str | None = None, *, max_samples: int | None = None) -> list[Question]:
    """Questions from every data set of an InternVL meta JSON (or a LLaVA JSON list with `image_root`), in order."""
    out: list[Question] = []
    for spec in read_meta(meta, image_root):
        left = None if max_samples is None else max_samples - len(out)
        if left is not None and left <= 0:
            break
        out += _questions_of(spec, left)
    return out


def question_from_prompt(prompt: str, images: list[str]) -> Question:
    """One question from a prompt and image files (paths or URLs); `<image>\\n` per image is put in front
    of the prompt unless it places its images itself."""
    data = []
    for path in images:
        raw = read_bytes(path, f"--image {path}", "an image file")
        try:
            data.append(check_image(raw, path, MAX_IMAGE_PIXELS).data)
        except ImageReject as exc:
            raise ConfigError(f"--image {path}: {exc.reason}: {exc.detail}") from None
    placed = prompt.count(IMAGE_PLACEHOLDER)
    if placed == 0:
        prompt = (IMAGE_PLACEHOLDER + "\n") * len(images) + prompt
    elif placed != len(images):
        raise ConfigError(f"--prompt has {placed} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} --image "
                          "file(s); give one placeholder per image, or none to put the images first")
    return Question("prompt", "prompt", [Turn.model_validate({"from": "human", "value": prompt})], data)


# --------------------------------------------------------------------------------------------------
# Loading


def _local_folder(source: str, cache_dir: str, what: str) -> Path:
    """`source` as a local folder: URLs fetched into the cache once (checksum-verified when the upload has
    vlm_core.storage's checksum manifest)."""
    path = source.removeprefix("file://")
    if "://" not in path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{what} {source}: {'is a file, not a folder' if folder.is_file() else 'no such folder'}")
        return folder
    import fsspec

    from vlm_core.storage import is_complete

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise ConfigError(f"{what} {source}: no folder at that URL")
    return fetch_to_cache(path, cache_dir, verified=is_complete(path))  # the cache training fetches models to


def model_kind(folder: Path, source: str = "") -> ModelKind:
    """What a folder holds: a LoRA adapter, a training checkpoint of a full fine-tune, or a model folder."""
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if (folder / "trainer_state.json").is_file() or (folder / "latest").is_file():
        return "checkpoint"
    if (folder / "config.json").is_file():
        return "model"
    raise ConfigError(
        f"{source or folder} is not a model: expected a model folder (config.json + weights, e.g. a merged "
        "model), a LoRA adapter (adapter_config.json) or a training checkpoint (trainer_state.json)")


def _tokenizer(*folders: Path):
    """The tokenizer of the first folder that has one (an adapter checkpoint carries the training tokenizer)."""
    from transformers import AutoTokenizer

    folder = next(f for f in folders if (f / "tokenizer_config.json").is_file() or f == folders[-1])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "context_image_token", None) is None:
        raise ConfigError(f"{folder}: the tokenizer has no context_image_token (<IMG_CONTEXT>); an InternVL-hf "
                          "tokenizer_config.json declares it")
    return tokenizer


def _base_folder(adapter: Path, source: str, base: str | None, cache_dir: str) -> Path:
    """The base model of a LoRA adapter: `base`, else the adapter's base_model_name_or_path."""
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    chosen = base or recorded
    if not chosen:
        raise ConfigError(f"LoRA adapter {source}: adapter_config.json names no base model "
                          "(base_model_name_or_path); pass the base model with --base PATH_OR_URL")
    try:
        folder = _local_folder(chosen, cache_dir, "base model")
        check_model_folder(folder)
    except ConfigError as exc:
        origin = "--base" if base else "its adapter_config.json base_model_name_or_path"
        raise ConfigError(f"LoRA adapter {source} needs its base model {chosen} (from {origin}), which cannot be "
                          f"used: {exc}; pass the base model folder with --base PATH_OR_URL") from None
    return folder


def _load_weights(folder: Path, kind: ModelKind, source: str, base: str | None, cache_dir: str, dtype: str,
                  attn: str) -> tuple[torch.nn.Module, Path]:
    """(the model with merged weights, in `dtype`; the folder whose config and tokenizer belong to it)."""
    from transformers import AutoConfig, InternVLForConditionalGeneration

    from vlm_core.safe_load import check_checkpoint_files

    check_checkpoint_files(folder)  # every pickle-based file, through the allowlist, before anything loads
    if kind == "model":
        check_model_folder(folder)
        return InternVLForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[dtype],
                                                                attn_implementation=attn), folder
    if kind == "lora":
        from peft import PeftModel

        base_folder = _base_folder(folder, source, base, cache_dir)
        model = InternVLForConditionalGeneration.from_pretrained(base_folder, dtype=torch.float32,
                                                                 attn_implementation=attn)
        merged = PeftModel.from_pretrained(model, folder).merge_and_unload()  # one model: as fast as a merged folder
        return merged.to(DTYPES[dtype]), base_folder
    from vlm_core.consolidate import load_checkpoint_model

    config_folder = folder if (folder / "config.json").is_file() else None
    if config_folder is None:
        if not base:
            raise ConfigError(f"checkpoint {source} has no config.json; pass its base model with --base PATH_OR_URL")
        config_folder = _local_folder(base, cache_dir, "base model")
    config = AutoConfig.from_pretrained(config_folder)
    config._attn_implementation = attn
    return load_checkpoint_model(folder, source, config).to(DTYPES[dtype]), config_folder


@dataclass
class Predictor:
    """A loaded model with its tokenizer and preprocessor: load once (`load_predictor`), answer many."""

    model: Any  # InternVLForConditionalGeneration, in eval mode on `device`
    tokenizer: Any
    preprocessor: Preprocessor
    source: str  # what was loaded (the --model argument)
    kind: ModelKind
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, preprocessor: Preprocessor, device: torch.device,
                   source: str = "the model being trained") -> Predictor:
        """A predictor over a model already in memory (e.g. the one a Trainer is training, a peft model
        included), answering through the given preprocessor. Nothing is copied or moved: the caller puts
        the model in eval mode and restores its mode afterwards."""
        return cls(model, tokenizer, preprocessor, source, "model", device)

    def _prompt(self, q: Question) -> ModelSample:
        try:
            return self.preprocessor.generation_prompt(q.turns, q.images, q.id, q.max_dynamic_patch,
                                                       f"question {q.id!r} ({q.dataset})")
        except SampleRejected as exc:
            raise ConfigError(str(exc)) from None

    def _generate(self, samples: list[ModelSample], max_new_tokens: int) -> list[str]:
        batch = left_pad(samples, self.tokenizer.pad_token_id)
        tiles = [s.pixel_values for s in samples if s.tiles_per_image]
        # a batch without images passes no pixel_values at all (generate would run the vision tower on None)
        pixels = {"pixel_values": torch.cat(tiles).to(self.device, self.model.dtype)} if tiles else {}
        end = self.preprocessor.tokens.im_end_id
        # use_cache=True: a model trained with gradient checkpointing has config.use_cache=False, which would
        # recompute the whole prefix at every new token; passing it here leaves the model's config alone.
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device),
                **pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                temperature=None, top_p=None, top_k=None, eos_token_id=end, pad_token_id=self.tokenizer.pad_token_id,
            )
        answers = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            row = row[: row.index(end)] if end in row else row
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    def predict(self, questions: list[Question], max_new_tokens: int = 32, batch_size: int = 8,
                progress: Progress | None = None) -> list[str]:
        """The greedy answer to each question, in order; `progress(done, total)` after each batch."""
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be at least 1")
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            answers += self._generate([self._prompt(q) for q in chunk], max_new_tokens)
            if progress:
                progress(len(answers), len(questions))
        return answers


def left_pad(samples: list[ModelSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, L), each prompt right-aligned so all answers start at column L."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, width - len(s.input_ids):] = s.input_ids
        attention[i, width - len(s.input_ids):] = s.attention_mask
    return {"input_ids": input_ids, "attention_mask": attention}


def load_predictor(
    model: str,
    *,
    base: str | None = None,
    data: DataConfig | None = None,
    dtype: str = "float32",
    cache_dir: str = DEFAULT_CACHE,
    device: str | None = None,
    attn_implementation: str = "sdpa",
) -> Predictor:
    """Load `model` (a model folder, a LoRA adapter, a full fine-tune's checkpoint, or an fsspec URL of
    one) for generation. A LoRA adapter's base is `base`, else the one its adapter_config.json names.
    `data` gives the preprocessing settings (tiles, normalisation, system prompt) the model was trained
    with; `device` defaults to CUDA when there is one."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    folder = _local_folder(model, cache_dir, "model")
    kind = model_kind(folder, model)
    attn = pick_attn_implementation(attn_implementation)
    net, config_folder = _load_weights(folder, kind, model, base, cache_dir, dtype, attn)
    tokenizer = _tokenizer(folder, config_folder) if kind != "model" else _tokenizer(folder)
    run_on = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(run_on).eval()
    preprocessor = make_preprocessor(tokenizer, data or DataConfig(), net.config)
    return Predictor(net, tokenizer, preprocessor, model, kind, run_on)
