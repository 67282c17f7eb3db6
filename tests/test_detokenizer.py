"""IncrementalDetokenizer, specified against `tokenizer.decode` of the whole output as the oracle."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

NON_ASCII_TEXTS = [
    "Le café est très chaud, l'été à Noël.",
    "Καλημέρα! Η γλώσσα μου είναι ελληνική.",
    "Привет, мир! Съешь же ещё этих мягких булок.",
    "你好，世界！我喜欢喝茶。薔薇と漢字は珍しい。",
    "안녕하세요 😀🚀👩‍💻🇯🇵 ∀x ∈ ℝ, x² ≥ 0 — «fin»",
]


def stream(
    detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int] | None = None
) -> list[str]:
    """Feeds ids in chunks (one at a time by default) and collects every delta handed out."""
    deltas = []
    position = 0
    for size in chunk_sizes or [1] * len(token_ids):
        detokenizer.add_tokens(token_ids[position : position + size])
        position += size
        deltas.append(detokenizer.take_new_text(finished=False))
    assert position >= len(token_ids)
    deltas.append(detokenizer.take_new_text(finished=True))
    return deltas


def random_chunks(rng: random.Random, total: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.choice([1, 1, 1, 2, 3, 5]))
    return sizes


def expected_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """(end, start, stop) of the stop match that ends first in text, longer on ties."""
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    return min(matches) if matches else None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_of_random_ids_concatenate_to_the_full_decode(tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(1234)
    vocab_size = len(tokenizer)
    for _ in range(200):
        token_ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 40))]
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = stream(detokenizer, token_ids, random_chunks(rng, len(token_ids)))

        full = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == full
        assert detokenizer.text == full
        if REPLACEMENT not in full:
            assert not any(REPLACEMENT in delta for delta in deltas)


@pytest.mark.parametrize("text", NON_ASCII_TEXTS)
def test_non_ascii_text_fed_one_token_at_a_time_never_shows_half_a_character(tokenizer, text: str) -> None:
    token_ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_a_token_that_ends_mid_character_is_held_until_the_character_completes(tokenizer) -> None:
    token_ids = tokenizer.encode("ok 😀")
    assert len(token_ids) >= 3 and REPLACEMENT in tokenizer.decode(token_ids[-1:])
    detokenizer = IncrementalDetokenizer(tokenizer)
    detokenizer.add_tokens(token_ids[:-1])
    # The space shares a token with the emoji's first bytes; it is settled, the bytes are not.
    assert detokenizer.take_new_text(finished=False) == "ok "
    detokenizer.add_tokens(token_ids[-1:])
    assert detokenizer.take_new_text(finished=False) == "😀"


def test_an_output_cut_mid_character_ends_as_decode_renders_it(tokenizer) -> None:
    token_ids = tokenizer.encode("ok 😀")[:-1]
    full = tokenizer.decode(token_ids)
    assert full.endswith(REPLACEMENT)
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert not any(REPLACEMENT in delta for delta in deltas[:-1])
    assert "".join(deltas) == full


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_are_skipped_or_kept(tokenizer, skip_special_tokens: bool) -> None:
    text = "<|im_start|>assistant\nBonjour à tous<|im_end|>"
    token_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    result = "".join(stream(detokenizer, token_ids))
    assert result == ("assistant\nBonjour à tous" if skip_special_tokens else text)


def test_decoding_works_on_a_short_window_not_the_whole_output(tokenizer) -> None:
    class CountingTokenizer:
        """Only `decode`: the detokenizer must work with any object that has it."""

        def __init__(self) -> None:
            self.longest_decode = 0

        def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
            self.longest_decode = max(self.longest_decode, len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    token_ids = tokenizer.encode(" ".join(NON_ASCII_TEXTS) * 10)
    assert "".join(stream(IncrementalDetokenizer(counting), token_ids)) == tokenizer.decode(token_ids)
    assert len(token_ids) > 500 and counting.longest_decode <= 8


def test_stop_string_across_token_boundaries_truncates_the_text(tokenizer) -> None:
    token_ids = tokenizer.encode("Hello, world! How are you today?")
    stop = "world! How"
    detokenizer = IncrementalDetokenizer(tokenizer, stop=[stop])
    reported = [detokenizer.add_tokens([token_id]) for token_id in token_ids]

    completing = next(i for i in range(len(token_ids)) if stop in tokenizer.decode(token_ids[: i + 1]))
    assert completing > 0 and stop not in tokenizer.decode(token_ids[completing:])  # really spans tokens
    assert reported[completing] == stop
    assert [r for i, r in enumerate(reported) if i != completing] == [None] * (len(token_ids) - 1)
    assert detokenizer.stop_reason == stop
    assert detokenizer.text == "Hello, "
    assert detokenizer.take_new_text(finished=True) == "Hello, "


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer) -> None:
    token_ids = tokenizer.encode("Hello, world! How are you today?")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["world!"], include_stop_str_in_output=True)
    deltas = stream(detokenizer, token_ids)
    assert "".join(deltas) == detokenizer.text == "Hello, world!"
    assert detokenizer.stop_reason == "world!"


def test_tokens_after_a_stop_are_ignored(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    assert detokenizer.add_tokens(tokenizer.encode("abc STOP def")) == "STOP"
    assert detokenizer.add_tokens(tokenizer.encode(" more")) is None
    assert detokenizer.take_new_text(finished=True) == "abc "
    assert detokenizer.text == "abc "


def test_only_a_possible_stop_prefix_is_held_back(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["abc"])
    assert detokenizer.add_tokens(tokenizer.encode("xxab")) is None
    assert detokenizer.take_new_text(finished=False) == "xx"
    assert detokenizer.text == "xxab"  # held back from the stream, but not from the text
    detokenizer.add_tokens(tokenizer.encode("d"))
    assert detokenizer.take_new_text(finished=False) == "abd"


def test_a_held_back_stop_prefix_that_completes_is_never_sent(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["abc"])
    detokenizer.add_tokens(tokenizer.encode("xxab"))
    assert detokenizer.take_new_text(finished=False) == "xx"
    assert detokenizer.add_tokens(tokenizer.encode("c and more")) == "abc"
    assert detokenizer.take_new_text(finished=False) == ""
    assert detokenizer.text == "xx"


def test_a_held_back_stop_prefix_is_released_when_the_output_finishes(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["abc"])
    detokenizer.add_tokens(tokenizer.encode("xxab"))
    assert detokenizer.take_new_text(finished=False) == "xx"
    assert detokenizer.take_new_text(finished=True) == "ab"


def test_the_stop_string_that_ends_first_wins(tokenizer) -> None:
    # Scanning character by character, "b" completes before "abc" does.
    for chunk_sizes in ([1] * 10, [10]):
        detokenizer = IncrementalDetokenizer(tokenizer, stop=["abc", "b"])
        token_ids = tokenizer.encode("xabcx")
        stream(detokenizer, token_ids, chunk_sizes)
        assert (detokenizer.stop_reason, detokenizer.text) == ("b", "xa")


def test_stop_strings_before_min_tokens_are_plain_text(tokenizer) -> None:
    token_ids = tokenizer.encode("ab ab ab")
    first_ab = next(i for i in range(len(token_ids)) if "ab" in tokenizer.decode(token_ids[: i + 1]))
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["ab"], min_tokens=first_ab + 2)
    reported = [detokenizer.add_tokens([token_id]) for token_id in token_ids]
    assert reported[first_ab] is None and "ab" in reported
    assert detokenizer.text.startswith("ab ")
    assert detokenizer.stop_reason == "ab"


def test_stop_string_made_of_split_characters(tokenizer) -> None:
    token_ids = tokenizer.encode("Emoji: 🚀 then 🐍 end")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["🐍"])
    deltas = stream(detokenizer, token_ids)
    assert "".join(deltas) == "Emoji: 🚀 then "
    assert detokenizer.stop_reason == "🐍"


def test_stop_string_on_special_token_text_when_special_tokens_are_kept(tokenizer) -> None:
    token_ids = tokenizer.encode("Yes.<|im_end|>trailing")
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(stream(detokenizer, token_ids)) == "Yes."


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_random_stops_and_chunkings_match_the_oracle(tokenizer, include_stop_str_in_output: bool) -> None:
    rng = random.Random(99)
    corpus_ids = tokenizer.encode(" ".join(NON_ASCII_TEXTS) + " Hello, world! abcabc xyz")
    vocab_size = len(tokenizer)
    for _ in range(150):
        if rng.random() < 0.5:
            start = rng.randrange(len(corpus_ids) - 10)
            token_ids = corpus_ids[start : start + rng.randrange(1, 30)]
        else:
            token_ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 30))]
        full = tokenizer.decode(token_ids, skip_special_tokens=True)
        stops = ["never-seen"]
        for _ in range(rng.randrange(0, 3)):
            if len(full) > 1:
                begin = rng.randrange(len(full) - 1)
                stops.append(full[begin : begin + rng.randrange(1, 5)])
        detokenizer = IncrementalDetokenizer(
            tokenizer, stop=stops, include_stop_str_in_output=include_stop_str_in_output
        )
        deltas = stream(detokenizer, token_ids, random_chunks(rng, len(token_ids)))

        match = expected_stop(full, stops)
        if match is None:
            expected_text, expected_reason = full, None
        else:
            end, start, stop = match
            expected_text, expected_reason = full[: end if include_stop_str_in_output else start], stop
        outcome = (detokenizer.stop_reason, detokenizer.text)
        assert outcome == (expected_reason, expected_text), (token_ids, stops)
        assert "".join(deltas) == expected_text


def test_a_raw_tokenizers_tokenizer_works_too(tokenizer) -> None:
    token_ids = tokenizer.encode(NON_ASCII_TEXTS[3] + "<|im_end|>")
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tokenizer.backend_tokenizer, skip_special_tokens=skip)
        expected = tokenizer.decode(token_ids, skip_special_tokens=skip)
        assert "".join(stream(detokenizer, token_ids)) == expected
