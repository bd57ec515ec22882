"""Helpers shared by the transformers backend tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from types import SimpleNamespace

from govllm.backends.hf import compat
from helpers import FakeRelay, _collect

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
    """Whether the manager still tracks any engine request of ``request_id`` (its engine ids are
    "id/go_id" and, for n > 1, "id/go_id/i")."""
    held = compat.held_request_ids(backend.manager)
    return any(h.startswith(request_id + "/") for h in held)


# Go ids of requests started with start(): far from helpers._collect's, so records never mix.
_go_ids = itertools.count(1 << 32)


def fake_relay(backend) -> FakeRelay:
    """The backend's FakeRelay (installed on first use; the bridge would set _govllm_shim.relay)."""
    if not isinstance(backend.relay, FakeRelay):
        backend.relay = FakeRelay()
    return backend.relay


async def start(backend, prompt, sampling, request_id):
    """Submits a request; returns (go_id, the future that resolves when every choice ended)."""
    fake_relay(backend)
    go_id = next(_go_ids)
    return go_id, await backend.submit(list(prompt), sampling, request_id, go_id)


def records_of(backend, go_id: int, index: int | None = None) -> list[dict]:
    """What the relay sent Go for go_id (and choice index): {"go_id", "index", "ids", "finish", "meta"}."""
    return [r for r in fake_relay(backend).records
            if r["go_id"] == go_id and (index is None or r["index"] == index)]


def tokens_of(backend, go_id: int, index: int = 0) -> list[int]:
    return [t for r in records_of(backend, go_id, index) for t in r["ids"]]


async def wait_tokens(backend, go_id: int, n: int, index: int = 0, timeout: float = 60.0) -> list[int]:
    """Waits until choice index of go_id has at least n tokens relayed."""
    deadline = time.monotonic() + timeout
    while len(tokens_of(backend, go_id, index)) < n:
        assert time.monotonic() < deadline, f"request {go_id} relayed {tokens_of(backend, go_id, index)}"
        await asyncio.sleep(0.01)
    return tokens_of(backend, go_id, index)


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
