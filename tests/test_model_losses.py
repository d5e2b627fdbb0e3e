"""CLIP and SigLIP losses: closed forms, invariances, and agreement between 2 gloo ranks and 1 process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hlip.model.losses import ClipLoss, SigLipLoss, create_loss

WORLD = 2


def _features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    texts = F.normalize(images + 0.7 * torch.randn(n, dim, generator=gen), dim=-1)
    return images, texts


def _clip_reference(images, texts, scale) -> torch.Tensor:
    """InfoNCE written out term by term: -log softmax of the matching pair, both directions."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        row = scale * (images[i] @ texts.T)
        col = scale * (texts[i] @ images.T)
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * n)


def _siglip_reference(images, texts, scale, bias) -> torch.Tensor:
    """SigLIP written out: sum over all pairs of -log sigmoid(z_ij * logit_ij), divided by n."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(torch.tensor(z) * (scale * images[i] @ texts[j] + bias))
    return total / n


def test_clip_loss_matches_written_out_infonce():
    images, texts = _features(6)
    scale = torch.tensor(14.0)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), _clip_reference(images, texts, scale))


def test_siglip_loss_matches_written_out_pairs():
    images, texts = _features(5)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    torch.testing.assert_close(
        SigLipLoss()(images, texts, scale, bias), _siglip_reference(images, texts, scale, bias)
    )


def test_clip_loss_is_zero_for_perfect_confident_pairs_and_log_n_for_uninformative():
    eye = torch.eye(4)
    assert ClipLoss()(eye, eye, torch.tensor(100.0)) < 1e-6
    constant = F.normalize(torch.ones(4, 3), dim=-1)
    torch.testing.assert_close(ClipLoss()(constant, constant, torch.tensor(10.0)), torch.tensor(math.log(4)))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_losses_ignore_batch_order(n, seed):
    """Shuffling the pairs (same permutation on both sides) must not change either loss."""
    images, texts = _features(n, seed=seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    scale, bias = torch.tensor(12.0), torch.tensor(-5.0)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), ClipLoss()(images[perm], texts[perm], scale))
    torch.testing.assert_close(
        SigLipLoss()(images, texts, scale, bias), SigLipLoss()(images[perm], texts[perm], scale, bias)
    )


def _soft_clip_reference(images, texts, scale, share, temperature) -> torch.Tensor:
    """Cross-entropy against targets written out per pair: (1 - share) on the pair's own report,
    share spread over the reports by the softmax of their similarity to it."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        similar = torch.softmax(texts[i] @ texts.T / temperature, 0)
        target = share * similar + (1 - share) * F.one_hot(torch.tensor(i), n)
        row = scale * (images[i] @ texts.T)
        col = scale * (texts[i] @ images.T)
        total = (
            total - (target * torch.log_softmax(row, 0)).sum() - (target * torch.log_softmax(col, 0)).sum()
        )
    return total / (2 * n)


def test_soft_target_clip_loss_matches_written_out_targets():
    images, texts = _features(6)
    scale = torch.tensor(14.0)
    loss = ClipLoss(soft_targets=0.4, soft_target_temperature=0.1)(images, texts, scale)
    torch.testing.assert_close(loss, _soft_clip_reference(images, texts, scale, 0.4, 0.1))
    torch.testing.assert_close(
        ClipLoss(soft_targets=0.0)(images, texts, scale), _clip_reference(images, texts, scale)
    )


def test_soft_targets_leave_images_on_their_reports_near_duplicates_included():
    """Images that sit on their reports, two studies with nearly the same report (the same
    findings, worded a little differently): with targets from the report similarity (at the
    logit scale's temperature) that is where the loss rests; one-hot targets keep pushing
    each of the two images away from the other's report."""
    _, texts = _features(6)
    nearly = F.normalize(
        texts[4] + 0.05 * torch.randn(texts.shape[1], generator=torch.Generator().manual_seed(1)), dim=0
    )
    texts = torch.cat([texts[:5], nearly[None]])  # study 5's report is nearly study 4's
    temperature = 0.1
    scale = torch.tensor(1 / temperature)

    def image_gradient(loss_fn):
        images = texts.clone().requires_grad_()
        loss_fn(images, texts, scale).backward()
        return images.grad

    soft = image_gradient(ClipLoss(soft_targets=1.0, soft_target_temperature=temperature))
    assert soft.abs().max() < 1e-6
    assert image_gradient(ClipLoss())[4:].abs().max() > 1e-2


def test_soft_targets_are_checked():
    with pytest.raises(ValueError, match="soft_targets"):
        ClipLoss(soft_targets=1.5)
    with pytest.raises(ValueError, match="CLIP loss only"):
        create_loss("siglip", soft_targets=0.5)


def test_create_loss_rejects_unknown_names():
    assert isinstance(create_loss("siglip"), SigLipLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("triplet")


# ---- distributed: 2 gloo processes vs 1 process on the full batch -------------------------

CASES = {
    "clip_local": lambda rank, world: ClipLoss(rank, world, gather_with_grad=True, local_loss=True),
    "clip_global": lambda rank, world: ClipLoss(rank, world, gather_with_grad=True, local_loss=False),
    "clip_soft": lambda rank, world: ClipLoss(rank, world, gather_with_grad=True, soft_targets=0.5),
    "siglip": lambda rank, world: SigLipLoss(rank, world, gather_with_grad=True),
}


def _loss_and_grads(name, loss_fn, images, texts):
    """Loss and its gradients w.r.t. features, logit scale and bias."""
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    scale, bias = torch.tensor(9.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
    args = (images, texts, scale, bias) if name == "siglip" else (images, texts, scale)
    loss = loss_fn(*args)
    loss.backward()
    grads = {"images": images.grad, "texts": texts.grad, "scale": scale.grad}
    if name == "siglip":
        grads["bias"] = bias.grad
    return loss.detach(), grads


def _rank_main(rank: int, init_file: str, out_dir: str, batch: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, texts = _features(batch)
        local = slice(rank * batch // WORLD, (rank + 1) * batch // WORLD)
        results = {
            name: _loss_and_grads(name, make(rank, WORLD), images[local], texts[local])
            for name, make in CASES.items()
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_with_one_process(tmp_path):
    """Mean of the per-rank losses = full-batch loss; per-rank feature gradients = WORLD x full-batch ones.

    The factor: each rank's backward sums the gradients of all ranks' losses through the
    gather, i.e. d(sum of losses) = WORLD * d(mean loss); DDP's gradient averaging then yields
    exactly the single-process parameter gradient.
    """
    batch = 6
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path), batch), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    images, texts = _features(batch)
    for name, make in CASES.items():
        loss, grads = _loss_and_grads(name, make(0, 1), images, texts)
        torch.testing.assert_close(sum(r[name][0] for r in per_rank) / WORLD, loss)
        for key in ("images", "texts"):
            gathered = torch.cat([r[name][1][key] for r in per_rank])
            torch.testing.assert_close(gathered, WORLD * grads[key], msg=f"{name} d/d{key}")
        for key in grads.keys() - {"images", "texts"}:
            summed = sum(r[name][1][key] for r in per_rank)
            torch.testing.assert_close(summed / WORLD, grads[key], msg=f"{name} d/d{key}")
