"""Write a tiny Llama config (no weights) for `--load-format dummy`: vLLM builds the model with
random weights, so tests and benchmarks measure the engine and the frontend, not a model.

It reuses the default model's tokenizer and chat template. head_dim is 32, the smallest vLLM's
CPU attention backend accepts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

CONFIG = {
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer-from", required=True, type=pathlib.Path)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = args.tokenizer_from / name
        if src.exists():
            shutil.copyfile(src, args.out / name)
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2))


if __name__ == "__main__":
    main()
