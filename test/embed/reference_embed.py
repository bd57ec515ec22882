"""The reference embeddings: transformers' own forward pass on the checkpoint, one text at a time,
pooled and normalised by hand as its sentence-transformers config says (mean pooling, Normalize).

As a script: ``reference_embed.py MODEL_DIR [--dimensions N] < texts.json`` prints the vectors as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys


def reference(model_dir: str, texts: list[str], dimensions: int | None = None) -> list[list[float]]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    with open(f"{model_dir}/1_Pooling/config.json", encoding="utf-8") as f:
        assert json.load(f)["pooling_mode_mean_tokens"], "the generated model mean-pools"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
            v = hidden.mean(dim=0)
            if dimensions is not None:
                v = v[:dimensions]
            out.append((v / v.norm()).tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--dimensions", type=int)
    args = p.parse_args()
    json.dump(reference(args.model_dir, json.load(sys.stdin), args.dimensions), sys.stdout)


if __name__ == "__main__":
    main()
