"""Prompt-lookup proposals: the tokens that followed the last earlier occurrence of the sequence's
final n tokens. No model; it helps wherever the answer repeats its context (code edits, quoting
retrieved text, structured outputs that echo field names)."""

from __future__ import annotations

import numpy as np

from engine.scheduling.request import Request


def propose_ngram(token_ids: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens, for
    the largest n in [min_n, max_n] that occurs; [] when none does.

    The most recent occurrence, because in a repeating text the latest copy is the likeliest to
    continue the same way (an edited line repeats the line it edits, not the file's first line).
    """
    length = len(token_ids)
    if k <= 0 or length < min_n + 1:
        return []
    # Where an earlier copy of the suffix could end: every earlier position holding the last token.
    ends = np.flatnonzero(token_ids[:-1] == token_ids[-1])
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        candidates = ends[ends >= n - 1]
        if candidates.size == 0:
            continue
        # The n - 1 tokens before each candidate end must equal those before the last token.
        matches = np.ones(candidates.size, dtype=bool)
        for offset in range(1, n):
            matches &= token_ids[candidates - offset] == token_ids[length - 1 - offset]
        found = candidates[matches]
        if found.size:
            start = int(found[-1]) + 1
            return token_ids[start : start + k].tolist()
    return []


class NgramProposer:
    """Keeps each sequence's tokens in a growing numpy buffer, so a step converts only the tokens
    that arrived since the last one (not the whole sequence, every step, for every row)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._buffers: dict[Request, tuple[np.ndarray, int]] = {}

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        proposals = [
            propose_ngram(self._tokens_of(request), k, self.min_n, self.max_n)
            for request, k in zip(requests, num_tokens, strict=True)
        ]
        if len(self._buffers) > 2 * len(requests) + 64:  # drop the buffers of sequences that ended
            alive = set(requests)
            self._buffers = {r: b for r, b in self._buffers.items() if r in alive}
        return proposals

    def _tokens_of(self, request: Request) -> np.ndarray:
        buffer, filled = self._buffers.get(request, (None, 0))
        total = request.num_tokens
        if buffer is None or len(buffer) < total:
            grown = np.empty(max(2 * total, 256), dtype=np.int64)
            if filled:
                grown[:filled] = buffer[:filled]
            buffer = grown
        if filled < total:
            buffer[filled:total] = request.token_ids_in(filled, total)
        self._buffers[request] = (buffer, total)
        return buffer[:total]
