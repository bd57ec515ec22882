"""Shared fixtures: engine/python on sys.path, the default model, one event loop per session."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

import pytest

PYTHON_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = PYTHON_DIR.parents[1]
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def model_path() -> str:
    path = pathlib.Path(os.environ.get("GOVLLM_TEST_MODEL") or DEFAULT_MODEL)
    if not (path / "config.json").is_file():
        pytest.skip(f"no model at {path}: run scripts/bootstrap (or set GOVLLM_TEST_MODEL)")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def loop():
    """One event loop for the whole session: the backend's handlers are bound to it."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def backend(model_path, loop):
    """The transformers backend on the default model, for the session (loading costs seconds).

    float32 by default, also on CUDA: batch invariance of greedy decoding is only meaningful there
    (GOVLLM_TEST_DTYPE=auto runs the suite in bfloat16 on CUDA).
    """
    import time

    from govllm.backend import EngineConfig
    from govllm.backends import hf_transformers

    cfg = EngineConfig(model=model_path, max_num_seqs=64, seed=1234, device=os.environ.get("GOVLLM_TEST_DEVICE", ""),
                       dtype=os.environ.get("GOVLLM_TEST_DTYPE", "float32"))
    b = hf_transformers.create(cfg)
    t0 = time.perf_counter()
    loop.run_until_complete(b.start())
    print(f"\n[transformers backend] started in {time.perf_counter() - t0:.1f}s on {b.device}, "
          f"attention {b.model.config._attn_implementation}, max_model_len {b.max_model_len()}")
    yield b
    loop.run_until_complete(b.shutdown())


@pytest.fixture(scope="session")
def ref_model(model_path):
    """The same checkpoint outside the manager, for reference forwards (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()
