"""The bridge driven as Go drives it, with a stand-in shim (fake_shim.py) and backend (fake_backend.py).

bridge.main runs on a thread of its own, as on the interpreter's main thread; the test sends
commands into the shim's inbox and reads the events the bridge emits.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import pytest

import fake_backend
from fake_shim import EV_DELTA, FakeShim

ERROR_KEYS = {"status", "type", "message", "param"}


class Running:
    """One bridge.main on its thread, with the shim it talks through."""

    def __init__(self, shim: FakeShim, model_dir, **extra) -> None:
        from govllm import bridge

        self.bridge = bridge
        self.shim = shim
        config = {"model": str(model_dir), "engine": "fake_backend:create", "served_model_name": "m", "extra": extra}
        self.thread = threading.Thread(target=bridge.main, args=(config,), daemon=True)
        self.thread.start()

    def submit(self, req_id: int, body: dict | bytes) -> None:
        self.shim.send(self.bridge.CMD_SUBMIT, req_id, body)

    def result(self, req_id: int) -> tuple[list[dict], dict]:
        """The request's deltas and its final END or ERROR event."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = self.shim.of(req_id)
            final = [e for e in events if e["kind"] in (self.bridge.EV_END, self.bridge.EV_ERROR)]
            if final:
                return [e for e in events if e["kind"] == EV_DELTA], final[0]
            time.sleep(0.005)
        raise TimeoutError(f"request {req_id} did not end: {self.shim.of(req_id)}")

    def echo(self, req_id: int, sampling: dict | None = None, request_id: str | None = None,
             prompt: str = "echo") -> dict:
        """What the backend received for a request ("echo" answers with it)."""
        body: dict = {"prompt": prompt, "sampling": sampling or {}}
        if request_id is not None:
            body["request_id"] = request_id
        self.submit(req_id, body)
        deltas, final = self.result(req_id)
        assert final["kind"] == self.bridge.EV_END, final
        return json.loads(deltas[0]["text"])

    def stop(self) -> None:
        if self.thread.is_alive():
            self.shim.send(self.bridge.CMD_SHUTDOWN)
            self.thread.join(10)


@pytest.fixture
def run(monkeypatch):
    """run(model_dir, **extra) starts a bridge; everything is stopped and restored afterwards."""
    shim = FakeShim()
    monkeypatch.setitem(sys.modules, "_govllm_shim", shim)
    from govllm import bridge

    monkeypatch.setattr(bridge, "shim", shim)
    fake_backend.EVENTS.clear()
    fake_backend.RELEASE.clear()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    started: list[Running] = []

    def start(model_dir, **extra) -> Running:
        r = Running(shim, model_dir, **extra)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
    fake_backend.RELEASE.set()
    assert all(not r.thread.is_alive() for r in started), "bridge.main did not return"
    root.handlers[:] = handlers
    root.setLevel(level)
    shim.close()


def _ready(r: Running) -> dict:
    return r.shim.wait_for(r.bridge.EV_READY)["meta"]


# ----------------------------------------------------------------------------- serving


def test_ready_and_end_meta(run, tmp_path):
    r = run(tmp_path)
    assert _ready(r) == {"model": "m", "root": str(tmp_path), "max_model_len": 100, "backend": "fake",
                         "structured_outputs": False, "tool_call_parser": "", "reasoning_parser": "", "runner": "generate"}
    r.submit(1, {"prompt": "echo"})
    deltas, end = r.result(1)
    assert len(deltas) == 1 and deltas[0]["finish"] == r.bridge.FINISH_CODES["stop"]
    assert end["meta"] == {"usage": {"prompt_tokens": 4, "completion_tokens": 1}}


@pytest.mark.parametrize("body, status, type_, message", [
    ({"prompt": "bad"}, 400, "BadRequestError", "too long"),
    ({"prompt": "echo", "sampling": {"top_p": 1.5}}, 400, "BadRequestError", "top_p"),
    ({"prompt": "echo", "sampling": {"temperature": "hot"}}, 400, "BadRequestError", "invalid sampling"),
    ({"prompt": "echo", "sampling": {"no_such": 1}}, 400, "BadRequestError", "unknown sampling"),
    ({"prompt_token_ids": [1, "2"]}, 400, "BadRequestError", "prompt_token_ids"),
    ({}, 400, "BadRequestError", "no messages"),
    (b"{not json", 400, "BadRequestError", "not valid JSON"),
    # backend bugs, mid-stream or in what it yields, are the server's fault
    ({"prompt": "str-token"}, 500, "InternalServerError", "TypeError"),
    ({"prompt": "value-error"}, 500, "InternalServerError", "ValueError: a bug in the backend"),
    ({"prompt": "die"}, 503, "EngineDeadError", "gone"),
    # a LoRA adapter the backend did not load: an unknown model
    ({"prompt": "echo", "lora": "sql-lora"}, 404, "NotFoundError", "The model `sql-lora` does not exist."),
    ({"prompt": "echo", "lora": 3}, 400, "BadRequestError", "lora must be an adapter name"),
])
def test_error_classification(run, tmp_path, body, status, type_, message):
    r = run(tmp_path)
    _ready(r)
    r.submit(3, body)
    _, final = r.result(3)
    assert final["kind"] == r.bridge.EV_ERROR
    meta = final["meta"]
    assert set(meta) == ERROR_KEYS
    assert (meta["status"], meta["type"]) == (status, type_) and message in meta["message"], meta


def test_internal_error_is_logged_with_request_id_and_traceback(run, tmp_path):
    r = run(tmp_path)
    _ready(r)
    r.submit(4, {"prompt": "value-error", "request_id": "chatcmpl-xyz"})
    r.result(4)
    logs = [e["meta"]["message"] for e in r.shim.events if e["kind"] == r.bridge.EV_LOG]
    assert any("chatcmpl-xyz" in m and "Traceback" in m and "ValueError" in m for m in logs), logs


def test_abort_ends_with_usage(run, tmp_path):
    r = run(tmp_path)
    _ready(r)
    r.submit(5, {"prompt": "hang"})
    r.shim.wait_for(EV_DELTA, 5)
    r.shim.send(r.bridge.CMD_ABORT, 5)
    _, end = r.result(5)
    assert end["kind"] == r.bridge.EV_END and end["meta"] == {"usage": {"prompt_tokens": 4, "completion_tokens": 1}}


# ----------------------------------------------------------------------------- request ids and sampling defaults


def test_request_id(run, tmp_path):
    r = run(tmp_path)
    _ready(r)
    assert r.echo(11)["request_id"] == "11"
    assert r.echo(12, request_id="req-abc")["request_id"] == "req-abc"
    # a client may repeat an X-Request-Id: the second running request gets a distinct backend id
    r.submit(20, {"prompt": "hang", "request_id": "dup"})
    r.shim.wait_for(EV_DELTA, 20)
    assert r.echo(21, request_id="dup")["request_id"] == "dup-21"
    r.shim.send(r.bridge.CMD_ABORT, 20)
    r.result(20)
    assert r.echo(22, request_id="dup")["request_id"] == "dup"


def test_set_fields_override_generation_config(run, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "top_k": 50, "top_p": 0.9, "temperature": 0.7, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_new_tokens": 5, "do_sample": True}))
    r = run(tmp_path)
    _ready(r)
    unset = r.echo(1)["sampling"]
    assert (unset["top_k"], unset["top_p"], unset["temperature"], unset["min_p"], unset["repetition_penalty"],
            unset["max_tokens"]) == (50, 0.9, 0.7, 0.05, 1.1, 5)
    assert r.echo(2, {"top_k": 0})["sampling"]["top_k"] == 0
    assert r.echo(3, {"top_k": -1})["sampling"]["top_k"] == 0
    assert r.echo(4, {"top_p": 1.0})["sampling"]["top_p"] == 1.0
    assert r.echo(5, {"temperature": None})["sampling"]["temperature"] == 0.7  # null: unset
    assert r.echo(6, {"max_tokens": 9})["sampling"]["max_tokens"] == 9
    # the model's max_new_tokens is capped by the room left in the context (max_model_len 100)
    assert r.echo(7, prompt="echo" + "x" * 94)["sampling"]["max_tokens"] == 2


# ----------------------------------------------------------------------------- startup


@pytest.mark.parametrize("mode", ["hang", "block"])
def test_shutdown_during_start_ends_the_bridge(run, tmp_path, mode):
    """A shutdown while the backend starts (awaiting, or blocked in a loading thread) cancels the start:
    FATAL "start cancelled", the backend's shutdown, and main returns at once."""
    r = run(tmp_path, start=mode)
    deadline = time.monotonic() + 10
    while f"start:{mode}" not in fake_backend.EVENTS and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    r.shim.send(r.bridge.CMD_SHUTDOWN)
    r.thread.join(5)
    assert not r.thread.is_alive() and time.monotonic() - t0 < 2
    fatal = r.shim.wait_for(r.bridge.EV_FATAL)
    assert "start cancelled" in fatal["meta"]["message"]
    assert not [e for e in r.shim.events if e["kind"] == r.bridge.EV_READY]
    assert fake_backend.EVENTS[-2:] == ["start cancelled", "shutdown"]


def test_commands_before_ready(run, tmp_path):
    r = run(tmp_path, start="hang")
    while "start:hang" not in fake_backend.EVENTS:
        time.sleep(0.01)
    r.submit(1, {"prompt": "echo"})
    _, final = r.result(1)
    assert final["kind"] == r.bridge.EV_ERROR and final["meta"]["status"] == 503, final
    r.shim.send(r.bridge.CMD_STATS, 2)
    stats = r.shim.wait_for(r.bridge.EV_STATS, 2)["meta"]
    assert stats["health_error"] == "the engine is starting" and stats["bridge_requests"] == 0
    r.shim.send(r.bridge.CMD_ABORT, 1)  # nothing to abort: ignored
    r.stop()
    assert not r.thread.is_alive()


@pytest.mark.parametrize("stats, want", [
    ("ok", {"gauges": {"num_requests_running": 0.0, "kv_cache_usage_perc": 0.5}, "counters": {}, "histograms": {},
            "info": {}}),
    ("fail", None),  # logged; the rest of the answer still comes
])
def test_stats_carry_the_engine_figures(run, tmp_path, stats, want):
    r = run(tmp_path, stats=stats)
    _ready(r)
    r.shim.send(r.bridge.CMD_STATS, 3)
    answer = r.shim.wait_for(r.bridge.EV_STATS, 3)["meta"]
    assert answer["engine"] == want and answer["health_error"] == "" and answer["backend_running"] == 0
    r.stop()


def test_start_failure_is_fatal(run, tmp_path):
    r = run(tmp_path, start="fail")
    fatal = r.shim.wait_for(r.bridge.EV_FATAL)
    assert fatal["meta"]["message"] == "RuntimeError: no model here" and "Traceback" in fatal["meta"]["traceback"]
    r.thread.join(5)
    assert not r.thread.is_alive()


def test_constants_are_plain_assignments():
    """engine's Go tests parse these lines of bridge.py with a regex: one NAME = value per line."""
    import pathlib
    import re

    from govllm import bridge

    text = pathlib.Path(bridge.__file__).read_text()
    for name in ("CMD_SUBMIT", "CMD_ABORT", "CMD_SHUTDOWN", "CMD_STATS", "EV_DELTA", "EV_END", "EV_ERROR", "EV_READY",
                 "EV_FATAL", "EV_LOG", "EV_STATS", "CMD_STOP_CHOICE", "EV_PROMPT"):
        m = re.search(rf"^{name} = (\d+)$", text, re.M)
        assert m and int(m.group(1)) == getattr(bridge, name), name
    assert re.search(r"^FINISH_CODES = \{None: 0, \"stop\": 1, \"length\": 2, \"abort\": 3, \"error\": 4, "
                     r"\"repetition\": 5\}$", text, re.M)


def test_prompt_encoder_trusts_fast_only_when_it_agrees():
    """Go's encoder is used once it gives the tokenizer's own ids on the probes, never otherwise."""
    from govllm.backend import PromptEncoder

    def slow(text, special):
        return [len(text), int(special)]

    calls = []

    def agreeing(text, special):
        calls.append(text)
        return [len(text), int(special)]

    enc = PromptEncoder(slow)
    assert enc("abc", True) == [3, 1]  # no fast encoder: the tokenizer
    enc = PromptEncoder(slow)
    enc.fast = agreeing
    assert enc("abcd", False) == [4, 0] and calls[-1] == "abcd"

    enc = PromptEncoder(slow)
    enc.fast = lambda text, special: [0] if "'" in text else [len(text), int(special)]
    assert enc("abcd", False) == [4, 0] and enc._trusted is False

    enc = PromptEncoder(slow)
    enc.fast = lambda text, special: None  # Go has no encoder for this tokenizer
    assert enc("ab", True) == [2, 1] and enc._trusted is False


# ----------------------------------------------------------------------------- output parsing


class _FakeRequestParser:
    """Upper-cases content; "CALL" in a choice's text is a tool call."""

    def __init__(self) -> None:
        self.fed: list[tuple] = []

    def feed(self, index: int, text: str, token_ids: list[int], finished: bool, whole: bool) -> dict:
        self.fed.append((index, text, token_ids, finished, whole))
        if text == "boom":
            raise RuntimeError("a parser bug")
        calls = [{"index": 0, "id": "call_1", "type": "function", "name": "f", "arguments": "{}"}] if "CALL" in text else []
        return {"content": text.upper(), "reasoning": None, "tool_calls": calls, "tools_called": bool(calls)}


class _FakeParsers:
    def __init__(self, tool_call_parser, reasoning_parser) -> None:
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        self.made: list[_FakeRequestParser] = []

    def for_request(self, request: dict, tool_calls: bool, reasoning: bool) -> _FakeRequestParser:
        assert tool_calls and not reasoning and request["tools"] == [{"type": "function"}]
        self.made.append(_FakeRequestParser())
        return self.made[-1]


@pytest.fixture
def fake_parsers(monkeypatch):
    from govllm import parsing

    loaded: list[_FakeParsers] = []

    def load(tool_call_parser, reasoning_parser, tokenizer, model_name):
        loaded.append(_FakeParsers(tool_call_parser, reasoning_parser))
        return loaded[-1]

    monkeypatch.setattr(parsing.Parsers, "load", staticmethod(load))
    return loaded


def _parse(r: Running, req_id: int, **cmd) -> dict:
    before = len([e for e in r.shim.of(req_id) if e["kind"] == r.bridge.EV_PARSED])
    r.shim.send(r.bridge.CMD_PARSE, req_id, {"token_ids": [], "finished": False, "whole": False, **cmd})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        parsed = [e for e in r.shim.of(req_id) if e["kind"] == r.bridge.EV_PARSED]
        if len(parsed) > before:
            return parsed[-1]["meta"]
        time.sleep(0.005)
    raise TimeoutError("no EV_PARSED")


def test_parse_commands_run_the_request_parsers(run, tmp_path, fake_parsers):
    r = run(tmp_path, tool_call_parser="hermes")
    assert _ready(r)["tool_call_parser"] == "hermes"
    r.submit(1, {"prompt": "echo", "tools": [{"type": "function"}], "parsing": {"tool_calls": True},
                 "sampling": {"n": 2}})
    _, end = r.result(1)
    assert end["kind"] == r.bridge.EV_END
    # Go's parse commands may come after END: the parsers are still there.
    assert _parse(r, 1, index=0, text="hi") == {"index": 0, "content": "HI", "reasoning": None, "tool_calls": [],
                                                "tools_called": False}
    got = _parse(r, 1, index=1, text="a CALL", token_ids=[5], finished=True, whole=True)
    assert got["tools_called"] and got["tool_calls"][0]["name"] == "f" and got["index"] == 1
    assert fake_parsers[0].made[0].fed == [(0, "hi", [], False, False), (1, "a CALL", [5], True, True)]
    # A parser that raises passes the text through; the last choice's finish frees the parsers.
    assert _parse(r, 1, index=0, text="boom", finished=True)["content"] == "boom"
    assert _parse(r, 1, index=0, text="after")["content"] == "after"  # freed: passed through
    # Unknown requests (parsers gone) are answered too, unparsed.
    assert _parse(r, 99, index=0, text="late")["content"] == "late"


def test_parsing_without_the_parser_is_a_400(run, tmp_path, fake_parsers):
    r = run(tmp_path)
    _ready(r)
    r.submit(2, {"prompt": "echo", "tools": [{"type": "function"}], "parsing": {"tool_calls": True}})
    _, final = r.result(2)
    assert final["kind"] == r.bridge.EV_ERROR
    assert final["meta"]["status"] == 400 and "--tool-call-parser" in final["meta"]["message"]
