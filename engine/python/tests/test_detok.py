"""Unit tests of govllm.detok: UTF-8 safety and stop strings (no model needed except the tokenizer tests)."""

from __future__ import annotations

import pytest

from govllm.detok import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher, TextStream


def byte_decoder(pieces: list[bytes]):
    """A byte-level 'tokenizer': token i is pieces[i]; decoding replaces broken UTF-8 like HF does."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def split_bytes(text: str, size: int) -> list[bytes]:
    data = text.encode()
    return [data[i : i + size] for i in range(0, len(data), size)]


def text_decoder(pieces: list[str]):
    return lambda ids: "".join(pieces[i] for i in ids)


def run_stream(stream: TextStream, ids: list[int]) -> list[str]:
    out = [stream.push([i]) for i in ids]
    out.append(stream.finish())
    return out


# ----------------------------------------------------------------------------- UTF-8


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_multibyte_never_split(size):
    text = "héllo wörld 世界 🎉👍🏽 naïve — done"
    pieces = split_bytes(text, size)
    detok = IncrementalDetokenizer(byte_decoder(pieces))
    deltas = [detok.push([i]) for i in range(len(pieces))]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    for d in deltas:
        assert REPLACEMENT_CHAR not in d
        d.encode("utf-8")  # a lone surrogate or half character would fail here


def test_emoji_held_until_complete():
    pieces = split_bytes("🎉", 1)  # 4 tokens, one byte each
    detok = IncrementalDetokenizer(byte_decoder(pieces))
    assert [detok.push([i]) for i in range(4)] == ["", "", "", "🎉"]


def test_truncated_character_dropped_at_end():
    pieces = split_bytes("ok🎉", 1)[:4]  # "ok" + 2 of the emoji's 4 bytes
    detok = IncrementalDetokenizer(byte_decoder(pieces))
    out = "".join(detok.push([i]) for i in range(4)) + detok.flush()
    assert out == "ok"


def test_prompt_context_is_not_emitted():
    pieces = [b"<s>", b"Hello", b" world"]
    detok = IncrementalDetokenizer(byte_decoder(pieces), prompt_token_ids=[0])
    assert detok.push([1]) == "Hello"
    assert detok.push([2]) == " world"
    assert detok.num_generated == 2


def test_real_tokenizer_emoji_and_cjk(tokenizer):
    text = "Voilà: 日本語のテキスト 🎉🚀👍🏽 and ünïcödé ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(t):
        return tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # The test is only meaningful if some token is half a character on its own.
    assert any(REPLACEMENT_CHAR in decode([i]) for i in ids)
    stream = TextStream(decode, prompt_token_ids=tokenizer("Say:", add_special_tokens=False)["input_ids"])
    deltas = run_stream(stream, ids)
    assert "".join(deltas) == decode(ids) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


# ----------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_deltas_is_truncated():
    pieces = ["The", " cap", "ital", " of", " Fr", "ance", " is", " Paris", "."]
    stream = TextStream(text_decoder(pieces), stop=["of France"])
    out = []
    for i in range(len(pieces)):
        out.append(stream.push([i]))
        if stream.stopped:
            break
    assert stream.stopped and stream.stops.matched == "of France"
    assert "".join(out) == "The capital "
    # "of" and " Fr" were held back, never emitted then retracted
    assert out[3] == " " and out[4] == ""
    assert stream.push([6]) == "" and stream.finish() == ""


def test_stop_string_at_start():
    pieces = ["Paris", " is", " nice"]
    stream = TextStream(text_decoder(pieces), stop=["Paris"])
    assert stream.push([0]) == ""
    assert stream.stopped


def test_min_tokens_defers_stop_strings():
    """vLLM's rule: no match inside the text of the first min_tokens tokens; one that starts there
    and ends later still matches."""
    pieces = ["Paris", " is", " Pa", "ris", " and", " Paris"]
    stream = TextStream(text_decoder(pieces), stop=["Paris"], min_tokens=2)
    assert stream.push([0]) == "Paris" and stream.push([1]) == " is"
    assert stream.push([2]) == " " and not stream.stopped  # "Pa" held: it may start "Paris"
    assert stream.push([3]) == "" and stream.stopped  # "Paris" ends in token 4's text
    stream = TextStream(text_decoder(pieces), stop=["is"], min_tokens=2)
    assert [stream.push([i]) for i in range(5)] == ["Paris", " is", " Pa", "r", ""] and stream.stopped


def test_stop_string_inside_one_token():
    pieces = ["ab", "cSTOPde", "f"]
    stream = TextStream(text_decoder(pieces), stop=["STOP"])
    assert stream.push([0]) == "ab"
    assert stream.push([1]) == "c"
    assert stream.stopped


def test_partial_stop_prefix_released_when_disambiguated():
    pieces = ["Hello", " wor", "m", " end"]
    stream = TextStream(text_decoder(pieces), stop=["world"])
    out = run_stream(stream, list(range(4)))
    assert out == ["Hello", " ", "worm", " end", ""]
    assert not stream.stopped


def test_partial_stop_prefix_flushed_at_end():
    pieces = ["Hello", " wor"]
    stream = TextStream(text_decoder(pieces), stop=["world"])
    out = run_stream(stream, [0, 1])
    assert "".join(out) == "Hello wor"
    assert out[1] == " " and out[2] == "wor"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["xyz", "b"])
    assert matcher.feed("a") == "a"
    assert matcher.feed("bcxyz") == ""
    assert matcher.matched == "b"


def test_overlapping_prefixes():
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("a") == ""
    assert matcher.feed("a") == ""
    assert matcher.feed("a") == "a"  # "aaa": only the last "aa" can still start "aab"
    assert matcher.feed("b") == ""
    assert matcher.matched == "aab"


def test_stop_with_multibyte_split():
    text = "x 🎉 y STOP z"
    pieces = split_bytes(text, 1)
    stream = TextStream(byte_decoder(pieces), stop=["STOP"])
    out = []
    for i in range(len(pieces)):
        out.append(stream.push([i]))
        if stream.stopped:
            break
    assert "".join(out) == "x 🎉 y "
    assert all(REPLACEMENT_CHAR not in d for d in out)


def test_empty_stop_strings_ignored():
    stream = TextStream(text_decoder(["a", "b"]), stop=[""])
    assert run_stream(stream, [0, 1]) == ["a", "b", ""]
