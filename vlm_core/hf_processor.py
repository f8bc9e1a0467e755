"""The published folder's processor: transformers' InternVL processor set to preprocess as training did.

Whoever loads a published folder with `AutoProcessor` gets transformers' `InternVLProcessor`, with a
`GotOcr2ImageProcessor` that reads preprocessor_config.json. Copied from the base model, that file
holds the base model's settings (e.g. up to 12 tiles per image, where training used
data.max_dynamic_patch=2), so the fine-tuned model would be fed inputs unlike the ones it learned
from. `write_processor_files` rewrites the processor configs of the folder being published from the
training config, and `processor_difference` loads them back the way a user would and proves, on probe
images, that they give the same prompt ids and pixels as our `Preprocessor`.

How transformers' GotOcr2 image processor (both `GotOcr2ImageProcessor`, torchvision, the default
when torchvision is installed, and `GotOcr2ImageProcessorPil`) maps to our tiling (vlm_core.data.tiling):

- crop_to_patches=true is InternVL's dynamic tiling; `InternVLProcessor` also passes it on every call.
- min_patches / max_patches = data.min_dynamic_patch / data.max_dynamic_patch: the same candidate
  grids (min ≤ cols·rows ≤ max), the same closest-aspect-ratio choice and the same tie rule (a later
  grid wins a tie when the image's area exceeds half the grid's pixel area); tiles row by row.
- thumbnail: GotOcr2 always appends a whole-image thumbnail to an image cut into more than one tile,
  exactly InternVL's rule with data.use_thumbnail=true. It has no setting to leave it out, so
  data.use_thumbnail=false cannot be published (`check_publishable` refuses it, naming the fix) unless
  data.max_dynamic_patch=1, where no image is ever cut and the two rules agree.
- size = the model's tile side (vision_config.image_size), resample 3 (bicubic), rescale 1/255,
  image_mean / image_std = the constants of data.normalization, do_convert_rgb.
- processor_config.json: image_seq_length = tokens per tile.
- the chat template: with data.system_prompt set, training put that system turn in front of every
  conversation without one; the template gets the same default (a conversation's own system turn
  still wins).

What a processor config cannot say, and so differs from training:

- pixels: the PIL backend gives bit-identical tiles to training with data.resize_backend=pil; the
  torchvision backend resizes with its own bicubic kernel (and fuses rescale and normalise), so its
  tiles differ, in grey levels: at most 1 where an image is scaled down, 2 on photos and gradients
  scaled up, up to 10 at hard edges scaled up (on under 0.1% of the values) and up to ~20 on pixel
  noise scaled up (tests/test_hf_load.py measures it). Pass `backend="pil"` to `AutoImageProcessor`
  for the PIL backend's pixels. Training with data.resize_backend=torch (the default) saw tiles
  within 2 grey levels of the PIL backend's on photos (tests/test_fast_tiling.py).
- data.min_dynamic_patch > 1: GotOcr2 orders grids of equal tile count differently, so some exact
  aspect-ratio ties pick another grid (rare: vlm_core.data.tiling counts 1,896 of 312 M size/setting
  cases up to 2000 px; e.g. 1000x400 px with exactly 4 tiles: training 4x1, transformers 2x2). With
  min_dynamic_patch=1 the grids are always the same. The publish logs a warning.
- several images in one prompt: training split the tile budget (max(1, max // images) each, and
  min_dynamic_patch lowered to that); transformers gives every image max_patches. Pass
  `processor_kwargs={"max_patches": ...}` to `apply_chat_template` to match.
- a `max_dynamic_patch` set per data set in the meta JSON applied to that data set only; the
  published processor has data.max_dynamic_patch.
- images: training applied the EXIF orientation and put transparent images on white; pass the
  processor an upright RGB image (`ImageOps.exif_transpose(image).convert("RGB")`; image paths and URLs
  given to `apply_chat_template` get the orientation applied by transformers).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm_core.config import ConfigError, DataConfig
from vlm_core.data.tiling import NORMALIZATION, vision_geometry

log = logging.getLogger(__name__)

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
PIXEL_TOLERANCE = 1e-4  # normalised units; one grey level is about 0.017 of them
PROBE_TEXT = "Describe the picture."


def check_publishable(data: DataConfig) -> None:
    """Raise a ConfigError when transformers' processor cannot reproduce training's preprocessing."""
    if not data.use_thumbnail and data.max_dynamic_patch > 1:
        raise ConfigError(
            "data.use_thumbnail=false cannot be published: transformers' InternVL image processor "
            "(GotOcr2ImageProcessor) always adds a thumbnail tile to an image cut into more than one tile, so "
            "the published model would be given a tile it never trained with. Train with "
            "data.use_thumbnail=true, or with data.max_dynamic_patch=1 (no image is cut)"
        )


def publish_settings(data: DataConfig) -> dict:
    """The training settings the published processor and chat template are written from."""
    return {"max_dynamic_patch": data.max_dynamic_patch, "min_dynamic_patch": data.min_dynamic_patch,
            "use_thumbnail": data.use_thumbnail, "normalization": data.normalization,
            "system_prompt": data.system_prompt}


def image_processor_settings(data: DataConfig, model_config: Any) -> dict:
    """preprocessor_config.json values that make GotOcr2ImageProcessor tile and normalise like training."""
    tile = vision_geometry(model_config).tile_size
    mean, std = NORMALIZATION[data.normalization]
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": True,
        "min_patches": data.min_dynamic_patch,
        "max_patches": data.max_dynamic_patch,
        "size": {"height": tile, "width": tile},
        "do_resize": True,
        "resample": 3,  # PIL bicubic, as vlm_core.data.tiling resizes
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def with_default_system(template: str, system_prompt: str) -> str:
    """`template` preceded by a system turn of `system_prompt` when the conversation has none.

    The prompt goes in as a Jinja string literal: JSON's escapes (\\n, \\", \\\\, \\uXXXX) are the
    ones Jinja's string literals understand, and non-ASCII text is kept as it is.
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- set messages = ([{'role': 'system', 'content': " + literal + "}] if (messages | length == 0 "
            "or messages[0]['role'] != 'system') else []) + messages %}" + template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_system_prompt(folder: Path, system_prompt: str) -> None:
    """Give every chat template in the folder (the processor's and the tokenizer's) the default system turn."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(with_default_system(jinja.read_text(encoding="utf-8"), system_prompt), encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        content = _read_json(folder / name)
        if isinstance(content.get("chat_template"), str):
            content["chat_template"] = with_default_system(content["chat_template"], system_prompt)
            _write_json(folder / name, content)


def write_processor_files(folder: Path, data: DataConfig, model_config: Any) -> None:
    """Rewrite the processor configs (and chat template) in `folder` from the training settings.

    preprocessor_config.json gets `image_processor_settings` over whatever the base model had; so does a
    processor_config.json that nests its image processor (transformers 5 writes that form, and it wins
    over preprocessor_config.json when present). processor_config.json gets image_seq_length.
    """
    check_publishable(data)
    settings = image_processor_settings(data, model_config)
    _write_json(folder / IMAGE_PROCESSOR_FILE, {**_read_json(folder / IMAGE_PROCESSOR_FILE), **settings})
    processor = {"processor_class": "InternVLProcessor", **_read_json(folder / PROCESSOR_FILE)}
    processor["image_seq_length"] = vision_geometry(model_config).tokens_per_tile
    if isinstance(processor.get("image_processor"), dict):
        processor["image_processor"] = {**processor["image_processor"], **settings}
    _write_json(folder / PROCESSOR_FILE, processor)
    if data.system_prompt is not None:
        _add_system_prompt(folder, data.system_prompt)
    if data.min_dynamic_patch > 1:
        log.warning("data.min_dynamic_patch=%d: transformers' processor breaks some exact aspect-ratio ties "
                    "between grids of equal tile count otherwise than training did (rare; see "
                    "vlm_core.hf_processor)", data.min_dynamic_patch)


def probe_images(data: DataConfig) -> dict[str, bytes]:
    """Deterministic PNGs (gradient + noise) whose tile count tells the tiling settings apart.

    "wide" is (max + 1):1, so max_dynamic_patch tiles (and the thumbnail) under training's settings
    and another count under any other max; "square" is one tile unless min_dynamic_patch > 1.
    """
    from PIL import Image

    side = 40
    out = {}
    for name, (w, h) in {"wide": ((data.max_dynamic_patch + 1) * side, side), "square": (side, side)}.items():
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        noise = np.random.default_rng(0).integers(-12, 13, size=(h, w, 3))
        rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 230 + noise
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def _render(processor: Any, image: Any) -> dict:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROBE_TEXT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def processor_difference(folder: Path, data: DataConfig) -> str | None:
    """How `folder`'s processor, loaded as a user would, preprocesses the probe images otherwise than training.

    None when it does not: for each probe image, the prompt ids (one image + text, generation prompt)
    of the default backend and of the PIL backend equal those of our `Preprocessor` up to the
    assistant's reply, and the PIL backend's pixels equal those of our `Preprocessor` with
    data.resize_backend=pil within PIXEL_TOLERANCE. The pixels are compared with the PIL-exact backend
    whatever training used: that is what proves the published settings (tile grid, thumbnail,
    normalisation) are training's, bit for bit; the torch backend's own difference from it (≤ 2 grey
    levels on photos, ~2 on the probes' upscaled noise) is a property of the backend, tested on its own.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.data.sample import Turn
    from vlm_core.data.template import IGNORE_INDEX

    model_config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unlimited = data.model_copy(update={"max_seq_length": 1 << 30, "resize_backend": "pil"})  # never cut
    preprocess = make_preprocessor(tokenizer, unlimited, model_config)
    turns = [Turn(from_="human", value=PROBE_TEXT), Turn(from_="gpt", value="A picture.")]
    default = AutoProcessor.from_pretrained(folder)
    pil = AutoProcessor.from_pretrained(folder)
    pil.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    for probe, png in probe_images(data).items():
        ours = preprocess(turns, [png], "probe")
        prompt = ours.input_ids[: int((ours.labels != IGNORE_INDEX).nonzero()[0])].tolist()
        image = Image.open(io.BytesIO(png)).convert("RGB")
        results = {"default": _render(default, image), "pil": _render(pil, image)}
        for backend, got in results.items():
            ids = got["input_ids"][0].tolist()
            if ids != prompt:
                at = _first_difference(prompt, ids)
                return (f"its processor ({backend} backend) renders a prompt with one {probe} probe image as "
                        f"{len(ids)} tokens where training's template gives {len(prompt)}; first difference at token "
                        f"{at}: processor {tokenizer.decode(ids[at:at + 8])!r}, training "
                        f"{tokenizer.decode(prompt[at:at + 8])!r} (the chat template or the tile count differs)")
        pixels = results["pil"]["pixel_values"]
        if pixels.shape != ours.pixel_values.shape:
            return (f"its image processor gives {tuple(pixels.shape)} pixel values for the {probe} probe image, "
                    f"training {tuple(ours.pixel_values.shape)}")
        diff = (pixels - ours.pixel_values).abs().max().item()
        if not diff <= PIXEL_TOLERANCE:
            return (f"its image processor's pixels for the {probe} probe image differ from training's by max |Δ| "
                    f"{diff:.3g} (tolerance {PIXEL_TOLERANCE:g}); check {IMAGE_PROCESSOR_FILE}")
    return None
