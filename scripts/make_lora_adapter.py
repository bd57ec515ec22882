"""Make a PEFT LoRA adapter with seeded random weights for a causal LM, offline.

    python scripts/make_lora_adapter.py --model models/SmolLM2-135M-Instruct --out /tmp/lora-a [--seed 0]

PEFT initialises B to zero (the adapter starts as a no-op); here both A and B are seeded random
normals, scaled so the adapter shifts each projection's output by a few percent: greedy output
departs from the base within a few tokens but stays readable text. The same seed gives the same
adapter_model.safetensors. Rank 8 on q/k/v/o and the MLP projections; saved with save_pretrained
(adapter_config.json + adapter_model.safetensors), the layout vLLM and PEFT both load.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: str, out_dir: str, seed: int = 0, rank: int = 8, std: float = 0.08) -> str:
    """Write the adapter to out_dir and return it. std is each A and B entry's spread: with
    lora_alpha == rank (scale 1) the update B·A·x has about rank·std² times x's size per entry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the base checkpoint directory")
    ap.add_argument("--out", required=True, help="the adapter directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.08)
    args = ap.parse_args()
    print(make_adapter(args.model, args.out, args.seed, args.rank, args.std))


if __name__ == "__main__":
    main()
