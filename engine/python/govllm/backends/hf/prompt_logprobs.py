"""Prompt logprobs on the transformers backend: one plain forward pass over the prompt.

The continuous-batching manager keeps only the last position's logits of a prefill, so a request
that asks for ``prompt_logprobs`` gets its own forward pass (no KV cache, the model's weights
shared with the manager's thread), computed as vLLM's sampler does (``gather_logprobs``): the
raw logits' log_softmax, the prompt token's logprob and rank (how many tokens are at least as
likely), then the ``k`` most likely.
"""

from __future__ import annotations

from typing import Any


def compute(model: Any, prompt_token_ids: list[int], k: int, device: str) -> tuple[Any, Any, Any]:
    """(token ids [P-1, k+1], logprobs [P-1, k+1], ranks [P-1]) as CPU tensors for a prompt of P
    tokens: row r is position r + 1, column 0 its prompt token."""
    import torch

    ids = torch.tensor([prompt_token_ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:].unsqueeze(-1)
        token_logprobs = logprobs.gather(-1, targets)
        ranks = (logprobs >= token_logprobs).sum(-1)
        columns = [targets]
        values = [token_logprobs]
        if k > 0:
            top_values, top_ids = torch.topk(logprobs, k, dim=-1)
            columns.append(top_ids)
            values.append(top_values)
        return torch.cat(columns, dim=1).cpu(), torch.cat(values, dim=1).cpu(), ranks.cpu()
