"""A tiny random InternVL with an offline tokenizer, for tests and the demo.

No hub download is possible on our test machines, so everything a real InternVL-hf checkpoint
folder holds is built here from scratch: the transformers-native `InternVLForConditionalGeneration`
weights (seeded: same seed, same bytes), a byte-level BPE tokenizer trained in-process with every
InternVL and ChatML special token and the `internvl2_5` chat template, and the image-processor /
processor configs. The folder loads with plain `from_pretrained`, exactly like a real checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TILE_SIZE = 112  # InternVL uses 448; 112 keeps the tiny model fast on CPU
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int((TILE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)  # 16 (InternVL: 256)

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# InternVL's grounding tokens, kept so tokenisation matches real checkpoints' special-token set.
GROUNDING = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO, *GROUNDING]

# The internvl2_5 ChatML template; an image item renders as one <IMG_CONTEXT> that the processor
# (or our own data code) expands to <img> + <IMG_CONTEXT> * tokens + </img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words of the demo data set (colours, shapes, questions) so the tokenizer has compact merges for them.
_WORDS = (
    "red green blue yellow white black orange purple circle square triangle stripe image picture "
    "photo What Which How many color colour shape is are the a an of in on and or it It This shows "
    "There one two three four left right top bottom Describe describe answer question You helpful "
    "assistant user system Say word Yes No yes no . , ? ! : ; ( ) - 0 1 2 3 4 5 6 7 8 9 Frame"
).split()


def _corpus(n_lines: int = 3000):
    rnd = random.Random(0)
    for _ in range(n_lines):
        yield " ".join(rnd.choice(_WORDS) for _ in range(12)) + "\n"


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained offline, with InternVL/ChatML special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        # The InternVL processor reads these attributes (and their *_id) off the tokenizer.
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
        padding_side="right",
    )


def tiny_config(tokenizer):
    """A ~1M-parameter InternVL config: 2-layer ViT (64 wide, 112 px tiles), 2-layer Qwen2 (128 wide)."""
    from transformers import InternVLConfig

    vision = dict(
        model_type="internvl_vision", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, image_size=TILE_SIZE, patch_size=PATCH_SIZE, use_qk_norm=False,
        norm_type="layer_norm", use_mean_pooling=False,
    )
    text = dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
        image_seq_length=TOKENS_PER_TILE, downsample_ratio=DOWNSAMPLE_RATIO, tie_word_embeddings=False,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )


def _save_processor_configs(folder: Path, max_tiles: int) -> None:
    """Write the image-processor and processor configs a real InternVL-hf checkpoint ships.

    Plain JSON in transformers' format, so AutoProcessor works wherever torchvision is installed.
    Training reads none of them (the tile size comes from config.json, tiling and normalisation from
    cfg.data); a published folder gets them rewritten from the training config (vlm_core.hf_processor).
    """
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_tiles,
        "size": {"height": TILE_SIZE, "width": TILE_SIZE},
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": TOKENS_PER_TILE}
    for name, content in (("preprocessor_config.json", image_processor), ("processor_config.json", processor)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")


def build_tiny_model(folder: str | Path, seed: int = 0, max_tiles: int = 6) -> Path:
    """Write a tiny random InternVL checkpoint (weights, tokenizer, processor configs) to `folder`.

    The same seed gives bit-identical weights. Returns the folder.
    """
    from transformers import InternVLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _save_processor_configs(folder, max_tiles)
    return folder
