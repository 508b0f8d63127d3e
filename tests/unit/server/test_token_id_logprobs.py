"""alignd's vLLM plugin: log-probabilities of chosen token ids go only to the requests that asked for them,
while the other requests of the engine step keep their own top-k (vLLM 0.32 gives every request the ids)."""

from __future__ import annotations

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

from alignd.decoders.contract import ViewSpec
from alignd.server.engines.vllm_local import _RawRow, _row_view, _view_params
from alignd.server.engines.vllm_plugin import register_token_id_logprobs

V = 20


def metadata(batch: int, top_k: int, token_ids: dict[int, list[int]]) -> SamplingMetadata:
    """Greedy sampling of ``batch`` requests asking for their ``top_k`` log-probabilities, some of them
    (``token_ids``: request index -> ids) for chosen ids instead."""
    return SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=top_k, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
        logprob_token_ids=token_ids,
    )


def test_chosen_ids_go_to_the_requests_that_asked_and_top_k_to_the_others() -> None:
    register_token_id_logprobs()
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    logprobs = logits.log_softmax(-1)
    out = Sampler()(logits.clone(), metadata(3, 4, {1: [5, 7, 2]}))
    ids, lps = out.logprobs_tensors.logprob_token_ids, out.logprobs_tensors.logprobs
    sampled = logits.argmax(-1)
    for row in (0, 2):  # their own top 4 after the sampled token, then padding
        top = torch.topk(logprobs[row], 4)
        assert ids[row, 0] == sampled[row]
        assert ids[row, 1:5].tolist() == top.indices.tolist()
        torch.testing.assert_close(lps[row, 1:5], top.values)
    assert ids[1, :4].tolist() == [int(sampled[1]), 5, 7, 2]
    torch.testing.assert_close(lps[1, :4], logprobs[1, [int(sampled[1]), 5, 7, 2]])
    assert ids[1, 4:].tolist() == [0] * (ids.shape[1] - 4) and torch.isinf(lps[1, 4:]).all()


def test_a_batch_asking_only_for_chosen_ids_is_left_to_vllm() -> None:
    register_token_id_logprobs()
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits.clone(), metadata(2, None, {0: [3, 4]}))  # type: ignore[arg-type]
    assert out.logprobs_tensors.logprob_token_ids[0, 1:3].tolist() == [3, 4]


def test_views_of_chosen_ids_ask_for_them_where_the_engine_can_and_read_the_gathered_row() -> None:
    want = ViewSpec(token_ids=(5, 7, 2))
    params = _view_params(want, chosen_ids=True)
    assert isinstance(params, SamplingParams)
    assert params.logprob_token_ids == [5, 7, 2] and params.logprobs == 3
    assert _view_params(want).logprobs == -1  # a whole row where the engine cannot
    assert _view_params(ViewSpec(top_k=3, token_ids=(5,)), chosen_ids=True).logprobs == -1
    row = _RawRow((np.array([9, 5, 7, 2, 0, 0]), np.array([-0.1, -2.0, -3.0, -1.5, -np.inf, -np.inf])))
    view = _row_view(row, want, V)
    assert view.token_ids is not None
    assert dict(zip(view.token_ids.tolist(), view.logprobs.tolist())) == {9: -0.1, 5: -2.0, 7: -3.0, 2: -1.5}
    assert view.logprob_of(0) == -np.inf
