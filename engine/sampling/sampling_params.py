"""Per-request sampling settings, validated once where they enter the engine."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

from engine.sampling.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by 1e-45 gives
# inf, and softmax of inf is NaN, which would emit token 0 on every step.
GREEDY_TEMPERATURE_EPS = 1e-5
# Above ~2 a repetition penalty already wrecks the text; the bound keeps logits * penalty finite in
# half precision (and rules out Infinity and 1e308). vLLM and transformers only require > 0.
MAX_REPETITION_PENALTY = 10.0
# OpenAI allows 4 stop strings; vLLM has no limit. Each one is matched after every token, so a
# request with 10,000 of them would slow the engine loop for everyone.
MAX_STOP_STRINGS = 64


class OutputKind(enum.Enum):
    """What each RequestOutput of a request carries (as in vLLM).

    CUMULATIVE: everything generated so far; DELTA: only what is new since the last output;
    FINAL_ONLY: a single output when the request finishes.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE_EPS, then set to 0) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: up to the model's context length
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: chosen token plus the top k alternatives
    # Logprobs of the prompt's tokens (each with the top k alternatives); the prompt is then computed,
    # never read from the prefix cache.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: OutputKind = OutputKind.CUMULATIVE
    # Constrains the output to a JSON schema, any JSON object, a regex, a choice or a grammar.
    structured_outputs: StructuredOutputsParams | None = None
    # Token sequences the output must never contain (vLLM's bad_words, tokenized): the last token of
    # each is banned whenever the output ends with the others.
    bad_words_token_ids: list[list[int]] | None = None
    # Filled by the engine from the tokenizer and generation_config; not a user setting.
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.bad_words_token_ids = [list(map(int, word)) for word in self.bad_words_token_ids or ()]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            self.temperature = 0.0

    def _validate(self) -> None:
        # Types first: bool is an int to Python (n=True would mean n=1), and a NaN passes every
        # comparison below as False-but-unchecked; both are a client's mistake, never a setting.
        for name in ("n", "top_k", "min_tokens", "max_tokens", "seed", "logprobs"):
            value = getattr(self, name)
            _check(
                value is None and name in ("max_tokens", "seed", "logprobs") or _is_int(value),
                name,
                f"must be an integer, got {value!r}",
            )
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            _check(_is_finite_number(value), name, f"must be a finite number, got {value!r}")
        _check(self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1 (off), 0 (off) or a positive integer, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}",
        )
        for token_id, bias in self.logit_bias.items():
            _check(
                -100.0 <= bias <= 100.0,  # also False for NaN
                "logit_bias",
                f"values must be in [-100, 100], got {bias} for token {token_id}",
            )
        if self.seed is not None:
            _check(-(2**63) <= self.seed < 2**63, "seed", f"must fit in 64 bits (signed), got {self.seed}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}",
        )
        _check(all(self.bad_words_token_ids), "bad_words", "bad words must not be empty")
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            )
        if self.prompt_logprobs is not None:
            _check(
                0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
            )
        _check(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs",
            f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too


def _is_finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValueError(f"Invalid value for '{param}': {message}")
