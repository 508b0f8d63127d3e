"""Every decoder served through the real server matches its transformers reference (greedy, float32).

The references in ``tests/reference`` recompute every model over the whole context with full-vocabulary
logits, one token at a time; the server runs the same decoders through vLLM sessions, blocks and pooling
requests. The output token ids are read from the ``alignment_trace`` spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "Once upon a time there was"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf(tiny_paths: dict[str, Path]) -> dict[str, Any]:
    """The tiny models in transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out: dict[str, Any] = {"tokenizer": AutoTokenizer.from_pretrained(tiny_paths["tiny-base"])}
    for name in ("tiny-base", "tiny-chat", "tiny-amateur"):
        out[name] = AutoModelForCausalLM.from_pretrained(tiny_paths[name], torch_dtype=torch.float32).eval()
    out["tiny-reward"] = AutoModelForSequenceClassification.from_pretrained(
        tiny_paths["tiny-reward"], torch_dtype=torch.float32
    ).eval()
    return out


def _served(client: openai.OpenAI, model: str, prompt: str, **extra: Any) -> tuple[list[int], Any]:
    body = {"alignment": {"trace": True, **extra.pop("alignment", {})}}
    extra.setdefault("max_tokens", MAX_TOKENS)
    out = client.completions.create(model=model, prompt=prompt, temperature=0, extra_body=body, **extra)
    trace = out.choices[0].model_extra["alignment_trace"]
    ids = [t for span in trace["spans"] for t in span["token_ids"]]
    return ids, out


def _prompt_ids(server: RunningServer, prompt: str) -> list[int]:
    r = httpx.post(server.base_url + "/tokenize", json={"model": "tiny-base", "prompt": prompt})
    return list(r.json()["tokens"])


def _eos(hf: dict[str, Any]) -> list[int]:
    return [hf["tokenizer"].eos_token_id]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("recipe", ["tiny-contrastive", "tiny-contrastive-spec"])
def test_contrastive_matches_reference(openai_client: openai.OpenAI, alignd_server: RunningServer,
                                       hf: dict[str, Any], recipe: str, prompt: str) -> None:
    from tests.reference import contrastive_ref
    from tests.support.hf_runner import logits_fn

    ids = _prompt_ids(alignd_server, prompt)
    expected = contrastive_ref.greedy(logits_fn(hf["tiny-base"]), logits_fn(hf["tiny-amateur"]), ids, ids,
                                      MAX_TOKENS, _eos(hf))
    served, out = _served(openai_client, recipe, prompt)
    assert served == expected
    assert out.choices[0].text == hf["tokenizer"].decode(expected, skip_special_tokens=True)


def _counter(server: RunningServer, family_name: str, *labels: str) -> dict[Any, float]:
    """A counter's ``_total`` samples from /metrics, keyed by the values of ``labels`` (one label: its value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics").text
    return {
        (tuple(s.labels[k] for k in labels) if len(labels) > 1 else s.labels[labels[0]]): s.value
        for family in text_string_to_metric_families(text) if family.name == family_name
        for s in family.samples if s.name.endswith("_total")
    }


def _engine_ops(server: RunningServer) -> dict[tuple[str, str], float]:
    """``alignd_engine_operations_total`` by (model, op)."""
    return _counter(server, "alignd_engine_operations", "model", "op")


def _decode_steps(server: RunningServer) -> dict[str, float]:
    """``alignd_engine_decode_steps_total`` by model."""
    return _counter(server, "alignd_engine_decode_steps", "model")


def _session_rewinds(server: RunningServer) -> dict[str, float]:
    """``alignd_session_rewinds_total`` by model."""
    return _counter(server, "alignd_session_rewinds", "model")


def test_speculative_blocks_are_written_and_scored_in_sessions(
    openai_client: openai.OpenAI, alignd_server: RunningServer, hf: dict[str, Any]
) -> None:
    """The draft writes each block inside its session and the amateur scores it as one appended chunk (alignd's
    vLLM plugin): no block takes a new request, a block cut short rewinds both sessions in place (the plugin
    again), and the output is still the reference's."""
    from tests.reference import contrastive_ref
    from tests.support.hf_runner import logits_fn

    prompt, n = PROMPTS[1], 40
    ids = _prompt_ids(alignd_server, prompt)
    expected = contrastive_ref.greedy(logits_fn(hf["tiny-base"]), logits_fn(hf["tiny-amateur"]), ids, ids, n,
                                      _eos(hf))
    before, rewinds_before = _engine_ops(alignd_server), _session_rewinds(alignd_server)
    steps_before = _decode_steps(alignd_server)
    served, out = _served(openai_client, "tiny-contrastive-spec", prompt, max_tokens=n)
    after, rewinds_after = _engine_ops(alignd_server), _session_rewinds(alignd_server)
    steps = {model: v - steps_before.get(model, 0.0) for model, v in _decode_steps(alignd_server).items()}
    grew = {key: after[key] - before.get(key, 0.0) for key in after if after[key] > before.get(key, 0.0)}
    rewound = {model: rewinds_after[model] - rewinds_before.get(model, 0.0) for model in rewinds_after}
    assert served == expected
    # every token the draft wrote took a forward step of its model (a block counts one step per token)
    drafted = out.choices[0].model_extra["alignment_trace"]["role_token_counts"]["expert"]
    assert steps.get("tiny-base", 0) >= drafted > grew.get(("tiny-base", "GenerateOp/session"), 0), (steps, drafted)
    assert rewound.get("tiny-base", 0) >= 1 and rewound.get("tiny-amateur", 0) >= 1, rewound
    assert grew.get(("tiny-base", "GenerateOp/session"), 0) >= 2, grew
    assert grew.get(("tiny-amateur", "ScoreOp/session"), 0) >= 1, grew
    assert ("tiny-base", "GenerateOp") not in grew and ("tiny-amateur", "ScoreOp") not in grew, grew


def test_speculative_matches_reference_past_one_kv_block(
    openai_client: openai.OpenAI, alignd_server: RunningServer, hf: dict[str, Any]
) -> None:
    """Past the first 128-token KV block (vLLM's CPU block size) a cut block rewinds the sessions within the
    block they fill, or restarts them where the cut reaches back into a full block: the output is still the
    reference's."""
    from tests.reference import contrastive_ref
    from tests.support.hf_runner import logits_fn

    prompt, n = PROMPTS[0], 160
    ids = _prompt_ids(alignd_server, prompt)
    expected = contrastive_ref.greedy(logits_fn(hf["tiny-base"]), logits_fn(hf["tiny-amateur"]), ids, ids, n,
                                      _eos(hf))
    assert len(ids) + len(expected) > 128 + 8, "the answer must reach past the first KV block"
    rewinds_before = _session_rewinds(alignd_server)
    served, _ = _served(openai_client, "tiny-contrastive-spec", prompt, max_tokens=n)
    rewinds_after = _session_rewinds(alignd_server)
    assert served == expected
    assert rewinds_after.get("tiny-base", 0) > rewinds_before.get("tiny-base", 0)


def test_prompt_lookup_drafts_are_scored_by_every_role_in_its_session(
    openai_client: openai.OpenAI, alignd_server: RunningServer, hf: dict[str, Any]
) -> None:
    """``method: ngram``: no model writes the draft; both roles score each drafted block as one chunk appended
    to their sessions, and the output is still the reference's."""
    from tests.reference import contrastive_ref
    from tests.support.hf_runner import logits_fn

    prompt, n = PROMPTS[1], 48
    ids = _prompt_ids(alignd_server, prompt)
    expected = contrastive_ref.greedy(logits_fn(hf["tiny-base"]), logits_fn(hf["tiny-amateur"]), ids, ids, n,
                                      _eos(hf))
    before = _engine_ops(alignd_server)
    spec = {"method": "ngram", "block_size": 6, "prompt_lookup_min": 1}
    served, out = _served(openai_client, "tiny-contrastive", prompt, max_tokens=n,
                          alignment={"params": {"speculative": spec}})
    after = _engine_ops(alignd_server)
    grew = {key: after[key] - before.get(key, 0.0) for key in after if after[key] > before.get(key, 0.0)}
    assert served == expected
    reasons = [span["reason"] for span in out.choices[0].model_extra["alignment_trace"]["spans"]]
    assert any("[drafted by prompt lookup, kept]" in r for r in reasons), reasons
    for model in ("tiny-base", "tiny-amateur"):
        assert grew.get((model, "ScoreOp/session"), 0) >= 1, grew
        assert (model, "ScoreOp") not in grew and (model, "GenerateOp/session") not in grew, grew


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logit_arithmetic_matches_reference(openai_client: openai.OpenAI, alignd_server: RunningServer,
                                            hf: dict[str, Any], prompt: str) -> None:
    from tests.reference import logit_arithmetic_ref
    from tests.support.hf_runner import logits_fn

    ids = _prompt_ids(alignd_server, prompt)
    prompts = {"base": ids, "aligned": ids, "reference": ids}
    expected = logit_arithmetic_ref.greedy(logits_fn(hf["tiny-base"]), logits_fn(hf["tiny-chat"]),
                                           logits_fn(hf["tiny-amateur"]), prompts, MAX_TOKENS, _eos(hf), 1.5)
    served, _ = _served(openai_client, "tiny-logit-arithmetic", prompt)
    assert served == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_args_implicit_reward_matches_reference(openai_client: openai.OpenAI, alignd_server: RunningServer,
                                                hf: dict[str, Any], prompt: str) -> None:
    from tests.reference import args_ref
    from tests.support.hf_runner import logits_fn

    ids = _prompt_ids(alignd_server, prompt)
    reward = args_ref.implicit_reward(logits_fn(hf["tiny-chat"]), logits_fn(hf["tiny-amateur"]), ids, ids)
    expected = args_ref.greedy(logits_fn(hf["tiny-base"]), ids, reward, 5, 1.0, 512, MAX_TOKENS, _eos(hf))
    served, _ = _served(openai_client, "tiny-args-implicit", prompt)
    assert served == expected


def test_args_reward_model_in_vllm_pooling_runner(openai_client: openai.OpenAI, alignd_server: RunningServer,
                                                  hf: dict[str, Any]) -> None:
    import torch

    from tests.reference import args_ref
    from tests.support.hf_runner import logits_fn

    prompt = PROMPTS[0]
    ids = _prompt_ids(alignd_server, prompt)
    tok = hf["tokenizer"]

    def reward(prompt_ids: list[int], generated: list[int], c: int) -> float:
        # The server scores text: prompt text + response text, tokenized by the reward model's tokenizer.
        text = prompt + tok.decode(generated + ([] if c in _eos(hf) else [c]), skip_special_tokens=True)
        with torch.inference_mode():
            return float(hf["tiny-reward"](torch.tensor([tok.encode(text)])).logits[0, 0])

    expected = args_ref.greedy(logits_fn(hf["tiny-base"]), ids, reward, 4, 1.0, 512, 6, _eos(hf))
    out = openai_client.completions.create(model="tiny-args-rm", prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"alignment": {"trace": True}})
    trace = out.choices[0].model_extra["alignment_trace"]
    assert [t for s in trace["spans"] for t in s["token_ids"]] == expected


@pytest.mark.parametrize("message", ["Tell me about Paris.", "Name three colours.", "Hello", "Count to ten."])
def test_nudging_matches_reference(openai_client: openai.OpenAI, alignd_server: RunningServer,
                                   hf: dict[str, Any], message: str) -> None:
    """Greedy nudging of tiny-base by tiny-chat (one tokenizer, two files: the roles share token ids) writes
    the reference's text, role by role. The random models write invalid UTF-8 now and then, so this also
    pins down word starts after replacement characters and the aligner reading the base's own tokens."""
    from tests.reference.nudging_reference import RefRole, nudging_reference
    from tests.support.hf_runner import HFTokenizer, logits_fn

    messages = [{"role": "user", "content": message}]
    params = {"stop_on_repetition": False, "block_tokens": 6, "base_chunk_tokens": 3}
    out = openai_client.chat.completions.create(
        model="tiny-base", messages=messages, max_tokens=40, temperature=0,
        extra_body={"alignment": {"decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
                                  "params": params, "trace": True}},
    )
    served: list[tuple[str, str]] = []
    for span in out.choices[0].model_extra["alignment_trace"]["spans"]:
        if served and served[-1][0] == span["role"]:
            served[-1] = (span["role"], served[-1][1] + span["text"])
        elif span["text"]:
            served.append((span["role"], span["text"]))

    def prompt(model: str) -> list[int]:
        r = httpx.post(alignd_server.base_url + "/tokenize", json={"model": model, "messages": messages})
        return list(r.json()["tokens"])

    tok, eos = HFTokenizer(hf["tokenizer"]), frozenset(_eos(hf))
    base_prompt = prompt("tiny-base")
    expected, reason = nudging_reference(
        RefRole(logits_fn(hf["tiny-base"]), tok, base_prompt, eos),
        RefRole(logits_fn(hf["tiny-chat"]), tok, prompt("tiny-chat"), eos),
        block_tokens=6, max_tokens=40, shared=True, prompt_last_char=tok.decode(base_prompt)[-1:],
    )
    assert served == expected
    assert out.choices[0].finish_reason == reason
    assert {role for role, _ in expected} == {"base", "aligner"}  # hand-overs in both directions


def test_nudging_on_a_shared_tokenizer(openai_client: openai.OpenAI, hf: dict[str, Any]) -> None:
    out = openai_client.chat.completions.create(
        model="tiny-nudging", messages=[{"role": "user", "content": "Tell me about Paris."}], max_tokens=24,
        temperature=0, extra_body={"alignment": {"trace": True}},
    )
    trace = out.choices[0].model_extra["alignment_trace"]
    assert set(trace["role_token_share"]) <= {"base", "aligner"}
    assert sum(trace["role_token_share"].values()) == pytest.approx(1.0)
    assert "".join(s["text"] for s in trace["spans"]) == out.choices[0].message.content
    assert out.usage.completion_tokens == sum(len(s["token_ids"]) for s in trace["spans"])


def test_nudging_base_runs_written_natively_keep_the_tokens(
    openai_client: openai.OpenAI, alignd_server: RunningServer
) -> None:
    """Greedy: after the first chunk of a base run, the base writes its chunks natively inside its session
    (cut chunks rewind it); the output is the one written a view per token (one chunk longer than the
    answer, so nothing is written natively)."""
    def nudged(chunk: int) -> list[tuple[str, list[int]]]:
        out = openai_client.chat.completions.create(
            model="tiny-base", messages=[{"role": "user", "content": "Tell me about Paris."}], max_tokens=40,
            temperature=0, extra_body={"alignment": {
                "decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
                "params": {"stop_on_repetition": False, "block_tokens": 6, "base_chunk_tokens": chunk},
                "trace": True}},
        )
        return [(s["role"], s["token_ids"]) for s in out.choices[0].model_extra["alignment_trace"]["spans"]]

    before = _engine_ops(alignd_server).get(("tiny-base", "GenerateOp/session"), 0.0)
    native = nudged(3)
    assert _engine_ops(alignd_server).get(("tiny-base", "GenerateOp/session"), 0.0) > before
    stepwise = nudged(64)
    assert [t for _, ids in native for t in ids] == [t for _, ids in stepwise for t in ids]
    assert {role for role, _ in native} == {"base", "aligner"}  # hand-overs in both directions


def test_grammar_recipe_always_matches(openai_client: openai.OpenAI) -> None:
    out = openai_client.completions.create(model="tiny-grammar", prompt="Answer:", max_tokens=10, n=6,
                                           temperature=1.0, seed=3)
    assert {c.text for c in out.choices} <= {"yes", "no", "maybe"}
    assert all(c.finish_reason == "stop" for c in out.choices)


def test_response_format_wraps_a_decoder(openai_client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = openai_client.completions.create(
        model="tiny-contrastive", prompt="JSON:", max_tokens=30, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}},
    )
    import json

    assert isinstance(json.loads(out.choices[0].text)["ok"], bool)


def test_urial_recipe_streams(openai_client: openai.OpenAI) -> None:
    chunks = list(openai_client.chat.completions.create(
        model="tiny-urial", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_equals_whole_for_a_recipe(openai_client: openai.OpenAI) -> None:
    whole = openai_client.completions.create(model="tiny-contrastive", prompt=PROMPTS[1], max_tokens=10,
                                             temperature=0)
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(
        model="tiny-contrastive", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_recipe_in_the_body(openai_client: openai.OpenAI) -> None:
    body = {"alignment": {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"},
                          "params": {"alpha": 0.2}, "trace": True}}
    out = openai_client.completions.create(model="tiny-base", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                           extra_body=body)
    spans = out.choices[0].model_extra["alignment_trace"]["spans"]
    assert spans and all(s["role"] in ("expert", "amateur") for s in spans)


@pytest.mark.parametrize(
    ("alignment", "param"),
    [
        ({"decoder": "nope", "roles": {"base": "tiny-base"}}, "alignment.decoder"),
        ({"decoder": "contrastive", "roles": {"expert": "tiny-base"}}, "alignment.roles.amateur"),
        ({"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "ghost"}}, "alignment.roles.amateur"),
        ({"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"},
          "params": {"alpha": 7}}, "alignment.params.alpha"),
        ({"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur", "judge": "tiny-chat"}},
         "alignment.roles.judge"),
        ({"roles": {"expert": "tiny-base"}}, "alignment.decoder"),
    ],
)
def test_bad_recipes_are_400_naming_the_field(alignd_server: RunningServer, alignment: dict, param: str) -> None:
    r = httpx.post(alignd_server.api_url + "/completions",
                   json={"model": "tiny-base", "prompt": "x", "max_tokens": 2, "alignment": alignment})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_decoders_are_discoverable(alignd_server: RunningServer) -> None:
    data = httpx.get(alignd_server.api_url + "/alignment/decoders").json()["data"]
    by_name = {d["name"]: d for d in data}
    assert {"nudging", "args", "contrastive", "logit_arithmetic", "grammar", "urial"} <= set(by_name)
    assert by_name["contrastive"]["shared_vocab"] is True and by_name["nudging"]["shared_vocab"] is False
    assert "alpha" in by_name["contrastive"]["params_schema"]["properties"]
    assert {r["name"] for r in by_name["nudging"]["roles"]} == {"base", "aligner"}


def test_recipes_listed_in_models(openai_client: openai.OpenAI) -> None:
    cards = {m.id: m.model_extra["alignd"] for m in openai_client.models.list().data}
    assert cards["tiny-nudging"]["kind"] == "recipe"
    assert cards["tiny-nudging"]["decoder"] == "nudging"
    assert cards["tiny-nudging"]["roles"]["aligner"]["model"] == "tiny-chat"
