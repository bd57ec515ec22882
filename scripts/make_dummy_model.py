"""Write a Llama config without weights for `--load-format dummy`: the engine builds the model with
random weights, so tests and benchmarks measure the engine and the frontend, not a model.

Shapes (--shape):
  tiny          2 layers, hidden 128 (the default; what tests use). head_dim is 32, the smallest
                vLLM's CPU attention backend accepts.
  micro         1 layer, hidden 64, 2 heads of 32: the cheapest engine step with the default
                model's vocabulary, so that serving overhead dominates (scripts/bench-side-by-side).
  llama-3.2-1b  Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
                vocabulary 128256, tied embeddings): ~1.24 B parameters, for GPU benchmarks. Rope
                scaling is left out: it changes no shape or cost.

It reuses the given tokenizer and chat template (for llama-3.2-1b, token ids past that tokenizer's
vocabulary decode to nothing; benchmarks send token ids and ignore EOS).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAMA_3_2_1B = {
    **TINY,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
MICRO = {
    **TINY,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
SHAPES = {"tiny": TINY, "micro": MICRO, "llama-3.2-1b": LLAMA_3_2_1B}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write(out: pathlib.Path, shape: str, tokenizer_from: pathlib.Path | None) -> None:
    config = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES if tokenizer_from else ():
        src = tokenizer_from / name
        if src.exists():
            shutil.copyfile(src, out / name)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_weights(out: pathlib.Path, seed: int) -> None:
    """Seeded random weights saved beside the config, for servers that cannot build a model from a
    config alone (transformers serve): every server then loads the very same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(out)
    dtype = getattr(config, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", type=pathlib.Path,
                        help="a model directory whose tokenizer files are copied (none: the engine's fallback)")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--weights", action="store_true",
                        help="also save seeded random weights (model.safetensors) instead of leaving them to the engine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.shape, args.tokenizer_from)
    if args.weights:
        write_weights(args.out, args.seed)


if __name__ == "__main__":
    main()
