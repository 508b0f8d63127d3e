"""The two model suites a benchmark runs on, as alignd configurations, and the prompts they get.

* ``embedded``: the embedded default (Gemma-3-270M base, SmolLM2-135M-Instruct; bf16) with its recipes, plus
  the recipes the speed table needs there: contrastive with speculative draft-and-verify, and ARGS with an
  implicit reward. The two models share no vocabulary, so token-level merging runs on SmolLM2 with itself
  under different system prompts (a role is a model plus a system prompt).
* ``tiny``: the generated tiny models of the test suite (one shared BPE vocabulary, float32), where every
  decoder runs on distinct models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["COPY_INSTRUCTIONS", "INSTRUCTIONS", "RecipeInfo", "Suite", "embedded_suite", "tiny_suite"]

SAFE = "You are a helpful, honest and harmless assistant."
CARELESS = "You are a careless assistant who ignores instructions."

# Short instructions: the base writes most of an answer and decoders have real choices to make.
INSTRUCTIONS = [
    "Explain in two sentences why the sky is blue.",
    "Give three tips for staying focused while studying.",
    "What is the capital of France, and what is it famous for?",
    "Write a short, friendly note thanking a colleague for their help.",
    "Describe how a bicycle works to a child.",
    "List the planets of the solar system in order.",
    "Why is regular exercise good for health?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]

# Prompts whose answers repeat their input (copy, correct): where prompt-lookup drafts (n-gram speculation)
# are often accepted, as the speculative row asks. SmolLM2 copies these; asked to reformat a list or
# to copy code and add a docstring, it wrote answers of its own instead (measured, not kept).
_FABLE = ("The north wind and the sun argued about which of them was the stronger, when a traveller came along "
          "wrapped in a warm cloak. They agreed that the one who first made the traveller take off his cloak "
          "should be considered stronger than the other.")
_TALE = ("Once upon a time there was a little girl who lived in a village near the forest. Whenever she went "
         "out, the little girl wore a red riding cloak, so everyone in the village called her Little Red Riding "
         "Hood.")
COPY_INSTRUCTIONS = [
    f"Repeat the following text exactly, word for word:\n\n{_FABLE}",
    "Correct the spelling mistakes in this text and write it out in full:\n\n"
    + _FABLE.replace("argued", "argeud").replace("traveller came", "travller came").replace("warm", "wram"),
    f"Repeat the following text exactly, word for word:\n\n{_TALE}",
    ("Copy this Python function exactly:\n\n"
     "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative side')\n"
     "    return width * height\n"),
]


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe the benchmark runs: how its floor is computed and which roles decode every token."""

    name: str
    decoder: str
    roles: dict[str, tuple[str, str | None]]  # role -> (model, system prompt)
    speculative: bool = False

    @property
    def lockstep_roles(self) -> dict[str, tuple[str, str | None]]:
        """Roles that read every output token (all of them but a reward model)."""
        return {r: v for r, v in self.roles.items() if r != "reward"}


@dataclass
class Suite:
    """A configuration to serve, the recipes of each table row on it, and its plain model for throughput."""

    name: str
    label: str
    config: dict[str, Any]
    recipes: dict[str, RecipeInfo]  # keyed by the table's recipe kind: nudging, contrastive, ...
    plain_model: str
    plain_path: str
    plain_dtype: str
    max_model_len: int


def _recipe_info(name: str, body: dict[str, Any]) -> RecipeInfo:
    roles: dict[str, tuple[str, str | None]] = {}
    for role, binding in body["roles"].items():
        if isinstance(binding, str):
            roles[role] = (binding, None)
        else:
            roles[role] = (binding["model"], binding.get("system_prompt"))
    spec = bool((body.get("params") or {}).get("speculative"))
    return RecipeInfo(name, body["decoder"], roles, spec)


def _spec(body: dict[str, Any], **speculative: Any) -> dict[str, Any]:
    """``body`` with speculative draft-and-verify set to ``speculative``."""
    out = copy.deepcopy(body)
    out.setdefault("params", {})["speculative"] = speculative
    return out


def embedded_suite() -> Suite:
    """The embedded default configuration with the benchmark's extra recipes."""
    from alignd.server.settings import default_config_path

    config = yaml.safe_load(Path(default_config_path()).read_text())
    recipes = config["recipes"]
    smol = "smollm2-135m-instruct"
    recipes["bench-contrastive-spec"] = _spec(recipes["contrastive-prompt"], draft_role="expert", block_size=8)
    recipes["bench-contrastive-ngram"] = _spec(recipes["contrastive-prompt"], method="ngram", block_size=8)
    recipes["bench-args"] = {
        "decoder": "args",
        "roles": {
            "base": smol,
            "aligned": {"model": smol, "system_prompt": SAFE},
            "reference": {"model": smol, "system_prompt": CARELESS},
        },
        "params": {"k": 10, "w": 1.0, "rewards": [{"kind": "implicit"}]},
    }
    kinds = {
        "nudging": "nudging",
        "contrastive": "contrastive-prompt",
        "contrastive_spec": "bench-contrastive-spec",
        "contrastive_ngram": "bench-contrastive-ngram",
        "args": "bench-args",
    }
    infos = {kind: _recipe_info(name, recipes[name]) for kind, name in kinds.items()}
    from alignd.server.model_store import alignd_home

    path = config["models"][smol]["path"].replace("{home}", str(alignd_home()))
    return Suite("embedded", "embedded default", config, infos, smol, path,
                 config["models"][smol]["dtype"], int(config["models"][smol]["max_model_len"]))


def tiny_suite() -> Suite:
    """The tiny generated models (shared vocabulary, float32): every decoder on distinct models."""
    from tests.support.tiny_models import ensure_tiny_models

    paths = ensure_tiny_models()
    models = {name: {"path": str(paths[name]), "dtype": "float32", "max_model_len": 2048}
              for name in ("tiny-base", "tiny-chat", "tiny-amateur")}
    contrastive = {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"}}
    sure = {**contrastive, "params": {"alpha": 0.5}}
    trio = {"base": "tiny-base", "aligned": "tiny-chat", "reference": "tiny-amateur"}
    recipes: dict[str, Any] = {
        "tiny-nudging": {"decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"}},
        "tiny-contrastive": contrastive,
        # The issue measures speculation "on prompts where drafts are often accepted". The random tiny models
        # disagree on a third of the positions under the default plausibility cut (alpha 0.1); at alpha 0.5
        # the expert's top token is the choice at about 87% of them. Measured with and without speculation.
        "tiny-contrastive-sure": sure,
        "tiny-contrastive-spec": _spec(sure, draft_role="expert", block_size=8),
        "tiny-contrastive-ngram": _spec(contrastive, method="ngram", block_size=8),
        "tiny-logit-arithmetic": {"decoder": "logit_arithmetic", "roles": trio, "params": {"lambda": 1.5}},
        "tiny-args": {"decoder": "args", "roles": trio, "params": {"k": 10, "w": 1.0, "rewards": [{"kind": "implicit"}]}},
    }
    kinds = {
        "nudging": "tiny-nudging",
        "contrastive": "tiny-contrastive",
        "contrastive_spec": "tiny-contrastive-spec",
        "contrastive_spec_off": "tiny-contrastive-sure",
        "contrastive_ngram": "tiny-contrastive-ngram",
        "logit_arithmetic": "tiny-logit-arithmetic",
        "args": "tiny-args",
    }
    infos = {kind: _recipe_info(name, recipes[name]) for kind, name in kinds.items()}
    config = {"models": models, "recipes": recipes}
    return Suite("tiny", "tiny pair", config, infos, "tiny-base",
                 str(paths["tiny-base"]), "float32", 2048)
