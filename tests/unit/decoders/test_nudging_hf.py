"""Nudging with transformers models (float32, full vocabulary) against the reference: greedy outputs equal.

Two set-ups: the project's tiny base and chat models, which share one byte-level BPE tokenizer (the
decoder works on token ids), and the tiny base against a small character-level aligner (text-level:
nothing is shared but the text).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from alignd.decoders.contract import DecoderContext, RoleContext, SamplingOptions
from alignd.decoders.nudging import Nudging
from alignd.decoders.prompts import build_prompt
from tests.reference.nudging_reference import RefRole, nudging_reference
from tests.support.fake_models import CharTokenizer, ContractExecutor, RunResult
from tests.support.hf_runner import HFModel, HFTokenizer, tiny_causal_lm
from tests.support.tiny_models import ensure_tiny_models

MAX = 24
ALPHABET = (
    "\x00 \n.,:;!?-'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"  # 64 characters, id 0 is EOS
)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class Restricted:
    """A model renormalised over allowed token ids, with a bias: random weights write word salad without
    spaces; these write words (so there are word starts to decide at) in text both tokenizers can spell."""

    def __init__(
        self, model: HFModel, allowed: np.ndarray, bias: np.ndarray | None = None, scale: float = 1.0
    ) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.bias = np.where(allowed, 0.0 if bias is None else bias, -np.inf)
        self.scale = scale

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        lp = self.model.logprobs(context) * self.scale + self.bias
        if context:  # never the same token twice in a row: random weights love loops
            lp[context[-1]] = -np.inf
        return lp - np.logaddexp.reduce(lp[np.isfinite(lp)])


def _words(tiny: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Allowed ids (EOS and tokens spelling a lower-case word, with or without a leading space) and a
    bias towards the space-led ones."""
    texts = [tiny["hf_tok"].decode([t]) for t in range(tiny["base"].vocab_size)]
    allowed = np.array([re.fullmatch(" ?[a-z]+", s) is not None for s in texts])
    allowed[tiny["eos"]] = True
    return allowed, np.array([1.5 if s.startswith(" ") else 0.0 for s in texts])


def ref_role(model: Any, tokenizer: Any, prompt: list[int], eos: int) -> RefRole:
    return RefRole(
        lambda ids: torch.from_numpy(model.logprobs(tuple(ids)).copy()), tokenizer, prompt, frozenset({eos})
    )


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    paths = ensure_tiny_models()
    hf_tok = AutoTokenizer.from_pretrained(paths["tiny-base"])
    tok = HFTokenizer(hf_tok)
    chat = AutoTokenizer.from_pretrained(paths["tiny-chat"])
    return {
        "base": HFModel(AutoModelForCausalLM.from_pretrained(paths["tiny-base"], dtype=torch.float32).eval()),
        "chat": HFModel(AutoModelForCausalLM.from_pretrained(paths["tiny-chat"], dtype=torch.float32).eval()),
        "tok": tok,
        "hf_tok": hf_tok,
        "eos": int(hf_tok.eos_token_id),
        "base_prompt": [int(hf_tok.bos_token_id), *tok.encode(build_prompt("plain", MESSAGES))],
        "chat_prompt": tok.encode(
            chat.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        ),
    }


def _role(name: str, model: str, prompt: list[int], tok: Any, vocab: int, eos: int) -> RoleContext:
    return RoleContext(name, model, prompt, tok, vocab, frozenset({eos}), prompt_text=tok.decode(prompt))


def _run(params: dict, roles: dict[str, RoleContext], models: dict[str, Any]) -> RunResult:
    ctx = DecoderContext(
        roles=roles, max_tokens=MAX, sampling=SamplingOptions(), rng=np.random.default_rng(0)
    )
    return ContractExecutor(models).run(Nudging(Nudging.parse_params(params)), ctx)


def _merged(result: RunResult) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in result.emits:
        if e.text:
            if out and out[-1][0] == e.role:
                out[-1] = (e.role, out[-1][1] + e.text)
            else:
                out.append((e.role, e.text))
    return out


@pytest.mark.parametrize("gamma", [0.5, 0.7])
def test_shared_tokenizer_matches_reference(tiny: dict[str, Any], gamma: float) -> None:
    tok, eos, vocab = tiny["tok"], tiny["eos"], tiny["base"].vocab_size
    roles = {
        "base": _role("base", "tiny-base", tiny["base_prompt"], tok, vocab, eos),
        "aligner": _role("aligner", "tiny-chat", tiny["chat_prompt"], tok, vocab, eos),
    }
    allowed, bias = _words(tiny)
    base, chat = Restricted(tiny["base"], allowed, bias, 0.5), Restricted(tiny["chat"], allowed, bias, 0.5)
    params = {"gamma": gamma, "stop_on_repetition": False, "block_tokens": 8, "base_chunk_tokens": 5}
    result = _run(params, roles, {"base": base, "aligner": chat})
    ref, reason = nudging_reference(
        ref_role(base, tok, tiny["base_prompt"], eos),
        ref_role(chat, tok, tiny["chat_prompt"], eos),
        gamma=gamma,
        block_tokens=8,
        max_tokens=MAX,
        shared=True,
        prompt_last_char=tok.decode(tiny["base_prompt"])[-1:],
    )
    assert _merged(result) == ref
    assert result.finish.reason == reason
    assert len(result.tokens) <= MAX
    assert {role for role, _ in ref} == {"base", "aligner"}  # both roles wrote: the test exercises hand-overs


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_cross_tokenizer_matches_reference(tiny: dict[str, Any], gamma: float) -> None:
    tok, eos = tiny["tok"], tiny["eos"]
    chars = CharTokenizer(64, alphabet=ALPHABET)
    aligner_model = HFModel(tiny_causal_lm(seed=5, vocab_size=64))
    vocab = tiny["base"].vocab_size
    allowed, bias = _words(tiny)
    base_model = Restricted(tiny["base"], allowed, bias, 0.5)
    letters = np.array([c == " " or c.islower() for c in ALPHABET])
    letters[0] = True
    char_bias = np.where(np.array(list(ALPHABET)) == " ", 4.0, 0.0)
    char_bias[0] = -4.0  # EOS
    aligner_model = Restricted(aligner_model, letters, char_bias)
    al_prompt = chars.encode("user: capital of france\nbot:")
    roles = {
        "base": _role("base", "tiny-base", tiny["base_prompt"], tok, vocab, eos),
        "aligner": _role("aligner", "tiny-char", al_prompt, chars, 64, 0),
    }
    params = {"gamma": gamma, "stop_on_repetition": False, "block_tokens": 10, "base_chunk_tokens": 4}
    result = _run(params, roles, {"base": base_model, "aligner": aligner_model})
    ref, reason = nudging_reference(
        ref_role(base_model, tok, tiny["base_prompt"], eos),
        ref_role(aligner_model, chars, al_prompt, 0),
        gamma=gamma,
        block_tokens=10,
        max_tokens=MAX,
        shared=False,
        prompt_last_char=tok.decode(tiny["base_prompt"])[-1:],
    )
    assert _merged(result) == ref
    assert result.finish.reason == reason
    assert {role for role, _ in ref} == {"base", "aligner"}  # both roles wrote: the test exercises hand-overs
