"""CMD_TOKENIZE (govllm/tokenizing.py): on the real SmolLM2 tokenizer behind the transformers
backend's own chat rendering, and through the bridge's command loop."""

from __future__ import annotations

import pytest

import fake_backend
from conftest import REPO_ROOT
from govllm import tokenizing
from govllm.backend import RequestError, load_chat_template, render_chat
from test_bridge import run  # noqa: F401  (the bridge fixture)

TEMPLATE = REPO_ROOT / "templates" / "chatml_tools.jinja"
TEXT = "héllo wörld 你好 🎉"
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture
def backend(tokenizer):
    """The transformers backend's tokenizer surface, without a model (as test_chat_template does)."""
    from govllm.backends.hf.backend import TransformersBackend

    b = object.__new__(TransformersBackend)
    b.tokenizer = tokenizer
    b.prompt_encoder = lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]
    b._chat_template = load_chat_template(str(TEMPLATE))
    return b


def _tok(backend, **cmd):
    return tokenizing.handle(backend, {"op": "tokenize", **cmd})


def test_prompt(backend, tokenizer):
    got = _tok(backend, prompt=TEXT, add_special_tokens=True, return_token_strs=True)
    assert got["tokens"] == tokenizer(TEXT)["input_ids"]
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    assert _tok(backend, prompt=TEXT)["token_strs"] is None


def test_messages_default_is_what_generation_renders(backend):
    got = _tok(backend, messages=USER, add_generation_prompt=True)["tokens"]
    assert got == backend.apply_chat_template(USER)
    with_tools = _tok(backend, messages=USER, tools=TOOLS, add_generation_prompt=True)["tokens"]
    assert with_tools == backend.apply_chat_template(USER, TOOLS) and len(with_tools) > len(got)


def test_messages_options(backend, tokenizer):
    plain = tokenizer.decode(_tok(backend, messages=USER, add_generation_prompt=True)["tokens"])
    assert plain.endswith("<|im_start|>assistant\n")
    no_gen = tokenizer.decode(_tok(backend, messages=USER, add_generation_prompt=False)["tokens"])
    assert no_gen == plain.removesuffix("<|im_start|>assistant\n")
    prefill = USER + [{"role": "assistant", "content": "Hel"}]
    cont = tokenizer.decode(_tok(backend, messages=prefill, add_generation_prompt=False,
                                 continue_final_message=True)["tokens"])
    assert cont.endswith("<|im_start|>assistant\nHel")
    special = _tok(backend, messages=USER, add_generation_prompt=True, add_special_tokens=True)["tokens"]
    assert special == tokenizer(render_chat(tokenizer, USER, None, backend._chat_template),
                                add_special_tokens=True)["input_ids"]


def test_chat_template_kwargs(backend, tokenizer):
    backend._chat_template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    got = _tok(backend, messages=USER, add_generation_prompt=True, chat_template_kwargs={"greeting": "Yo "})
    assert tokenizer.decode(got["tokens"]) == "Yo hi"


def test_template_error_is_the_clients(backend):
    backend._chat_template = "{{ raise_exception('no such role') }}"
    with pytest.raises(RequestError, match="no such role") as err:
        _tok(backend, messages=USER, add_generation_prompt=False)
    assert err.value.param == "messages"


def test_detokenize_round_trip(backend, tokenizer):
    ids = _tok(backend, prompt=TEXT, add_special_tokens=True)["tokens"]
    assert tokenizing.handle(backend, {"op": "detokenize", "tokens": ids}) == {"text": TEXT}
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizing.detokenize(backend, [im_start]) == "<|im_start|>"  # kept, as vLLM's /detokenize


@pytest.mark.parametrize("tokens", [[-1], [49152], [1, 10**9], ["a"], [True], "12"])
def test_detokenize_refuses(backend, tokens):
    with pytest.raises(RequestError) as err:
        tokenizing.detokenize(backend, tokens)
    assert err.value.param == "tokens" and err.value.status == 400


def test_no_tokenizer():
    class Bare:
        name = "bare"

    for cmd in ({"op": "tokenize", "prompt": "x"}, {"op": "detokenize", "tokens": [1]}):
        with pytest.raises(tokenizing.NoTokenizerError) as err:
            tokenizing.handle(Bare(), cmd)
        assert err.value.status == 501 and "bare backend has no tokenizer" in str(err.value)


@pytest.mark.parametrize("data", [b"{", b"[1]", b'{"op":"nope"}', b'{"op":"tokenize"}'])
def test_bad_commands(backend, data):
    with pytest.raises(RequestError):
        tokenizing.handle(backend, tokenizing.parse(data))


class ByteTokenizer:
    """Ids are UTF-8 bytes (as fake_backend's encode), 256 and 257 special."""

    chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

    def encode(self, text, add_special_tokens=True):
        return ([256] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode(errors="replace") + ("<s>" if 256 in ids else "")

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]

    def __len__(self):
        return 258


def test_bridge_answers_tokenize(run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fake_backend.FakeBackend, "tokenizer", ByteTokenizer(), raising=False)
    r = run(tmp_path)
    r.shim.wait_for(r.bridge.EV_READY)
    r.shim.send(r.bridge.CMD_TOKENIZE, 7, {"op": "tokenize", "prompt": "hé", "add_special_tokens": True,
                                           "return_token_strs": True, "request_id": "tokenize-abc"})
    ev = r.shim.wait_for(r.bridge.EV_TOKENIZED, 7)
    assert ev["meta"] == {"tokens": [256, 104, 195, 169], "token_strs": ["Ā", "h", "Ã", "©"]}
    # messages by default go through the backend's apply_chat_template, as generation's prompt
    r.shim.send(r.bridge.CMD_TOKENIZE, 8, {"op": "tokenize", "messages": USER, "add_generation_prompt": True})
    assert r.shim.wait_for(r.bridge.EV_TOKENIZED, 8)["meta"]["tokens"] == list(b"hi")
    r.shim.send(r.bridge.CMD_TOKENIZE, 9, {"op": "detokenize", "tokens": list(TEXT.encode())})
    assert r.shim.wait_for(r.bridge.EV_TOKENIZED, 9)["meta"] == {"text": TEXT}
    r.shim.send(r.bridge.CMD_TOKENIZE, 10, {"op": "detokenize", "tokens": [300]})
    err = r.shim.wait_for(r.bridge.EV_ERROR, 10)["meta"]
    assert (err["status"], err["param"]) == (400, "tokens") and "300 is out of vocabulary" in err["message"]


def test_bridge_without_tokenizer_answers_501(run, tmp_path):  # noqa: F811
    r = run(tmp_path)
    r.shim.wait_for(r.bridge.EV_READY)
    r.shim.send(r.bridge.CMD_TOKENIZE, 5, {"op": "tokenize", "prompt": "x"})
    err = r.shim.wait_for(r.bridge.EV_ERROR, 5)["meta"]
    assert (err["status"], err["type"]) == (501, "NotImplementedError")
    r.shim.send(r.bridge.CMD_TOKENIZE, 6, b"{not json")
    assert r.shim.wait_for(r.bridge.EV_ERROR, 6)["meta"]["status"] == 400


def test_bridge_refuses_before_ready(run, tmp_path):  # noqa: F811
    r = run(tmp_path, start="block")
    r.shim.send(r.bridge.CMD_TOKENIZE, 4, {"op": "tokenize", "prompt": "x"})
    err = r.shim.wait_for(r.bridge.EV_ERROR, 4)["meta"]
    assert err["status"] == 503 and "starting" in err["message"]
    fake_backend.RELEASE.set()
