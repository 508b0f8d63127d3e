"""The gateway's tokenizers tell decoders when two models share one vocabulary."""

from __future__ import annotations

from pathlib import Path

from alignd.decoders.contract import RoleContext
from alignd.decoders.nudging import Nudging
from alignd.server.tokenization import ModelTokenizer
from tests.support.tiny_models import ensure_tiny_models


def _role(name: str, tok: ModelTokenizer) -> RoleContext:
    return RoleContext(name, name, [], tok, len(tok.hf), tok.eos_token_ids)


def test_vocab_fingerprint_lets_nudging_share_token_ids(tmp_path: Path) -> None:
    """tiny-base and tiny-chat load one tokenizer from two directories: nudging works on their token ids.
    A saved copy has the same fingerprint; one more token makes another vocabulary."""
    paths = ensure_tiny_models()
    base, chat = ModelTokenizer(str(paths["tiny-base"])), ModelTokenizer(str(paths["tiny-chat"]))
    assert base.hf is not chat.hf
    assert base.vocab_fingerprint == chat.vocab_fingerprint
    nudging = Nudging(Nudging.parse_params({}))
    assert nudging.shares_tokenizer(_role("base", base), _role("aligner", chat))

    base.hf.save_pretrained(tmp_path)
    assert ModelTokenizer(str(tmp_path)).vocab_fingerprint == base.vocab_fingerprint
    grown = ModelTokenizer(str(tmp_path))
    grown.hf.add_tokens(["<alignd-test-token>"])
    assert grown.vocab_fingerprint != base.vocab_fingerprint
