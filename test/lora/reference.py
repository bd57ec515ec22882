"""The e2e LoRA test's reference: greedy generate of the base model and of PEFT's PeftModel.

stdin: {"model": dir, "adapter": dir, "prompts": [text, ...], "max_tokens": n}
stdout: {"prompt_ids": [[...]], "base": [text, ...], "adapter": [text, ...]}, the texts decoded as
transformers decodes (skip_special_tokens), the generation stopping at EOS as generate does.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    req = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(req["model"])
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    prompt_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in req["prompts"]]

    def run(m):
        texts = []
        for ids in prompt_ids:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=req["max_tokens"],
                                 do_sample=False)
            texts.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
        return texts

    base = run(model)
    peft_model = PeftModel.from_pretrained(model, req["adapter"]).eval()
    json.dump({"prompt_ids": prompt_ids, "base": base, "adapter": run(peft_model)}, sys.stdout)


if __name__ == "__main__":
    main()
