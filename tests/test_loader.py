"""Streaming loader over real WebDataset shards: rank/worker split, order, resume, padding, rejects, S3;
and the map-style reference loader producing the same inputs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers.shard_sets import demo_records, write_shard_set
from vlm_core.config import DataConfig
from vlm_core.data.collator import Collator
from vlm_core.data.loader import DataStats, LoaderState, ShardStream, epoch_plan, make_dataloader
from vlm_core.data.preprocess import make_preprocessor
from vlm_core.data.reference import ReferenceDataset, reference_dataloader
from vlm_core.data.sample import IGNORE_INDEX


def stream(folder, preprocessor, tokenizer, **kw) -> ShardStream:
    kw = {"batch_size": 2, "seed": 7, "shuffle_buffer": 8, "num_workers": 2, "rank": 0, "world_size": 1, **kw}
    return ShardStream.from_folder(str(folder), preprocessor, Collator(tokenizer.pad_token_id, 8), **kw)


def read_ids(ds: ShardStream, workers: bool = True) -> tuple[list[str], DataStats, int]:
    """Sample ids in the order the training loop gets them, summed counters, number of batches."""
    ids, stats, batches = [], DataStats(), 0
    for batch in make_dataloader(ds) if workers else ds:
        ids += batch["sample_ids"]
        stats.add(batch["data_stats"])
        batches += 1
        assert (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).all()  # never a sample with all labels -100
    return ids, stats, batches


@pytest.mark.parametrize(("n", "world", "workers", "batch"), [(48, 2, 2, 2), (50, 2, 2, 2), (7, 3, 2, 4), (100, 1, 0, 3)])
def test_epoch_plan_covers_every_sample(n, world, workers, batch):
    shards = [(f"s{i}.tar", c) for i, c in enumerate([10, 0, 17, 3] + [1] * 70)]
    shards = shards[: next(i for i in range(len(shards)) if sum(c for _, c in shards[: i + 1]) >= n) + 1]
    shards[-1] = (shards[-1][0], n - sum(c for _, c in shards[:-1]))
    plans = epoch_plan(shards, epoch=3, seed=1, world_size=world, num_workers=workers, batch_size=batch)
    lengths = {sum(r.stop - r.start for r in p) for p in plans}
    assert len(plans) == world * max(1, workers) and len(lengths) == 1
    per = lengths.pop()
    assert per % batch == 0 and per * len(plans) >= n > (per - batch) * len(plans)
    seen = Counter((r.url, i) for p in plans for r in p if not r.padding for i in range(r.start, r.stop))
    assert len(seen) == n and set(seen.values()) == {1}
    assert sum(r.stop - r.start for p in plans for r in p if r.padding) == per * len(plans) - n


def test_two_ranks_two_workers_see_every_sample_once(demo_data, preprocessor, tokenizer):
    expected = {r["id"] for r in demo_data["records"]}
    per_rank = []
    for rank in (0, 1):
        ds = stream(demo_data["shards"], preprocessor, tokenizer, rank=rank, world_size=2)
        ids, stats, batches = read_ids(ds)
        assert batches == len(ds) == 12 and len(ids) == ds.samples_per_epoch == 24
        assert stats.samples == 24 and stats.padded == 0 and stats.skipped == 0
        assert stats.text_only == 8 and stats.images == 8 * 1 + 8 * 2 and stats.tiles > stats.images
        per_rank.append(ids)
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)


def test_order_is_a_function_of_seed_and_epoch(demo_data, preprocessor, tokenizer):
    first, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer))
    again, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer))
    in_process, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer), workers=False)
    assert first == again == in_process  # DataLoader workers or not: the same stream
    other_seed, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer, seed=8))
    ds = stream(demo_data["shards"], preprocessor, tokenizer)
    ds.set_epoch(1)
    next_epoch, _, _ = read_ids(ds, workers=False)
    assert sorted(first) == sorted(other_seed) == sorted(next_epoch)
    assert first != other_seed and first != next_epoch


def test_resume_continues_exactly_where_it_stopped(demo_data, preprocessor, tokenizer):
    full = stream(demo_data["shards"], preprocessor, tokenizer, state=LoaderState(epoch=2))
    order, _, _ = read_ids(full)
    assert len(order) == 48
    for k in (5, 12, 47):  # mid-batch, a batch boundary, the last sample
        rest, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer, state=LoaderState(2, k)))
        assert rest == order[k:], k
    # resume twice in one epoch: stop after 3 more batches of the resumed run, resume again
    ds = stream(demo_data["shards"], preprocessor, tokenizer, state=LoaderState(2, 5))
    consumed = 5
    for i, batch in enumerate(make_dataloader(ds)):
        consumed += len(batch["sample_ids"])
        if i == 2:
            break
    assert consumed == 5 + 1 + 2 + 2  # the first batch finishes the interrupted one
    rest, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer, state=LoaderState(2, consumed)))
    assert rest == order[consumed:]
    # the state a training loop derives from its step count
    assert full.state_after(len(full) * 2 + 3) == LoaderState(epoch=2, samples_consumed=6)


def test_uneven_sample_count_is_padded_so_ranks_take_equal_steps(tmp_path, preprocessor, tokenizer):
    records = demo_records(50, seed=1)
    folder = write_shard_set(tmp_path / "shards", records, per_shard=12)
    ids, padded, lengths = [], 0, set()
    for rank in (0, 1):
        ds = stream(folder, preprocessor, tokenizer, rank=rank, world_size=2, shuffle_buffer=0)
        got, stats, batches = read_ids(ds)
        ids += got
        padded += stats.padded
        lengths.add((batches, len(got)))
    assert lengths == {(14, 28)}  # ceil(50 / (2 ranks · 2 workers · 2)) · 2 = 14 samples per worker
    assert set(ids) == {r["id"] for r in records} and padded == 56 - 50
    assert sum(c - 1 for c in Counter(ids).values()) == padded


def test_rejected_samples_are_reported_and_replaced(tmp_path, tokenizer, tiny_config):
    records = demo_records(12)
    records[1]["images"][0] = (records[1]["images"][0][0], b"broken jpeg", 10, 10)  # undecodable
    records[4]["conversations"][0]["value"] = "no placeholder here"  # one image, no <image>: fine (prepended)
    records[5]["conversations"][1]["value"] = "<image> extra"  # two images but now three placeholders
    records[6]["conversations"][1]["value"] = "word " * 400  # too long: truncated inside the reply
    records[9]["conversations"] = records[9]["conversations"][:1]  # no reply
    folder = write_shard_set(tmp_path / "shards", records, per_shard=5)
    pp = make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=2, max_seq_length=256), tiny_config)
    ds = stream(folder, pp, tokenizer, num_workers=2, batch_size=3, shuffle_buffer=0)
    ids, stats, batches = read_ids(ds)
    assert batches == len(ds) and len(ids) == ds.samples_per_epoch == 12
    assert (stats.skipped_invalid, stats.skipped_no_labels, stats.skipped_image_cut) == (2, 1, 0)
    # counted per yielded sample: twice when the truncated sample also stands in for a skipped one
    assert stats.truncated == Counter(ids)["s00006"] >= 1 and stats.skipped_too_long == 0 and stats.skipped == 3
    assert stats.replaced == stats.skipped and stats.samples == 12
    bad = {records[i]["id"] for i in (1, 5, 9)}
    assert not bad & set(ids) and "s00004" in ids
    as_log = stats.as_dict()
    assert as_log["data/skipped"] == stats.skipped and as_log["data/replaced"] == stats.replaced


@pytest.mark.integration
def test_reads_shards_from_s3(demo_data, preprocessor, tokenizer, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("loader-test")
    fs.put(str(demo_data["shards"]) + "/", "loader-test/shards/", recursive=True)
    local, _, _ = read_ids(stream(demo_data["shards"], preprocessor, tokenizer, rank=1, world_size=2))
    remote, stats, batches = read_ids(stream("s3://loader-test/shards", preprocessor, tokenizer, rank=1, world_size=2))
    assert remote == local and len(remote) == 24 and batches == 12 and stats.skipped == 0
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        stream("s3://loader-test/nothing-here", preprocessor, tokenizer)


def test_reference_loader_gives_the_same_inputs(demo_data, preprocessor, tokenizer):
    ref = ReferenceDataset(str(demo_data["annotation"]), str(demo_data["image_root"]), preprocessor)
    assert len(ref) == 48
    ds = stream(demo_data["shards"], preprocessor, tokenizer, num_workers=0, batch_size=1, shuffle_buffer=0,
                shuffle_shards=False)
    by_id = {}
    for batch in ds:
        by_id[batch["sample_ids"][0]] = batch
    collate = Collator(tokenizer.pad_token_id, 8)
    for i in (0, 1, 2, 47):
        a, b = collate([ref[i]]), by_id[f"s{i:05d}"]
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(a[key], b[key]), (i, key)
    seen = []
    for batch in reference_dataloader(ref, collate, batch_size=4, num_workers=2, seed=3):
        seen += batch["sample_ids"]
        assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
    assert sorted(seen) == sorted(by_id)


def test_rank_from_environment_and_worker_mismatch(demo_data, preprocessor, tokenizer, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = stream(demo_data["shards"], preprocessor, tokenizer, rank=None, world_size=None)
    assert (ds.rank, ds.world_size, len(ds)) == (1, 2, 12)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE"):
        stream(demo_data["shards"], preprocessor, tokenizer, rank=None, world_size=None)
    wrong = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(ValueError, match="planned for 2"):
        next(iter(wrong))
    with pytest.raises(ValueError, match="another world size"):
        ds.load_state(LoaderState(0, 25))
