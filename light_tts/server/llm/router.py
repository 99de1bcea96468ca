"""Admission policy of the LLM engine (LightLLM's continuous-batching queue, our own code).

A running request is described, for the estimate, by what it holds now and what it may still
add. LightLLM describes a request by (has_run_len, left_out_len) and assumes every request grows
by one token per step until it ends, then frees everything; sorting by remaining length, the
peak KV use of a set of requests is max_k (sum_{i<=k} has_i + k * left_k). A TTS request has
several text pieces generated one after another, each a fresh sequence (the previous piece's KV
is freed, the next one is prefilled), so here each request i is

    has    tokens its current piece holds (or will hold once prefilled)
    left   tokens its current piece may still add
    later  the largest (prompt + expected tokens) of its remaining pieces, 0 if none
    steps  steps after the current piece until the request ends (expected tokens of later pieces)

and its use at time t is bounded by the non-decreasing envelope
    E(t) = has + t                        for t <= left
    E(t) = max(has + left, later)         for left < t <= left + steps,   then 0.
The sum of envelopes of the requests still alive only drops at end times, so the peak is the
largest sum at an end time T_k = left_k + steps_k over the requests with T_i >= T_k (LightLLM's
formula when no request has later pieces).

Expected tokens per piece (LightLLM's `get_tuple_tokens`): with fixed_speech_tokens, exactly N;
while the engine is busy (KV in use / capacity >= --router_token_ratio; always, with the default
0), the piece's max length (token-text ratio bound or max_speech_tokens); otherwise
min(max length, max(1.1 x tokens so far, --router_max_new_token_len)). With the exact bound no
running request can run out of KV; with the optimistic one it can, and the engine then pauses the
most recently admitted decoding requests (their KV is freed; their tokens so far and sampler state
are kept, and they are prefilled again with those tokens once there is room), so no request is
lost (see LLMEngine).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Load:
    has: int
    left: int
    later: int = 0
    steps: int = 0


def estimated_peak(loads: list) -> int:
    """Upper bound of the KV tokens the requests `loads` will hold at once (see module doc)."""
    if not loads:
        return 0
    has = np.array([l.has for l in loads], dtype=np.int64)
    left = np.array([l.left for l in loads], dtype=np.int64)
    later = np.array([l.later for l in loads], dtype=np.int64)
    end = left + np.array([l.steps for l in loads], dtype=np.int64)
    t = end[:, None]                                                  # candidate times (rows)
    grow = has[None, :] + np.minimum(t, left[None, :])
    plateau = np.maximum(has + left, later)[None, :]
    env = np.where(t <= left[None, :], grow, plateau)
    alive = end[None, :] >= t
    return int(np.where(alive, env, 0).sum(axis=1).max())


def expected_new_tokens(max_len: int, produced: int, *, fixed: bool, busy: bool, router_max_new_token_len: int) -> int:
    """How many tokens a piece is assumed to reach (LightLLM's estimate)."""
    if fixed or busy:
        return max_len
    return min(max_len, max(int(1.1 * produced), router_max_new_token_len))
