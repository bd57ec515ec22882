"""The transformers backend with the pooling runner (``extra["runner"] == "pooling"``): embeddings.

The model is transformers' ``AutoModel`` (the encoder without a head) in eval mode; each
request's inputs are padded into batches of at most ``max_num_seqs`` (default 32), run on one
worker thread (the loop never waits on a forward pass; requests take turns), and pooled as the
model's sentence-transformers config says (``modules.json`` -> ``1_Pooling/config.json``: CLS,
mean or last token), truncated to ``dimensions`` (Matryoshka) and L2-normalised when the module
list has a Normalize step (no ``modules.json``: normalised, vLLM's default). Pooling and
normalisation follow vLLM's order: pool, truncate, normalise. Without a pooling config the
pooling is vLLM's default for the architecture: last token for ``*ForCausalLM``, else CLS.

Chat and completions are refused (400 naming the runner), as vLLM refuses them on a pooling model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
from typing import Any, AsyncIterator

from ...backend import EngineConfig, EngineDeadError, RequestError, SamplingParams
from ...embedding import POOLING_RUNNER_MESSAGE, RUNNER_POOLING, EmbeddingInfo, matryoshka_from_config
from . import loading

log = logging.getLogger("govllm.transformers")

ENGINE_NAME = "transformers"
POOLING_TYPES = ("cls", "mean", "last")
# sentence-transformers' Pooling module names (vLLM's _ST_POOLING_MODULE_TYPES) and Normalize ones.
_ST_POOLING = ("sentence_transformers.models.Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling")
_ST_NORMALIZE = ("sentence_transformers.models.Normalize",
                 "sentence_transformers.sentence_transformer.modules.normalize.Normalize")
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last",
             "cls": "cls", "mean": "mean", "lasttoken": "last"}


def read_pooling_config(model_dir: str, architectures: list[str]) -> tuple[str, bool]:
    """(pooling type, normalize) from the model's sentence-transformers modules, else vLLM's defaults."""
    default = "last" if any(a.endswith("ForCausalLM") for a in architectures) else "cls"
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return default, True
    with open(modules_path, encoding="utf-8") as f:
        modules = json.load(f)
    normalize = any(m.get("type") in _ST_NORMALIZE for m in modules)
    pooling = next((m for m in modules if m.get("type") in _ST_POOLING), None)
    if pooling is None:
        return default, normalize
    with open(os.path.join(model_dir, pooling.get("path") or "", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    modes = [cfg["pooling_mode"]] if isinstance(cfg.get("pooling_mode"), str) else \
        [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
    if not modes:
        return default, normalize
    if len(modes) > 1 or modes[0] not in _ST_MODES:
        raise RuntimeError(f"the pooling config of {model_dir} asks for {modes}: the transformers backend pools "
                           f"with one of cls, mean or lasttoken")
    return _ST_MODES[modes[0]], normalize


def pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """One vector per row of ``hidden`` [batch, seq, dim] under ``mask`` [batch, seq] (right padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(dim=1).long() - 1
        return hidden[range(hidden.shape[0]), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class TransformersEmbeddingBackend:
    name = ENGINE_NAME
    runner = RUNNER_POOLING
    structured_outputs = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.extra = dict(config.extra or {})
        self.model: Any = None
        self.tokenizer: Any = None
        self.pooling = "cls"
        self.normalize = True
        self.device = ""
        self._info: EmbeddingInfo | None = None
        self._max_model_len = 0
        self._batch = max(1, int(config.max_num_seqs or 0) or 32)
        self._pad_id = 0
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="govllm-embed")
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._load)
        except asyncio.CancelledError:
            self._closed = True
            raise

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoConfig, AutoModel

        cfg = self.config
        self.device = loading.resolve_device(cfg.device)
        dtype = loading.resolve_dtype(cfg.dtype, self.device)
        if self.device.startswith("cpu") and self.extra.get("num_threads"):
            torch.set_num_threads(int(self.extra["num_threads"]))
        hf_config = AutoConfig.from_pretrained(cfg.model)
        self.pooling, self.normalize = read_pooling_config(cfg.model, list(getattr(hf_config, "architectures", None) or []))
        self.tokenizer = loading.load_tokenizer(cfg.model, self.extra.get("tokenizer"))
        attn = str(self.extra.get("attn_implementation") or "sdpa")
        model = AutoModel.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn)
        if self._closed:
            raise RuntimeError("the transformers backend was shut down while loading")
        self.model = model.to(self.device).eval()
        text_config = hf_config.get_text_config()
        model_len = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        max_len = int(cfg.max_model_len or 0) or model_len or 512
        if model_len and max_len > model_len:
            log.warning("max_model_len %d is above the model's %d: using %d", max_len, model_len, model_len)
            max_len = model_len
        self._max_model_len = max_len
        matryoshka, dims = matryoshka_from_config(hf_config)
        self._info = EmbeddingInfo(size=int(text_config.hidden_size),
                                   vocab_size=int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer)),
                                   matryoshka=matryoshka, matryoshka_dimensions=dims)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        log.info("transformers pooling runner: %s on %s (%s), pooling %s, normalize %s, max_model_len %d, batch %d",
                 cfg.model, self.device, str(dtype).removeprefix("torch."), self.pooling, self.normalize, max_len,
                 self._batch)

    def health(self) -> None:
        if self._closed:
            raise EngineDeadError("the transformers engine is shut down")
        if self.model is None:
            raise EngineDeadError("the transformers engine is not started")

    async def shutdown(self) -> None:
        self._closed = True
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.model = None

    def num_running(self) -> int:
        return -1

    # ------------------------------------------------------------------ what the bridge asks

    def max_model_len(self) -> int:
        return self._max_model_len

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                            ) -> list[int]:
        raise RequestError(POOLING_RUNNER_MESSAGE, param="model")

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str
                       ) -> AsyncIterator[Any]:
        raise RequestError(POOLING_RUNNER_MESSAGE, param="model")
        yield  # an async generator, as the bridge iterates it

    def embedding_info(self) -> EmbeddingInfo:
        assert self._info is not None
        return self._info

    async def embed(self, token_ids: list[list[int]], dimensions: int | None, request_id: str) -> list[Any]:
        """One vector per input, computed on the worker thread; a cancelled request stops at its next batch."""
        self.health()
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._worker, self._forward, token_ids, dimensions,
                                                            cancelled)
        try:
            return await future
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except RuntimeError as exc:
            if self._closed:
                raise EngineDeadError(f"the transformers engine is shut down: {exc}") from exc
            raise

    def _forward(self, token_ids: list[list[int]], dimensions: int | None, cancelled: threading.Event) -> list[Any]:
        import torch

        out: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(token_ids), self._batch):
                if cancelled.is_set() or self._closed:
                    raise RuntimeError("embedding stopped: the request was cancelled or the engine shut down")
                chunk = token_ids[start:start + self._batch]
                width = max(len(ids) for ids in chunk)
                ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, :len(seq)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                vectors = pool(hidden, mask, self.pooling).float()
                if dimensions is not None:
                    vectors = vectors[:, :dimensions]
                if self.normalize:
                    vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
                out.extend(vectors.cpu().numpy())
        return out
