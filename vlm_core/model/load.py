"""Load an InternVL checkpoint in transformers format for training.

We build on transformers' own `InternVLForConditionalGeneration` (the `*-hf` checkpoints) rather
than re-implementing the model. This module adds what a training run needs around
`from_pretrained`: a model given as a URL is fetched once into a local cache; the folder is checked
*before* loading so a wrong path or a non-InternVL model fails with a message that says what to fix;
dtype, attention kernel and gradient checkpointing come from `ModelConfig`. `check_model_source`
is the same check as a pre-flight: it reads only config.json, so a wrong model.path fails before
any data is prepared or any training process starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from vlm_core.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPLETE_MARKER = ".download-complete"


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def fetch_to_cache(url: str, cache_dir: str | Path, subdir: str = "", verified: bool = False) -> Path:
    """Download a folder from any fsspec URL into `cache_dir` (or its `subdir`), once.

    The copy goes to a temporary folder that is renamed when complete (with COMPLETE_MARKER inside),
    so an interrupted download is never mistaken for a model. A model folder is copied as it is;
    with `verified` (LoRA adapters, training checkpoints) the URL must be a complete upload of
    vlm_core.storage (its checksum manifest present) and every file's sha256 is checked, on every
    call: an existing copy is synced against the manifest (unchanged files are not downloaded again),
    so a checkpoint re-uploaded under the same URL is never served stale from the cache.
    Credentials come from the environment (e.g. AWS_* for S3).
    """
    target = cache_folder(url, cache_dir, subdir)
    if verified and (target / COMPLETE_MARKER).exists():
        from vlm_core.storage import download_folder

        download_folder(url, target)  # checksums decide what is stale
        return target
    if (target / COMPLETE_MARKER).exists():
        return target
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    if verified:
        from vlm_core.storage import download_folder

        download_folder(url, tmp)
    else:
        _copy_folder(url, tmp)
    tmp.mkdir(parents=True, exist_ok=True)  # an upload with no files creates none
    (tmp / COMPLETE_MARKER).write_text(url + "\n")
    if (target / COMPLETE_MARKER).exists():  # another process finished first; keep theirs
        return target
    if target.exists():  # unmarked, so not a complete download (e.g. an interrupted copy of an older version)
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def cache_folder(url: str, cache_dir: str | Path, subdir: str = "") -> Path:
    """Where fetch_to_cache keeps its copy of `url` (complete when COMPLETE_MARKER is inside)."""
    return Path(cache_dir).expanduser() / subdir / hashlib.sha256(url.encode()).hexdigest()[:16]


def _copy_folder(url: str, dest: Path) -> None:
    """Copy the folder at `url` into `dest` as it is (model folders carry no checksum manifest)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise ConfigError(f"model.path={url}: no folder at that URL (expected an InternVL checkpoint folder)")
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(root.rstrip("/") + "/", str(dest), recursive=True)


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The local folder holding the model: fetched if `model.path` is a URL, built if tiny and missing."""
    path = cfg.path.removeprefix("file://")
    if _is_url(path):
        return fetch_to_cache(path, cfg.cache_dir)
    folder = Path(path).expanduser()
    if not folder.exists() and cfg.build_tiny_if_missing:
        from vlm_core.model.tiny import build_tiny_model

        build_tiny_model(folder)
    return folder


def base_model_reference(cfg: ModelConfig) -> str:
    """How a LoRA adapter names its base model: model.path as given when it is a URL, else the absolute folder.

    peft writes the name it is given into adapter_config.json, where a relative path (valid only from
    the folder training ran in) or a cache folder would leave the adapter pointing nowhere useful.
    """
    path = cfg.path.removeprefix("file://")
    return cfg.path if _is_url(path) else str(Path(path).expanduser().resolve())


def check_model_folder(folder: Path, trust_remote_code: bool = False) -> dict:
    """Return the folder's config.json as a dict, or raise a ConfigError saying what is wrong."""
    if folder.is_file():
        raise ConfigError(f"model.path={folder} is a file; point model.path at the checkpoint's folder")
    if not folder.is_dir():
        raise ConfigError(
            f"model.path={folder}: folder does not exist. Point model.path at a local InternVL checkpoint "
            "(e.g. a download of OpenGVLab/InternVL3-1B-hf) or set model.build_tiny_if_missing=true for the "
            "tiny test model."
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.path={folder}: no config.json there; this is not a transformers model folder")
    try:
        raw = cfg_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"model.path={folder}: config.json cannot be read ({exc.strerror or exc}); "
                          "check its permissions") from None
    config = _parse_config(raw, str(folder))
    _check_model_type(config, str(folder))
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not has_weights:
        raise ConfigError(f"model.path={folder}: config.json is there but no weight files (*.safetensors)")
    _check_remote_code(config, str(folder), trust_remote_code)
    return config


def _parse_config(raw: bytes, where: str) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError
        raise ConfigError(f"model.path={where}: config.json is not valid JSON ({exc}); the checkpoint folder is "
                          "damaged or not a transformers model") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model.path={where}: config.json holds a {type(config).__name__}, not an object; "
                          "this is not a transformers model folder")
    return config


def _check_model_type(config: dict, where: str) -> None:
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise ConfigError(
            f"model.path={where}: this is the original InternVL format (model_type 'internvl_chat'). Use the "
            "transformers-format checkpoint instead (the '-hf' repositories, e.g. OpenGVLab/InternVL3-1B-hf), "
            "or convert it with transformers' convert_internvl_weights_to_hf.py."
        )
    if model_type != "internvl":
        raise ConfigError(
            f"model.path={where}: config.json has model_type {model_type!r}, not 'internvl'. This pipeline "
            "fine-tunes InternVL models in transformers format (InternVLForConditionalGeneration)."
        )


def _check_remote_code(config: dict, where: str, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(
            f"model.path={where}: the checkpoint asks to run its own code (auto_map in config.json); review "
            "it and set model.trust_remote_code=true to allow it"
        )


def check_model_source(cfg: ModelConfig) -> None:
    """Pre-flight: model.path names an InternVL checkpoint, judged by its config.json alone (nothing is
    loaded or downloaded). A missing folder passes when model.build_tiny_if_missing will build it."""
    path = cfg.path.removeprefix("file://")
    if not _is_url(path):
        folder = Path(path).expanduser()
        if not (cfg.build_tiny_if_missing and not folder.exists()):
            check_model_folder(folder, cfg.trust_remote_code)
        return
    cached = cache_folder(path, cfg.cache_dir)
    if (cached / COMPLETE_MARKER).exists():
        check_model_folder(cached, cfg.trust_remote_code)
        return
    import fsspec

    from vlm_core.storage import explain_error

    try:
        with fsspec.open(f"{path.rstrip('/')}/config.json", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"model.path={path}: no config.json at that URL (expected an InternVL checkpoint "
                          "folder in transformers format)") from None
    except Exception as exc:  # noqa: BLE001 - explained
        raise explain_error(exc, path, "model.path: reading config.json of", "model.path") from exc
    config = _parse_config(raw, path)
    _check_model_type(config, path)
    _check_remote_code(config, path, cfg.trust_remote_code)


def pick_attn_implementation(choice: str) -> str:
    """'auto' → flash_attention_2 when the package is installed and a GPU is present, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if choice == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if choice == "flash_attention_2" and not has_flash:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU; "
            "use 'auto' or 'sdpa'"
        )
    return choice


def load_model(cfg: ModelConfig):
    """Load InternVLForConditionalGeneration as configured (dtype, attention, gradient checkpointing)."""
    from transformers import InternVLForConditionalGeneration

    folder = resolve_model_path(cfg)
    check_model_folder(folder, cfg.trust_remote_code)
    model = InternVLForConditionalGeneration.from_pretrained(
        folder,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=pick_attn_implementation(cfg.attn_implementation),
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_tokenizer(cfg: ModelConfig):
    """The checkpoint's tokenizer (with the InternVL image tokens as attributes)."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(cfg)
    check_model_folder(folder, cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if getattr(tokenizer, "context_image_token", None) is None:
        raise ConfigError(
            f"model.path={folder}: the tokenizer has no context_image_token (<IMG_CONTEXT>); "
            "an InternVL-hf tokenizer_config.json declares it"
        )
    return tokenizer
