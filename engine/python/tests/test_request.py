"""govllm.request (the request JSON, generation_config defaults) and backend.py's shared helpers."""

from __future__ import annotations

import json

import pytest

from govllm.backend import RequestError, SamplingParams, _text_content
from govllm.request import apply_default_max_tokens, generation_defaults, parse_request


def test_generation_defaults(tmp_path):
    assert generation_defaults(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "top_k": 50, "temperature": 0.6, "repetition_penalty": 1.2, "max_new_tokens": 64,
        "max_length": 20}))
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.0, "repetition_penalty": 1.2, "max_tokens": 64}
    (tmp_path / "generation_config.json").write_text("[]")
    assert generation_defaults(str(tmp_path)) == {}
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams.from_dict({"top_k": -1}).top_k == 0


def test_parse_request():
    req = parse_request(json.dumps({"prompt": "hi", "request_id": "r-1", "sampling": {"top_k": 0, "seed": None}}).encode(),
                        "7", {"top_k": 50, "max_tokens": 8})
    assert (req.request_id, req.prompt, req.sampling.top_k, req.sampling.seed, req.default_max_tokens) == (
        "r-1", "hi", 0, None, 8)
    assert parse_request(b'{"prompt": "hi", "sampling": {"max_tokens": 3}}', "7", {"max_tokens": 8}).default_max_tokens is None
    assert parse_request(b'{"prompt": "hi"}', "7", {}).request_id == "7"
    for bad in (b"[]", b'{"sampling": []}', b'{"prompt_token_ids": [true]}', b'{"sampling": {"n": "x"}}'):
        with pytest.raises(RequestError):
            parse_request(bad, "7", {})


def test_default_max_tokens_is_capped_by_the_context():
    req = parse_request(b'{"prompt": "hi"}', "1", {"max_tokens": 8})
    apply_default_max_tokens(req, prompt_len=95, max_model_len=100)
    assert req.sampling.max_tokens == 5
    req = parse_request(b'{"prompt": "hi"}', "1", {"max_tokens": 8})
    apply_default_max_tokens(req, prompt_len=100, max_model_len=100)  # no room: the backend refuses the prompt
    assert req.sampling.max_tokens is None


def test_text_content_parts_join_with_newlines():
    assert _text_content([{"type": "text", "text": "a"}, {"text": "b"}]) == "a\nb"  # as vLLM and the Go server join them
    assert _text_content("plain") == "plain"
    with pytest.raises(RequestError, match="image_url"):
        _text_content([{"type": "image_url", "image_url": {}}])
