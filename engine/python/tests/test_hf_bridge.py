"""The transformers backend behind the real bridge, with the stand-in shim (fake_shim.py): the
token-id protocol end to end as Go sees it (READY names the tokenizer, the prompt event, token-only
deltas from relay, CMD_STOP_CHOICE, CMD_ABORT, shutdown)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import pytest

from fake_shim import EV_DELTA, EV_PROMPT, FakeShim
from helpers import decode_logprobs_meta
from hf_helpers import DEVICE, PARIS


@pytest.fixture
def bridged(model_path, monkeypatch):
    """bridge.main on a thread of its own with the transformers backend; stopped afterwards."""
    shim = FakeShim()
    monkeypatch.setitem(sys.modules, "_govllm_shim", shim)
    from govllm import bridge

    monkeypatch.setattr(bridge, "shim", shim)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    config = {"model": model_path, "engine": "transformers", "served_model_name": "m", "dtype": "float32",
              "device": DEVICE or "cpu", "max_model_len": 256, "seed": 1, "extra": {"kv_cache_gib": 0.05}}
    thread = threading.Thread(target=bridge.main, args=(config,), daemon=True)
    thread.start()
    try:
        yield bridge, shim
    finally:
        if thread.is_alive():
            shim.send(bridge.CMD_SHUTDOWN)
            thread.join(60)
        root.handlers[:] = handlers
        root.setLevel(level)
        shim.close()
    assert not thread.is_alive(), "the bridge did not stop"


def _run(bridge, shim, req_id, body, stop_after=None, timeout=60.0):
    """Submits a request; sends CMD_STOP_CHOICE for choice 0 once it has stop_after tokens; returns
    (prompt event, deltas, final event)."""
    shim.send(bridge.CMD_SUBMIT, req_id, body)
    deadline, stopped = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        events = shim.of(req_id)
        deltas = [e for e in events if e["kind"] == EV_DELTA]
        if stop_after is not None and not stopped and sum(len(d["tokens"]) for d in deltas) >= stop_after:
            shim.send(bridge.CMD_STOP_CHOICE, req_id, b"0")
            stopped = True
        final = [e for e in events if e["kind"] in (bridge.EV_END, bridge.EV_ERROR)]
        if final:
            prompt = [e for e in events if e["kind"] == EV_PROMPT]
            return prompt[0] if prompt else None, deltas, final[0]
        time.sleep(0.005)
    raise TimeoutError(f"request {req_id} did not end: {shim.of(req_id)}")


def test_token_protocol_through_the_bridge(bridged, tokenizer):
    bridge, shim = bridged
    ready = shim.wait_for(bridge.EV_READY, timeout=180)["meta"]
    assert ready["backend"] == "transformers"
    assert os.path.isfile(os.path.join(ready["tokenizer"], "tokenizer.json"))

    # a chat request: the prompt event first, then token-only deltas, the last one finishing
    prompt, deltas, end = _run(bridge, shim, 1, {"messages": PARIS, "sampling": {"max_tokens": 30, "temperature": 0}})
    assert end["kind"] == bridge.EV_END, end
    assert prompt["meta"] and all(isinstance(t, int) for t in prompt["meta"])  # the chat template's ids
    assert deltas and all(d["text"] == "" and d["index"] == 0 for d in deltas)
    assert [d["finish"] for d in deltas[:-1]] == [0] * (len(deltas) - 1) and deltas[-1]["finish"] in (1, 2)
    ids = [t for d in deltas for t in d["tokens"]]
    assert "Paris" in tokenizer.decode(ids, skip_special_tokens=True)
    if deltas[-1]["finish"] == 1:
        assert ids[-1] == tokenizer.eos_token_id  # relayed; Go leaves its text out

    # Go matched a stop string: CMD_STOP_CHOICE ends the request; logprobs travel as binary meta
    _, deltas, end = _run(bridge, shim, 2, {"prompt": "Once upon a time", "sampling": {
        "max_tokens": 120, "temperature": 0, "ignore_eos": True, "logprobs": 2}}, stop_after=4)
    assert end["kind"] == bridge.EV_END, end
    assert 4 <= sum(len(d["tokens"]) for d in deltas) < 120 and all(d["finish"] == 0 for d in deltas)
    for d in deltas:
        rows = decode_logprobs_meta(d["meta"])
        assert [r["ids"][0] for r in rows] == d["tokens"] and all(len(r["ids"]) == 3 for r in rows)

    # the client went away: CMD_ABORT ends it with END
    shim.send(bridge.CMD_SUBMIT, 3, {"prompt": "Once upon a time", "sampling": {
        "max_tokens": 200, "temperature": 0, "ignore_eos": True}})
    deadline = time.monotonic() + 60
    while not any(e["kind"] == EV_DELTA for e in shim.of(3)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    shim.send(bridge.CMD_ABORT, 3)
    shim.wait_for(bridge.EV_END, 3, timeout=30)
    assert sum(len(e["tokens"]) for e in shim.of(3) if e["kind"] == EV_DELTA) < 200

    # a client mistake is a 400 from the backend's validation
    _, _, err = _run(bridge, shim, 4, {"prompt_token_ids": [1, 10**9], "sampling": {"max_tokens": 2}})
    assert err["kind"] == bridge.EV_ERROR and err["meta"]["status"] == 400, err
