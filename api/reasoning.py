"""Reasoning models: the `<think>...</think>` block before the answer, returned as `reasoning_content`.

Qwen3 and DeepSeek-R1 style models think in a block between two marker tokens, then answer. With a
reasoning parser (`--reasoning-parser`, or detected from the chat template) a chat answer's text is
split in two: the thinking goes to `message.reasoning_content` (streamed as `delta.reasoning_content`;
also under vLLM's newer name `reasoning`), the rest to `content`, where tool calls are read from.

Where the output starts is decided from the prompt: its tail (the text after its last special token,
that is the generation prompt the template wrote) may already open the block (`<think>\\n`, as
DeepSeek-R1's and newer Qwen templates write) or open and close it (`<think>\\n\\n</think>\\n\\n`,
Qwen3's template with `enable_thinking: false`). Otherwise the parser's default holds:
- qwen3: the output may open a block with its first token; an output that starts otherwise is all answer.
- deepseek_r1: the output is thinking (a leading `<think>` is dropped) until `</think>`.
After the end marker everything is answer; a second block is not looked for (as in vLLM).

A constrained answer (JSON response_format, a regex, forced tool calls) is constrained after the
thinking only: the engine's grammar matcher waits for the end-marker token (`engine.sampling.structured_outputs
.ThinkingMarkers`). Both markers must be single tokens of the vocabulary, as they are for these
families; the text split and the grammar agree as long as the model writes them as those tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from engine.sampling.structured_outputs import ThinkingMarkers

THINK_START = "<think>"
THINK_END = "</think>"


class Phase(enum.Enum):
    OPENING = "opening"  # nothing generated yet; a thinking block may open with the first token
    THINKING = "thinking"
    ANSWER = "answer"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    # Where an output starts when its prompt's tail says nothing (no marker after its last special token).
    default_phase: Phase
    start_token_id: int
    end_token_id: int
    special_ids: frozenset[int]

    def initial_phase(self, prompt_token_ids: list[int]) -> Phase:
        """Where the output of this prompt starts (see the module docstring)."""
        phase = self.default_phase
        for token_id in reversed(prompt_token_ids):
            if token_id == self.end_token_id:
                return Phase.ANSWER
            if token_id == self.start_token_id:
                return Phase.THINKING
            if token_id in self.special_ids:
                break  # the generation prompt ends here: older turns' blocks say nothing of this one
        return phase

    def thinking_markers(self, phase: Phase) -> ThinkingMarkers | None:
        """What the engine's grammar matcher must wait for before it constrains the answer."""
        if phase == Phase.ANSWER:
            return None
        return ThinkingMarkers(
            start_token_id=self.start_token_id,
            end_token_id=self.end_token_id,
            thinking=phase == Phase.THINKING,
        )

    def splitter(self, phase: Phase) -> ReasoningSplitter:
        return ReasoningSplitter(phase)


class ReasoningSplitter:
    """One choice's text, fed in deltas, split into (reasoning, content) deltas.

    Text that may be the start of a marker is held back until the next delta (or `final`) settles it.
    The markers themselves appear in neither part.
    """

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self._pending = ""
        # A thinking output may repeat the opening marker its prompt already wrote (older templates).
        self._at_thinking_start = phase in (Phase.THINKING, Phase.OPENING)
        self.saw_reasoning = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self._pending += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            if self.phase == Phase.ANSWER:
                content.append(self._pending)
                self._pending = ""
                break
            if self._at_thinking_start:
                if THINK_START.startswith(self._pending) and not final:
                    break  # could still become the opening marker
                self._at_thinking_start = False
                if self._pending.startswith(THINK_START):
                    self._pending = self._pending[len(THINK_START) :]
                    self.phase = Phase.THINKING
                    self.saw_reasoning = True
                    continue
                if self.phase == Phase.OPENING:
                    self.phase = Phase.ANSWER  # the first token did not open a block
                    continue
            end = self._pending.find(THINK_END)
            if end >= 0:
                reasoning.append(self._pending[:end])
                self._pending = self._pending[end + len(THINK_END) :]
                self.phase = Phase.ANSWER
                self.saw_reasoning = True
                continue
            keep = 0 if final else _partial_suffix(self._pending, THINK_END)
            reasoning.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        thought = "".join(reasoning)
        if thought:
            self.saw_reasoning = True
        return thought, "".join(content)


def split_reasoning(parser: ReasoningParser, phase: Phase, text: str) -> tuple[str | None, str | None]:
    """A whole output as (reasoning_content, content); None for a part that is absent."""
    splitter = parser.splitter(phase)
    reasoning, content = splitter.feed(text, final=True)
    return (reasoning if splitter.saw_reasoning else None), content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


REASONING_PARSERS = {"qwen3": Phase.OPENING, "deepseek_r1": Phase.THINKING}


def parser_name_for_template(chat_template: str | None) -> str | None:
    """The reasoning format a chat template teaches, where it is unambiguous; None otherwise."""
    if not chat_template or THINK_START not in chat_template:
        return None
    if "enable_thinking" in chat_template:
        return "qwen3"
    if "<｜Assistant｜>" in chat_template:  # DeepSeek's fullwidth bars
        return "deepseek_r1"
    return None


def get_reasoning_parser(name: str, tokenizer: Any) -> ReasoningParser:
    """The parser `name` for this tokenizer; ValueError when its markers are not single tokens."""
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"Invalid value for 'reasoning_parser': must be one of {sorted(REASONING_PARSERS)}, got {name!r}"
        )
    ids = []
    for marker in (THINK_START, THINK_END):
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"Invalid value for 'reasoning_parser': {name} needs {marker} to be one token of this model's "
                f"vocabulary, but the tokenizer splits it into {len(encoded)}"
            )
        ids.append(encoded[0])
    special = frozenset(getattr(tokenizer, "all_special_ids", ())) - set(ids)
    return ReasoningParser(name, REASONING_PARSERS[name], ids[0], ids[1], special)
