"""The ``grammar`` decoder with transformers models (float32, full vocabulary) against the reference.

Greedy constrained decoding on the project's tiny base model (a real byte-level BPE tokenizer, compiled
through ``GrammarVocab.from_huggingface``); sampling, plain and ASAp, on a small character-level model:
with the same seeds the decoder draws exactly the reference's tokens, sample after sample, while the ASAp
trie fills up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from alignd.decoders.contract import DecoderContext, RoleContext, SamplingOptions
from alignd.decoders.grammar import BACKENDS, GrammarSpec, GrammarVocab, build_grammar
from alignd.decoders.grammar.decoder import GrammarAligned
from tests.reference.grammar_reference import GrammarReference
from tests.support.fake_models import CharTokenizer, ContractExecutor, RunResult
from tests.support.hf_runner import HFModel, HFTokenizer, logits_fn, tiny_causal_lm
from tests.support.tiny_models import ensure_tiny_models

ALPHABET = "\x00 abcdefghijklmnopqrstuvwxyz0123456789.,:-!?ABCDEFGHIJKLMNOPQRSTU"  # 64; id 0 is EOS


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = ensure_tiny_models()["tiny-base"]
    hf_tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = int(hf_tok.eos_token_id)
    vocab = int(model.config.vocab_size)
    tok = HFTokenizer(hf_tok)
    return {
        "model": model,
        "hf": HFModel(model),
        "tok": tok,
        "eos": eos,
        "vocab": vocab,
        "grammar_vocab": GrammarVocab.from_huggingface(hf_tok, vocab, [eos]),
        "prompt": [int(hf_tok.bos_token_id), *tok.encode("Question: name a colour.\nAnswer:")],
    }


def _ctx(role: RoleContext, vocab: GrammarVocab, max_tokens: int, seed: int | None) -> DecoderContext:
    return DecoderContext(
        roles={"base": role},
        max_tokens=max_tokens,
        sampling=SamplingOptions(temperature=0.0 if seed is None else 1.0, seed=seed),
        rng=np.random.default_rng(seed),
        extra={"grammar_vocab": vocab},
    )


@pytest.mark.parametrize(
    "pattern", [" [a-z]{2,8}( [a-z]{2,8}){0,2}\\.", " (yes|no|maybe|blue)", " [0-9]{1,3}(,[0-9]{1,3}){1,3}"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_constrained_matches_reference_on_a_bpe_model(
    tiny: dict[str, Any], pattern: str, backend: str
) -> None:
    role = RoleContext(
        "base", "tiny-base", tiny["prompt"], tiny["tok"], tiny["vocab"], frozenset({tiny["eos"]})
    )
    decoder = GrammarAligned(GrammarAligned.parse_params({"regex": pattern, "backend": backend}))
    result: RunResult = ContractExecutor({"base": tiny["hf"]}).run(
        decoder, _ctx(role, tiny["grammar_vocab"], 24, None)
    )
    ref = GrammarReference(
        logits_fn(tiny["model"]), tiny["tok"], tiny["prompt"], pattern, tiny["eos"], tiny["vocab"]
    )
    expected = ref.run(24)
    assert result.tokens == expected
    assert result.finish.reason == "stop"
    # xgrammar's masks equal the brute-force regex masks along the way
    g = build_grammar(GrammarSpec(kind="regex", value=pattern), tiny["grammar_vocab"], backend=backend)
    for i, t in enumerate(expected[:6]):
        assert set(np.flatnonzero(g.allowed_mask()).tolist()) == set(ref.allowed(expected[:i]))
        g.advance(t)


@pytest.mark.parametrize("mode", ["constrained", "asap"])
def test_sampling_draws_the_reference_tokens(mode: str) -> None:
    """Sample after sample (the ASAp trie learning as it goes), the decoder's draws equal the reference's."""
    torch.set_num_threads(1)
    model = tiny_causal_lm(seed=3, vocab_size=len(ALPHABET))
    chars = CharTokenizer(len(ALPHABET), alphabet=ALPHABET)
    vocab = GrammarVocab.from_tokens(["<eos>", *ALPHABET[1:]], eos_token_ids=[0])
    pattern = "(ab|b|ba){1,3}c"
    prompt = chars.encode("go:")
    role = RoleContext("base", "tiny-char", prompt, chars, len(ALPHABET), frozenset({0}))
    decoder = GrammarAligned(
        GrammarAligned.parse_params({"regex": pattern, "mode": mode, "pure_sampling": True})
    )
    executor = ContractExecutor({"base": HFModel(model)})
    ref = GrammarReference(logits_fn(model), chars, prompt, pattern, 0, len(ALPHABET), mode=mode)
    masked = GrammarReference(logits_fn(model), chars, prompt, pattern, 0, len(ALPHABET))
    outputs, reweighted = set(), 0
    for seed in range(25):
        result = executor.run(decoder, _ctx(role, vocab, 12, seed))
        assert result.tokens == ref.run(12, np.random.default_rng(seed)), seed
        outputs.add(result.text)
        reweighted += result.tokens != masked.run(12, np.random.default_rng(seed))
    assert len(outputs) >= 3  # the draws do differ from seed to seed
    if mode == "asap":
        (key,) = decoder.store.keys()
        trie = decoder.store.peek(key)
        assert trie is not None and trie.num_samples == 25 and trie.root.theta < 0.9
        assert reweighted > 0  # what ASAp learnt changed some draws
