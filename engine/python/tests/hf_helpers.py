"""Helpers shared by the transformers backend tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

from govllm.backends.hf import compat
from helpers import _collect

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
TOPICS = [
    "cats", "dogs", "the sea", "mountains", "Paris", "coffee", "trains", "the moon",
    "bees", "winter", "music", "chess", "rivers", "bread", "robots", "volcanoes",
]
# GOVLLM_TEST_CONCURRENCY=64 is the full batch-invariance check (~2 minutes on 2 cores).
CONCURRENCY = int(os.environ.get("GOVLLM_TEST_CONCURRENCY", "12"))
DEVICE = os.environ.get("GOVLLM_TEST_DEVICE", "")


def topic_prompt(backend, i):
    return backend.apply_chat_template(
        [{"role": "user", "content": f"Tell me {i // len(TOPICS) + 1} facts about {TOPICS[i % len(TOPICS)]}."}]
    )


def engine_holds(backend, request_id: str) -> bool:
    """Whether the manager still tracks any engine request of ``request_id`` (its choices are "id/i")."""
    held = compat.held_request_ids(backend.manager)
    return any(h == request_id or h.startswith(request_id + "/") for h in held)


async def wait_released(backend, request_id, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine_holds(backend, request_id):
            return True
        await asyncio.sleep(0.05)
    return False


def run_together(loop, backend, jobs):
    """Runs (prompt, sampling, request_id) jobs concurrently; returns their outputs in order."""
    async def run():
        return await asyncio.gather(*[_collect(backend, p, sp, rid) for p, sp, rid in jobs])

    return [o[0] for o in loop.run_until_complete(run())]


def fake_request(request_id, params, prompt, generated):
    """What PerRequestSampler reads of a manager request about to predict output token len(generated)."""
    state = SimpleNamespace(request_id=request_id, logit_processor_kwargs={"govllm_sampling": params},
                            initial_tokens=list(prompt), generated_tokens=list(generated),
                            position_offset=len(prompt) + len(generated))
    return SimpleNamespace(has_new_token=True, state=state)


def reference_logits(ref_model, tokens):
    """Raw next-token logits after each prefix of tokens: [len(tokens), vocab]."""
    import torch

    with torch.no_grad():
        return ref_model(torch.tensor([tokens])).logits[0].float()


def reference_greedy(ref_model, prompt, n, repetition=1.0, presence=0.0, frequency=0.0):
    """Greedy decoding with vLLM's penalty semantics, written out independently of the sampler."""
    import torch

    out: list[int] = []
    for _ in range(n):
        logits = reference_logits(ref_model, prompt + out)[-1]
        vocab = logits.size(0)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab)[:vocab].float()
        seen = (counts > 0) | torch.isin(torch.arange(vocab), torch.tensor(prompt))
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits) - frequency * counts - presence * (counts > 0).float()
        out.append(int(logits.argmax()))
    return out
