"""Exactness on the project's shared tiny models (``tests.support.tiny_models``: one byte-level BPE
tokenizer, vocab 512) with prompts in the ``plain`` format: the real-tokenizer path of the decoders
(detokenizing, text rewards) against the references, with and without speculative draft-and-verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alignd.decoders.args import ARGS
from alignd.decoders.contrastive import Contrastive
from alignd.decoders.logit_arithmetic import LogitArithmetic
from alignd.decoders.prompts import build_prompt
from tests.reference import args_ref, contrastive_ref, logit_arithmetic_ref
from tests.support.fake_models import make_context
from tests.support.hf_runner import HFModel, HFReward, HFTokenizer, logits_fn, raw_logits_fn, run_with_hf
from tests.support.tiny_models import ensure_tiny_models

MAX = 10
SPECULATIVE = [None, {"block_size": 3}, {"method": "ngram", "block_size": 3, "prompt_lookup_min": 1}]
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    paths: dict[str, Path] = ensure_tiny_models()
    out: dict[str, Any] = {
        name: AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
        for name in ("tiny-base", "tiny-chat", "tiny-amateur")
    }
    out["tiny-reward"] = AutoModelForSequenceClassification.from_pretrained(
        paths["tiny-reward"], dtype=torch.float32
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(paths["tiny-base"])
    out["tokenizer"] = HFTokenizer(hf_tok)
    out["eos"] = int(hf_tok.eos_token_id)
    out["prompt"] = [int(hf_tok.bos_token_id), *out["tokenizer"].encode(build_prompt("plain", MESSAGES))]
    out["vocab"] = int(out["tiny-base"].config.vocab_size)
    return out


def _ctx(tiny: dict[str, Any], roles: tuple[str, ...]) -> Any:
    p = tiny["prompt"]
    return make_context(
        {r: (p, tiny["vocab"]) for r in roles}, tiny["tokenizer"], max_tokens=MAX, eos=(tiny["eos"],)
    )


def _check_text(result: Any, tiny: dict[str, Any]) -> None:
    # byte-level tokens of a character that never completes are not text (vLLM drops them too)
    assert result.text == tiny["tokenizer"].decode(result.tokens).rstrip("\ufffd")


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_contrastive(tiny: dict[str, Any], speculative: dict | None) -> None:
    decoder = Contrastive(Contrastive.parse_params({"speculative": speculative}))
    result = run_with_hf(
        decoder,
        _ctx(tiny, ("expert", "amateur")),
        {"expert": HFModel(tiny["tiny-base"]), "amateur": HFModel(tiny["tiny-amateur"])},
    )
    expected = contrastive_ref.greedy(
        logits_fn(tiny["tiny-base"]),
        logits_fn(tiny["tiny-amateur"]),
        tiny["prompt"],
        tiny["prompt"],
        MAX,
        (tiny["eos"],),
    )
    assert result.tokens == expected and expected
    _check_text(result, tiny)


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_logit_arithmetic(tiny: dict[str, Any], speculative: dict | None) -> None:
    decoder = LogitArithmetic(LogitArithmetic.parse_params({"lambda": 1.5, "speculative": speculative}))
    roles = {"base": "tiny-base", "aligned": "tiny-chat", "reference": "tiny-amateur"}
    result = run_with_hf(decoder, _ctx(tiny, tuple(roles)), {r: HFModel(tiny[m]) for r, m in roles.items()})
    prompts = dict.fromkeys(roles, tiny["prompt"])
    expected = logit_arithmetic_ref.greedy(
        *(raw_logits_fn(tiny[m]) for m in roles.values()), prompts, MAX, (tiny["eos"],), 1.5
    )
    assert result.tokens == expected and expected
    _check_text(result, tiny)


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_args_with_a_text_reward_model(tiny: dict[str, Any], speculative: dict | None) -> None:
    tok = tiny["tokenizer"]
    reward = HFReward(tiny["tiny-reward"], tok)
    decoder = ARGS(ARGS.parse_params({"k": 4, "w": 2.0, "speculative": speculative}))
    result = run_with_hf(
        decoder, _ctx(tiny, ("base", "reward")), {"base": HFModel(tiny["tiny-base"])}, {"reward": reward}
    )
    prompt_text = tok.decode(tiny["prompt"])
    eos = tiny["eos"]

    def text_reward(prompt: list[int], generated: list[int], c: int) -> float:
        return reward(prompt_text, tok.decode(generated + ([] if c == eos else [c])))

    expected = args_ref.greedy(
        logits_fn(tiny["tiny-base"]), tiny["prompt"], text_reward, 4, 2.0, tiny["vocab"], MAX, (eos,)
    )
    assert result.tokens == expected and expected
    _check_text(result, tiny)
