"""Prompt formats (plain, urial) and the URIAL decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

from alignd.decoders.contract import DecoderError, GenerateOp, SamplingOptions, ViewOp
from alignd.decoders.prompts import build_prompt, format_stop_strings, prompt_format_names, urial_data
from alignd.decoders.urial import URIAL
from tests.support.fake_models import CharTokenizer, ContractExecutor, FakeModel, make_context

REPO = Path(__file__).resolve().parents[3]
ALPHABET = CharTokenizer.ALPHABET
TOK = CharTokenizer(len(ALPHABET))  # id 0 is the end of sequence
EOS = 0

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}],
    },
]


def test_format_names_and_unknown_format() -> None:
    assert prompt_format_names() == ["plain", "urial"]
    with pytest.raises(DecoderError) as info:
        build_prompt("nope", CHAT)
    assert info.value.param == "prompt_format"


def test_plain_format_exactly() -> None:
    assert build_prompt("plain", CHAT) == (
        "Be brief.\n\nQuestion: Hi?\nAnswer: Hello.\n\nQuestion: Capital of France?\nAnswer:"
    )
    assert build_prompt("plain", [{"role": "user", "content": "Q"}]) == "Question: Q\nAnswer:"
    # ending on an assistant turn: the model continues it
    assert build_prompt("plain", CHAT[1:3]) == "Question: Hi?\nAnswer: Hello."
    assert format_stop_strings("plain") == ("\nQuestion:",)


def test_bad_messages_are_decoder_errors() -> None:
    with pytest.raises(DecoderError):
        build_prompt("plain", [{"role": "tool", "content": "x"}])
    with pytest.raises(DecoderError):
        build_prompt("plain", [{"role": "system", "content": "only a system prompt"}])
    with pytest.raises(DecoderError):
        build_prompt("urial", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_urial_format_has_header_system_examples_turns_and_open_answer() -> None:
    data = urial_data()
    assert len(data.examples) >= 3 and data.header.startswith("# Instruction")
    text = build_prompt("urial", CHAT)
    assert text.startswith(data.header + "\nBe brief.\n\n")
    for query, answer in data.examples:
        assert f"# Query:\n```\n{query}\n```\n\n# Answer:\n```\n{answer}\n```\n\n" in text
    assert text.endswith(
        "# Query:\n```\nHi?\n```\n\n# Answer:\n```\nHello.\n```\n\n"
        "# Query:\n```\nCapital of France?\n```\n\n# Answer:\n```\n"
    )
    default = build_prompt("urial", [{"role": "user", "content": "Q"}])
    assert data.default_system in default
    assert format_stop_strings("urial") == ("# Query",)


def test_urial_examples_ship_as_package_data() -> None:
    assert (REPO / "decoders" / "data" / "urial" / "urial.json").is_file()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["alignd.decoders"]
    assert "data/*/*" in patterns


def script_model(script: str, prompt_len: int, vocab: int = len(ALPHABET), runner_up: str = "z") -> FakeModel:
    """A model that writes ``script`` after its prompt (then end of sequence), confidently but not surely;
    ``runner_up`` is always its second choice."""
    ids = TOK.encode(script) + [EOS]
    second = TOK.encode(runner_up)[0]

    def fn(context: tuple[int, ...]) -> np.ndarray:
        pos = len(context) - prompt_len
        logits = np.zeros(vocab)
        logits[second] = 4.0
        logits[ids[min(pos, len(ids) - 1)]] = 8.0
        return logits

    return FakeModel(fn, vocab)


def urial(**params: Any) -> URIAL:
    return URIAL(URIAL.parse_params(params))


def run_urial(script: str, d: URIAL | None = None, **kw: Any) -> Any:
    prompt = TOK.encode("Q:")
    kw.setdefault("max_tokens", 200)
    c = make_context({"base": (prompt, len(ALPHABET))}, TOK, eos=(EOS,), **kw)
    return ContractExecutor({"base": script_model(script, len(prompt))}).run(d or urial(), c)


def test_urial_stops_before_the_next_query_and_drops_the_fence() -> None:
    result = run_urial("Paris is the capital.\n```\n\n# Query:\n```\nmore")
    assert result.text == "Paris is the capital."
    assert result.finish.reason == "stop"
    assert not result.ops_of(ViewOp)
    assert all(op.role == "base" and op.max_tokens <= 16 for op in result.ops_of(GenerateOp))
    assert all(e.reason == "urial: base wrote natively" for e in result.emits)


def test_urial_drops_a_closing_fence_at_end_of_sequence_but_keeps_inner_code() -> None:
    assert run_urial("Use:\n```python\nx = 1\n```\nDone.\n```").text == "Use:\n```python\nx = 1\n```\nDone."


def test_urial_honours_request_stop_strings_max_tokens_and_block_size() -> None:
    assert run_urial("abc. def", stop_strings=["."]).text == "abc"
    result = run_urial("abcdefghij", max_tokens=4)
    assert (result.text, result.finish.reason) == ("abcd", "length")
    result = run_urial("abcdefghij", urial(block_tokens=3))
    assert result.text == "abcdefghij"
    assert [op.max_tokens for op in result.ops_of(GenerateOp)][:3] == [3, 3, 3]


def test_urial_passes_the_request_sampling_to_the_engine() -> None:
    sampling = SamplingOptions(temperature=0.7, top_p=0.9, seed=5)
    result = run_urial("abcdefgh", urial(block_tokens=3), sampling=sampling, seed=5)
    ops = result.ops_of(GenerateOp)
    assert [(op.sampling.temperature, op.sampling.top_p) for op in ops] == [(0.7, 0.9)] * len(ops)
    seeds = [op.sampling.seed for op in ops]
    assert len(set(seeds)) == len(seeds), "each block gets its own seed (no repeated random stream)"
    again = run_urial("abcdefgh", urial(block_tokens=3), sampling=sampling, seed=5)
    assert [op.sampling.seed for op in again.ops_of(GenerateOp)] == seeds


class LettersOnly:
    """A fake grammar: lowercase letters and spaces only (the end of sequence is always allowed)."""

    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.rollbacks = 0
        self.allowed = set(TOK.encode("abcdefghijklmnopqrstuvwxyz ")) | {EOS}

    def allowed_mask(self) -> np.ndarray:
        return np.array([t in self.allowed for t in range(len(ALPHABET))])

    def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> None:
        return None

    def advance(self, token_id: int) -> None:
        assert token_id in self.allowed
        self.accepted.append(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.rollbacks += 1
        del self.accepted[len(self.accepted) - num_tokens :]

    def is_terminated(self) -> bool:
        return False

    def finish(self) -> None:
        pass


def test_urial_under_a_grammar_verifies_every_token() -> None:
    grammar = LettersOnly()
    result = run_urial("ab C!d", grammar=grammar)
    assert result.text == "ab zzd"
    assert grammar.accepted == result.tokens
    assert all(op.want.full for op in result.ops_of(GenerateOp))
    assert any("replaces base's draft 'C'" in e.reason for e in result.emits)


def test_urial_without_query_stop() -> None:
    result = run_urial("ok\n```\n\n# Query: x", urial(stop_at_query=False), max_tokens=12)
    assert (result.text, result.finish.reason) == ("ok\n```\n\n# Qu", "length")


def test_urial_declares_its_prompt_format() -> None:
    assert URIAL.default_prompt_formats == {"base": "urial"}
    assert [r.name for r in URIAL.roles] == ["base"]
