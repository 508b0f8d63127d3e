"""Tiny random-weight models that the tests generate, so no model hub is needed.

Three causal LMs share one BPE tokenizer trained on the fly (vocab 512), so token-level decoders can merge
them; a sequence-classification model with the same tokenizer serves as a reward model. Every model uses
head_dim 64 (vLLM's CPU attention rejects smaller heads) and float32 weights, so greedy outputs can be
compared exactly with transformers. The models are cached under ``.cache/tiny-models`` and rebuilt when
:data:`RECIPE_VERSION` changes.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / ".cache" / "tiny-models"
RECIPE_VERSION = 4
VOCAB_SIZE = 512

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_LINES = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: What is the color of the sky? Answer: The sky is blue on a clear day.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Alignment at inference time lets a small model guide a large base model.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": true}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024.",
    "Please answer politely and briefly. Thank you very much for asking!",
    "Once upon a time there was a tiny model that learned to write stories.",
    "User: hello there\nAssistant: Hi! How can I help you today?",
]

# name -> (architecture, seed, num_hidden_layers)
_MODELS = {
    "tiny-base": ("causal", 1, 2),
    "tiny-chat": ("causal", 2, 2),
    "tiny-amateur": ("causal", 3, 1),
    "tiny-reward": ("reward", 4, 1),
}


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS_LINES * 20, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.save_pretrained(out)


def _build_model(kind: str, seed: int, layers: int, tok_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if kind == "reward":
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
        # Random weights give nearly uniform next-token distributions; sharper logits make greedy choices
        # well separated (robust to float noise) and give decoders real disagreements to resolve.
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    if kind == "causal" and out.name == "tiny-chat":
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)


def ensure_tiny_models(root: Path | None = None) -> dict[str, Path]:
    """Build (once) and return the tiny test models by name: tiny-base, tiny-chat, tiny-amateur, tiny-reward.

    tiny-chat alone carries a chat template (ChatML), so tiny-base and tiny-amateur act as base models.
    Safe to call from several processes at once (a file lock guards the build).
    """
    root = root or DEFAULT_ROOT
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / name for name in _MODELS}
    stamp = root / "recipe.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = stamp.exists() and json.loads(stamp.read_text()).get("version") == RECIPE_VERSION
        if built and all((p / "config.json").exists() for p in paths.values()):
            return paths
        tok_dir = root / "_tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        _train_tokenizer(tok_dir)
        for name, (kind, seed, layers) in _MODELS.items():
            shutil.rmtree(paths[name], ignore_errors=True)
            _build_model(kind, seed, layers, tok_dir, paths[name])
        stamp.write_text(json.dumps({"version": RECIPE_VERSION}))
    return paths


if __name__ == "__main__":
    for model_name, path in ensure_tiny_models().items():
        print(model_name, path)
