"""BERT's masked-language-model corruption of one token sequence."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

IGNORE_INDEX = -100  # label of positions the MLM loss skips (torch cross_entropy's default)


class TokenInfo(Protocol):
    """What masking needs from a tokenizer (TextTokenizer provides it)."""
    special_ids: frozenset[int]
    mask_id: int
    vocab_size: int


def mask_tokens(ids: Sequence[int] | np.ndarray, rng: np.random.Generator, info: TokenInfo,
                probability: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Return (masked ids, labels), both int64 arrays shaped like `ids`.

    Each non-special token is chosen with `probability`; when that picks none but some could
    be, one is chosen uniformly so every text yields an MLM target (unless probability is 0).
    Chosen tokens become [MASK] (80%), a random non-special token (10%) or stay (10%); labels
    hold the original id at chosen positions and IGNORE_INDEX elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    candidates = ~np.isin(ids, list(info.special_ids))
    chosen = candidates & (rng.random(ids.shape) < probability)
    if probability > 0 and candidates.any() and not chosen.any():
        chosen[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    masked = ids.copy()
    masked[chosen & (action < 0.8)] = info.mask_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_regular_ids(rng, int(replace.sum()), info)
    return masked, labels


def random_regular_ids(rng: np.random.Generator, n: int, info: TokenInfo) -> np.ndarray:
    """`n` ids drawn uniformly from the vocabulary minus the special ids."""
    specials = sorted(s for s in info.special_ids if s < info.vocab_size)
    draws = rng.integers(info.vocab_size - len(specials), size=n)
    # The k-th regular id is k plus the number of special ids at or below it: walking the
    # sorted specials and stepping past each one reached gives exactly that.
    for s in specials:
        draws += draws >= s
    return draws
