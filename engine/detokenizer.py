"""Incremental detokenization and stop-string matching for one output sequence.

Token ids arrive a few at a time; the text that goes out must be exactly what
`tokenizer.decode(all_ids, skip_special_tokens=...)` gives for the whole output, without
re-decoding the whole output on every step and without ever sending half a character.

Decoding works on a short window of ids (the vLLM / HF TextStreamer "prefix offset" scheme):
the window starts one settled chunk back, so decoders that treat the first token specially (a
SentencePiece leading space) see the same context in both decodes whose difference we emit.
While the window's text ends in U+FFFD a character may still be completing, so that tail is held.

tokenizers' `DecodeStream` does the same windowing in Rust but cannot flush: when an output ends
inside a character (a length cutoff) its buffered bytes never come out, so the streamed text would
miss the final U+FFFD that `decode` shows. We keep the window ourselves instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tokenizers

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's sampled token ids into text, with stop strings.

    `add_tokens` feeds new ids and reports a matched stop string; after a match the text is final
    (cut before the stop string, or after it with include_stop_str_in_output) and further ids are
    ignored. `take_new_text` hands out the text not yet handed out, holding back a tail that could
    still grow into a stop string. Stop strings match on the decoded text, across token boundaries;
    when several match, the one that ends first wins (as if the text were scanned character by
    character), so the result does not depend on how the ids were grouped into calls. With
    min_tokens, only a stop string completed once the output has that many tokens counts.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._decode = _make_decode(tokenizer, skip_special_tokens)
        self._stop = [s for s in dict.fromkeys(stop or []) if s]  # dedupe, keep order
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop_str = include_stop_str_in_output
        # As in vLLM, a stop string only counts once the output has min_tokens tokens; one that
        # completed earlier is plain text.
        self._min_tokens = min_tokens

        self._token_ids: list[int] = []
        # ids[:read_offset] are settled: their text is in the output. The window starts at
        # prefix_offset (one settled chunk before read_offset) and the first window_emitted
        # characters of decode(ids[prefix_offset:]) are already in the output.
        self._prefix_offset = 0
        self._read_offset = 0
        self._window_emitted = 0

        # The final text as chunks (joined lazily), and the chunks not yet handed out.
        self._parts: list[str] = []
        self._length = 0
        self._unsent: list[str] = []
        self._num_sent = 0
        # The last (max stop length - 1) characters: all a future stop match can reach back into.
        self._tail = ""
        self._stop_reason: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text so far that is final (truncated at the stop string once one matched)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Feeds newly sampled ids; returns the stop string if one matched now, else None."""
        if self._stop_reason is not None or self._flushed or not token_ids:
            return None
        self._token_ids.extend(token_ids)
        return self._append(self._decode_window(final=False))

    def take_new_text(self, finished: bool) -> str:
        """The text not yet handed out, less a tail that could still become a stop string.

        With finished=True everything is released, including the bytes of an unfinished
        character at the very end (as U+FFFD, exactly as `decode` renders them); feed no more ids
        afterwards. Check `stop_reason` after it: that last flush can still complete a stop string.
        """
        if finished and not self._flushed:
            self._flushed = True
            if self._stop_reason is None:
                self._append(self._decode_window(final=True))
        hold = 0 if finished or self._stop_reason is not None else self._stop_prefix_len()
        release = self._length - self._num_sent - hold
        if release <= 0:
            return ""
        unsent = "".join(self._unsent)
        self._unsent = [unsent[release:]] if hold else []
        self._num_sent += release
        return unsent[:release]

    def _decode_window(self, final: bool) -> str:
        """Decodes the window; returns its new settled text and slides the window forward."""
        ids = self._token_ids
        window_text = self._decode(ids[self._prefix_offset :])
        # Lossy UTF-8 decoding changes only a trailing run of U+FFFD when more bytes arrive
        # (one per incomplete sequence for byte-level BPE, one per byte for byte fallback), so
        # everything before that run is settled.
        settled_end = len(window_text) if final else len(window_text.rstrip(_REPLACEMENT_CHAR))
        new_text = window_text[self._window_emitted : settled_end]
        self._window_emitted = max(self._window_emitted, settled_end)
        if settled_end == len(window_text) and len(ids) > self._read_offset:
            # All of the window is settled: restart it at the previous settled point, which keeps
            # exactly one chunk of context and so keeps each decode short.
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._window_emitted = len(self._decode(ids[self._prefix_offset : self._read_offset]))
        return new_text

    def _append(self, new_text: str) -> str | None:
        if not new_text:
            return None
        if self._stop:
            match = self._find_stop(new_text) if len(self._token_ids) >= self._min_tokens else None
            if match is not None:
                stop_str, cut = match
                self._stop_reason = stop_str
                self._truncate_and_append(new_text, cut)
                return stop_str
            keep = self._max_stop_len - 1
            self._tail = (self._tail + new_text)[-keep:] if keep else ""
        self._parts.append(new_text)
        self._unsent.append(new_text)
        self._length += len(new_text)
        return None

    def _find_stop(self, new_text: str) -> tuple[str, int] | None:
        """The first-ending stop match that uses new_text, with the offset in new_text to cut at."""
        haystack = self._tail + new_text
        base = len(self._tail)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self._stop:
            # Matches inside the tail alone were found on earlier calls; start just early enough
            # for a match that ends at the first new character.
            start = haystack.find(stop_str, max(0, base - len(stop_str) + 1))
            if start < 0:
                continue
            # Ties on the end go to the longer stop string (the earlier start).
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, start, stop_str = best
        return stop_str, (end if self._include_stop_str else start) - base

    def _truncate_and_append(self, new_text: str, cut: int) -> None:
        if cut >= 0:
            self._parts.append(new_text[:cut])
            self._unsent.append(new_text[:cut])
            self._length += cut
            return
        # The stop string began in earlier text. That text is still unsent: take_new_text only
        # releases text that is not the start of any stop string.
        assert self._length + cut >= self._num_sent, "a stop string began in text already sent"
        full = self.text[: self._length + cut]
        self._parts = [full]
        self._length = len(full)
        self._unsent = [full[self._num_sent :]]

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that is a proper prefix of some stop string."""
        tail = self._tail
        longest = 0
        for stop_str in self._stop:
            # Scan candidate starts from the earliest (the longest possible prefix of this stop
            # string) and stop at the first hit; starts at or past `limit` could only give an end
            # no longer than the best so far.
            i = max(0, len(tail) - (len(stop_str) - 1))
            limit = len(tail) - longest
            while (i := tail.find(stop_str[0], i, limit)) >= 0:
                if stop_str.startswith(tail[i:]):
                    longest = len(tail) - i
                    break
                i += 1
        return min(longest, self._length - self._num_sent)


def _make_decode(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A fast `ids -> text` that returns exactly what `tokenizer.decode` returns."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # transformers' fast decode is the Rust decode plus an optional clean-up pass. When no
    # clean-up applies and the class does not override decoding, call Rust directly: it skips
    # several microseconds of Python argument handling on every step of every request.
    if (
        isinstance(backend, tokenizers.Tokenizer)
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and _uses_stock_decode(type(tokenizer))
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _uses_stock_decode(tokenizer_class: type) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    same_decode = getattr(tokenizer_class, "decode", None) is getattr(PreTrainedTokenizerBase, "decode", None)
    same_inner = getattr(tokenizer_class, "_decode", None) is getattr(TokenizersBackend, "_decode", None)
    return same_decode and same_inner
