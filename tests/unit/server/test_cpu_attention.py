"""alignd's vLLM plugin: vLLM's CPU attention never takes its AMX kernel, which decodes bf16 models wrongly
(the embedded SmolLM2 answers in garbled French on an AMX Xeon; ``test_embedded.test_smollm2_chats``)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.attention.backends import cpu_attn

from alignd.server.engines.vllm_plugin import register_cpu_attention_without_amx


def test_bf16_attention_takes_the_vector_kernel_where_vllm_would_take_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # an AMX CPU, on any x86 machine
    register_cpu_attention_without_amx()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128, 64) == "vec"
    # where vLLM does not choose AMX, its choice stands
    assert cpu_attn._get_attn_isa(torch.float32, 128, 64) == "vec"
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128, 48) == "vec16"
