"""Chat logprobs' `bytes`: each token's own bytes, so a client can rebuild a character split over tokens."""

from __future__ import annotations

from api.logprobs import TokenText, chat_logprobs
from engine.outputs import TokenLogprob

TEXT = "世界 🚀 Ж ünïcödé"


def test_bytes_of_partial_character_tokens_join_to_the_text(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    token_text = TokenText(tokenizer)
    # The alternatives are the same tokens, so both places are checked.
    entries = [TokenLogprob(token_id, -0.5, [(token_id, -0.5)]) for token_id in ids]
    content = chat_logprobs(entries, token_text)["content"]
    partial = [entry for entry in content if "\ufffd" in entry["token"]]
    assert partial, "the test text must split some character over tokens"
    for entry in partial:
        assert entry["bytes"] != list("\ufffd".encode())
    # The oracle is the tokenizer's own encoding of the text: its tokens' bytes are the text's UTF-8.
    assert b"".join(bytes(entry["bytes"]) for entry in content) == TEXT.encode("utf-8")
    assert b"".join(bytes(entry["top_logprobs"][0]["bytes"]) for entry in content) == TEXT.encode("utf-8")
