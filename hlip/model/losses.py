"""Contrastive losses (CLIP InfoNCE and SigLIP) that stay correct across DDP ranks.

Conventions (as open_clip): features arrive L2-normalised, ``logit_scale`` is the multiplier
(already exponentiated), every rank holds the same number of pairs, and each rank returns its
own loss. Under DDP the gradients of the per-rank losses are averaged, so the mean of the
per-rank losses is the quantity optimised; it equals the single-process loss on the full
global batch. Gathering with gradient (``torch.distributed.nn.functional.all_gather``) lets
every rank's loss reach the features of all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def gather_features(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool
) -> list[torch.Tensor]:
    """Per-rank feature chunks of the global batch, in rank order.

    Without ``with_grad`` only this rank's own chunk carries gradient (the others are copies),
    which is cheaper but gives each rank a partial gradient.
    """
    if world_size == 1:
        return [features]
    if with_grad:
        return list(dist_fn.all_gather(features))
    chunks = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(chunks, features.detach())
    chunks[rank] = features
    return chunks


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: cross-entropy over image->text and text->image logits, averaged.

    ``local_loss=True`` (HLIP's recipe): each rank scores its own pairs against the global
    batch, with targets ``arange(local_bs) + rank * local_bs``. ``local_loss=False``: every
    rank computes the full global-batch loss.

    ``soft_targets`` (0 = one-hot, as CLIP) gives that share of each target to the batch's
    reports by their similarity to the pair's own report (a softmax of the detached text
    features' cosine similarities at ``soft_target_temperature``), in both directions. Many
    studies of an archive share findings, and word for word the sentences that state them;
    one-hot targets push a study's image away from every such report of the batch, which
    works against learning the finding itself (the false negatives of contrastive learning
    on clinical data). Identical reports get equal targets.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
        local_loss: bool = True,
        soft_targets: float = 0.0,
        soft_target_temperature: float = 0.05,
    ):
        super().__init__()
        if not 0.0 <= soft_targets <= 1.0:
            raise ValueError(f"soft_targets must be in [0, 1], got {soft_targets}")
        self.rank, self.world_size = rank, world_size
        self.gather_with_grad, self.local_loss = gather_with_grad, local_loss
        self.soft_targets, self.soft_target_temperature = soft_targets, soft_target_temperature

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        all_images = torch.cat(
            gather_features(image_features, self.rank, self.world_size, self.gather_with_grad)
        )
        all_texts = torch.cat(
            gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        )
        if self.local_loss:
            per_image = logit_scale * image_features @ all_texts.T
            per_text = logit_scale * text_features @ all_images.T
            offset = self.rank * image_features.shape[0]
        else:
            per_image = logit_scale * all_images @ all_texts.T
            per_text = per_image.T
            offset = 0
        labels = torch.arange(per_image.shape[0], device=per_image.device) + offset
        if self.soft_targets:
            own = text_features if self.local_loss else all_texts
            labels = self._targets(own.detach(), all_texts.detach(), labels)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2

    def _targets(self, texts: torch.Tensor, all_texts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Target probabilities [rows, global batch]: one-hot mixed with the report similarity."""
        similar = torch.softmax(texts @ all_texts.T / self.soft_target_temperature, dim=1)
        one_hot = F.one_hot(labels, all_texts.shape[0]).to(similar.dtype)
        return (1 - self.soft_targets) * one_hot + self.soft_targets * similar


class SigLipLoss(nn.Module):
    """Sigmoid pairwise loss (Zhai et al. 2023): every image-text pair is a binary decision.

    Each rank scores its images against the texts of every rank (positives only on its own
    diagonal) and divides the summed log-sigmoid terms by its local batch size, as big_vision
    and open_clip do.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    @staticmethod
    def _pair_loss(images, texts, logit_scale, logit_bias, positives: bool) -> torch.Tensor:
        logits = logit_scale * images @ texts.T + logit_bias
        signs = -torch.ones_like(logits)
        if positives:
            signs = signs + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        texts = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        total = sum(
            self._pair_loss(image_features, chunk, logit_scale, logit_bias, positives=i == self.rank)
            for i, chunk in enumerate(texts)
        )
        return total / image_features.shape[0]


def create_loss(
    kind: str, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True, soft_targets: float = 0.0
) -> nn.Module:
    """``"clip"`` -> ClipLoss (local-loss mode), ``"siglip"`` -> SigLipLoss."""
    if kind == "clip":
        return ClipLoss(rank, world_size, gather_with_grad=gather_with_grad, soft_targets=soft_targets)
    if soft_targets:
        raise ValueError("soft_targets applies to the CLIP loss only")
    if kind == "siglip":
        return SigLipLoss(rank, world_size, gather_with_grad=gather_with_grad)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip' or 'siglip'")
