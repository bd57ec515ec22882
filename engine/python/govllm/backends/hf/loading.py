"""Device, dtype, tokenizer and model loading for the transformers backend, and KV cache sizing."""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("govllm.transformers")

_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

# load_format values: "dummy" builds random weights from config.json; the rest load the checkpoint.
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")


def resolve_device(name: str) -> str:
    """"cuda" when available for "" or "auto", else the named device (CUDA must be available for cuda*)."""
    import torch

    name = (name or "").strip().lower()
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return name


def resolve_dtype(name: str, device: str) -> Any:
    """The torch dtype for ``name``; "auto" is bfloat16 on CUDA, float32 elsewhere."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (use auto, float32, float16 or bfloat16)")
    return getattr(torch, _DTYPES[name])


def load_model(path: str, load_format: str, dtype: Any, device: str, attn: str, seed: int | None = None) -> Any:
    """The model of ``path`` on ``device``, in eval mode.

    ``load_format="dummy"``: the architecture of ``path/config.json`` with random weights (transformers'
    own initialisation, from torch's RNG: ``seed`` makes two loads identical), created on the device.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    load_format = (load_format or "auto").strip().lower()
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported by the transformers backend "
                         f"(use one of {', '.join(LOAD_FORMATS)})")
    if load_format == "dummy":
        if seed is not None:
            torch.manual_seed(int(seed))
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        kwargs = {"use_safetensors": False} if load_format == "pt" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str, tokenizer: str | None = None, dummy: bool = False) -> Any:
    """The tokenizer of ``tokenizer`` (``extra["tokenizer"]``), else of the model directory.

    With dummy weights a config-only directory may have none: then a byte-level tokenizer (256 byte
    tokens, no merges, no chat template) stands in, so completions still encode and decode.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer or path)
    except Exception as exc:
        if not dummy or tokenizer:
            raise
        log.warning("no tokenizer in %s (%s): using a byte-level tokenizer", path, exc)
        return byte_tokenizer()


def byte_tokenizer() -> Any:
    """A tokenizer whose ids 0-255 are the bytes of the text (GPT-2's byte-to-character alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = [chr(c) for c in _byte_order()]
    assert set(byte_chars) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _byte_order() -> list[int]:
    """GPT-2's printable stand-in character for each byte value 0-255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return chars


def as_int_list(value: Any) -> list[int]:
    """An int, a list of ints or None (as configs hold token ids) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model: Any, text_config: Any, tokenizer: Any) -> list[int]:
    """EOS ids of the generation config, the model config and the tokenizer, together."""
    eos: list[int] = []
    for source in (getattr(model, "generation_config", None), text_config, model.config):
        eos += as_int_list(getattr(source, "eos_token_id", None))
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    return sorted({t for t in eos if t >= 0})


def kv_bytes_per_token(text_config: Any) -> int:
    """KV cache bytes one token takes in every layer, at float32 (an upper bound)."""
    heads = int(getattr(text_config, "num_attention_heads", 1))
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    layers = int(text_config.num_hidden_layers)
    return 2 * layers * kv_heads * head_dim * 4


def num_blocks(extra: dict[str, Any], text_config: Any, page_size: int, max_len: int, on_cpu: bool) -> int | None:
    """The cache size in blocks: ``extra["num_blocks"]``, else on CPU ``kv_cache_gib`` (default 1 GiB);
    None leaves it to transformers (on CUDA). Never less than one full-length request."""
    blocks = extra.get("num_blocks")
    if blocks is None and on_cpu:
        # transformers would take 90% of the host's memory for a CPU cache.
        budget = float(extra.get("kv_cache_gib", 1.0)) * (1 << 30)
        blocks = max(int(budget // (kv_bytes_per_token(text_config) * page_size)), 1)
    if blocks is None:
        return None
    # A request that cannot fit kills the manager's loop ("No requests can be scheduled ...").
    return max(int(blocks), math.ceil(max_len / page_size) + 1)
