"""Multimodal packing: budgets, samples kept apart inside a row, losses equal to unpacked ones (every
reduction, gradient accumulation, two ranks), resume, and the config keys."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.shard_sets import demo_records, write_shard_set
from vlm_core.config import DataConfig, load_config
from vlm_core.data.collator import Collator, model_inputs
from vlm_core.data.loader import LoaderState, ShardStream, make_dataloader
from vlm_core.data.packing import collate_packed, iter_packs, pack_samples, sample_tiles
from vlm_core.data.preprocess import make_preprocessor
from vlm_core.data.reference import ReferenceDataset
from vlm_core.data.sample import IGNORE_INDEX
from vlm_core.identity import make_identity
from vlm_core.model.loss import global_weight_total, vlm_loss
from vlm_core.progress import error_line

REDUCTIONS = ["token", "sample", "square"]
BUDGET = (256, 12)  # pack_max_tokens, pack_max_tiles: the 12 test samples (33-151 tokens, 34 tiles) take 3-4 rows


@pytest.fixture(scope="module")
def samples(demo_data, preprocessor):
    """12 preprocessed samples: text-only, one-image and two-image ones in turn, of different lengths."""
    ref = ReferenceDataset(str(demo_data["annotation"]), str(demo_data["image_root"]), preprocessor)
    return [ref[i] for i in range(12)]


def _model(tiny_model_dir, attn: str = "sdpa"):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    return InternVLForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)


def test_rows_respect_both_budgets_and_hold_every_sample_once(samples):
    lengths = [len(s.input_ids) for s in samples]
    tiles = [sample_tiles(s) for s in samples]
    assert len(set(lengths)) > 3 and {s.dummy_tile for s in samples} == {True, False}
    for max_tokens, max_tiles in [(max(lengths), 64), (2 * max(lengths), max(tiles)), (1024, 64)]:
        rows = pack_samples(samples, max_tokens, max_tiles)
        assert sorted(i for row in rows for i in row) == list(range(len(samples)))
        assert all(sum(lengths[i] for i in row) <= max_tokens and sum(tiles[i] for i in row) <= max_tiles for row in rows)
        assert all(row == sorted(row) for row in rows) and rows == sorted(rows)
        assert rows == pack_samples(samples, max_tokens, max_tiles)  # deterministic
    assert len(pack_samples(samples, 1024, 64)) < len(samples)  # really packs
    assert len(pack_samples(samples, 1024, max(tiles))) > len(pack_samples(samples, 1024, 64))  # tiles split rows too
    with pytest.raises(ValueError, match="raise train.pack_max_tiles"):
        pack_samples(samples, 1024, 1)
    # a budget below the longest sample: the budget grows to that sample (the batch is that wide anyway);
    # nothing is refused or dropped, and the shorter samples still share rows up to that length
    short = pack_samples(samples, 40, 64)
    assert sorted(i for row in short for i in row) == list(range(len(samples)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in short)
    assert short == pack_samples(samples, max(lengths), 64) and len(short) < len(samples)
    assert len(pack_samples(samples, 1024, 64)) < len(short)  # a shorter budget, more and shorter rows
    packs = list(iter_packs(samples, 1024, 64, buffer=5))
    assert [s.sample_id for p in packs for s in p] != [] and sorted(s.sample_id for p in packs for s in p) == sorted(
        s.sample_id for s in samples)


def test_packed_batch_layout(samples, tokenizer):
    batch = collate_packed(samples, tokenizer.pad_token_id, *BUDGET, pad_to_multiple_of=8)
    assert "attention_mask" not in batch and batch["use_cache"] is False and batch["input_ids"].shape[1] % 8 == 0
    rows = pack_samples(samples, *BUDGET)
    assert 3 <= len(rows) < len(samples) and batch["input_ids"].shape[0] == len(rows)
    pixels = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i].input_ids)
            assert torch.equal(batch["input_ids"][r, at : at + n], samples[i].input_ids)
            assert torch.equal(batch["position_ids"][r, at : at + n], torch.arange(n))
            assert (batch["sample_index"][r, at : at + n] == i).all()
            assert batch["labels"][r, at] == IGNORE_INDEX and torch.equal(batch["labels"][r, at + 1 : at + n],
                                                                          samples[i].labels[1:])
            pixels.append(samples[i].pixel_values)
            at += n
        assert (batch["sample_index"][r, at:] == -1).all() and (batch["labels"][r, at:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))
    # every <IMG_CONTEXT> has its image feature: tokens per tile x tiles
    context = int((batch["input_ids"] == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())
    assert context == 16 * batch["pixel_values"].shape[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_sample_inside_a_pack_has_the_logits_it_has_alone(samples, tokenizer, tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn).eval()
    batch = collate_packed(samples, tokenizer.pad_token_id, *BUDGET, pad_to_multiple_of=8)  # rows with padding
    assert batch["input_ids"].shape[0] >= 3 and (batch["sample_index"] == -1).any()
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        alone = [model(**model_inputs(Collator(tokenizer.pad_token_id)([s]))).logits[0] for s in samples]
    worst = 0.0
    for i, s in enumerate(samples):
        where = batch["sample_index"] == i
        real = s.attention_mask.bool()  # the dummy tile's span is masked when alone and seen by nobody packed
        got = packed[where][real]
        worst = max(worst, float((got - alone[i][real]).abs().max()))
    assert worst < 1e-5, worst
    # with a cache (the config's use_cache=True) transformers builds no block mask: samples would see each other
    broken = dict(model_inputs(batch), use_cache=True)
    with torch.no_grad():
        leaky = model(**broken).logits
    assert float((leaky - packed).abs().max()) > 1e-3


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, micro_batches: list[dict], reduction: str, world_size: int = 1):
    """One optimizer step's loss and gradients over micro-batches, normalised over all of them (and ranks)."""
    model.zero_grad()
    norm = global_weight_total([(b["labels"], b.get("sample_index")) for b in micro_batches], reduction)
    total = torch.zeros(())
    for b in micro_batches:
        out = model(**{k: v for k, v in model_inputs(b).items() if k != "labels"})
        loss = vlm_loss(out.logits, b["labels"], reduction, normalizer=norm, world_size=world_size,
                        sample_index=b.get("sample_index"))
        loss.backward()
        total += loss.detach()
    return total, _grads(model)


def _per_sample_losses(model, batch: dict, n: int) -> torch.Tensor:
    """The mean cross-entropy of each original sample of a batch (packed or not)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none").view(logits.shape[0], -1)
    index = batch.get("sample_index")
    index = (torch.arange(logits.shape[0])[:, None].expand_as(batch["labels"]) if index is None else index)[:, 1:]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return torch.stack([ce[(index == i) & mask].mean() for i in range(n)])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_losses_and_gradients_equal_unpacked_with_accumulation(samples, tokenizer, tiny_model_dir, reduction):
    model = _model(tiny_model_dir)
    micro = [samples[:5], samples[5:]]  # two accumulation steps of different sizes
    plain = [Collator(tokenizer.pad_token_id, 8)(m) for m in micro]
    packed = [Collator(tokenizer.pad_token_id, 8, *BUDGET)(m) for m in micro]
    assert all(p["input_ids"].shape[0] < len(m) for p, m in zip(packed, micro, strict=True))
    if reduction == "token":  # the per-sample losses themselves (the same for every reduction)
        for p, u, m in zip(packed, plain, micro, strict=True):
            assert torch.allclose(_per_sample_losses(model, p, len(m)), _per_sample_losses(model, u, len(m)), atol=1e-5)
    loss_u, grads_u = _step(model, plain, reduction)
    loss_p, grads_p = _step(model, packed, reduction)
    assert abs(loss_p.item() - loss_u.item()) < 1e-5, (loss_p, loss_u)
    assert grads_p.keys() == grads_u.keys()
    for name, g in grads_u.items():
        assert torch.allclose(grads_p[name], g, atol=1e-5, rtol=1e-4), name
    # a per-row count (what the loss does without the sample index) weights samples differently
    if reduction != "token":
        wrong = global_weight_total([b["labels"] for b in packed], reduction)
        right = global_weight_total([(b["labels"], b["sample_index"]) for b in packed], reduction)
        assert abs(wrong.item() - right.item()) > 1e-3


def _rank_worker(rank: int, world: int, init: str, model_dir: str, data: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pp = make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=4, max_seq_length=1024), AutoConfig.from_pretrained(model_dir))
    ref = ReferenceDataset(data["annotation"], data["image_root"], pp)
    mine = [ref[i] for i in range(rank, 12, world)]  # each rank its own 6 samples, 2 accumulation steps of 3
    model = _model(model_dir)
    result = {}
    for reduction in REDUCTIONS:
        for name, collate in (("plain", Collator(tokenizer.pad_token_id, 8)),
                              ("packed", Collator(tokenizer.pad_token_id, 8, *BUDGET))):
            loss, grads = _step(model, [collate(mine[:3]), collate(mine[3:])], reduction, world_size=world)
            for g in grads.values():  # what DDP / DeepSpeed do: average gradients over ranks
                dist.all_reduce(g)
                g /= world
            dist.all_reduce(loss)
            result[reduction, name] = {"loss": loss / world, "grads": grads}
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.integration
def test_two_ranks_packed_equal_unpacked_and_whole_batch(demo_data, samples, tiny_model_dir, tmp_path, tokenizer):
    out = tmp_path / "rank0.pt"
    data = {"annotation": str(demo_data["annotation"]), "image_root": str(demo_data["image_root"])}
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/rdv", str(tiny_model_dir), data, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    model = _model(tiny_model_dir)
    for reduction in REDUCTIONS:  # each rank 2 micro-batches of 3, packed or not = the 12 samples at once
        whole_loss, whole_grads = _step(model, [Collator(tokenizer.pad_token_id, 8)(samples)], reduction)
        for name in ("plain", "packed"):
            assert abs(got[reduction, name]["loss"].item() - whole_loss.item()) < 1e-5, (reduction, name)
            for key, g in whole_grads.items():
                assert torch.allclose(got[reduction, name]["grads"][key], g, atol=1e-5, rtol=1e-4), (reduction, name, key)


def _stream(folder, preprocessor, tokenizer, state=None, pack=BUDGET) -> ShardStream:
    collate = Collator(tokenizer.pad_token_id, 8, *pack)
    return ShardStream.from_folder(str(folder), preprocessor, collate, batch_size=4, seed=3, shuffle_buffer=8, num_workers=2,
                                   rank=0, world_size=1, state=state, pack=pack)


def _batches(ds: ShardStream) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "data_stats"} for b in make_dataloader(ds)]


def test_resume_mid_epoch_with_packing_gives_the_same_batches(demo_data, preprocessor, tokenizer):
    full = _batches(_stream(demo_data["shards"], preprocessor, tokenizer, LoaderState(epoch=1)))
    assert len(full) == 12 and all("position_ids" in b and b["input_ids"].shape[0] < 4 for b in full[:3])
    rest = _batches(_stream(demo_data["shards"], preprocessor, tokenizer, LoaderState(1, 5 * 4)))
    assert len(rest) == 7
    for a, b in zip(full[5:], rest, strict=True):
        assert a["sample_ids"] == b["sample_ids"]
        for key in ("input_ids", "labels", "position_ids", "sample_index", "pixel_values"):
            assert torch.equal(a[key], b[key]), key


def test_a_sample_over_the_tile_budget_stops_the_stream_naming_it(tmp_path, preprocessor, tokenizer):
    folder = write_shard_set(tmp_path / "shards", demo_records(8), per_shard=4)
    named = r"train-00000\d\.tar key demo-\d+-000 \(id s\d+\) has \d+ image tiles.*raise train.pack_max_tiles \(now 2\)"
    with pytest.raises(ValueError, match=named) as caught:  # raised in a DataLoader worker
        _batches(_stream(folder, preprocessor, tokenizer, pack=(1024, 2)))
    # the rank's one error line keeps the worker's message, not the start of the worker's traceback
    line = error_line(caught.value)
    assert re.search(named, line) and "Traceback" not in line and line.endswith("(ValueError in DataLoader worker process 0)")


def test_config_keys_validation_and_identity(tmp_path):
    cfg = load_config(None, ["train.packing=true", "data.max_seq_length=512", "train.pack_max_tokens=512"])
    assert (cfg.train.packing, cfg.train.pack_max_tokens, cfg.train.pack_max_tiles) == (True, 512, 64)
    # rows shorter than the longest sample are allowed (a longer sample takes a row of its own)
    assert load_config(None, ["train.packing=true", "data.max_seq_length=1024", "train.pack_max_tokens=256"]
                       ).train.pack_max_tokens == 256
    # packing lays out the same samples per micro-batch and trains to the same losses (tested above), so
    # switching it on to resume a run faster is not a different run; and runs from before it keep their identity
    base = make_identity(load_config(None, []), "d", "m").id
    for change in ("train.packing=true", "train.pack_max_tokens=4096", "train.pack_max_tiles=8"):
        assert make_identity(load_config(None, [change]), "d", "m").id == base, change
    assert make_identity(load_config(None, ["train.per_device_batch_size=3"]), "d", "m").id != base
