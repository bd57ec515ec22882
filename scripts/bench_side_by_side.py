"""govllm against the server users would otherwise run, same engine, same model, same run.

Pairs (each run one after the other on this machine, never two servers at once):
  vllm          govllm serve --engine vllm        vs  vllm serve
  transformers  govllm serve --engine transformers vs  transformers serve --continuous-batching

Each server is driven by ``govllm bench --scenario load --concurrency C --ignore-eos --json`` at
every concurrency asked for, after one greedy probe whose text must be the same for both servers of
a pair. Models: the default model and a micro Llama with seeded random weights (``--models tiny``:
1 layer, hidden 64, the default model's tokenizer), where the engine is cheap and the frontend's
cost shows. Writes results.json and table.md into --out.

Usage: scripts/bench-side-by-side [--out DIR] [--pairs vllm,transformers] [--models default,tiny]
                                  [--concurrency 1,16,64,256] [--max-tokens 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PROBE = "Write one sentence about the sea."
START_TIMEOUT_S = 900


@dataclasses.dataclass
class ModelSpec:
    name: str  # "default" or "tiny"
    path: Path


@dataclasses.dataclass
class ServerSpec:
    label: str  # e.g. "govllm (vllm)"
    argv: list[str]
    env: dict[str, str]
    model_name: str  # what to send as "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log: {log}\n{tail(log)}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {START_TIMEOUT_S} s; log: {log}\n{tail(log)}")


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def govllm_bin() -> Path:
    """bin/govllm, or $GOVLLM_BIN (scripts/gpu-check points it at the prebuilt bundle)."""
    path = Path(os.environ.get("GOVLLM_BIN") or ROOT / "bin" / "govllm")
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make build` first")
    return path


def cpu_env(omp_threads: int) -> dict[str, str]:
    """The engine environment both servers of a pair get on CPU (govllm's vLLM defaults, made explicit)."""
    cores = os.cpu_count() or 2
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(omp_threads or max(1, cores - 1)),
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def servers(pair: str, model: ModelSpec, port: int, args: argparse.Namespace) -> list[ServerSpec]:
    gov = str(govllm_bin())
    py = str(VENV_BIN / "python")
    common = ["--host", "127.0.0.1", "--port", str(port), "--model", str(model.path), "--python", py,
              "--device", args.device, "--max-model-len", str(args.max_model_len)]
    env = cpu_env(args.omp_threads) if args.device == "cpu" else {}
    served = model.path.name
    if pair == "vllm":
        # One explicit dtype for both: govllm's auto is float32 on CPU, vLLM's bfloat16.
        return [
            ServerSpec("govllm --engine vllm", [gov, "serve", "--engine", "vllm", *common, "--dtype", "bfloat16",
                                                "--engine-arg", "enforce_eager=true"], env, served),
            # `vllm serve` runs this module; its console script fails on vllm-cpu, whose package
            # metadata is named vllm-cpu while the CLI asks for the version of "vllm".
            ServerSpec("vllm serve", [str(VENV_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
                                      "--model", str(model.path), "--host", "127.0.0.1",
                                      "--port", str(port), "--served-model-name", served,
                                      "--max-model-len", str(args.max_model_len), "--enforce-eager",
                                      "--dtype", "bfloat16"],
                       env, served),
        ]
    if pair == "transformers":
        cb = {"page_size": 64, "max_batch_tokens": 512, "num_blocks": args.num_blocks}
        # One dtype for both (transformers serve's "auto" would follow the float32 weights on CUDA).
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        gov_cb = [a for k, v in cb.items() for a in ("--engine-arg", f"{k}={v}")]
        return [
            # transformers serve has no flag for requests per batch (its default: up to 1024, bounded
            # by max_batch_tokens); govllm keeps its own default (64 on CPU, 256 on CUDA) unless
            # --transformers-max-num-seqs sets one.
            ServerSpec("govllm --engine transformers", [gov, "serve", "--engine", "transformers", *common,
                                                        "--dtype", dtype, *gov_cb,
                                                        *(["--max-num-seqs", str(args.transformers_max_num_seqs)]
                                                          if args.transformers_max_num_seqs else [])],
                       env, served),
            ServerSpec("transformers serve", [str(VENV_BIN / "transformers"), "serve", str(model.path),
                                              "--host", "127.0.0.1", "--port", str(port), "--continuous-batching",
                                              "--device", args.device, "--dtype", dtype,
                                              "--cb-block-size", "64", "--cb-max-batch-tokens", "512",
                                              "--cb-num-blocks", str(args.num_blocks)],
                       env, str(model.path)),
        ]
    raise SystemExit(f"unknown pair {pair!r} (vllm, transformers)")


def probe(base: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "temperature": 0,
            "max_tokens": max_tokens, "stream": False}
    out = http_json(base + "/v1/chat/completions", body)
    return out["choices"][0]["message"]["content"]


def load(base: str, model: str, concurrency: int, pair: str, args: argparse.Namespace) -> dict[str, Any]:
    """One `govllm bench --scenario load` run; returns its summary (vLLM benchmark_serving names)."""
    prompts = max(args.min_prompts, concurrency * args.rounds)
    cmd = [str(govllm_bin()), "bench", "--url", base, "--model", model, "--scenario", "load",
           "--concurrency", str(concurrency), "--num-prompts", str(prompts), "--max-tokens", str(args.max_tokens),
           "--temperature", "0", "--seed", "1", "--no-progress", "--json"]
    if pair == "vllm":
        cmd.append("--ignore-eos")  # fixed-length outputs; transformers serve rejects the field (422)
    else:
        cmd.append("--allow-no-done")  # transformers serve ends its streams without data: [DONE]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0 and not res.stdout.strip():
        raise RuntimeError(f"govllm bench failed ({res.returncode}): {res.stderr[-2000:]}")
    report = json.loads(res.stdout)
    scenario = report["scenarios"][0]
    return {**scenario["summary"], "ok": scenario["ok"]}


def run_server(spec: ServerSpec, pair: str, port: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    log = out / f"{spec.label.replace(' ', '_').replace('-', '')}-{port}.log"
    env = {**os.environ, **spec.env}
    print(f"== {spec.label}: {' '.join(spec.argv)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(spec.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"server": spec.label, "argv": spec.argv, "log": str(log), "levels": {}}
    try:
        t0 = time.monotonic()
        wait_healthy(proc, base, log)
        result["start_s"] = round(time.monotonic() - t0, 1)
        result["probe"] = probe(base, spec.model_name, args.max_tokens)
        for c in args.concurrency:
            print(f"   concurrency {c} ...", flush=True)
            result["levels"][str(c)] = load(base, spec.model_name, c, pair, args)
    except Exception as exc:  # recorded in the table, the other servers still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"   failed: {result['error'][:2000]}", flush=True)
    finally:
        stop(proc)
    return result


def fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def ratio(a: Any, b: Any) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| model | pair | streams | server | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "| model | pair | streams | tok/s govllm ÷ peer | TTFT p99 govllm ÷ peer | same greedy text |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        gov, peer = r["servers"]
        same = r.get("same_greedy_text")
        for c in args.concurrency:
            rows = []
            for s in (gov, peer):
                lv = s.get("levels", {}).get(str(c))
                m = lv or {}
                rows.append(m)
                lines.append(
                    f"| {r['model']} | {r['pair']} | {c} | {s['server']} | {fmt(m.get('output_throughput'))} | "
                    f"{fmt(m.get('median_ttft_ms'))} | {fmt(m.get('p99_ttft_ms'))} | {fmt(m.get('median_itl_ms'))} | "
                    f"{fmt(m.get('p99_itl_ms'))} | {fmt(m.get('failed', s.get('error') and 'server failed'))} |"
                )
            ratios.append(
                f"| {r['model']} | {r['pair']} | {c} | {ratio(rows[0].get('output_throughput'), rows[1].get('output_throughput'))} | "
                f"{ratio(rows[0].get('p99_ttft_ms'), rows[1].get('p99_ttft_ms'))} | {same} |"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(ratios) + "\n"


def tiny_model() -> Path:
    path = ROOT / "models" / "micro-llama-random"
    if not (path / "model.safetensors").exists():
        # The tokenizer and chat template of the default model (or of the config-only tiny model,
        # which carries the same files to hosts without the default model's weights).
        source = next((d for d in (ROOT / "models" / "SmolLM2-135M-Instruct", ROOT / "models" / "tiny-llama-dummy")
                       if (d / "tokenizer.json").exists()), None)
        if source is None:
            raise SystemExit("no tokenizer for the tiny model: run scripts/bootstrap (models/SmolLM2-135M-Instruct)")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dummy_model.py"), "--shape", "micro", "--weights",
                        "--tokenizer-from", str(source), "--out", str(path)], check=True)
    return path


def importable(module: str) -> bool:
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return res.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "side-by-side"))
    ap.add_argument("--pairs", default="vllm,transformers")
    ap.add_argument("--models", default="default,tiny")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream at each concurrency")
    ap.add_argument("--min-prompts", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-blocks", type=int, default=640, help="transformers pair: KV cache blocks of 64 tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS of both servers on CPU (0: cores - 1)")
    ap.add_argument("--transformers-max-num-seqs", type=int, default=0,
                    help="govllm --max-num-seqs for the transformers pair (0: govllm's default)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    models = []
    for name in args.models.split(","):
        if name == "default":
            models.append(ModelSpec("default", ROOT / "models" / "SmolLM2-135M-Instruct"))
        elif name == "tiny":
            models.append(ModelSpec("tiny", tiny_model()))  # the micro shape: 1 layer, hidden 64
        else:
            models.append(ModelSpec(Path(name).name, Path(name).resolve()))

    results = []
    for model in models:
        for pair in args.pairs.split(","):
            if pair == "vllm" and not importable("vllm"):
                print("vllm is not importable here: skipping the vllm pair", flush=True)
                continue
            port = free_port()
            specs = servers(pair, model, port, args)
            ran = [run_server(spec, pair, port, out, args) for spec in specs]
            same = ran[0].get("probe") is not None and ran[0].get("probe") == ran[1].get("probe")
            results.append({"model": model.name, "model_path": str(model.path), "pair": pair, "servers": ran,
                            "same_greedy_text": same})
            (out / "results.json").write_text(json.dumps(results, indent=2))

    md = table(results, args)
    (out / "table.md").write_text(md)
    print(md)
    for r in results:
        if not r["same_greedy_text"]:
            probes = [s.get("probe") for s in r["servers"]]
            print(f"note: {r['model']}/{r['pair']}: greedy texts differ: {probes!r}", flush=True)


if __name__ == "__main__":
    main()
