"""The one typed configuration of a fine-tuning run.

`FinetuneConfig` is the same object everywhere: the YAML a user writes (with `key.path=value`
overrides on the command line), the Prefect flow parameter (so the UI form shows every field with
its help text), and the JSON handed to the training subprocess. Every field carries a description;
choices are `Literal`s. Bad input raises `ConfigError`, which names the key path, what is allowed
and, for a misspelt key, the closest valid one, in one line. Every number must be finite (an
infinite learning rate would pass `gt=0` and be written to run.json as `null`).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"]


# a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
# sbatch options the slurm launcher sets itself, with the config key that decides them
SLURM_MANAGED = {
    "--nodes": "train.nnodes", "-N": "train.nnodes", "--ntasks-per-node": "train.nproc_per_node",
    "--ntasks": "train.nnodes x train.nproc_per_node", "-n": "train.nnodes x train.nproc_per_node",
    "--output": "the run folder (train.output_dir)", "-o": "the run folder (train.output_dir)",
    "--error": "the run folder (train.output_dir)", "-e": "the run folder (train.output_dir)",
    "--chdir": "the flow's working directory", "-D": "the flow's working directory",
    "--partition": "train.slurm.partition", "-p": "train.slurm.partition", "--time": "train.slurm.time",
    "-t": "train.slurm.time", "--account": "train.slurm.account", "-A": "train.slurm.account",
    "--gpus-per-node": "train.slurm.gpus_per_node", "--cpus-per-task": "train.slurm.cpus_per_task",
    "-c": "train.slurm.cpus_per_task",
}


class ConfigError(ValueError):
    """A configuration problem, with the key path and how to fix it in the message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _folder(value: str, url_ok: bool = True) -> str:
    """A path setting: not empty (that would mean the working directory), local when `url_ok` is false."""
    if not value.strip():
        raise ValueError("must not be empty (an empty path means the working directory); set a path")
    if not url_ok and "://" in value:
        raise ValueError("must be a local folder, not a URL (object storage goes in storage.url)")
    return value


class DataConfig(_Section):
    """Where the training data comes from and how samples are turned into model inputs."""

    meta: str = Field(
        "runs/demo/data/meta.json",
        description="Path or fsspec URL of an InternVL meta JSON ({name: {root, annotation, repeat_time, "
        "max_dynamic_patch}}) or of a single LLaVA JSON list of records. The default is where "
        "`vlmft demo-data runs/demo/data` (and `make run`) writes the demo data set.",
    )
    write_demo_if_missing: bool = Field(
        False,
        description="Write the generated demo data set (as `vlmft demo-data` does) into data.meta's folder when "
        "data.meta does not exist; for the demo and its deployment only, data.meta must then be a local meta.json.",
    )
    image_root: str | None = Field(
        None,
        description="Image folder (path or URL) for a LLaVA JSON list; ignored for an InternVL meta JSON, "
        "whose datasets each name their own root.",
    )
    shards: str = Field(
        "runs/demo/shards",
        description="Folder or fsspec URL (e.g. s3://bucket/shards) where WebDataset shards and manifest.json go.",
    )
    max_dynamic_patch: int = Field(
        12, ge=1, le=64, description="Maximum number of image tiles per sample (InternVL's max_dynamic_patch)."
    )
    min_dynamic_patch: int = Field(1, ge=1, le=64, description="Minimum number of image tiles per sample.")
    use_thumbnail: bool = Field(
        True, description="Append a whole-image thumbnail tile when an image is cut into more than one tile."
    )
    normalization: Literal["imagenet", "clip", "siglip"] = Field(
        "imagenet", description="Pixel mean/std constants used to normalise tiles."
    )
    resize_backend: Literal["torch", "pil"] = Field(
        "torch",
        description="How tiles are decoded, resized and normalised: 'torch' (PyTorch's antialiased bicubic on uint8, "
        "JPEG draft decoding where it cannot show, fused normalisation; within 2 grey levels of 'pil' on photos and "
        "several times faster) or 'pil' (PIL's bicubic, bit for bit what InternVL and transformers' "
        "GotOcr2ImageProcessorPil give). Changes the pixels, so it is part of the run identity.",
    )
    max_seq_length: int = Field(
        4096, ge=16, description="Longest token sequence (text + image tokens); longer samples are reported."
    )
    system_prompt: str | None = Field(
        None, description="System prompt added to conversations that have none; null adds nothing."
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of samples held out (deterministically) for evaluation."
    )
    eval_count: int | None = Field(
        None, ge=0, description="Number of samples held out for evaluation; overrides data.eval_fraction when set."
    )
    prepare_workers: int = Field(
        2, ge=1, description="Parallel workers writing shards, each one group of samples (data.samples_per_shard) at a "
        "time; shards are byte-identical for any number.",
    )
    prepare_pool: Literal["processes", "threads"] = Field(
        "processes", description="What the prepare_workers are when there are several: processes (the work is mostly "
        "Python; about 0.3 s to start, more when lengths are checked: each loads the tokenizer) or threads (no "
        "start-up; they speed up image_check=decode, where PIL releases the GIL, but not verify).",
    )
    samples_per_shard: int = Field(1000, ge=1, description="Maximum samples in one WebDataset tar shard.")
    max_shard_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Maximum size of one shard in bytes before a new one starts."
    )
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels are rejected as decompression bombs."
    )
    image_check: Literal["decode", "verify"] = Field(
        "decode",
        description="How images are proven intact: decode (every byte decoded; catches corrupt JPEG bodies) or "
        "verify (structure only: PNG CRCs and end markers; faster, misses some corrupt JPEG data).",
    )
    max_reject_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="The run fails when more than this fraction of samples is rejected."
    )
    shuffle_buffer: int = Field(1000, ge=0, description="Samples held in the streaming loader's shuffle buffer.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per training rank.")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate",
        description="Samples longer than max_seq_length: 'truncate' cuts them (never inside an image span: "
        "those are skipped and counted), 'skip' drops them. Both are counted in the training logs.",
    )
    pad_to_multiple_of: int | None = Field(
        8, ge=1, description="Right-pad each batch to a multiple of this many tokens (8 suits GPU kernels); null pads "
        "to the batch's longest sample only.",
    )
    shuffle_shards: bool = Field(
        True, description="Shuffle the order of shards every epoch (seeded by train.seed and the epoch)."
    )

    @field_validator("meta", "shards")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        return _folder(value)

    @model_validator(mode="after")
    def _tiles(self) -> DataConfig:
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(
                f"data.min_dynamic_patch ({self.min_dynamic_patch}) must not exceed "
                f"data.max_dynamic_patch ({self.max_dynamic_patch})"
            )
        return self

    @model_validator(mode="after")
    def _demo_meta(self) -> DataConfig:
        if self.write_demo_if_missing and ("://" in self.meta or Path(self.meta).name != "meta.json"):
            raise ValueError(
                f"data.write_demo_if_missing=true writes the demo data set as FOLDER/meta.json, but data.meta={self.meta} "
                "is not a local path ending in meta.json; point data.meta at one, or set data.write_demo_if_missing=false"
            )
        return self


class ModelConfig(_Section):
    """The base model: where it is, how it is loaded and which parts are trained."""

    path: str = Field(
        "runs/tiny-internvl",
        description="Folder (or fsspec URL, fetched to model.cache_dir) of an InternVL checkpoint in "
        "transformers format (model_type 'internvl', the *-hf checkpoints).",
    )
    build_tiny_if_missing: bool = Field(
        False,
        description="Build the tiny random InternVL (tests, demo) at model.path when the folder does not exist.",
    )
    cache_dir: str = Field(
        "~/.cache/vlm_finetune/models", description="Local folder where a model given as a URL is downloaded."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype the weights are loaded in (float32 on CPU-only test machines)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel; 'auto' picks flash_attention_2 when installed and on a GPU, else sdpa.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the checkpoint to run (only for checkpoints that need it)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    freeze_vision: bool = Field(True, description="Freeze the vision encoder (InternVL's freeze_backbone).")
    unfreeze_vision_layers: int = Field(
        0, ge=0, description="With freeze_vision, still train the last N vision encoder layers."
    )
    freeze_projector: bool = Field(False, description="Freeze the MLP projector (InternVL's freeze_mlp).")
    freeze_llm: bool = Field(
        False,
        description="Freeze the language model, embeddings and LM head (always frozen under LoRA on the LLM).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _folder(value)

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: str) -> str:
        return _folder(value, url_ok=False)


class LoraConfig(_Section):
    """LoRA adapters (peft). Adapted parts keep their base weights frozen."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of full weights.")
    llm: bool = Field(True, description="Put LoRA adapters on the language model.")
    vision: bool = Field(False, description="Put LoRA adapters on the vision encoder.")
    r: int = Field(16, ge=1, le=1024, description="LoRA rank (size of the low-rank update).")
    alpha: int | None = Field(None, ge=1, description="LoRA alpha; null means 2 * r (InternVL's choice).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    llm_target_modules: list[str] = Field(
        default_factory=lambda: list(LLM_LORA_TARGETS),
        min_length=1,
        description="Names of the language model's linear layers that get adapters.",
    )
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the merged model's weights; auto keeps the base checkpoint's dtype."
    )
    merge_tolerance: float | None = Field(
        None, ge=0, description="Largest relative logit difference allowed between the merged model and base + "
        "adapter; null picks 1e-4 for float32 and 3e-2 for bfloat16 weights.",
    )
    vision_target_modules: list[str] = Field(
        default_factory=lambda: list(VISION_LORA_TARGETS),
        min_length=1,
        description="Names of the vision encoder's linear layers that get adapters (with lora.vision).",
    )

    @model_validator(mode="after")
    def _some_target(self) -> LoraConfig:
        if self.enabled and not (self.llm or self.vision):
            raise ValueError("lora.enabled is true but neither lora.llm nor lora.vision is; enable one")
        return self


class SlurmConfig(_Section):
    """The Slurm batch job that runs training when train.launcher=slurm (vlm_core.slurm)."""

    partition: str | None = Field(None, description="Slurm partition (sbatch --partition); null: the cluster's default.")
    time: str | None = Field(
        None,
        description="Time limit of the job (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; "
        "null: the partition's default. A job that reaches it is retried and resumes from the newest checkpoint.",
    )
    account: str | None = Field(None, description="Account to charge (sbatch --account); null: the user's default.")
    gpus_per_node: int | None = Field(
        None, ge=1, description="GPUs per node (sbatch --gpus-per-node), shared by the node's "
        "train.nproc_per_node ranks (each uses the GPU of its local rank); null: none (a CPU-only job, unless "
        "train.slurm.extra_sbatch asks for GPUs with --gres=gpu:N or --gpus...).",
    )
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPU cores per rank (sbatch --cpus-per-task, also OMP_NUM_THREADS); null: Slurm's "
        "default (one core per rank).",
    )
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="More #SBATCH options, one per item (e.g. '--qos=high', '--constraint=a100', '--exclusive'); "
        "nodes, tasks, output and chdir are set from the config and may not be repeated here.",
    )

    @field_validator("partition", "account")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError("must be one word without spaces (or null for the cluster's default)")
        return value

    @field_validator("time", mode="before")
    @classmethod
    def _time_quoted(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"got the number {value}; write the time limit as a string in quotes, e.g. '90' "
                             "(minutes) or '01:30:00' (YAML reads an unquoted 1:30:00 as the number 5400)")
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_TIME.fullmatch(value):
            raise ValueError("is not a Slurm time limit; write minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS "
                             "(2-00:00:00)")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        lines = []
        for item in value:
            line = item.strip().removeprefix("#SBATCH").strip()
            if not line.startswith("-") or "\n" in line:
                raise ValueError(f"{item!r} is not one sbatch option; write e.g. '--qos=high'")
            option = line.split("=")[0].split()[0]
            if option in SLURM_MANAGED:
                raise ValueError(f"{item!r}: {option} is set from {SLURM_MANAGED[option]}; set that instead")
            lines.append(line)
        return lines


class TrainConfig(_Section):
    """Optimisation, checkpointing and the distributed launch."""

    output_dir: str = Field("runs/demo/train", description="Local folder for checkpoints, logs and metrics.")
    run_subdir: bool = Field(
        False,
        description="Put the run in {output_dir}/{name}-{identity[:8]}, where the identity is the hash of every "
        "setting that changes what the run learns, the data and the base model: a changed setting then starts "
        "a new run folder instead of being refused in the old one.",
    )
    seed: int = Field(42, description="Random seed for weights init of new parts, data order and dropout.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 runs train.num_epochs epochs.")
    num_epochs: float = Field(1.0, gt=0, description="Epochs over the training shards when max_steps is -1.")
    per_device_batch_size: int = Field(1, ge=1, description="Samples per micro-batch on each rank.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (derived from train.global_batch_size when that is set)."
    )
    global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step over all ranks; must be divisible by "
        "per_device_batch_size x nproc_per_node x nnodes. Null uses gradient_accumulation_steps as given.",
    )
    learning_rate: float = Field(4e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    loss_reduction: Literal["token", "sample", "square"] = Field(
        "square",
        description="How token losses are weighted: token (each token 1), sample (1/n per sample of n "
        "supervised tokens), square (1/sqrt(n), InternVL 2.5/3's choice); normalised over the global batch.",
    )
    packing: bool = Field(
        False,
        description="Pack each micro-batch's samples into as few rows as train.pack_max_tokens and "
        "train.pack_max_tiles allow, instead of padding every sample to the longest: position ids restart at 0 per "
        "sample so no sample attends to another, and every loss reduction weights samples exactly as unpacked. "
        "A micro-batch still holds train.per_device_batch_size samples (steps, resume positions unchanged).",
    )
    pack_max_tokens: int = Field(
        8192, ge=16, description="Most tokens in one packed row (train.packing); a sample longer than this takes a "
        "row of its own. With flash_attention_2 long rows cost nothing extra; with sdpa or eager attention (CPU, or a "
        "GPU without flash-attn) a row of L tokens costs L x L attention whatever it holds, so keep rows to a few "
        "samples there (benchmarks/README.md: on CPU, 256 beat 512 on the demo mix).",
    )
    pack_max_tiles: int = Field(
        64, ge=1, description="Most image tiles in one packed row (train.packing), dummy tiles of text-only samples "
        "included; a sample with more tiles stops training with an error naming it.",
    )
    bf16: bool = Field(True, description="Train in bfloat16 mixed precision.")
    deepspeed: Literal["none", "zero1", "zero2", "zero3", "zero3_offload"] = Field(
        "zero2", description="DeepSpeed ZeRO stage (configs shipped in the repository), or none."
    )
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(3, ge=1, description="Checkpoints kept locally; null keeps all.")
    eval_steps: int = Field(500, ge=1, description="Evaluate on held-out shards every N steps.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every N steps.")
    eval_on_start: bool = Field(False, description="Evaluate once before the first step (the baseline eval loss).")
    resume_from: str = Field(
        "auto",
        description="'auto' resumes from the newest complete checkpoint of this run (same identity: settings, "
        "data and base model; local or in storage), 'none' starts fresh, anything else is a checkpoint folder "
        "to continue on purpose, even with other settings (recorded as the run's parent).",
    )
    launcher: Literal["torchrun", "deepspeed", "python", "slurm"] = Field(
        "torchrun", description="How training processes are started: torchrun, the deepspeed launcher or plain python "
        "on this machine, or slurm: a batch job of train.nnodes nodes x train.nproc_per_node ranks (train.slurm).",
    )
    nproc_per_node: int = Field(1, ge=1, description="Training processes per node.")
    nnodes: int = Field(1, ge=1, description="Number of nodes.")
    node_rank: int = Field(0, ge=0, description="This node's rank (multi-node launches).")
    master_addr: str = Field("127.0.0.1", description="Address of the rank-0 node.")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on the rank-0 node; a one-node run "
                             "moves to a free port when this one is taken on the machine (another run).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="The Slurm job (train.launcher=slurm).")
    hostfile: str | list[str] | None = Field(
        None,
        description="train.launcher=deepspeed on several nodes: DeepSpeed's hostfile (one `HOST slots=N` line per "
        "node, N training processes there; # comments), as a path on the worker's node or as the list of its lines. "
        "The worker's node starts every node over SSH (pdsh); the world size is the sum of the slots left after "
        "train.include / train.exclude. Null: one node, train.nproc_per_node processes.",
    )
    ssh_port: int | None = Field(
        None, ge=1, le=65535, description="SSH port of every node in train.hostfile; null uses ssh's own default "
        "(22, or the port ~/.ssh/config names for the host).",
    )
    include: str = Field(
        "", description="DeepSpeed's --include for train.hostfile: the hosts (and slots) to use, e.g. "
        "'node1@node2:0,1'; empty uses every host. Not together with train.exclude.",
    )
    exclude: str = Field(
        "", description="DeepSpeed's --exclude for train.hostfile: hosts (or HOST:SLOTS) to leave out, e.g. 'node3'.",
    )
    shared_output_dir: bool = Field(
        True,
        description="Every node sees the same train.output_dir (a shared file system: the normal cluster set-up). "
        "False: each node has a folder of its own at that path; every training process then uploads its own "
        "checkpoint files to storage.url, a checkpoint counts as complete once all ranks' files are there, and a "
        "resume fetches each node's files from storage (needs storage.url with storage.upload_checkpoints).",
    )

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        return _folder(value, url_ok=False)

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 to run train.num_epochs epochs (0 would still train one step)")
        return value

    @model_validator(mode="after")
    def _nodes(self) -> TrainConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank ({self.node_rank}) must be below train.nnodes ({self.nnodes})")
        return self


class StorageConfig(_Section):
    """Object storage for checkpoints and merged models. Credentials come from the environment only."""

    url: str | None = Field(
        None,
        description="Folder or fsspec URL (s3://bucket/prefix) for checkpoints and merged models; null keeps "
        "everything local. S3 endpoint and keys come from AWS_* environment variables, never from here.",
    )
    upload_checkpoints: bool = Field(True, description="Upload each checkpoint while training runs.")
    secret_block: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding a JSON object of AWS_* variables (e.g. "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); used when they are not in the environment.",
    )


class LoggingConfig(_Section):
    """Experiment tracking."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers that receive training metrics."
    )
    wandb_project: str = Field("vlm-finetune", description="W&B project name.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode; online also needs WANDB_API_KEY in the environment."
    )
    progress_seconds: float = Field(
        3.0, gt=0, le=3600, description="Seconds between the progress lines (step/total, samples/s, tokens/s, ETA, "
        "latest loss) in the run's log while training runs; the log says what the run is busy with when it has "
        "been quiet for 5 s or for this plus 2 s, whichever is longer.",
    )


class EvalConfig(_Section):
    """Generative evaluation on the held-out shards, and promotion of the fine-tuned model by its result."""

    enabled: bool = Field(
        True, description="After the merge, answer the held-out questions with the base and the fine-tuned model "
        "and score both (exact match, token F1, ANLS); needs data.eval_count > 0.",
    )
    max_samples: int = Field(64, ge=1, description="Held-out samples evaluated (the first N of the eval split, same for every model).")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest answer generated per question (greedy decoding).")
    batch_size: int = Field(8, ge=1, description="Questions generated together in one batch.")
    metric: Literal["exact_match", "f1", "anls"] = Field(
        "exact_match", description="The metric that decides promotion: exact match after normalisation, token F1, or ANLS.",
    )
    promote: bool = Field(
        True, description="Make the fine-tuned model the current model of `name` in storage.url when its metric is at "
        "least the current model's (on the same samples, in the same run) plus promotion_margin.",
    )
    promotion_margin: float = Field(
        0.0, ge=-1.0, le=1.0, description="How much better (in eval.metric, 0..1) a candidate must be than the current model.",
    )
    examples: int = Field(6, ge=0, le=100, description="Held-out examples shown side by side (base vs fine-tuned) in the run's report.")
    during_training: bool = Field(
        False, description="Also answer the first eval.max_samples held-out questions at every evaluation during training "
        "(train.eval_steps, train.eval_on_start, the final one) with the model being trained, and log exact match, F1 "
        "and ANLS next to eval_loss (eval_exact_match ... in metrics.jsonl, eval/exact_match ... in TensorBoard / W&B).",
    )


class FinetuneConfig(_Section):
    """Everything a fine-tuning run needs: data, model, LoRA, training, storage and logging."""

    name: str = Field("demo", min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Run name (letters, digits, . _ -).")
    data: DataConfig = Field(default_factory=DataConfig, description="Data sources and preprocessing.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model and what is trained.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and distributed launch.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Checkpoint and model storage.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Experiment tracking.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Generative evaluation and promotion.")

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuneConfig:
        if self.model.unfreeze_vision_layers and not self.model.freeze_vision:
            raise ValueError(
                "model.unfreeze_vision_layers only applies with model.freeze_vision=true "
                "(with freeze_vision=false every vision layer trains already)"
            )
        if self.lora.enabled and self.lora.vision and self.model.unfreeze_vision_layers:
            raise ValueError("lora.vision=true adapts the vision encoder; set model.unfreeze_vision_layers=0")
        return self


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _section_fields(path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at `path` (a tuple of keys into FinetuneConfig), for suggestions."""
    model: type[BaseModel] = FinetuneConfig
    for key in path:
        field = model.model_fields.get(str(key))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _section_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
        return f"{key}: unknown key{'; ' + hint if hint else ''} (valid keys here: {', '.join(valid)})"
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if err["type"] == "literal_error":
        msg = msg.replace("must be", "must be one of", 1)
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def validate_config(data: dict[str, Any], source: str = "config") -> FinetuneConfig:
    """Validate a plain dict into a FinetuneConfig; raise ConfigError naming every bad key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(data).__name__}")
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"invalid configuration in {source}: " + "; ".join(lines)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a', 'b', 'c'], value) with the value parsed as a YAML scalar/list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` applied; unknown keys suggest the close match."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for depth, key in enumerate(keys):
            valid = _section_fields(tuple(keys[:depth]))
            if depth and not valid:
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth])} is a setting, not a section; "
                                  f"use {'.'.join(keys[:depth])}=VALUE")
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                path = ".".join(keys[: depth + 1])
                hint = f"; did you mean '{'.'.join(keys[:depth] + [close[0]])}'?" if close else ""
                raise ConfigError(f"override {text!r}: unknown key {path}{hint} (valid keys here: {', '.join(valid)})")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {'.'.join(keys[: depth + 1])} is not a section")
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_text(p: Path) -> str:
    """The config file as text: UTF-8 (a byte-order mark is fine); anything else is named in one line."""
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:256]:  # with or without byte-order mark
        raise ConfigError(f"config file {p} is UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Load a YAML (or JSON) config file, apply `key.path=value` overrides, validate.

    With no path, the defaults are the base. Relative paths inside the file are kept as written
    (they resolve against the working directory of the run).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder (pass --config with a YAML file, e.g. configs/demo.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (pass --config with a YAML file, e.g. configs/demo.yaml)")
        try:
            data = yaml.load(_read_text(p), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return validate_config(data, source)


def to_json(cfg: FinetuneConfig) -> str:
    """The JSON form handed to the training subprocess (`--config run.json`)."""
    return cfg.model_dump_json(indent=2)


def from_json(text: str, source: str = "run.json") -> FinetuneConfig:
    """Inverse of to_json, with the same error messages as YAML loading."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return validate_config(data, source)


def to_yaml(cfg: FinetuneConfig) -> str:
    """A YAML document of the full config (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
