"""The transformers backend: ``backend`` (the Backend), ``sampler`` (per-request sampling),
``loading`` (model, tokenizer, cache size) and ``compat`` (transformers' internals)."""
