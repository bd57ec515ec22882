#!/usr/bin/env python3
"""Tiny load generator (until `govllm bench`, issue 7): N concurrent streaming chat requests of
max_tokens tokens each (ignore_eos, greedy) against an OpenAI-compatible server; prints output
tokens/s over the wall time of the batch and the median time to first token.

Usage: scripts/loadgen.py URL CONCURRENCY MAX_TOKENS
"""
import json, sys, threading, time, urllib.request

url, conc, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = []

def one(i):
    body = json.dumps({"messages": [{"role": "user", "content": f"Tell me a story about dragon number {i}."}],
                       "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter(); ttft = None; toks = 0
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c.get("usage"):
                toks = c["usage"]["completion_tokens"]
            elif ttft is None and any(ch["delta"].get("content") for ch in c["choices"]):
                ttft = time.perf_counter() - t0
    results.append((ttft, toks, time.perf_counter() - t0))

start = time.perf_counter()
ts = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.perf_counter() - start
toks = sum(r[1] for r in results)
ttfts = sorted(r[0] for r in results)
print(json.dumps({"concurrency": conc, "output_tokens": toks, "wall_s": round(wall, 2),
                  "tokens_per_s": round(toks / wall, 1), "ttft_p50_s": round(ttfts[len(ttfts)//2], 3)}))
