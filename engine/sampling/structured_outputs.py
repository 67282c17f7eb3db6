"""Grammar-constrained decoding: a request's output is forced into a JSON schema, a regex, a choice or
an EBNF grammar, whatever the model's weights.

xgrammar does the grammar work. It is an optional dependency, imported only when a request carries a
constraint, so the engine runs without it. Per engine there is one `GrammarManager`: it compiles each
constraint once (an LRU cache keyed by the constraint's canonical JSON), gives every sequence its own
matcher, and at each step fills the token bitmask of all constrained rows of the batch in one call and
applies it to the logits. Unconstrained rows cost nothing.

JSON is compiled without free whitespace (`any_whitespace=False`: separators are exactly ", " and ": "),
because a grammar that allows unbounded whitespace lets a weak model loop on spaces and newlines until
max_tokens.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and xgrammar load on first use, so `import engine` stays light
    import torch

logger = logging.getLogger(__name__)

_PARAM = "structured_outputs"
_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# The schema json_object compiles; through the same JSON-schema path as `json`, so it gets the same
# fixed separators (xgrammar's builtin JSON grammar allows arbitrary whitespace).
_ANY_OBJECT_SCHEMA = '{"type": "object"}'
# Compiled grammars kept per engine. A compiled grammar holds per-state token masks (up to megabytes
# for a large vocabulary), so the cache is bounded; recompiling an evicted one costs milliseconds.
GRAMMAR_CACHE_SIZE = 128
# Constrained rows per step from which the bitmask is filled on several threads. Below it, handing
# rows to worker threads costs more than filling them (a row takes microseconds on a warm grammar).
PARALLEL_FILL_MIN_ROWS = 64
# xgrammar (0.2.8) writes a string with minLength/maxLength as a run of this character class, which lets
# raw control characters (U+0000-U+001F but CR and LF) through: no JSON parser accepts those in a string.
# Its unbounded strings exclude them, as the second class does; the patch is a no-op once that is fixed.
_LENGTH_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the useful part.
_XGRAMMAR_ERROR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class ThinkingMarkers:
    """A reasoning model's thinking block, which the constraint does not cover: it applies after it.

    thinking: True: the output starts inside the block; False: the block may open with the first
    token (start_token_id), and the answer starts at once if it does not. The block ends with the
    end_token_id token; the grammar constrains what follows.
    """

    start_token_id: int
    end_token_id: int
    thinking: bool


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output: set exactly one field (and `thinking` with any of them).

    json: a JSON schema (dict, or its JSON text); the output is one JSON value valid against it.
    json_object: True: the output is any JSON object.
    regex: the output matches the regex in full (xgrammar's regex dialect: no lookaround, no backrefs).
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (xgrammar's dialect, GBNF-like, with a `root` rule).

    The output ends (finish_reason "stop") when it is complete and the model samples EOS, which the
    grammar allows only at that point; max_tokens can still cut it short (finish_reason "length").
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # A reasoning model's thinking comes first, unconstrained; not part of the compiled grammar.
    thinking: ThinkingMarkers | None = None

    def __post_init__(self) -> None:
        chosen = [kind for kind in _KINDS if self._is_set(kind)]
        if len(chosen) != 1:
            got = "none" if not chosen else " and ".join(chosen)
            raise _invalid(f"set exactly one of {', '.join(_KINDS)}; got {got}")
        if isinstance(self.json, str):
            try:
                self.json = jsonlib.loads(self.json)
            except ValueError as error:
                raise _invalid(f"the JSON schema is not valid JSON: {error}") from None
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise _invalid(f"the JSON schema must be a JSON object, got {type(self.json).__name__}")
            try:
                jsonlib.dumps(self.json)
            except (TypeError, ValueError) as error:
                raise _invalid(f"the JSON schema must be JSON-serializable: {error}") from None
        if self.json_object not in (True, False):
            raise _invalid(f"json_object must be a bool, got {self.json_object!r}")
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise _invalid("regex must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise _invalid("choice must be a list of strings")
            self.choice = list(self.choice)
            if not self.choice:
                raise _invalid("choice must hold at least one string")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            raise _invalid("grammar must be a non-empty EBNF string")

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return bool(value) if kind == "json_object" else value is not None

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if self._is_set(kind))

    def cache_key(self) -> str:
        """Canonical JSON of the constraint: equal constraints share one compiled grammar.

        Keys keep the schema's own property order (no sort_keys): xgrammar emits properties in schema
        order, so two orderings are two different grammars.
        """
        kind = self.kind
        value = True if kind == "json_object" else getattr(self, kind)
        return jsonlib.dumps([kind, value], separators=(",", ":"), ensure_ascii=False)


def import_xgrammar() -> Any:
    """The xgrammar module, or a ValueError saying how to get it (a request asked for a constraint)."""
    try:
        import xgrammar
    except (ImportError, OSError) as error:  # OSError: installed, but its native library does not load
        raise ValueError(
            f"Invalid value for '{_PARAM}': constrained decoding (JSON mode, JSON schema, regex, choice, "
            "grammar, forced tool calls) needs the xgrammar package, which this server cannot import "
            f"({error}); install it with `pip install xgrammar` (or the sluicegate[structured] extra)"
        ) from None
    return xgrammar


# Where a sequence with ThinkingMarkers is: the grammar only sees tokens in _ANSWER.
_OPENING, _THINKING, _ANSWER = 0, 1, 2


class SequenceGrammar:
    """One sequence's matcher: where in the grammar its output is, and which tokens may come next.

    With ThinkingMarkers the matcher waits: tokens of the thinking block pass unchecked and unmasked,
    and the grammar starts with the token after the end marker.
    """

    __slots__ = ("manager", "matcher", "phase", "markers")

    def __init__(self, manager: GrammarManager, matcher: Any, markers: ThinkingMarkers | None = None) -> None:
        self.manager = manager
        self.matcher = matcher
        self.markers = markers
        if markers is None:
            self.phase = _ANSWER
        else:
            self.phase = _THINKING if markers.thinking else _OPENING

    @property
    def masks_next_token(self) -> bool:
        """False inside a thinking block, where any token may come."""
        return self.phase != _THINKING

    @property
    def may_open_thinking(self) -> bool:
        """True while the next token may open a thinking block (the first token, with markers)."""
        return self.phase == _OPENING

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it (a bug upstream)."""
        if self.phase == _THINKING:
            if token_id == self.markers.end_token_id:
                self.phase = _ANSWER
            return True
        if self.phase == _OPENING:
            if token_id == self.markers.start_token_id:
                self.phase = _THINKING
                return True
            self.phase = _ANSWER
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """True once the output is complete and the grammar's stop token has been accepted."""
        return self.phase == _ANSWER and self.matcher.is_terminated()


class GrammarManager:
    """Compiles constraints for one tokenizer and masks the logits of constrained rows.

    `compile` and `new_sequence_grammar` are thread-safe (requests are validated off the engine thread);
    `apply_bitmask` runs on the engine thread only, since it reuses one bitmask buffer.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        max_rows: int,
        device: torch.device | str = "cpu",
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ) -> None:
        import torch

        xgr = import_xgrammar()
        self._xgr = xgr
        stop = sorted(stop_token_ids)
        # vocab_size is the model's (the logits width), which may exceed the tokenizer's: xgrammar then
        # treats the padding ids as never allowed. The stop tokens are the engine's EOS ids, so the
        # grammar's "end of output" is exactly what the engine treats as EOS.
        tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop or None
        )
        # xgrammar's own cache is off: ours is bounded by count and keyed by canonical constraint JSON.
        self._compiler = xgr.GrammarCompiler(tokenizer_info, cache_enabled=False)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # One bitmask for the whole batch, allocated once: row i belongs to sampled row i of a step, and
        # only constrained rows are filled (the others are never read). Pinned on CUDA so the copy to
        # the device is asynchronous.
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        if self.device.type == "cuda":
            self._bitmask = self._bitmask.pin_memory()
        self._device_bitmask: torch.Tensor | None = None
        self._fill_serial = xgr.BatchGrammarMatcher(max_threads=1)
        self._fill_parallel: Any = None  # built on first large batch

    # ---- compile (any thread) ----------------------------------------------------------------

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of a constraint (cached); ValueError saying why it is invalid."""
        key = params.cache_key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        # Compiled outside the lock: a big schema can take a while, and other requests need not wait.
        # Two threads may compile the same key at once; both results are equal, one is kept.
        compiled = self._compile_uncached(params)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)

    def _compile_uncached(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        compiler = self._compiler
        try:
            if kind == "json":
                return self._compile_json_schema(jsonlib.dumps(params.json))
            if kind == "json_object":
                return compiler.compile_json_schema(_ANY_OBJECT_SCHEMA, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as error:
            what = {"json": "JSON schema", "json_object": "JSON object"}.get(kind, kind)
            raise _invalid(f"invalid {what}: {xgrammar_message(error)}") from None

    def _compile_json_schema(self, schema: str) -> Any:
        ebnf = json_schema_grammar(schema)
        if _JSON_STRING_CHAR in ebnf:  # patched: compile the fixed text
            try:
                return self._compiler.compile_grammar(ebnf)
            except RuntimeError:  # the printed grammar did not parse back: keep xgrammar's own
                logger.debug("could not recompile the patched JSON-schema grammar", exc_info=True)
        return self._compiler.compile_json_schema(schema, any_whitespace=False)

    def new_sequence_grammar(self, compiled: Any, thinking: ThinkingMarkers | None = None) -> SequenceGrammar:
        return SequenceGrammar(self, self._xgr.GrammarMatcher(compiled), thinking)

    # ---- masking (engine thread) -------------------------------------------------------------

    def apply_bitmask(self, logits: torch.Tensor, rows: list[int], grammars: list[SequenceGrammar]) -> None:
        """Sets to -inf, in logits[rows[i]], every token grammars[i] does not allow next.

        logits is [B, V'] with V' <= the model's vocabulary (columns past V' are never sampled).
        """
        if not all(g.masks_next_token for g in grammars):  # thinking rows sample freely
            kept = [(row, g) for row, g in zip(rows, grammars, strict=True) if g.masks_next_token]
            rows, grammars = [row for row, _ in kept], [g for _, g in kept]
            if not rows:
                return
        num_rows = logits.shape[0]
        if num_rows > self._bitmask.shape[0]:
            self._grow(num_rows)
        bitmask = self._bitmask
        matchers = [g.matcher for g in grammars]
        if len(matchers) >= PARALLEL_FILL_MIN_ROWS:
            if self._fill_parallel is None:
                self._fill_parallel = self._xgr.BatchGrammarMatcher(max_threads="auto")
            self._fill_parallel.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        else:
            self._fill_serial.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        for row, grammar in zip(rows, grammars, strict=True):
            if grammar.may_open_thinking:  # the answer's first token, or the thinking block's opening
                _allow_token(bitmask, row, grammar.markers.start_token_id)
        width = logits.shape[1]
        if logits.device.type == "cpu":
            self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, indices=rows)
            return
        # On an accelerator: our own few-kernel op, so neither Triton nor a JIT build is needed. On CUDA
        # the fill above ran on the host while the forward pass was still queued on the device; the
        # pinned copy is asynchronous, and the buffer is not refilled before this step's tokens reach
        # the host (the engine syncs on them).
        if self._device_bitmask is None or self._device_bitmask.shape != bitmask.shape:
            self._device_bitmask = bitmask.to(logits.device)
        else:
            self._device_bitmask[:num_rows].copy_(bitmask[:num_rows], non_blocking=True)
        apply_token_bitmask(logits, self._device_bitmask, rows)

    def _grow(self, num_rows: int) -> None:
        bitmask = self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        self._bitmask = bitmask.pin_memory() if self.device.type == "cuda" else bitmask
        self._device_bitmask = None


def _allow_token(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = 1 << bit
    # int32 words: bit 31 is the sign bit.
    bitmask[row, word] |= value - (1 << 32) if value >= 1 << 31 else value


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Masks logits[rows] to -inf where the bit of bitmask[rows] is 0; any device, plain torch ops.

    bitmask is int32 [>= B, ceil(V / 32)], bit j of word w standing for token 32 * w + j.
    """
    import torch

    num_rows, width = logits.shape
    every_row = rows == list(range(num_rows))
    row_index = None if every_row else torch.tensor(rows, device=logits.device)
    words = bitmask[:num_rows] if row_index is None else bitmask[row_index]
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    # An arithmetic right shift keeps bit j in position 0 whatever the sign of the word.
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(words.shape[0], -1)[:, :width].bool()
    if row_index is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[row_index] = logits[row_index].masked_fill_(~allowed, float("-inf"))


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """The EBNF (xgrammar's dialect) of JSON values valid against `schema`, without free whitespace.

    For building larger grammars around JSON (forced tool calls). Raises xgrammar's RuntimeError for
    an invalid schema (see `xgrammar_message`), and ValueError if xgrammar is not installed.
    """
    xgr = import_xgrammar()
    text = schema if isinstance(schema, str) else jsonlib.dumps(schema)
    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
    return ebnf.replace(_LENGTH_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the given strings."""
    # A JSON string literal is a valid EBNF string literal for xgrammar (same escapes).
    return "root ::= " + " | ".join(jsonlib.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


def xgrammar_message(error: BaseException) -> str:
    """xgrammar's error text without its C++ source-location prefix."""
    return _XGRAMMAR_ERROR_PREFIX.sub("", str(error).strip()).strip()


def _invalid(message: str) -> ValueError:
    return ValueError(f"Invalid value for '{_PARAM}': {message}")
