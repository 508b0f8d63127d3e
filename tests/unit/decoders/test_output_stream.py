"""Detokenizing, stop strings and holding back in ``alignd.decoders.output_stream``."""

from __future__ import annotations

import re

from alignd.decoders.output_stream import OutputStream
from tests.support.fake_models import CharTokenizer


class ByteTokenizer:
    """Token id = one UTF-8 byte (ids 0..255); invalid sequences decode to U+FFFD like real tokenizers."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


class SpaceEatingTokenizer(CharTokenizer):
    """Drops a leading space of the decoded text, as sentencepiece tokenizers do."""

    def decode(self, token_ids: list[int]) -> str:
        text = super().decode(token_ids)
        return text.removeprefix(" ")


def _push_all(stream: OutputStream, tok: object, text: str) -> list:
    emits = []
    for t in tok.encode(text):  # type: ignore[attr-defined]
        emits += stream.push(t, "r")
        if stream.stopped:
            break
    return emits


def test_plain_text_streams_token_by_token() -> None:
    tok = CharTokenizer(len(CharTokenizer.ALPHABET))
    stream = OutputStream(tok, "base")
    emits = _push_all(stream, tok, "hello")
    assert [e.text for e in emits] == list("hello")
    assert [e.token_ids for e in emits] == [(t,) for t in tok.encode("hello")]
    assert stream.finish() == []


def test_stop_string_is_cut_and_never_sent() -> None:
    tok = CharTokenizer(len(CharTokenizer.ALPHABET))
    stream = OutputStream(tok, "base", stop_strings=["#Q"])
    emits = _push_all(stream, tok, "ab#c#Qxyz")
    assert stream.stopped
    assert "".join(e.text for e in emits) == "ab#c"
    # '#' was held back until the next character showed it was not a stop string
    assert [e.text for e in emits] == ["a", "b", "#c"] or [e.text for e in emits] == ["a", "b", "#", "c"]
    assert all("#Q" not in e.text for e in emits)


def test_stop_string_inside_a_token_cuts_the_text() -> None:
    class Words:
        vocab = ("", "hello", " wor", "ld!", "STOP", "ld")

        def encode(self, text: str) -> list[int]:
            raise NotImplementedError

        def decode(self, ids: list[int]) -> str:
            return "".join(self.vocab[i] for i in ids)

    stream = OutputStream(Words(), "base", stop_strings=["orld"])
    emits = []
    for t in (1, 2, 3):
        emits += stream.push(t, "r")
    assert stream.stopped
    assert "".join(e.text for e in emits) == "hello w"
    assert [t for e in emits for t in e.token_ids] == [1, 2]


def test_earliest_stop_string_wins() -> None:
    tok = CharTokenizer(len(CharTokenizer.ALPHABET))
    stream = OutputStream(tok, "base", stop_strings=["cd", "bcd"])
    emits = _push_all(stream, tok, "abcde")
    assert "".join(e.text for e in emits) == "a"


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    tok = ByteTokenizer()
    stream = OutputStream(tok, "base")
    emits = _push_all(stream, tok, "aé€b")
    assert "".join(e.text for e in emits) == "aé€b"
    assert all("\ufffd" not in e.text for e in emits)
    assert all(e.text for e in emits), "no event without text: a split character travels with its last byte"
    assert [len(e.token_ids) for e in emits] == [1, 2, 3, 1]


def test_prompt_context_keeps_leading_space() -> None:
    tok = SpaceEatingTokenizer(len(CharTokenizer.ALPHABET))
    prompt = tok.encode("Answer:")
    stream = OutputStream(tok, "base", prompt_ids=prompt)
    emits = _push_all(stream, tok, " Paris")
    assert "".join(e.text for e in emits) == " Paris"


def test_finish_releases_held_text_and_drops_matching_tail() -> None:
    tok = CharTokenizer(len(CharTokenizer.ALPHABET))
    stream = OutputStream(tok, "base", stop_strings=["\n```\n\n# Query"])
    emits = _push_all(stream, tok, "ok\n```")
    assert "".join(e.text for e in emits) == "ok"
    tail = stream.finish(re.compile(r"\s*```\s*$"))
    assert "".join(e.text for e in tail) == ""
    stream2 = OutputStream(tok, "base", stop_strings=["\n```\n\n# Query"])
    emits2 = _push_all(stream2, tok, "ok\n``")
    assert "".join(e.text for e in emits2 + stream2.finish()) == "ok\n``"


def test_logprobs_travel_with_their_tokens() -> None:
    tok = CharTokenizer(len(CharTokenizer.ALPHABET))
    stream = OutputStream(tok, "base")
    emits = []
    for i, t in enumerate(tok.encode("ab")):
        emits += stream.push(t, f"r{i}", logprob=-float(i), top_logprobs={t: -float(i)})
    assert [e.logprobs for e in emits] == [(-0.0,), (-1.0,)]
    assert [e.reason for e in emits] == ["r0", "r1"]
    assert emits[1].top_logprobs == ({tok.encode("b")[0]: -1.0},)
