"""Run decoders through the contract with transformers models (float32, full vocabulary, no engine).

:class:`HFModel` wraps a causal LM as a :class:`tests.support.fake_models.LanguageModel`: each view is the
log-softmax of the last logits of a forward pass over exactly that context (no KV cache, no batching), so
its numbers are bit-identical to a reference implementation that recomputes the whole context per step.
:class:`HFReward` wraps a sequence-classification model as a reward function over text pairs.
:func:`run_with_hf` drives a decoder with them through the shared :class:`ContractExecutor`.

:func:`tiny_causal_lm` and :func:`tiny_reward_model` build small random Llama models in memory (vocab 64 by
default, one layer, head_dim 64), fast enough for the unit tier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from alignd.decoders.contract import Decoder, DecoderContext
from tests.support.fake_models import ContractExecutor, RunResult

__all__ = [
    "HFModel",
    "HFReward",
    "HFTokenizer",
    "logits_fn",
    "raw_logits_fn",
    "run_with_hf",
    "tiny_causal_lm",
    "tiny_reward_model",
]


def _config(vocab_size: int, layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.3,  # sharper than the default: well-separated greedy choices
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=0,
    )


def tiny_causal_lm(seed: int, vocab_size: int = 64, layers: int = 1) -> Any:
    """A random float32 ``LlamaForCausalLM`` (deterministic in ``seed``), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(vocab_size, layers)).float().eval()


def tiny_reward_model(seed: int, vocab_size: int = 64) -> Any:
    """A random float32 ``LlamaForSequenceClassification`` with one label (a reward model)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = _config(vocab_size, 1)
    config.num_labels = 1
    return LlamaForSequenceClassification(config).float().eval()


def logits_fn(model: Any) -> Callable[[list[int]], torch.Tensor]:
    """``ids -> float64 log-softmax of the last position's float32 logits`` (full forward per call)."""

    def fn(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    return fn


def raw_logits_fn(model: Any) -> Callable[[list[int]], torch.Tensor]:
    """``ids -> float64 copy of the last position's raw float32 logits`` (full forward per call)."""

    def fn(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False).logits[0, -1].double()

    return fn


class HFModel:
    """A transformers causal LM as an executor model: full-vocabulary log-probabilities after a context."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self._fn = logits_fn(model)
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        """The next-token log-distribution after ``context`` (cached per context)."""
        key = tuple(int(t) for t in context)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._fn(list(key)).numpy().copy()
            self._cache[key] = hit
        return hit


class HFTokenizer:
    """A transformers tokenizer as the contract's :class:`~alignd.decoders.contract.Tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Any) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


class HFReward:
    """A sequence-classification model as a reward function of ``(prompt text, response text)``."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.calls = 0

    def ids_reward(self, ids: list[int]) -> float:
        """The reward of token ids (the value at the last token)."""
        with torch.inference_mode():
            return float(self.model(torch.tensor([list(ids)], dtype=torch.long)).logits[0, 0])

    def __call__(self, prompt: str, response: str) -> float:
        self.calls += 1
        return self.ids_reward(self.tokenizer.encode(prompt + response))


def run_with_hf(
    decoder: Decoder,
    ctx: DecoderContext,
    models: Mapping[str, HFModel],
    rewards: Mapping[str, Callable[[str, str], float]] | None = None,
) -> RunResult:
    """Run ``decoder`` on ``ctx`` with transformers models per role (and reward functions per reward role)."""
    return ContractExecutor(models, rewards).run(decoder, ctx)
