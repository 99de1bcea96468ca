"""Speech-token sampling for the CosyVoice2 LM (one sequence, 1-D scores).

Same rules as the official `cosyvoice.utils.common` (ras_sampling, nucleus_sampling,
random_sampling), with an optional `torch.Generator` so a request can be reproduced from
its own seed without touching the global RNG. Given the same generator state and fp32
scores, the random draws are the same calls the official code makes on the global RNG
(`multinomial(1, replacement=True)` on the same tensors), so results match token for token.

`weighted_scores` are log-probabilities or logits over the speech vocabulary; only their
softmax matters. None of these functions modify their input.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def greedy_sampling(weighted_scores: torch.Tensor, decoded_tokens: Sequence[int] = (),
                    generator: Optional[torch.Generator] = None) -> int:
    """Argmax over the full distribution. The official code has no greedy mode; this is
    for tests and reference comparisons (and deterministic debugging)."""
    return int(torch.argmax(weighted_scores).item())


def random_sampling(weighted_scores: torch.Tensor, decoded_tokens: Sequence[int] = (),
                    generator: Optional[torch.Generator] = None) -> int:
    """Sample from the full softmax distribution."""
    probs = weighted_scores.softmax(dim=0)
    return int(torch.multinomial(probs, 1, replacement=True, generator=generator).item())


def nucleus_sampling(weighted_scores: torch.Tensor, top_p: float = 0.8, top_k: int = 25,
                     generator: Optional[torch.Generator] = None) -> int:
    """Top-p and top-k together: walk tokens from most to least likely and keep each one
    while (mass kept so far < top_p) and (fewer than top_k kept). The most likely token is
    therefore always kept, and the token that crosses top_p is kept too. Sample among the
    kept tokens in proportion to their probabilities."""
    probs = weighted_scores.softmax(dim=0)
    # Stable sort: equal probabilities keep index order, as in the official code.
    sorted_probs, sorted_idx = probs.sort(descending=True, stable=True)
    head = sorted_probs[:top_k]
    # Exclusive running sum, accumulated left to right like the official loop.
    mass_before = torch.cat((head.new_zeros(1), torch.cumsum(head, dim=0)[:-1]))
    # mass_before is non-decreasing, so the kept tokens are a prefix of `head`.
    num_kept = int((mass_before < top_p).sum().item())
    choice = torch.multinomial(head[:num_kept], 1, replacement=True, generator=generator)
    return int(sorted_idx[choice].item())


def ras_sampling(weighted_scores: torch.Tensor, decoded_tokens: Sequence[int], top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1,
                 generator: Optional[torch.Generator] = None) -> int:
    """Repetition-aware sampling (VALL-E 2 style, as in CosyVoice2).

    Draw with nucleus sampling; if that token already occurs at least win_size * tau_r
    times among the last win_size decoded tokens, draw again from the full distribution
    with that token excluded (the official code sets its score to -inf before resampling).
    With the official values (10, 0.1) a single occurrence in the window triggers it.
    """
    token = nucleus_sampling(weighted_scores, top_p=top_p, top_k=top_k, generator=generator)
    window = list(decoded_tokens)[-win_size:] if win_size > 0 else []
    repeats = sum(1 for t in window if int(t) == token)
    if repeats >= win_size * tau_r:
        scores = weighted_scores.clone()
        scores[token] = -float("inf")
        token = random_sampling(scores, decoded_tokens, generator=generator)
    return token
