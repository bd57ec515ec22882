"""LoRA adapters on the transformers backend (backends/hf/lora.py): greedy output equals PEFT's own
generate, differs from the base model, and stays so when base and adapter requests share steps."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys

import pytest

if importlib.util.find_spec("peft") is None:
    pytest.skip("peft is not installed in this interpreter", allow_module_level=True)

from conftest import REPO_ROOT  # noqa: E402
from govllm.backend import EngineConfig, LoRAModule, UnknownModelError, lora_modules  # noqa: E402
from govllm.backends.hf import lora  # noqa: E402
from helpers import _collect, collect, greedy  # noqa: E402

PROMPT_TEXT = "The capital of France is"
TOKENS = 16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from make_lora_adapter import make_adapter

    root = tmp_path_factory.mktemp("lora")
    return {name: make_adapter(model_path, str(root / name), seed=seed) for name, seed in (("lora-a", 0), ("lora-b", 1))}


@pytest.fixture(scope="module")
def lora_backend(model_path, loop, adapters):
    from govllm.backends import hf_transformers

    cfg = EngineConfig(model=model_path, max_num_seqs=16, seed=1234, device="cpu", dtype="float32",
                       extra={"lora_modules": [{"name": n, "path": p} for n, p in adapters.items()]})
    b = hf_transformers.create(cfg)
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.shutdown())


def peft_greedy(model_path, adapter_dir, prompt_ids, tokens):
    """PEFT's own generate: the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, min_new_tokens=tokens)
    return out[0, len(prompt_ids):].tolist()


def test_adapters_listed(lora_backend, adapters):
    assert [m.name for m in lora_backend.lora_adapters()] == list(adapters)


def test_adapter_equals_peft_and_differs_from_base(loop, lora_backend, adapters, model_path):
    prompt = lora_backend.encode(PROMPT_TEXT)
    base = collect(loop, lora_backend, prompt, greedy(TOKENS, ignore_eos=True), "base")[0]["ids"]
    want = peft_greedy(model_path, adapters["lora-a"], prompt, TOKENS)
    got = loop.run_until_complete(_collect_adapter(lora_backend, prompt, "lora-a", "a"))
    assert got == want
    assert got != base


def test_mixed_steps_match_solo(loop, lora_backend):
    """Base and both adapters together (their tokens packed into the same steps) answer as alone."""
    prompts = [lora_backend.encode(t) for t in (PROMPT_TEXT, "Once upon a time", "def add(a, b):")]
    kinds = [None, "lora-a", "lora-b"]
    solo = {(i, k): loop.run_until_complete(_collect_adapter(lora_backend, p, k, f"solo-{i}-{k}"))
            for i, p in enumerate(prompts) for k in kinds}

    async def together():
        return await asyncio.gather(*(_collect_adapter(lora_backend, p, k, f"mix-{i}-{k}")
                                      for i, p in enumerate(prompts) for k in kinds))

    mixed = loop.run_until_complete(together())
    assert mixed == [solo[(i, k)] for i in range(len(prompts)) for k in kinds]
    assert solo[(0, None)] != solo[(0, "lora-a")] != solo[(0, "lora-b")]


def test_unknown_adapter_is_404(loop, lora_backend, backend):
    prompt = lora_backend.encode(PROMPT_TEXT)
    for b in (lora_backend, backend):  # also the backend without adapters
        with pytest.raises(UnknownModelError) as err:
            loop.run_until_complete(b.submit(prompt, greedy(2), "nope", 1 << 40, adapter="nope"))
        assert err.value.status == 404 and err.value.param == "model"


async def _collect_adapter(backend, prompt, adapter, request_id):
    """The greedy token ids of one request on adapter (None: the base model)."""
    if adapter is None:
        return (await _collect(backend, prompt, greedy(TOKENS, ignore_eos=True), request_id))[0]["ids"]
    submit = backend.submit

    async def with_adapter(*args):
        return await submit(*args, adapter=adapter)

    backend_view = _Bound(backend, with_adapter)
    return (await _collect(backend_view, prompt, greedy(TOKENS, ignore_eos=True), request_id))[0]["ids"]


class _Bound:
    """backend with submit bound to one adapter (what the bridge passes)."""

    def __init__(self, backend, submit):
        self._backend, self.submit = backend, submit

    def __getattr__(self, name):
        return getattr(self._backend, name)

    @property
    def relay(self):
        return self._backend.relay

    @relay.setter
    def relay(self, value):
        self._backend.relay = value


def test_lora_modules_refusals(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text("{}")
    assert lora_modules({"lora_modules": [{"name": "a", "path": str(good)}]}) == [LoRAModule("a", str(good))]
    assert lora_modules({}) == []
    for bad, msg in [
        ({"lora_modules": {"a": "b"}}, "must be a list"),
        ({"lora_modules": [{"name": "a"}]}, "want {name, path}"),
        ({"lora_modules": [{"name": "a", "path": str(good)}, {"name": "a", "path": str(good)}]}, "given twice"),
        ({"lora_modules": [{"name": "a", "path": str(tmp_path)}]}, "no adapter_config.json"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lora_modules(bad)


def test_load_adapter_refuses_what_it_does_not_apply(tmp_path, adapters, lora_backend):
    path = tmp_path / "dora"
    shutil.copytree(adapters["lora-a"], path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_adapter(LoRAModule("dora", str(path)), lora_backend.model, "cpu", lora_backend.dtype)
    assert os.path.isfile(path / "adapter_model.safetensors")
