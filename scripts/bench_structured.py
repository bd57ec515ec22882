"""Tokens/s of json_schema-constrained requests against free ones, govllm beside vllm serve.

Servers (each alone on the machine, started once per interleaved round, the order rotating):
  govllm (vllm)          govllm serve --engine vllm
  vllm serve             python -m vllm.entrypoints.cli.main serve (the same engine and flags)
  govllm (transformers)  govllm serve --engine transformers (xgrammar applied per row in Go's batch)

Per server and concurrency C (--concurrency, default 1,64), two workloads of C x --requests-per-stream
chat requests, greedy, --max-tokens each, C in flight (closed loop):
  free         "List six fruits." with ignore_eos, so outputs run to max_tokens
  json_schema  the same prompt with response_format json_schema: an object whose "items" is an
               array of exactly 6 strings of at most 8 characters (outputs end with the schema;
               their length is what the usage reports)
Reported: output tokens/s (completion tokens the servers reported / wall time), per workload, and
the ratio json_schema/free; medians over the rounds. Every server also runs with
--enable-auto-tool-choice --tool-call-parser hermes (govllm with templates/chatml_tools.jinja) and
answers, once per round, a tool_choice "required" and a named request for get_weather(city, unit):
reported is how many of their calls have arguments that validate against the tool's parameters
(jsonschema). Writes results.json and table.md into --out.

Usage: scripts/bench-structured [--out DIR] [--servers govllm-vllm,vllm-serve,govllm-transformers]
           [--concurrency 1,64] [--rounds-interleaved 3] [--requests-per-stream 2] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_side_by_side as sbs  # noqa: E402  (its server start/stop helpers)

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8},
                             "minItems": 6, "maxItems": 6}},
    "required": ["items"],
    "additionalProperties": False,
}
PROMPT = "List six fruits."
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}}]


def server_argv(key: str, model: Path, port: int, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    py = str(sbs.VENV_BIN / "python")
    env = sbs.cpu_env(0)
    gov = str(sbs.ROOT / "bin" / "govllm")
    common = ["serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(model), "--python", py,
              "--device", "cpu", "--max-model-len", str(args.max_model_len)]
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    common += [*tools, "--chat-template", str(sbs.ROOT / "templates" / "chatml_tools.jinja")]
    if key == "govllm-vllm":
        return [gov, *common, "--engine", "vllm", "--dtype", "float32", "--engine-arg", "enforce_eager=true"], env
    if key == "govllm-transformers":
        return [gov, *common, "--engine", "transformers", "--dtype", "float32"], env
    if key == "vllm-serve":
        env = dict(env)
        shim = sbs.pyshim()
        if shim is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
        return [py, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", model.name, "--max-model-len", str(args.max_model_len), "--enforce-eager",
                "--dtype", "float32", *tools], env
    raise SystemExit(f"unknown server {key!r}")


def body(model: str, workload: str, max_tokens: int) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                         "max_tokens": max_tokens}
    if workload == "free":
        b["ignore_eos"] = True
    else:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": SCHEMA, "strict": True}}
    return b


async def load(base: str, model: str, workload: str, c: int, n: int, max_tokens: int) -> dict[str, Any]:
    """n requests, c in flight; output tokens/s from the servers' usage."""
    queue = list(range(n))
    tokens, errors, invalid = 0, 0, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async def worker() -> None:
            nonlocal tokens, errors, invalid
            while queue:
                queue.pop()
                async with session.post(base + "/v1/chat/completions", json=body(model, workload, max_tokens)) as r:
                    data = await r.json()
                    if r.status != 200:
                        errors += 1
                        continue
                    tokens += data["usage"]["completion_tokens"]
                    if workload == "json_schema":
                        try:
                            json.loads(data["choices"][0]["message"]["content"])
                        except ValueError:
                            invalid += 1  # cut by max_tokens

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.monotonic() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall else None, "errors": errors,
            "invalid_json": invalid}


def forced_calls(base: str, model: str) -> dict[str, Any]:
    """A "required" and a named tool choice: how many calls validate against the parameters."""
    import jsonschema

    out: dict[str, Any] = {}
    for label, choice in (("required", "required"),
                          ("named", {"type": "function", "function": {"name": "get_weather"}})):
        b = {"model": model, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
             "temperature": 0, "max_tokens": 100, "tools": TOOLS, "tool_choice": choice}
        try:
            resp = sbs.http_json(base + "/v1/chat/completions", b)
            calls = resp["choices"][0]["message"].get("tool_calls") or []
        except Exception as exc:  # noqa: BLE001 - a refusal is a result too
            out[label] = {"error": str(exc)[:200]}
            continue
        valid = 0
        for call in calls:
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
                valid += 1
            except Exception:  # noqa: BLE001
                pass
        out[label] = {"calls": len(calls), "valid": valid,
                      "arguments": [c["function"]["arguments"] for c in calls][:2]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=sbs.ROOT / "build" / "bench-structured")
    ap.add_argument("--servers", default="govllm-vllm,vllm-serve,govllm-transformers")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--rounds-interleaved", type=int, default=3)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--model", type=Path, default=sbs.ROOT / "models" / "SmolLM2-135M-Instruct")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    keys = args.servers.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds_interleaved):
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
        for key in order:
            port = sbs.free_port()
            argv, env = server_argv(key, args.model, port, args)
            log = args.out / f"{key}-round{rnd}.log"
            with open(log, "w") as logf:
                proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                        start_new_session=True, cwd=sbs.ROOT)
            base = f"http://127.0.0.1:{port}"
            try:
                sbs.wait_healthy(proc, base, log)
                asyncio.run(load(base, args.model.name, "json_schema", 1, 2, args.max_tokens))  # warm-up
                calls = forced_calls(base, args.model.name)
                runs.append({"server": key, "round": rnd, "forced_calls": calls})
                print(json.dumps(runs[-1]), flush=True)
                for c in concurrencies:
                    for workload in ("free", "json_schema"):
                        r = asyncio.run(load(base, args.model.name, workload, c, c * args.requests_per_stream,
                                             args.max_tokens))
                        r.update(server=key, round=rnd, concurrency=c, workload=workload)
                        runs.append(r)
                        print(json.dumps(r), flush=True)
            finally:
                sbs.stop(proc)
    medians: dict[str, Any] = {}
    for key in keys:
        for c in concurrencies:
            for workload in ("free", "json_schema"):
                vals = [r["tok_s"] for r in runs if "tok_s" in r
                        and (r["server"], r["concurrency"], r["workload"]) == (key, c, workload) and r["tok_s"]]
                medians[f"{key}/{c}/{workload}"] = statistics.median(vals) if vals else None
    (args.out / "results.json").write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))
    lines = ["| server | streams | free tok/s | json_schema tok/s | json_schema / free |", "|---|---:|---:|---:|---:|"]
    for key in keys:
        for c in concurrencies:
            f, j = medians[f"{key}/{c}/free"], medians[f"{key}/{c}/json_schema"]
            lines.append(f"| {key} | {c} | {f:.1f} | {j:.1f} | {j / f:.2f} |" if f and j else f"| {key} | {c} | {f} | {j} | - |")
    lines += ["", "| server | forced calls that validate (required) | (named) | example arguments |", "|---|---|---|---|"]
    for key in keys:
        got = [r["forced_calls"] for r in runs if r.get("server") == key and "forced_calls" in r]
        cell = {}
        for label in ("required", "named"):
            valid = sum(g[label].get("valid", 0) for g in got)
            total = sum(g[label].get("calls", 0) for g in got)
            cell[label] = f"{valid}/{total}" if total else (got[0][label].get("error", "no calls") if got else "-")
        example = got[0]["named"].get("arguments", [""])[0] if got and got[0]["named"].get("arguments") else ""
        lines.append(f"| {key} | {cell['required']} | {cell['named']} | `{example[:60]}` |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
