"""Hugging Face's own greedy answer, for the equivalence test: model.generate on the same
checkpoint, in this (plain Python) process. Reads a JSON list of prompts on stdin and prints a
JSON list of generated token-id lists, each ending at EOS (included) or at MAX_NEW_TOKENS.

Usage: reference_hf.py MODEL MAX_NEW_TOKENS DEVICE DTYPE < prompts.json
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    model_dir, max_new, device, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    out = []
    for p in json.load(sys.stdin):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for i, t in enumerate(new):  # up to and including EOS, as a server returns it
            if t in eos:
                new = new[: i + 1]
                break
        out.append(new)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
