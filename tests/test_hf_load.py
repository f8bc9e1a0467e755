"""Published folders load like a real checkpoint: transformers' own processor, read from the folder, gives
the prompt ids and pixels training gave (vlm_core.hf_processor); plain transformers in a fresh interpreter
generates what the model does in-process; a LoRA adapter names its base model so that plain peft finds
it from any working directory."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from helpers.images import jpeg_bytes
from vlm_core.config import ConfigError, DataConfig, ModelConfig, load_config
from vlm_core.data.preprocess import make_preprocessor
from vlm_core.data.sample import Turn
from vlm_core.data.template import IGNORE_INDEX
from vlm_core.data.tiling import NORMALIZATION
from vlm_core.demo import shape_png
from vlm_core.hf_processor import check_publishable, processor_difference
from vlm_core.merge import merge_lora
from vlm_core.model import build_for_training
from vlm_core.model.load import base_model_reference
from vlm_core.model.tiny import TILE_SIZE, TOKENS_PER_TILE
from vlm_core.preflight import preflight

README = Path(__file__).parent.parent / "README.md"
# The training run's data settings, each unlike the tiny base model's processor (6 tiles, ImageNet, no system)
DATA = DataConfig(max_dynamic_patch=3, normalization="clip", system_prompt="You answer briefly.")
QUESTION = "What colour is the shape?"
# (width, height): one tile (square, 4:3 and 3:2 with 3 tiles at most) and 2x1, 3x1, 1x3 grids + thumbnail
SIZES = [(112, 112), (640, 480), (90, 60), (300, 120), (1000, 400), (50, 200), (37, 91), (230, 100)]
# The torchvision backend's bicubic resize is not PIL's. Measured on these images, in grey levels: photos
# and gradients within 2; the shapes' hard edges, scaled up, up to 9, on under 0.1% of the values.
TORCHVISION_GREY_LEVELS = {"photo": 2, "gradient": 2, "shape": 9}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> dict:
    """A LoRA adapter trained from a relative model.path (as configs/demo.yaml has it), and its logits."""
    from helpers.batches import make_batch

    cwd = os.getcwd()
    os.chdir(tiny_model_dir.parent)
    try:
        cfg = load_config(None, [f"model.path={tiny_model_dir.name}", "model.dtype=float32", "lora.enabled=true",
                                 "lora.r=4"])
        model = build_for_training(cfg)
    finally:
        os.chdir(cwd)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter's stand-in: LoRA B is zero at init, so give it values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("adapter") / "checkpoint-1"
    model.save_pretrained(out)
    batch = make_batch(AutoTokenizer.from_pretrained(tiny_model_dir), TILE_SIZE, TOKENS_PER_TILE, n_samples=1)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return {"path": out, "batch": batch, "logits": logits}


@pytest.fixture(scope="module")
def published(tiny_model_dir, adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published") / "merged"
    merge_lora(ModelConfig(path=str(tiny_model_dir), dtype="float32"), str(adapter["path"]), out, data=DATA)
    return out


def _images() -> list[tuple[str, bytes]]:
    """The demo's shapes, a JPEG photo of colour noise and a smooth gradient, in every size of SIZES."""
    rnd, out = random.Random(0), []
    for w, h in SIZES:
        out.append((f"shape {w}x{h}", shape_png(rnd.choice(["red", "blue", "green"]), rnd.choice(["circle", "square"]),
                                                (w, h), rnd)))
        out.append((f"photo {w}x{h}", jpeg_bytes(w, h, (120, 60, 200), seed=w)))
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        buf = io.BytesIO()
        Image.fromarray((np.stack([x, y, (x + y) / 2], axis=-1) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"gradient {w}x{h}", buf.getvalue()))
    return out


def _messages(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def _training_inputs(folder: Path, data: DataConfig, png: bytes) -> tuple[list[int], torch.Tensor]:
    """Our Preprocessor's prompt ids (everything before the assistant's reply) and pixel values."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    sample = make_preprocessor(tokenizer, data, config)(
        [Turn(from_="human", value=QUESTION), Turn(from_="gpt", value="red.")], [png], "s")
    reply_at = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    return sample.input_ids[:reply_at].tolist(), sample.pixel_values


def test_saved_processor_config_is_the_training_config(published):
    pre = json.loads((published / "preprocessor_config.json").read_text())
    mean, std = NORMALIZATION[DATA.normalization]
    assert pre["image_processor_type"] == "GotOcr2ImageProcessor" and pre["crop_to_patches"] is True
    assert (pre["max_patches"], pre["min_patches"]) == (DATA.max_dynamic_patch, DATA.min_dynamic_patch) == (3, 1)
    assert pre["size"] == {"height": TILE_SIZE, "width": TILE_SIZE}
    assert pre["image_mean"] == list(mean) and pre["image_std"] == list(std) and pre["resample"] == 3
    assert json.loads((published / "processor_config.json").read_text())["image_seq_length"] == TOKENS_PER_TILE
    loaded = AutoProcessor.from_pretrained(published)
    ip = loaded.image_processor
    assert (ip.max_patches, ip.min_patches, ip.crop_to_patches) == (3, 1, True)
    assert list(ip.image_mean) == list(mean) and loaded.image_seq_length == TOKENS_PER_TILE


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_hf_processor_gives_the_training_inputs(published, backend):
    """transformers' processor against our PIL-exact backend (data.resize_backend=pil)."""
    processor = AutoProcessor.from_pretrained(published)  # the default backend is torchvision
    if backend == "pil":
        processor.image_processor = AutoImageProcessor.from_pretrained(published, backend="pil")
    assert type(processor.image_processor).__name__ == {"torchvision": "GotOcr2ImageProcessor",
                                                        "pil": "GotOcr2ImageProcessorPil"}[backend]
    std = torch.tensor(NORMALIZATION[DATA.normalization][1])[None, :, None, None]
    tiles, worst, values, far = set(), dict.fromkeys(TORCHVISION_GREY_LEVELS, 0.0), 0, 0
    for name, png in _images():
        ids, pixels = _training_inputs(published, DATA.model_copy(update={"resize_backend": "pil"}), png)
        got = processor.apply_chat_template(_messages(Image.open(io.BytesIO(png)).convert("RGB")),
                                            add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        assert got["input_ids"][0].tolist() == ids, name  # system turn, image span (tile count), question
        assert got["pixel_values"].shape == pixels.shape, name
        grey = ((got["pixel_values"] - pixels) * std * 255).abs()  # in 0..255 grey levels
        if backend == "pil":
            assert torch.equal(got["pixel_values"], pixels), f"{name}: {grey.max().item()} grey levels"
        kind = name.split()[0]
        worst[kind] = max(worst[kind], grey.max().item())
        values, far = values + grey.numel(), far + int((grey > 2.001).sum())
        tiles.add(pixels.shape[0])
    assert tiles == {1, 3, 4}  # one tile; 2x1 and 3x1 grids with their thumbnail (max_dynamic_patch=3)
    assert all(worst[kind] <= bound + 1e-3 for kind, bound in TORCHVISION_GREY_LEVELS.items()), worst
    assert far / values < 1e-3, far / values
    assert (max(worst.values()) > 0.5) == (backend == "torchvision")  # torchvision's resize differs, PIL's not


def test_torch_backend_is_within_two_grey_levels_of_the_hf_pil_processor(published):
    """Training's default backend (data.resize_backend=torch) against transformers' PIL-backend processor: the
    same prompt ids and tile counts; pixels within 2 grey levels on photos and gradients."""
    assert DATA.resize_backend == "torch"
    processor = AutoProcessor.from_pretrained(published)
    processor.image_processor = AutoImageProcessor.from_pretrained(published, backend="pil")
    std = torch.tensor(NORMALIZATION[DATA.normalization][1])[None, :, None, None]
    worst, values, far = {"photo": 0.0, "gradient": 0.0, "shape": 0.0}, 0, 0
    for name, png in _images():
        ids, pixels = _training_inputs(published, DATA, png)
        got = processor.apply_chat_template(_messages(Image.open(io.BytesIO(png)).convert("RGB")),
                                            add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        assert got["input_ids"][0].tolist() == ids and got["pixel_values"].shape == pixels.shape, name
        grey = ((got["pixel_values"] - pixels) * std * 255).abs()
        worst[name.split()[0]] = max(worst[name.split()[0]], grey.max().item())
        values, far = values + grey.numel(), far + int((grey > 2.001).sum())
    assert worst["photo"] <= 2.001 and worst["gradient"] <= 2.001, worst
    # the demo shapes' hard edges scaled up: up to 9 grey levels (as the torchvision backend), on few values
    assert 0.5 < worst["shape"] <= 9.001 and far / values < 1e-3, (worst, far / values)


def test_processor_check_names_what_differs(published, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(published, folder)
    assert processor_difference(folder, DATA) is None
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    for key, value in [("max_patches", 6), ("max_patches", 2), ("min_patches", 2)]:  # 6: the base model's
        (folder / "preprocessor_config.json").write_text(json.dumps({**pre, key: value}))
        assert "the chat template or the tile count differs" in processor_difference(folder, DATA)
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": [0.5, 0.5, 0.5]}))
    assert re.search(r"pixels for the wide probe image differ from training's by max \|Δ\| 0\.\d+",
                     processor_difference(folder, DATA))
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    no_system = DATA.model_copy(update={"system_prompt": None})  # the template adds a turn training did not have
    assert "first difference at token 1: processor 'system\\nYou answer" in processor_difference(folder, no_system)


def test_thumbnail_off_cannot_be_published(tiny_model_dir, adapter, tmp_path):
    off = DataConfig(use_thumbnail=False, max_dynamic_patch=4)
    with pytest.raises(ConfigError, match=r"data.use_thumbnail=false cannot be published: .*always adds a thumbnail"):
        merge_lora(ModelConfig(path=str(tiny_model_dir), dtype="float32"), str(adapter["path"]), tmp_path / "m",
                   data=off)
    assert not (tmp_path / "m").exists()
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.use_thumbnail=false"])
    with pytest.raises(ConfigError, match="data.use_thumbnail=false"):
        preflight(cfg, "merge")
    check_publishable(DataConfig(use_thumbnail=False, max_dynamic_patch=1))  # no image is cut: nothing differs


def test_adapter_names_its_base_model_by_absolute_path(adapter, tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftConfig, PeftModel

    saved = json.loads((adapter["path"] / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # trained from a relative path
    monkeypatch.chdir(tmp_path)  # elsewhere: plain peft, nothing but the checkpoint folder
    cfg = PeftConfig.from_pretrained(adapter["path"])
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(cfg.base_model_name_or_path),
                                      adapter["path"])
    model.eval()
    with torch.no_grad():
        assert (model(**adapter["batch"]).logits - adapter["logits"]).abs().max().item() < 1e-5
    assert base_model_reference(ModelConfig(path="s3://models/internvl3-1b")) == "s3://models/internvl3-1b"
    assert base_model_reference(ModelConfig(path=f"file://{tiny_model_dir}")) == str(tiny_model_dir.resolve())


def _readme_snippet() -> str:
    """The python block of README.md's "Using a published model" section."""
    section = README.read_text().split("## Using a published model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.integration
def test_readme_snippet_in_a_fresh_interpreter_generates_what_the_model_does_in_process(published, tmp_path):
    image = tmp_path / "shape.png"
    image.write_bytes(shape_png("red", "circle", (300, 120), random.Random(1)))
    snippet = _readme_snippet()
    assert snippet.count('"runs/demo/train/merged"') == 1 and snippet.count('"shape.png"') == 1
    code = snippet.replace('"runs/demo/train/merged"', repr(str(published))) + (
        "import json, sys\n"
        "print('INPUT_IDS', json.dumps(inputs['input_ids'][0].tolist()))\n"
        "print('OUTPUT', json.dumps(output[0].tolist()))\n"
        "print('PROJECT', sorted(m for m in sys.modules if m.split('.')[0] in ('vlm_core', 'tasks', 'flows', 'vlmft')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {key: value for line in res.stdout.splitlines() for key, _, value in [line.partition(" ")]
             if key in ("INPUT_IDS", "OUTPUT", "PROJECT")}
    assert lines["PROJECT"] == "[]"  # plain transformers: no project module was imported

    processor = AutoProcessor.from_pretrained(published)
    model = AutoModelForImageTextToText.from_pretrained(published)
    inputs = processor.apply_chat_template(_messages(Image.open(image).convert("RGB")), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    prompt, _ = _training_inputs(published, DATA, image.read_bytes())
    assert json.loads(lines["INPUT_IDS"]) == inputs["input_ids"][0].tolist() == prompt
    assert json.loads(lines["OUTPUT"]) == output[0].tolist()
    assert output.shape[1] > len(prompt)  # it generated something
    reply = processor.decode(output[0, len(prompt):], skip_special_tokens=True)
    assert res.stdout.startswith(reply + "\n")  # what the snippet prints
