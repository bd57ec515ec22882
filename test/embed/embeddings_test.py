"""/v1/embeddings through the openai Python SDK, against the reference forward pass to 1e-4."""

from __future__ import annotations

import base64
import os

import numpy as np
import openai
import pytest

from reference_embed import reference

URL, MODEL, MODEL_DIR = os.environ["GOVLLM_URL"], os.environ["GOVLLM_MODEL"], os.environ["GOVLLM_MODEL_DIR"]
TEXTS = ["Hello, the quick brown fox jumps over the lazy dog!", "cat", "red green blue " * 3, "what is a vector?"]


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=URL + "/v1", api_key=os.environ["GOVLLM_API_KEY"], max_retries=0)


@pytest.fixture(scope="module")
def want() -> np.ndarray:
    return np.array(reference(MODEL_DIR, TEXTS))


def _vector(embedding) -> np.ndarray:
    """A float list, or (encoding_format="base64" asked by the caller: the SDK leaves it) base64."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float64)
    return np.array(embedding)


# None: the SDK's default, which asks for base64 itself and decodes it into floats.
@pytest.mark.parametrize("fmt", ["float", "base64", None])
def test_vectors_equal_reference(client, want, fmt):
    kwargs = {"encoding_format": fmt} if fmt else {}
    resp = client.embeddings.create(model=MODEL, input=TEXTS, **kwargs)
    assert resp.object == "list" and resp.model == MODEL
    if fmt == "base64":
        assert all(isinstance(d.embedding, str) for d in resp.data)
    got = np.array([_vector(d.embedding) for d in resp.data])
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    assert got.shape == want.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(TEXTS)


def test_single_string_and_token_ids(client, want):
    one = client.embeddings.create(model=MODEL, input=TEXTS[1])
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-4)
    # "cat" is [CLS] cat [SEP] in the generated vocabulary: ids 2, then cat's, then 3.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(MODEL_DIR)(TEXTS[1])["input_ids"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids])
    for d in by_ids.data:
        np.testing.assert_allclose(d.embedding, want[1], atol=1e-4)
    assert by_ids.usage.prompt_tokens == 2 * len(ids)
    flat = client.embeddings.create(model=MODEL, input=ids)
    np.testing.assert_allclose(flat.data[0].embedding, want[1], atol=1e-4)


def test_dimensions(client):
    resp = client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=16)
    np.testing.assert_allclose(np.array([d.embedding for d in resp.data]),
                               np.array(reference(MODEL_DIR, TEXTS[:2], 16)), atol=1e-4)


@pytest.mark.parametrize("kwargs, param, words", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": [[5] * 129]}, "input", "maximum context length is 128"),
    ({"input": "cat " * 200}, "input", "maximum context length is 128"),
    ({"input": "cat", "dimensions": 24}, "dimensions", "Matryoshka dimensions [16, 32, 64]"),
    ({"input": "cat", "dimensions": 65}, "dimensions", "[1, 64]"),
    ({"input": "cat", "encoding_format": "int8"}, "encoding_format", "base64"),
    ({"input": "cat", "extra_body": {"truncate_prompt_tokens": 3}}, "truncate_prompt_tokens", "not supported"),
])
def test_bad_requests(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, **kwargs)
    err = exc.value.body
    assert err["param"] == param, err
    assert words in err["message"], err


def test_completions_refused(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert "--runner" in exc.value.body["message"]
