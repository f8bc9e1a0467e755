"""Loss reductions: hand-computed values, and gradient accumulation / multi-rank equal the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm_core.model.loss import global_weight_total, token_weights, vlm_loss

REDUCTIONS = ["token", "sample", "square"]


def _ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_hand_computed_values():
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.5], [0.1, -1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            [[0.3, 0.2, 0.1], [2.0, 1.0, -1.0], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0]],
        ]
    )
    # labels are unshifted: position t's logits predict labels[t + 1]
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 0, -100, -100]])
    a, b = _ce([1.0, 2.0, 0.5], 1), _ce([0.1, -1.0, 2.0], 2)  # sample 0: n = 2
    c = _ce([0.3, 0.2, 0.1], 0)  # sample 1: n = 1
    expected = {
        "token": (a + b + c) / 3,
        "sample": (a / 2 + b / 2 + c) / 2,
        "square": (a / math.sqrt(2) + b / math.sqrt(2) + c) / (2 / math.sqrt(2) + 1),
    }
    for reduction, value in expected.items():
        assert vlm_loss(logits, labels, reduction).item() == pytest.approx(value, rel=1e-6), reduction
    assert token_weights(labels, "square").sum().item() == pytest.approx(math.sqrt(2) + 1)
    # the "token" reduction is what the model's own loss computes
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 3), labels[:, 1:].reshape(-1))
    assert vlm_loss(logits, labels, "token").item() == pytest.approx(ref.item(), rel=1e-6)


def test_no_supervised_token_gives_zero_loss_with_a_graph():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    loss = vlm_loss(logits, torch.full((1, 5), -100), "square")
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and torch.all(logits.grad == 0)


class TokenModel(torch.nn.Module):
    """Logits of each position depend on its own token only, so padding never changes other positions."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _samples(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Samples of different lengths and supervised-token counts (one with none)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 3) % 9
        ids = torch.randint(0, 11, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2 - (i % 3)] = -100  # prompt part
        if i == 3:
            labels[:] = -100  # a sample with nothing to learn
        out.append((ids, labels))
    return out


def _pad(samples):
    width = max(len(i) for i, _ in samples)
    ids = torch.stack([torch.cat([i, torch.zeros(width - len(i), dtype=i.dtype)]) for i, _ in samples])
    labels = torch.stack([torch.cat([lab, torch.full((width - len(lab),), -100)]) for _, lab in samples])
    return ids, labels


def _whole_batch(samples, reduction):
    model = TokenModel()
    ids, labels = _pad(samples)
    loss = vlm_loss(model(ids), labels, reduction)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_micro_batches_equal_whole_batch(reduction):
    samples = _samples()
    ref_loss, ref_grads = _whole_batch(samples, reduction)
    model = TokenModel()
    micro = [_pad(samples[i : i + 3]) for i in range(0, len(samples), 3)]  # 3 + 3 + 2, each padded alone
    norm = global_weight_total([labels for _, labels in micro], reduction)
    total = torch.zeros(())
    for ids, labels in micro:
        loss = vlm_loss(model(ids), labels, reduction, normalizer=norm)
        loss.backward()
        total += loss.detach()
    assert abs(total.item() - ref_loss.item()) < 1e-6
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=0), n
    # the naive per-micro-batch mean differs (unless reduction and split happen to agree)
    naive = sum(vlm_loss(TokenModel()(ids), labels, reduction).item() for ids, labels in micro) / len(micro)
    assert abs(naive - ref_loss.item()) > 1e-3


def _rank_worker(rank: int, world: int, init: str, reduction: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    samples = _samples()[rank::world]  # each rank its own samples
    micro = [_pad(samples[i : i + 2]) for i in range(0, len(samples), 2)]  # 2 accumulation steps
    model = TokenModel()
    norm = global_weight_total([labels for _, labels in micro], reduction)  # all-reduced over ranks
    total = torch.zeros(())
    for ids, labels in micro:
        loss = vlm_loss(model(ids), labels, reduction, normalizer=norm, world_size=world)
        loss.backward()
        total += loss.detach()
    for p in model.parameters():  # what DDP / DeepSpeed do: average gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": {n: p.grad for n, p in model.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_ranks_with_accumulation_equal_whole_batch(reduction, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/rdv", reduction, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    ref_loss, ref_grads = _whole_batch(_samples(), reduction)
    assert abs(got["loss"].item() - ref_loss.item()) < 1e-6
    for n, g in ref_grads.items():
        assert torch.allclose(got["grads"][n], g, atol=1e-6, rtol=0), n
