"""Prompt logprobs: the log-probability the model gives each prompt token, for requests that ask
(`SamplingParams.prompt_logprobs`; lm-eval-harness scores with them).

The logits at prompt position p predict token p + 1, so a step that computes positions [start, end)
of a prompt of P tokens yields the logprobs of tokens start + 1 .. min(end, P - 1). The LM head then
runs on those rows as well as on the sampled ones; the values come from the raw distribution (no
penalties, bias or temperature), as generated tokens' logprobs do. Such requests never read their
prompt from the prefix cache (the scheduler skips the lookup), since a cached block has no logits.
Only a request's first sample computes them (its siblings share the prompt). A preempted request
recomputes its prompt; the engine keeps the values it already had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.execution.transfers import host_to_device, to_pinned_host
from engine.outputs import TokenLogprob
from engine.scheduling.request import Request


@dataclass
class PromptSpan:
    request: Request
    first_position: int  # the prompt position of the span's first row (it predicts token first_position + 1)
    num_rows: int


@dataclass
class PromptLogprobRows:
    """Where a step's prompt-logprob rows are in its packed batch, and what they predict."""

    spans: list[PromptSpan]
    rows: np.ndarray  # [R] rows of the packed batch
    targets: np.ndarray  # [R] the prompt token each row predicts
    num_top: int  # the most alternatives any span asks for


def find_prompt_rows(requests: list[Request], starts: list[int], ends: list[int], batch_starts: list[int]):
    """The rows of this step whose logits give prompt logprobs (None when no request asks)."""
    spans: list[PromptSpan] = []
    rows: list[np.ndarray] = []
    targets: list[int] = []
    num_top = 0
    for request, start, end, batch_start in zip(requests, starts, ends, batch_starts):
        wanted = request.params.prompt_logprobs
        if wanted is None or request.sample_index != 0:
            continue
        last = min(end, request.num_prompt_tokens - 1)  # the last prompt position predicts no prompt token
        if last <= start:
            continue
        spans.append(PromptSpan(request, start, last - start))
        rows.append(np.arange(batch_start, batch_start + last - start))
        targets.extend(request.prompt_token_ids[start + 1 : last + 1])
        num_top = max(num_top, wanted)
    if not spans:
        return None
    return PromptLogprobRows(spans, np.concatenate(rows), np.asarray(targets, dtype=np.int64), num_top)


# Prompt rows whose [rows, vocab] logprobs exist at once (about 150 MB for a 152k vocabulary).
ROWS_PER_SLICE = 256


def _pack(logits: torch.Tensor, targets: torch.Tensor, num_top: int) -> torch.Tensor:
    """[3 + 2k, R]: each row's target id, its logprob, its 1-based rank (vLLM's `rank`), then the top
    k logprobs and their ids."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    rank = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    columns = [targets.float().unsqueeze(0), chosen.unsqueeze(0), rank.float().unsqueeze(0)]
    if num_top:
        top_values, top_ids = logprobs.topk(num_top, dim=1)
        columns += [top_values.t(), top_ids.float().t()]
    return torch.cat(columns)


class LaunchedPromptLogprobs:
    """A step's prompt logprobs, computed on the device and copied to the host behind it."""

    def __init__(
        self, rows: PromptLogprobRows, hidden: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int
    ) -> None:
        self.spans = rows.spans
        assert vocab_size < 2**24, "token ids travel as float32"
        device = hidden.device
        index = host_to_device(torch.from_numpy(rows.rows), device)
        targets = host_to_device(torch.from_numpy(rows.targets), device)
        # In slices of rows: a whole long prompt's [R, V] float32 logprobs would be gigabytes.
        pieces = []
        for begin in range(0, len(rows.rows), ROWS_PER_SLICE):
            piece = slice(begin, begin + ROWS_PER_SLICE)
            pieces.append(_pack(lm_head(hidden[index[piece]])[:, :vocab_size], targets[piece], rows.num_top))
        # One [3 + 2k, R] block, copied once. float32 holds token ids exactly below 2**24.
        packed = torch.cat(pieces, dim=1)
        self._num_top = rows.num_top
        self.on_cuda = device.type == "cuda"
        self._host = to_pinned_host(packed) if self.on_cuda else packed

    def result(self) -> list[tuple[Request, int, list[TokenLogprob]]]:
        """Valid once the step's tokens have been read (the caller synchronized on the device)."""
        values = self._host.tolist()
        targets, chosen, ranks = values[0], values[1], values[2]
        k = self._num_top
        top_values, top_ids = values[3 : 3 + k], values[3 + k : 3 + 2 * k]
        result = []
        row = 0
        for span in self.spans:
            wanted = span.request.params.prompt_logprobs
            entries = []
            for r in range(row, row + span.num_rows):
                alternatives = [(int(top_ids[j][r]), top_values[j][r]) for j in range(wanted)]
                entries.append(TokenLogprob(int(targets[r]), chosen[r], alternatives, rank=int(ranks[r])))
            result.append((span.request, span.first_position, entries))
            row += span.num_rows
        return result
