"""Embeddings: the bridge-side helpers (govllm/embedding.py) and the transformers pooling runner
against a plain transformers forward pass with sentence-transformers' pooling done by hand."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from govllm import embedding
from govllm.backend import EngineConfig, RequestError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
TEXTS = ["Hello, the quick brown fox jumps over the lazy dog!", "cat", "two words", "the sky is blue " * 5]


# ------------------------------------------------------------------ helpers without a model


def _unpack(meta: bytes) -> tuple[dict, np.ndarray]:
    (n,) = struct.unpack_from("<I", meta)
    header = json.loads(meta[4:4 + n])
    data = np.frombuffer(meta[4 + n:], dtype="<f4")
    if "error" in header:
        return header, data
    return header, data.reshape(header["count"], header["dim"])


def test_pack_round_trip():
    vecs = [np.array([1.0, -2.5, 3.25], dtype=np.float32), np.array([0.0, 1e-7, -1e7], dtype=np.float32)]
    header, rows = _unpack(embedding.pack(vecs, 9))
    assert header == {"count": 2, "dim": 3, "prompt_tokens": 9}
    np.testing.assert_array_equal(rows, np.stack(vecs))


def test_pack_error():
    header, data = _unpack(embedding.pack_error(400, "BadRequestError", "no", "input"))
    assert header == {"error": {"status": 400, "type": "BadRequestError", "message": "no", "param": "input"}}
    assert data.size == 0


def test_parse_command():
    cmd = embedding.parse_command(json.dumps({"request_id": "embd-1", "inputs": [{"text": "a"}, {"token_ids": [1, 2]}],
                                              "dimensions": 8}).encode())
    assert cmd == embedding.EmbedCommand("embd-1", ["a", [1, 2]], 8)
    with pytest.raises(RequestError):
        embedding.parse_command(b"{}")


@pytest.mark.parametrize("dims, info, message", [
    (8, embedding.EmbeddingInfo(64, 100), "does not support Matryoshka"),
    (65, embedding.EmbeddingInfo(64, 100, True, None), "range [1, 64]"),
    (24, embedding.EmbeddingInfo(64, 100, True, [16, 32, 64]), "dimensions [16, 32, 64], got 24"),
])
def test_check_dimensions_refuses(dims, info, message):
    with pytest.raises(RequestError) as exc:
        embedding.check_dimensions(dims, info, "m")
    assert message in str(exc.value) and exc.value.param == "dimensions"


def test_check_dimensions_accepts():
    embedding.check_dimensions(None, embedding.EmbeddingInfo(64, 100), "m")
    embedding.check_dimensions(32, embedding.EmbeddingInfo(64, 100, True, [16, 32, 64]), "m")
    embedding.check_dimensions(5, embedding.EmbeddingInfo(64, 100, True, None), "m")


def test_token_inputs():
    enc = lambda text: [2] + [10 + len(w) for w in text.split()] + [3]  # noqa: E731
    assert embedding.token_inputs(["ab c", [5, 6]], enc, 8, 100) == [[2, 12, 11, 3], [5, 6]]
    for inputs, word in (([[]], "empty"), ([list(range(9))], "maximum context length is 8"), ([[5, 100]], "vocabulary")):
        with pytest.raises(RequestError) as exc:
            embedding.token_inputs(inputs, enc, 8, 100)
        assert word in str(exc.value) and exc.value.param == "input"


def test_matryoshka_from_config():
    assert embedding.matryoshka_from_config({"matryoshka_dimensions": [8, 16]}) == (True, [8, 16])
    assert embedding.matryoshka_from_config({"is_matryoshka": True}) == (True, None)
    assert embedding.matryoshka_from_config({}) == (False, None)


class _GenerateBackend:
    runner = "generate"


def test_generate_runner_refuses(loop):
    meta = loop.run_until_complete(embedding.embed(_GenerateBackend(), b'{"inputs":[{"text":"a"}]}', 1, "m"))
    header, _ = _unpack(meta)
    assert header["error"]["status"] == 400 and "--runner pooling" in header["error"]["message"]


# ------------------------------------------------------------------ the transformers pooling runner


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("embed-model")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_embedding_model.py"), "--out", str(out)],
                   check=True)
    return str(out)


@pytest.fixture(scope="module")
def pooling_backend(embed_model, loop):
    from govllm.backends import hf_transformers

    b = hf_transformers.create(EngineConfig(model=embed_model, dtype="float32", device="cpu", max_num_seqs=3,
                                            extra={"runner": "pooling"}))
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.shutdown())


def _reference(model_dir: str, texts: list[str], dims: int | None = None) -> np.ndarray:
    """transformers' own forward pass, one text at a time, mean-pooled and normalised by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            v = hidden.mean(dim=0)[:dims]
            rows.append((v / v.norm()).numpy())
    return np.stack(rows)


def test_pooling_config_read(pooling_backend):
    assert (pooling_backend.pooling, pooling_backend.normalize) == ("mean", True)
    info = pooling_backend.embedding_info()
    assert (info.size, info.matryoshka, info.matryoshka_dimensions) == (64, True, [16, 32, 64])
    assert pooling_backend.max_model_len() == 128


@pytest.mark.parametrize("dims", [None, 16])
def test_pooling_matches_reference(pooling_backend, embed_model, loop, dims):
    data = json.dumps({"inputs": [{"text": t} for t in TEXTS], "dimensions": dims}).encode()
    header, rows = _unpack(loop.run_until_complete(embedding.embed(pooling_backend, data, 7, "m")))
    assert "error" not in header, header
    ref = _reference(embed_model, TEXTS, dims)
    assert rows.shape == ref.shape == (len(TEXTS), dims or 64)
    np.testing.assert_allclose(rows, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert header["prompt_tokens"] == sum(len(pooling_backend.encode(t)) for t in TEXTS)


def test_pooling_token_ids_equal_text(pooling_backend, loop):
    ids = pooling_backend.encode(TEXTS[0])
    a = loop.run_until_complete(embedding.embed(pooling_backend, json.dumps({"inputs": [{"text": TEXTS[0]}]}).encode(), 1, "m"))
    b = loop.run_until_complete(embedding.embed(pooling_backend, json.dumps({"inputs": [{"token_ids": ids}]}).encode(), 2, "m"))
    np.testing.assert_array_equal(_unpack(a)[1], _unpack(b)[1])


def test_pooling_refuses_generation_and_long_inputs(pooling_backend, loop):
    with pytest.raises(RequestError) as exc:
        pooling_backend.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "--runner" in str(exc.value)
    header, _ = _unpack(loop.run_until_complete(
        embedding.embed(pooling_backend, json.dumps({"inputs": [{"token_ids": [5] * 129}]}).encode(), 3, "m")))
    assert header["error"]["param"] == "input" and "maximum context length is 128" in header["error"]["message"]


def test_read_pooling_config_defaults(tmp_path):
    from govllm.backends.hf.embedding import read_pooling_config

    assert read_pooling_config(str(tmp_path), ["BertModel"]) == ("cls", True)
    assert read_pooling_config(str(tmp_path), ["LlamaForCausalLM"]) == ("last", True)
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "p"}]))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling_config(str(tmp_path), ["BertModel"]) == ("cls", False)
