"""Writes byte-exact detokenization references for the Go detok tests.

Usage: make_reference.py OUT_DIR DEFAULT_MODEL_DIR

For each tokenizer (the default model, plus SentencePiece byte-fallback
tokenizers trained here offline) it writes OUT_DIR/<name>/tokenizer.json
(when generated), and OUT_DIR/<name>.json with:
  cases:     prompt ids, output ids, options, transformers' decode of the
             output, and vLLM's FastIncrementalDetokenizer text per token;
  token_text: vllm convert_ids_list_to_tokens for every id;
  logprob:   vLLM LogprobsProcessor._verify_tokens results with context.
"""

import json
import os
import random
import sys
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer, TokenizersBackend  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens  # noqa: E402
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402

OPTS = [(True, True), (False, True), (False, False), (True, False)]

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}",
    "  leading spaces",
    "trailing spaces   ",
    "multiple     spaces\t\ttabs\n\n\nnewlines",
    "\n",
    " ",
    "    ",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "🎉🎊🥳 party time 🚀",
    "👨‍👩‍👧‍👦 family emoji with ZWJ",
    "🇫🇷🇯🇵 flags",
    "e\u0301 combining acute, a\u0308 umlaut, n\u0303",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334 zalgo",
    "مرحبا بالعالم",
    "שלום עולם",
    "Ελληνικά κείμενα",
    "Привет, мир!",
    "3.14159265358979323846264338327950288419716939937510",
    "1234567890 0987654321 100000000000000000000",
    "-42, +7, 1e-10, 0x1F, 0b1010",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "<|endoftext|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more text",
    "<repo_name>govllm<file_sep>main.go<filename>x",
    "café naïve résumé über façade",
    "math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ ≈ ∞",
    "currency: €100 £50 ¥1000 ₹500 ₿",
    "box drawing ┌─┐│└┘ ░▒▓█",
    "\u00a0non-breaking\u00a0space and\u200bzero width",
    "control \x01\x02\x7f chars",
    "replacement \ufffd char literal",
    "<0xE4> literal byte token text",
    "▁ metaspace char literal ▁▁",
    "Ġ and Ċ look like byte-level chars",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "https://example.com/path?q=1&r=two#frag",
    "user@example.com, +1 (555) 123-4567",
    "Mixed 中文 and English and 日本語 and 🎉 emoji",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::",
    "It's can't won't I'm you're we've they'd",
    "hello . world , foo ! bar ? baz 's",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉",
    "𓀀𓀁𓀂 hieroglyphs 𐍈 gothic",
    "ascii art:\n  /\\_/\\\n ( o.o )\n  > ^ <",
    "tab\tseparated\tvalues\n1\t2\t3",
    "\r\nwindows\r\nline endings\r\n",
    "emoji skin tones 👋🏻👋🏽👋🏿",
    "क्षत्रिय हिन्दी देवनागरी",
    "ภาษาไทย ไม่มีช่องว่าง",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
]


def vllm_pieces(tok, prompt, out, skip, spaces):
    sp = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    req = SimpleNamespace(
        request_id="ref", sampling_params=sp, prompt_token_ids=list(prompt), prompt_embeds=None
    )
    det = FastIncrementalDetokenizer(tok, req)
    pieces, prev = [], 0
    for t in out:
        det.update([t], False)
        pieces.append(det.output_text[prev:])
        prev = len(det.output_text)
    return pieces


def make_cases(tok, texts, rng, n_random, special_ids):
    vocab = len(tok)
    cases = []

    def add(name, prompt, out, k):
        skip, spaces = OPTS[k % len(OPTS)]
        cases.append(
            {
                "name": name,
                "prompt": prompt,
                "output": out,
                "skip": skip,
                "spaces": spaces,
                "decode": tok.decode(out, skip_special_tokens=skip),
                "pieces": vllm_pieces(tok, prompt, out, skip, spaces),
            }
        )

    k = 0
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            continue
        add(f"text{i}/whole", [], ids, k)
        k += 1
        p = rng.randrange(0, len(ids) + 1)
        add(f"text{i}/split{p}", ids[:p], ids[p:], k)
        k += 1
        # Slice mid-sequence: may cut a character in half at either end.
        a = rng.randrange(0, len(ids))
        b = rng.randrange(a, len(ids)) + 1
        add(f"text{i}/slice{a}:{b}", ids[:a], ids[a:b], k)
        k += 1
        # Two texts joined by special tokens, with a chat-like prompt.
        other = tok.encode(texts[(i * 7 + 3) % len(texts)], add_special_tokens=False)
        sp = special_ids[i % len(special_ids)]
        add(f"text{i}/special", ids[-3:], [sp] + ids + [sp, sp] + other + [sp], k)
        k += 1
    for i in range(n_random):
        n = rng.randrange(1, 80)
        pool = list(range(vocab))
        out = [rng.choice(pool) if rng.random() > 0.1 else rng.choice(special_ids) for _ in range(n)]
        prompt = [rng.choice(pool) for _ in range(rng.randrange(0, 6))]
        add(f"random{i}", prompt, out, i)
    return cases


def logprob_cases(tok, cases, rng):
    proc = LogprobsProcessor.__new__(LogprobsProcessor)
    proc.tokenizer = tok
    res = []
    for c in cases:
        seq = c["prompt"] + c["output"]
        for i in range(len(seq)):
            if rng.random() > 0.3:
                continue
            ctx = seq[max(0, i - rng.randrange(0, 6)) : i]
            ids = [seq[i], rng.randrange(len(tok))]
            texts = convert_ids_list_to_tokens(tok, ids)
            texts = proc._verify_tokens(texts, ids, ctx[-4:])
            for tid, text in zip(ids, texts):
                res.append({"id": tid, "context": ctx, "text": text})
    return res


def reference(name, tok, texts, rng, n_random, special_ids, out_dir):
    assert isinstance(tok, TokenizersBackend), type(tok)
    cases = make_cases(tok, texts, rng, n_random, special_ids)
    data = {
        "cases": cases,
        "token_text": convert_ids_list_to_tokens(tok, list(range(len(tok)))),
        "logprob": logprob_cases(tok, cases, rng),
    }
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(data, f)


def train_sentencepiece(out_dir, rng):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    words = (
        "the quick brown fox jumps over lazy dog hello world code def return print "
        "import numbers 123 4567 café naïve über résumé"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    lines += ["你好世界 こんにちは 🎉 emoji 😀 ok", "  indented  text  "] * 3
    src = os.path.join(out_dir, "spm_src")
    os.makedirs(src, exist_ok=True)
    corpus = os.path.join(src, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(src, "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tok = LlamaTokenizer.from_pretrained(src)
    llama = os.path.join(out_dir, "spm_llama")
    tok.save_pretrained(llama)
    tj = json.load(open(os.path.join(llama, "tokenizer.json")))
    variants = {"spm_llama": None}
    # Gemma style: no Strip, so the leading space survives.
    gemma = json.loads(json.dumps(tj))
    gemma["decoder"]["decoders"] = [d for d in gemma["decoder"]["decoders"] if d["type"] != "Strip"]
    variants["spm_gemma"] = gemma
    # Plain Metaspace decoder (older Mistral-style exports).
    meta = json.loads(json.dumps(tj))
    meta["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    variants["spm_metaspace"] = meta
    for name, spec in variants.items():
        d = os.path.join(out_dir, name)
        if spec is not None:
            tok.save_pretrained(d)
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                json.dump(spec, f, ensure_ascii=False)
            # transformers 5's LlamaTokenizer rebuilds its decoder in
            # __init__ and ignores tokenizer.json's; the generic backend
            # loads the file as is.
            cfg_path = os.path.join(d, "tokenizer_config.json")
            cfg = json.load(open(cfg_path))
            cfg["tokenizer_class"] = "TokenizersBackend"
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
        yield name, d


def main():
    out_dir, model_dir = sys.argv[1], sys.argv[2]
    rng = random.Random(20261202)
    tok = AutoTokenizer.from_pretrained(model_dir)
    specials = [i for i in range(len(tok)) if i in tok.added_tokens_decoder]
    reference("default", tok, TEXTS, rng, 120, specials, out_dir)
    names = []
    for name, d in train_sentencepiece(out_dir, rng):
        t = AutoTokenizer.from_pretrained(d)
        reference(name, t, TEXTS, rng, 60, [0, 1, 2], out_dir)
        names.append(name)
    print("ok", ["default"] + names)


if __name__ == "__main__":
    main()
