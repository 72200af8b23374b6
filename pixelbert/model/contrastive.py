"""Image-text contrastive learning (ALBEF's ITC; not in the Pixel-BERT paper): the projections
and the in-batch loss that give retrieval a cheap similarity to shortlist pairs by.

On several ranks the loss is the one of the global batch: every rank gathers the others' vectors
and texts (detached), computes the whole batch's loss, and back-propagates it into its own
vectors only, scaled by the world size, so that the data-parallel mean of the ranks' gradients is
the global loss's gradient (tested: two ranks of four items train as one rank of eight).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ContrastiveHead(nn.Module):
    """The [CLS] state of a text-only pass and of an image-only pass, each projected to `dim`
    and scaled to unit length. Their dot product is the similarity a retrieval shortlist ranks
    by; `scale` (a learned inverse temperature, from 1/0.07 as in CLIP, at most 100) sharpens
    it for the loss."""

    MAX_SCALE = 100.0

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.text_proj = nn.Linear(hidden_size, dim)
        self.image_proj = nn.Linear(hidden_size, dim)
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # 1-d: ZeRO-3 partitions it like a bias

    def text(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls_hidden).float(), dim=-1)

    def image(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(cls_hidden).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.float().clamp(max=math.log(self.MAX_SCALE)).exp()[0]


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, positives: torch.Tensor, text_image: torch.Tensor,
                     image_ids: torch.Tensor) -> torch.Tensor:
    """The batch's contrastive loss, the mean of both directions: each image that has a positive
    text against every text (positives and negatives), each positive text against every image.
    An image's positives are the texts written for it and any text identical to one of its
    positive texts (captions repeat); the targets spread evenly over them.

    text [T, E] and image [I, E]: unit vectors; positives [P]: the rows of `text` that are
    items' positives; text_image [T] and image_ids [I]: dataset-wide ids of the image each text
    was written for and of each image. On several ranks, see the module docstring: the value is
    the global batch's loss on every rank."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tokens = input_ids.masked_fill(attention_mask == 0, -1)  # padding compares equal at any length
    if world > 1:
        text, image, tokens, positives, text_image, image_ids = gather_batch(
            text, image, tokens, positives, text_image, image_ids)
        # Unlike the vectors, the temperature gets its whole gradient on every rank: keep the
        # world-size factor below from multiplying it.
        scale = scale.detach() + (scale - scale.detach()) / world
    # An image twice in the batch (two ranks' items of one image) is one image, as one rank has it.
    same_image = image_ids[:, None] == image_ids[None, :]
    first = ~torch.tril(same_image, diagonal=-1).any(1)
    image, image_ids = image[first], image_ids[first]
    written_for = (image_ids[:, None] == text_image[None, :]).float()  # [images, texts]
    same_text = (tokens[:, None, :] == tokens[None, positives, :]).all(-1).float()  # [texts, positives]
    matches = (written_for + written_for[:, positives] @ same_text.T) > 0
    with_item = written_for[:, positives].sum(1) > 0  # an image left only by dropped items has no positive
    logits = scale * image @ text.T
    image_to_text = soft_cross_entropy(logits[with_item], matches[with_item])
    text_to_image = soft_cross_entropy(logits[:, positives].T, matches[:, positives].T)
    loss = (image_to_text + text_to_image) / 2
    # Every rank holds the same value; each back-propagates into its own rows only, so scale the
    # gradient (not the value) by the world size for the data-parallel mean to be the global one.
    return loss * world - loss.detach() * (world - 1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` against the uniform distribution over the row's
    True `targets` (each row has at least one), averaged over rows."""
    targets = targets.float()
    return -(F.log_softmax(logits, dim=-1) * targets / targets.sum(-1, keepdim=True)).sum(-1).mean()


def gather_batch(text, image, tokens, positives, text_image, image_ids):
    """The global batch, rank by rank: the other ranks' vectors (detached) around this rank's
    own, their texts padded with -1 to the longest, their positives shifted to global rows."""
    sizes = torch.tensor([[len(text), len(image), tokens.shape[1], len(positives)]], device=text.device)
    sizes = torch.cat(all_gather_padded(sizes))  # [world, 4]
    rank = dist.get_rank()
    text_start = torch.cat([sizes.new_zeros(1), sizes[:-1, 0].cumsum(0)])
    tokens = F.pad(tokens, (0, int(sizes[:, 2].max()) - tokens.shape[1]), value=-1)

    def every(local, count_column):
        parts = [part[:int(count)] for part, count in zip(all_gather_padded(local.detach()), sizes[:, count_column])]
        parts[rank] = local
        return torch.cat(parts)

    positives = every(positives + text_start[rank], 3)
    return (every(text, 0), every(image, 1), every(tokens, 0), positives, every(text_image, 0), every(image_ids, 1))


def all_gather_padded(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `local` (same trailing shape, any length), each padded with zeros to the longest."""
    length = torch.tensor([len(local)], device=local.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(lengths))
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return parts
