"""Writes reference.json for package tokenize: Hugging Face tokenizers' own ids for many texts.

Usage: make_reference.py [MODEL_DIR]   (default: models/SmolLM2-135M-Instruct at the repo root)

Each case is a text and its ids from tokenizers.Tokenizer.encode with add_special_tokens false
and true; transformers' AutoTokenizer (what vLLM wraps) is checked to agree. Texts: detok's
reference texts, texts around stop strings, their chat-template renderings, and seeded random
strings over letters, digits, punctuation, contractions, every kind of Unicode whitespace,
emoji, CJK, combining marks and the model's special tokens (whole and cut short). Offline.
"""

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "detok", "testdata"))

from make_output_reference import STOP_TEXTS  # noqa: E402
from make_reference import TEXTS  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

PIECES = [
    "a", "Z", "é", "ß", "Ω", "ж", "字", "世界", "🙂", "👨‍👩‍👧", "🇫🇷", "e\u0301", "\u0300", "0", "7", "42", "٣", "½", "Ⅻ",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x", "''", "'", "\"", "!", "?", ".", ",", "-", "--", "_", "#",
    "(", ")", "{", "}", "<", ">", "/", "\\", "|", "@", "$", "%", "^", "&", "*", "+", "=", "~", "`",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u2009",
    "\u200a", "\u200b", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\ufeff", "\x00", "\x1f", "\x7f",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<|", "|>", "<filename>",
    "hello", "world", "The", " the", "don't", "I'm", "can't", "1234567", "3.14", "x=1;", "def", "    ",
]


def random_texts(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        out.append("".join(rng.choice(PIECES) for _ in range(k)))
    return out


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
    raw = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(model, local_files_only=True)
    rng = random.Random(13)
    texts = list(TEXTS) + list(STOP_TEXTS)
    texts += [hf.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
              for t in list(TEXTS)[:40] + list(STOP_TEXTS)]
    texts += ["", " ", "a" * 300, " " * 50 + "x", "\n" * 20, "9" * 100, "🙂" * 30, "x" + "\u0301" * 40]
    texts += random_texts(rng, 700)
    cases = []
    for t in texts:
        plain = raw.encode(t, add_special_tokens=False).ids
        special = raw.encode(t, add_special_tokens=True).ids
        assert hf.encode(t, add_special_tokens=False) == plain, t
        assert hf.encode(t, add_special_tokens=True) == special, t
        cases.append({"text": t, "ids": plain, "special_ids": special})
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump({"model": os.path.basename(model), "cases": cases}, f, ensure_ascii=True, separators=(",", ":"))
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
