"""Writes the stop-string / streamed-output references for detok.Output.

Usage: make_output_reference.py [DEFAULT_MODEL_DIR]

DEFAULT_MODEL_DIR defaults to models/SmolLM2-135M-Instruct at the module
root. Runs offline: tokenizers are loaded from local directories only.

Writes, next to this script:
  spm/<name>/tokenizer.json, tokenizer_config.json
      the SentencePiece byte-fallback tokenizers of make_reference.py
      (trained here, then loaded back from these copies), so the Go test
      needs neither the venv nor a re-training;
  output_reference.json
      {"cases": [...]}; each case names its tokenizer ("default" is the
      model directory, the others are spm/<name>) and holds the prompt ids,
      the output ids split into engine steps, the sampling parameters
      (stop, include_stop_str_in_output, min_tokens, skip_special_tokens,
      spaces_between_special_tokens), whether the last step is
      stop-terminated and whether it finishes the request, and what vLLM's
      own detokenizer (IncrementalDetokenizer.from_new_request, i.e.
      FastIncrementalDetokenizer) produced: the delta text of
      get_next_output_text(finished, delta=True) and num_output_tokens()
      after each processed step, the matched stop string (processing stops
      there, as the engine would), output_token_ids and output_text.
"""

import json
import logging
import os
import random
import shutil
import sys
import tempfile
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_reference import TEXTS, train_sentencepiece  # noqa: E402
from transformers import AutoTokenizer, TokenizersBackend  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.engine.detokenizer import (  # noqa: E402
    FastIncrementalDetokenizer,
    IncrementalDetokenizer,
)

# The invalid-prefix resets of random-id cases are expected.
logging.getLogger("vllm.v1.engine.detokenizer").setLevel(logging.ERROR)

OPTS = [(True, True), (False, True), (False, False), (True, False)]

# Texts written around stop strings (multi-byte, combining marks, code,
# whitespace runs, chat markup).
STOP_TEXTS = [
    "答案是四十二。然后我们继续。最后一句。",
    "I feel great 🙂 today, 🙂🙂 really 🙂!",
    "Party 🎉🎉 and more 🎉 at the end",
    "```python\nprint('hi')\n```\nDone. More text after the fence.",
    "Thought: search\nAction: lookup\nObservation: found it\n\nFinal Answer: 42",
    "<answer>yes</answer> trailing words</answer>",
    "e\u0301e\u0301 combining vs é precomposed, n\u0303o\u0308",
    "a    b\t\t\tc\n\n\n\nd     e",
    "你好世界，世界你好。世界！",
    "User: hi\nAssistant: hello\nUser: bye\nAssistant:",
    "STOP stop Stop sToP STOPSTOP",
    "1. one\n2. two\n3. three\n4. four",
    "def f(x):\n    return x  # END\n\ndef g():\n    pass  # END",
    "Ünïcödé wörds ünd mörë wörds",
    "abcabcabcabd abcd",
]

FIXED_STOPS = [
    "。", "🙂", "🎉", "世界", "\u0301", "é", "\n\n", "  ", "```", "</answer>",
    "<|im_end|>", "im_end", "\ufffd", "END", "Observation:", "\t", "!", ".",
    "ö", "🙂!", "ab", "abd",
]


def load(d):
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert isinstance(tok, TokenizersBackend), type(tok)
    return tok


def detokenizer(tok, prompt, stop, include, min_tokens, skip, spaces):
    sp = SamplingParams(
        max_tokens=None,
        stop=stop,
        include_stop_str_in_output=include,
        min_tokens=min_tokens,
        skip_special_tokens=skip,
        spaces_between_special_tokens=spaces,
    )
    req = SimpleNamespace(
        request_id="ref", sampling_params=sp, prompt_token_ids=list(prompt), prompt_embeds=None
    )
    det = IncrementalDetokenizer.from_new_request(tok, req)
    assert isinstance(det, FastIncrementalDetokenizer), type(det)
    return det


def plain_pieces(tok, prompt, out, skip, spaces):
    """Text per output token without stop strings (to pick stop strings)."""
    det = detokenizer(tok, prompt, None, False, 0, skip, spaces)
    pieces = []
    for t in out:
        prev = len(det.output_text)
        det.update([t], False)
        pieces.append(det.output_text[prev:])
    return pieces


def run(tok, case):
    det = detokenizer(
        tok, case["prompt"], case["stop"], case["include"], case["min_tokens"],
        case["skip"], case["spaces"],
    )
    deltas, ntoks, stop = [], [], None
    steps = case["steps"]
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        s = det.update(list(step), case["stop_terminated"] and last)
        finished = s is not None or (last and case["finish"])
        deltas.append(det.get_next_output_text(finished, True))
        ntoks.append(det.num_output_tokens())
        if s is not None:
            stop = s
            break
    case["deltas"] = deltas
    case["num_tokens"] = ntoks
    case["matched"] = stop
    case["token_ids"] = list(det.output_token_ids)
    case["text"] = det.output_text


def split_steps(rng, ids, mode):
    if mode in (1, 2, 3):
        return [ids[i : i + mode] for i in range(0, len(ids), mode)]
    steps, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3])
        steps.append(ids[i : i + n])
        i += n
    return steps


def pick_stops(rng, pieces, kind):
    """Stop strings from the plain output text, chosen by kind."""
    text = "".join(pieces)
    bounds, pos = [], 0
    for p in pieces:
        pos += len(p)
        bounds.append(pos)
    inner = [b for b in bounds if 0 < b < len(text)]

    def straddle(maxlen):
        if not inner:
            return None
        b = rng.choice(inner)
        a = rng.randrange(max(0, b - maxlen + 1), b)
        e = rng.randrange(b + 1, min(len(text), a + maxlen) + 1)
        return text[a:e]

    def substring(maxlen):
        if not text:
            return None
        a = rng.randrange(len(text))
        return text[a : a + rng.randrange(1, maxlen + 1)]

    def mid_token():
        # Strictly inside one token's text when a token has 3+ characters.
        long = [(i, p) for i, p in enumerate(pieces) if len(p) >= 3]
        if not long:
            return substring(2)
        i, p = rng.choice(long)
        a = rng.randrange(1, len(p) - 1)
        return p[a : rng.randrange(a + 1, len(p))]

    if kind == "straddle":
        s = straddle(rng.choice([2, 3, 5, 8]))
        return [s] if s else []
    if kind == "midtoken":
        s = mid_token()
        return [s] if s else []
    if kind == "fixed":
        present = [s for s in FIXED_STOPS if s in text]
        pool = present if present and rng.random() < 0.8 else FIXED_STOPS
        return rng.sample(pool, min(len(pool), rng.choice([1, 1, 2, 3])))
    if kind == "later_first":
        # Two stop strings; the one listed second completes earlier.
        a = straddle(3) or substring(3)
        b = substring(4)
        if not a or not b:
            return [s for s in (a, b) if s]
        ia, ib = text.find(a), text.find(b)
        ea, eb = ia + len(a), ib + len(b)
        return [a, b] if eb < ea else [b, a]
    if kind == "suffix_tie":
        # A stop string and one of its suffixes end at the same place.
        s = straddle(5) or substring(5)
        if not s or len(s) < 2:
            return [s] if s else []
        suf = s[rng.randrange(1, len(s)) :]
        return [suf, s] if rng.random() < 0.5 else [s, suf]
    if kind == "long":
        s = substring(rng.randrange(10, 25))
        return [s, "never-ever-present-stop"] if s else ["never-ever-present-stop"]
    if kind == "absent":
        tail = text[-2:] if len(text) >= 2 else "x"
        return rng.choice([["ZZZ_NOT_PRESENT_ZZZ"], [tail + "\u2603"], ["🙃🙃", "。。。"]])
    if kind == "none":
        return []
    raise ValueError(kind)


KINDS = ["straddle", "midtoken", "fixed", "later_first", "suffix_tie", "long", "absent", "none"]


def make_cases(name, tok, texts, rng, eos_ids, special_ids, n_random):
    cases = []

    def add(cname, prompt, out, k, kind, insert_special=False):
        skip, spaces = OPTS[k % len(OPTS)]
        out = list(out)
        if insert_special and special_ids:
            for _ in range(rng.randrange(1, 4)):
                out.insert(rng.randrange(len(out) + 1), rng.choice(special_ids))
        term = rng.random() < 0.3
        if term:
            # EOS, or a user stop_token_id that is an ordinary token.
            out.append(rng.choice(eos_ids) if rng.random() < 0.7 else out[-1] if out else eos_ids[0])
        pieces = plain_pieces(tok, prompt, out, skip, spaces)
        stop = pick_stops(rng, pieces, kind)
        r = rng.random()
        if r < 0.55:
            min_tokens = 0
        elif r < 0.9:
            min_tokens = rng.randrange(1, max(2, len(out)))
        else:
            min_tokens = len(out) + rng.randrange(0, 3)
        case = {
            "name": f"{name}/{cname}/{kind}",
            "tokenizer": name,
            "prompt": list(prompt),
            "steps": split_steps(rng, out, rng.choice([1, 2, 3, 0, 0])),
            "stop": stop,
            "include": rng.random() < 0.4,
            "min_tokens": min_tokens,
            "skip": skip,
            "spaces": spaces,
            "stop_terminated": term,
            "finish": term or rng.random() < 0.8,
        }
        run(tok, case)
        cases.append(case)

    k = 0
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            continue
        kind = KINDS[k % len(KINDS)]
        add(f"text{i}/whole", [], ids, k, kind)
        k += 1
        p = rng.randrange(0, len(ids))
        kind = KINDS[(k * 3) % len(KINDS)]
        add(f"text{i}/split{p}", ids[:p], ids[p:], k, kind, insert_special=(i % 3 == 0))
        k += 1
    for i in range(n_random):
        n = rng.randrange(1, 40)
        out = [rng.randrange(len(tok)) for _ in range(n)]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 4))]
        add(f"random{i}", prompt, out, i, KINDS[i % len(KINDS)])
    return cases


def main():
    root = os.path.dirname(os.path.dirname(HERE))
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "models", "SmolLM2-135M-Instruct")
    rng = random.Random(20261203)
    cases = []

    tok = load(model_dir)
    specials = [i for i in range(len(tok)) if i in tok.added_tokens_decoder]
    eos = [tok.eos_token_id, 0]
    cases += make_cases("default", tok, TEXTS + STOP_TEXTS, rng, eos, specials, 20)

    spm_dir = os.path.join(HERE, "spm")
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in train_sentencepiece(tmp, random.Random(7)):
            dst = os.path.join(spm_dir, name)
            os.makedirs(dst, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(d, f), os.path.join(dst, f))
    for name in ("spm_llama", "spm_gemma", "spm_metaspace"):
        tok = load(os.path.join(spm_dir, name))
        texts = STOP_TEXTS + TEXTS[:: 3 if name == "spm_llama" else 5]
        cases += make_cases(name, tok, texts, rng, [2], [0, 1, 2], 6)

    out = os.path.join(HERE, "output_reference.json")
    with open(out, "w") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    matched = sum(c["matched"] is not None for c in cases)
    print(f"wrote {out}: {len(cases)} cases, {matched} with a stop match, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
