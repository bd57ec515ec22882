"""vLLM's own answer, for the equivalence test: greedy chat completions through vllm.LLM in
this (plain Python) process. Reads a JSON list of prompts on stdin, prints a JSON list of texts.

Usage: reference.py MODEL MAX_MODEL_LEN MAX_TOKENS < prompts.json
"""

from __future__ import annotations

import json
import os
import sys

# The same engine settings govllm's vllm backend uses on CPU (in-process model, one OMP thread
# per spare core), so both sides run the same kernels.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    model, max_model_len, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    prompts = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    texts = []
    for p in prompts:  # one at a time: batch composition must not be what differs
        out = llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)
        texts.append(out[0].outputs[0].text)
    print(json.dumps(texts))


if __name__ == "__main__":
    main()
