"""load_format=dummy, the byte-level tokenizer, and scripts/bench_transformers_gpu.py at tiny sizes."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from govllm.backend import EngineConfig, RequestError, SamplingParams
from govllm.backends import hf_transformers
from helpers import collect, greedy
from hf_helpers import PARIS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]

# ----------------------------------------------------------------------------- load_format=dummy


@pytest.fixture(scope="module")
def tiny_dummy_dir(model_path, tmp_path_factory) -> pathlib.Path:
    """scripts/make_dummy_model.py's tiny Llama config (no weights), with the default model's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-dummy")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_dummy_model.py"), "--tokenizer-from",
                    model_path, "--out", str(out)], check=True)
    return out


def _dummy_backend(path, seed=7, **extra):
    cfg = EngineConfig(model=str(path), max_model_len=256, seed=seed, dtype="float32", device="cpu",
                       extra={"load_format": "dummy", "kv_cache_gib": 0.05, **extra})
    return hf_transformers.create(cfg)


def test_load_format_dummy(loop, tiny_dummy_dir, tmp_path):
    """Random weights for a config.json: the right shape, seeded, and they generate the tokens asked for."""
    import torch

    b = _dummy_backend(tiny_dummy_dir)
    loop.run_until_complete(b.start())
    try:
        cfg = b.model.config
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (128, 2, 49152)
        weight = b.model.get_input_embeddings().weight
        assert weight.std().item() > 1e-3, "weights should be random, not zeros"
        prompt = b.encode("Hello there")
        out = collect(loop, b, prompt, greedy(10, ignore_eos=True), "dummy")[0]
        assert out["finish"] == "length" and len(out["ids"]) == 10
        again = collect(loop, b, prompt, greedy(10, ignore_eos=True), "dummy-2")[0]
        assert again["ids"] == out["ids"]
        sampled = collect(loop, b, prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=1, logprobs=1,
                                                           presence_penalty=0.5), "dummy-3")[0]
        assert len(sampled["ids"]) <= 5
        assert len(sampled["logprobs"]) == len(sampled["ids"]) and all(len(r["ids"]) == 2 for r in sampled["logprobs"])
        assert b.tokenizer_dir() == str(tiny_dummy_dir)  # the tokenizer copied next to config.json
    finally:
        loop.run_until_complete(b.shutdown())

    # The same seed gives the same weights; another seed others.
    def embedding(seed):
        model = hf_transformers.load_model(str(tiny_dummy_dir), "dummy", torch.float32, "cpu", "sdpa", seed=seed)
        return model.get_input_embeddings().weight

    assert torch.equal(embedding(3), embedding(3)) and not torch.equal(embedding(3), embedding(4))

    # A directory with only config.json: a byte-level tokenizer stands in.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_dummy_dir / "config.json", bare / "config.json")
    b = _dummy_backend(bare)
    loop.run_until_complete(b.start())
    try:
        prompt = b.encode("héllo 🙂")
        assert prompt == list("héllo 🙂".encode())
        out = collect(loop, b, prompt, greedy(4, ignore_eos=True), "bare")[0]
        assert len(out["ids"]) == 4
        with pytest.raises(RequestError, match="chat template"):
            b.apply_chat_template(PARIS)
        # No tokenizer.json in the directory: Go gets the byte-level stand-in, saved for it
        saved = pathlib.Path(b.tokenizer_dir())
        assert saved != bare and (saved / "tokenizer.json").is_file() and b.tokenizer_dir() == str(saved)
        from tokenizers import Tokenizer

        assert Tokenizer.from_file(str(saved / "tokenizer.json")).decode(prompt) == "héllo 🙂"
    finally:
        loop.run_until_complete(b.shutdown())
    assert not saved.exists(), "shutdown removes the saved tokenizer"

    with pytest.raises(ValueError, match="load_format 'gguf'"):
        loop.run_until_complete(_dummy_backend(tiny_dummy_dir, load_format="gguf").start())


# ----------------------------------------------------------------------------- the GPU benchmark script, on CPU


def test_bench_script_runs_on_cpu(tiny_dummy_dir, tmp_path):
    """scripts/bench_transformers_gpu.py end to end at tiny sizes (its numbers mean nothing here)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_transformers_gpu.py"), "--model", str(tiny_dummy_dir),
           "--device", "cpu", "--dtype", "float32", "--prompt-len", "8", "--batch1-tokens", "8", "--streams", "4",
           "--stream-tokens", "6", "--max-model-len", "128", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| govllm / generate_batch |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["load_format"] == "dummy"
    g = result["govllm"]
    assert g["batch1"]["tokens"] == 8 and g["batch1"]["decode_tokens_per_s"] > 0
    assert g["streams"]["complete"] and g["streams"]["tokens"] == 4 * 6
    assert result["generate_batch"]["complete"] and result["generate_batch"]["tokens"] == 4 * 6
    assert result["ratio"] > 0 and result["bound_tokens_per_s"] > 0
    # tied embeddings counted once: 49152 x 128 + 2 layers x (attention 2 x 128 x (128 + 64) + MLP 3 x 128 x 256
    # + 2 norms) + the final norm, float32
    params = 49152 * 128 + 2 * (2 * 128 * (128 + 64) + 3 * 128 * 256 + 2 * 128) + 128
    assert result["weight_bytes"] == 4 * params


# ----------------------------------------------------------------------------- cancelled start


def test_cancelled_start_never_starts_the_manager(loop, tiny_dummy_dir, monkeypatch):
    """The bridge cancels start() when Go shuts down during the load: the loop is free at once, and
    the loading thread, once its blocking step returns, stops instead of starting the manager."""
    import asyncio
    import threading
    import time

    from govllm.backends.hf import backend as hf_backend

    in_load, release, finished = threading.Event(), threading.Event(), threading.Event()
    real_load_model = hf_backend.loading.load_model

    def slow_load_model(*args, **kwargs):
        in_load.set()
        release.wait(60)
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(hf_backend.loading, "load_model", slow_load_model)
    b = _dummy_backend(tiny_dummy_dir)
    real_load = b._load

    def load():
        try:
            real_load()
        finally:
            finished.set()

    b._load = load

    async def scenario():
        task = asyncio.create_task(b.start())
        while not in_load.is_set():  # imports and the tokenizer come first
            assert not task.done(), task
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await b.shutdown()
        return time.monotonic() - t0

    assert loop.run_until_complete(asyncio.wait_for(scenario(), 120)) < 2, "cancel and shutdown waited for the load"
    release.set()
    assert finished.wait(60)
    assert b.manager is None
    with pytest.raises(Exception, match="shut down"):
        b.health()
