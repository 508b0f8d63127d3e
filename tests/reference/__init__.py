"""Reference implementations of the token-level decoders, written for clarity, not speed.

Each module decodes one token at a time from full-vocabulary log-probabilities (or logits), recomputing the
whole context at every step (``tests.support.hf_runner.logits_fn`` for transformers models,
``tests.reference.common.numpy_model`` for numpy fakes), and gives the per-step sampling distribution for
chi-square tests. Speculative draft-and-verify changes no output, so the speculative-wrapped decoders are
checked against the same references (same greedy tokens; same sampling distribution).
"""
