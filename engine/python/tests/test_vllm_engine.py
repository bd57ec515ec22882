"""The vllm backend (vLLM's AsyncLLM in process) on the default model (SmolLM2-135M-Instruct).

One engine for the module (float32, eager, max_model_len 2048, 1 GiB KV cache), driven on the
session's event loop. Engine death is tested last, on a second, tiny engine (random weights,
``load_format="dummy"``), so that the main engine stays healthy whatever order tests run in; the
orphan check runs a tiny engine in a child Python host and SIGKILLs that host. Skipped when vllm is
not installed. GOVLLM_TEST_MODEL overrides the model directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this interpreter", allow_module_level=True)

psutil = pytest.importorskip("psutil")

from govllm.backend import EngineConfig, EngineDeadError, RequestError, SamplingParams  # noqa: E402
from govllm.backends import vllm_compat, vllm_engine, vllm_env  # noqa: E402
from helpers import FakeRelay, _collect, collect, decode_logprobs_meta, greedy

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
MAX_MODEL_LEN = 2048
PYTHON_DIR = pathlib.Path(__file__).resolve().parents[1]


def _engine_cores() -> set[int]:
    """PIDs of this process's EngineCore children."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()[:1]):
                pids.add(child.pid)
    return pids


@pytest.fixture(scope="module")
def vllm_backend(model_path, loop):
    cfg = EngineConfig(model=model_path, engine="vllm", dtype="float32", seed=1234, max_model_len=MAX_MODEL_LEN,
                       max_num_seqs=32, extra={"kv_cache_gib": 1})
    b = vllm_engine.create(cfg)
    t0 = time.perf_counter()
    loop.run_until_complete(b.start())
    print(f"\n[vllm backend] started in {time.perf_counter() - t0:.1f}s on {b.platform}, env {b.env['env']}, "
          f"pdeathsig {b.env['pdeathsig']}")
    yield b
    t0 = time.perf_counter()
    loop.run_until_complete(b.shutdown())
    print(f"\n[vllm backend] shut down in {time.perf_counter() - t0:.1f}s")


@pytest.fixture(scope="module")
def tiny_model_dir(model_path, tmp_path_factory) -> str:
    """A 2-layer Llama config (head_dim 32: the smallest the CPU attention backend takes) with
    SmolLM2's tokenizer; weights come from load_format="dummy"."""
    d = tmp_path_factory.mktemp("tiny-llama")
    src = json.loads((pathlib.Path(model_path) / "config.json").read_text())
    cfg = {k: v for k, v in src.items() if not k.startswith("_")}
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (pathlib.Path(model_path) / name).is_file():
            shutil.copy(pathlib.Path(model_path) / name, d / name)
    return str(d)


def tiny_config(path: str) -> EngineConfig:
    return EngineConfig(model=path, engine="vllm", dtype="float32", max_model_len=512,
                        extra={"load_format": "dummy", "kv_cache_gib": 0.25})


async def _wait_idle(backend, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.num_running() == 0:
            return True
        await asyncio.sleep(0.02)
    return backend.num_running() == 0


# ----------------------------------------------------------------------------- configuration (no engine)


FIELDS = {"model": None, "tokenizer": None, "dtype": "auto", "seed": 0, "max_model_len": None, "max_num_seqs": None,
          "served_model_name": None, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
          "gpu_memory_utilization": 0.92, "kv_cache_memory_bytes": None, "enforce_eager": False,
          "load_format": "auto", "quantization": None, "trust_remote_code": False,
          "distributed_executor_backend": None, "disable_log_stats": False, "block_size": None}


def test_engine_kwargs_from_config(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = EngineConfig(model="/m", served_model_name="smol", max_model_len=1024, max_num_seqs=8, dtype="bfloat16",
                       seed=7, extra={"tokenizer": "/t", "tensor_parallel_size": 2.0, "quantization": "fp8",
                                      "distributed_executor_backend": "ray", "load_format": "dummy",
                                      "trust_remote_code": True, "debug": True, "pdeathsig": False})
    kw = vllm_engine.build_engine_kwargs(cfg, "gpu", FIELDS)
    assert kw == {"model": "/m", "served_model_name": "smol", "max_model_len": 1024, "max_num_seqs": 8,
                  "dtype": "bfloat16", "seed": 7, "disable_log_stats": False, "tokenizer": "/t",
                  "tensor_parallel_size": 2, "quantization": "fp8", "distributed_executor_backend": "ray",
                  "load_format": "dummy", "trust_remote_code": True}
    assert isinstance(kw["tensor_parallel_size"], int)
    # GPU placement's utilisation passes through; no KV default off CPU
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"gpu_memory_utilization": 0.5}), "gpu", FIELDS)
    assert kw["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in kw and "enforce_eager" not in kw
    # 0 means vLLM's default
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m"), "gpu", FIELDS)
    assert "max_model_len" not in kw and "max_num_seqs" not in kw and kw["dtype"] == "auto"


def test_engine_kwargs_cpu_defaults(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m"), "cpu", FIELDS)
    assert kw["enforce_eager"] is True
    assert kw["kv_cache_memory_bytes"] == vllm_env.default_cpu_kv_cache_bytes()
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"enforce_eager": False, "kv_cache_gib": 0.5}),
                                         "cpu", FIELDS)
    assert kw["enforce_eager"] is False and kw["kv_cache_memory_bytes"] == 1 << 29
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"kv_cache_memory_bytes": 12345.0}), "cpu",
                                         FIELDS)
    assert kw["kv_cache_memory_bytes"] == 12345 and isinstance(kw["kv_cache_memory_bytes"], int)
    # a fraction of RAM, or vLLM's legacy variable, replaces the default size
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"gpu_memory_utilization": 0.3}), "cpu", FIELDS)
    assert "kv_cache_memory_bytes" not in kw
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m"), "cpu", FIELDS)
    assert "kv_cache_memory_bytes" not in kw


def test_old_vllm_without_kv_cache_memory_bytes_gets_the_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "placeholder")  # restored after the test
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    fields = {k: v for k, v in FIELDS.items() if k != "kv_cache_memory_bytes"}
    kw = vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"kv_cache_gib": 3}), "cpu", fields)
    assert "kv_cache_memory_bytes" not in kw and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_python_executable_when_embedded(monkeypatch):
    """In the Go binary sys.executable may be the binary itself: spawn must still exec a python."""
    monkeypatch.setattr(sys, "executable", "/usr/local/bin/govllm")
    exe = vllm_env.python_executable()
    assert os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK)


def test_default_cpu_kv_cache_size():
    GiB = 1 << 30
    assert vllm_env.default_cpu_kv_cache_bytes(64 * GiB) == 4 * GiB
    assert vllm_env.default_cpu_kv_cache_bytes(8 * GiB) == 2 * GiB
    assert vllm_env.default_cpu_kv_cache_bytes(24 * GiB) == 4 * GiB


def test_unknown_extra_key_is_an_error():
    with pytest.raises(ValueError, match="no_such_option"):
        vllm_engine.build_engine_kwargs(EngineConfig(model="/m", extra={"no_such_option": 1}), "cpu", FIELDS)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux)")
def test_pdeathsig_wrapper_kills_spawned_child(tmp_path):
    """multiprocessing children spawned through the wrapper die when their host is SIGKILLed
    (and, as a control, children spawned with plain python survive it)."""
    wrapper = vllm_env.pdeathsig_wrapper(vllm_env.python_executable())
    assert wrapper and os.access(wrapper, os.X_OK)
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, sys, time
        def sleeper(ready):
            ready.set()
            time.sleep(120)
        if __name__ == "__main__":
            multiprocessing.set_executable(sys.argv[1])
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Event()
            p = ctx.Process(target=sleeper, args=(ready,))
            p.start()
            ready.wait(60)
            print(p.pid, flush=True)
            time.sleep(120)
    """))

    def child_after_host_killed(executable: str, wait: float) -> tuple[int, bool]:
        proc = subprocess.Popen([sys.executable, str(script), executable], stdout=subprocess.PIPE, text=True)
        try:
            child = int(proc.stdout.readline())
            assert psutil.pid_exists(child)
            proc.kill()
            proc.wait(10)
            return child, _wait_gone(child, wait)
        finally:
            proc.kill()

    child, gone = child_after_host_killed(wrapper, 10)
    assert gone, "a child spawned through the wrapper outlived its SIGKILLed host"
    child, gone = child_after_host_killed(vllm_env.python_executable(), 1.5)
    with contextlib.suppress(psutil.Error):
        psutil.Process(child).kill()
    assert not gone, "control: a plain-python child should have outlived its host"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- the engine


def test_environment_and_surface(vllm_backend):
    b = vllm_backend
    b.health()
    assert b.name == "vllm"
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    import multiprocessing.spawn

    assert os.fsdecode(multiprocessing.spawn.get_executable()) == b.env["executable"]
    if b.platform == "cpu":
        assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") is not None
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            assert os.environ.get("OMP_NUM_THREADS")
        assert b.engine_kwargs["enforce_eager"] is True
        assert b.engine_kwargs["kv_cache_memory_bytes"] == 1 << 30
    assert b.max_model_len() == MAX_MODEL_LEN
    ids = b.apply_chat_template(PARIS)
    assert ids and all(isinstance(t, int) for t in ids)
    assert b.encode("Hello world") == b.tokenizer("Hello world")["input_ids"]
    assert b.num_running() == 0
    # the EngineCore child runs through the pdeathsig wrapper (its parent is this process)
    assert _engine_cores(), "no EngineCore child process"


def test_engine_args_fields_exist():
    """The AsyncEngineArgs fields the backend and Go rely on exist in the installed vLLM."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    names = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    wanted = {"model", "tokenizer", "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
              "dtype", "quantization", "max_model_len", "max_num_seqs", "enforce_eager", "load_format", "seed",
              "trust_remote_code", "distributed_executor_backend", "kv_cache_memory_bytes", "disable_log_stats"}
    assert wanted <= names, wanted - names


def test_platform_prediction(monkeypatch):
    assert vllm_env.predict_platform(EngineConfig(model="/m", device="cpu")) == "cpu"
    assert vllm_env.predict_platform(EngineConfig(model="/m", device="cuda:0")) == "cuda"
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    assert vllm_env.predict_platform(EngineConfig(model="/m")) == "cpu"
    monkeypatch.delenv("VLLM_TARGET_DEVICE")
    from vllm.platforms import current_platform

    predicted = vllm_env.predict_platform(EngineConfig(model="/m"))
    assert predicted == ("cpu" if current_platform.is_cpu() else "cuda")


def test_chat_capital_of_france(loop, vllm_backend):
    b = vllm_backend
    out = collect(loop, b, b.apply_chat_template(PARIS), greedy(20), "paris")
    assert list(out) == [0]
    c = out[0]
    assert "Paris" in c["text"], c
    assert c["finish"] == "stop" and c["ids"][-1] == b.tokenizer.eos_token_id
    assert c["deltas"] >= 2, "expected streaming deltas"
    assert b.decode(c["ids"]).strip() == c["text"].strip()


def test_max_tokens_gives_length_and_greedy_is_deterministic(loop, vllm_backend):
    prompt = vllm_backend.encode("The history of the city of Rome")
    a = collect(loop, vllm_backend, prompt, greedy(6, ignore_eos=True), "len-a")[0]
    b = collect(loop, vllm_backend, prompt, greedy(6, ignore_eos=True), "len-b")[0]
    assert a["finish"] == "length" and len(a["ids"]) == 6
    assert a == b


def test_n2_gives_two_indexed_choices(loop, vllm_backend):
    b = vllm_backend
    out = collect(loop, b, b.apply_chat_template(PARIS), SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2),
                  "n2")
    assert sorted(out) == [0, 1]
    for c in out.values():
        assert c["finish"] in ("stop", "length") and c["ids"]
    assert loop.run_until_complete(_wait_idle(b))


def test_stop_strings_are_left_to_go(vllm_backend):
    """Stop strings are matched in Go on the detokenized text: vLLM's engine never sees them."""
    params = vllm_backend.sampling_params(10, greedy(20, stop=["Paris"]))
    assert not params.stop


def test_seed_reproducibility(loop, vllm_backend):
    b = vllm_backend
    prompt = b.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    a = collect(loop, b, prompt, sp, "seed-a")[0]
    c = collect(loop, b, prompt, sp, "seed-b")[0]
    assert a["ids"] and a["text"] == c["text"] and a["ids"] == c["ids"]


def test_concurrent_greedy_requests_match_solo(loop, vllm_backend):
    b = vllm_backend
    prompts = [b.apply_chat_template([{"role": "user", "content": f"Tell me a fact about {t}."}])
               for t in ("cats", "the moon", "trains", "bread")]
    solo = [collect(loop, b, p, greedy(10), f"solo-{i}")[0]["ids"] for i, p in enumerate(prompts)]

    async def together():
        return await asyncio.gather(*[_collect(b, p, greedy(10), f"conc-{i}") for i, p in enumerate(prompts)])

    outs = loop.run_until_complete(together())
    assert [o[0]["ids"] for o in outs] == solo


def test_max_tokens_none_fills_the_context(vllm_backend):
    params = vllm_backend.sampling_params(100, SamplingParams(max_tokens=None, temperature=0.0))
    assert params.max_tokens == MAX_MODEL_LEN - 100
    assert params.top_k in (0, -1)  # "off" in vLLM
    params = vllm_backend.sampling_params(10, SamplingParams(max_tokens=5, top_k=0, temperature=0.5))
    assert params.max_tokens == 5 and params.top_k == -1


async def _submit_until(b, prompt, sampling, rid, go_id, records) -> asyncio.Future:
    """Submits and waits until the relay has carried ``records`` outputs of go_id."""
    relay = b.relay if isinstance(b.relay, FakeRelay) else FakeRelay()
    b.relay = relay
    done = await b.submit(prompt, sampling, rid, go_id)
    while sum(r["go_id"] == go_id for r in relay.records) < records:
        await asyncio.sleep(0.01)
    return done


def test_cancel_aborts_in_engine(loop, vllm_backend):
    b = vllm_backend
    prompt = b.encode("Once upon a time")

    async def run():
        done = await _submit_until(b, prompt, greedy(400, ignore_eos=True), "cancel-me", 900001, 3)
        assert b.num_running() == 1
        b.cancel(900001)
        await asyncio.wait_for(done, 5)
        return await _wait_idle(b, 5)

    assert loop.run_until_complete(run()), f"vLLM still holds {b.num_running()} request(s)"
    assert sum(len(r["ids"]) for r in b.relay.records if r["go_id"] == 900001) < 400
    # the engine serves on
    assert "Paris" in collect(loop, b, b.apply_chat_template(PARIS), greedy(20), "after-cancel")[0]["text"]


def test_stop_choice_stops_one_choice(loop, vllm_backend):
    """Go's stop string: stop_choice ends that choice in the engine and nothing more of it is relayed."""
    b = vllm_backend
    prompt = b.encode("Once upon a time")

    async def run():
        sp = SamplingParams(max_tokens=300, temperature=0.8, seed=5, n=2, ignore_eos=True)
        done = await _submit_until(b, prompt, sp, "stop-one", 900002, 4)
        b.stop_choice(900002, 0)
        count = sum(len(r["ids"]) for r in b.relay.records if r["go_id"] == 900002 and r["index"] == 0)
        await asyncio.wait_for(done, 60)  # choice 1 runs to its max_tokens
        after = sum(len(r["ids"]) for r in b.relay.records if r["go_id"] == 900002 and r["index"] == 0)
        ones = [r for r in b.relay.records if r["go_id"] == 900002 and r["index"] == 1]
        return count, after, ones

    count, after, ones = loop.run_until_complete(run())
    assert after == count, "choice 0 was relayed after Go stopped it"
    assert sum(len(r["ids"]) for r in ones) == 300 and ones[-1]["finish"] == 2
    assert loop.run_until_complete(_wait_idle(b, 5))


def test_validation_errors_are_request_errors(loop, vllm_backend):
    b = vllm_backend
    prompt = b.apply_chat_template(PARIS)
    bad_top_p = SamplingParams(max_tokens=5, temperature=0.7)
    bad_top_p.top_p = 5.0  # past govllm's own validation: vLLM's check answers
    with pytest.raises(RequestError, match="top_p") as info:
        collect(loop, b, prompt, bad_top_p, "bad-top-p")
    assert info.value.status == 400
    with pytest.raises(RequestError, match="greedy"):
        collect(loop, b, prompt, SamplingParams(max_tokens=5, temperature=0.0, n=2), "greedy-n2")
    with pytest.raises(RequestError, match="temperature"):
        collect(loop, b, prompt, SamplingParams(max_tokens=5, temperature=3.0), "hot")
    # engine-side validation (raised by generate on its first iteration)
    with pytest.raises(RequestError, match="maximum model length|maximum context length"):
        collect(loop, b, [42] * (MAX_MODEL_LEN + 10), greedy(5), "too-long")
    with pytest.raises(RequestError, match="out of vocabulary|vocab"):
        collect(loop, b, [10**7], greedy(5), "oov")
    assert loop.run_until_complete(_wait_idle(b))
    b.health()
    assert "Paris" in collect(loop, b, prompt, greedy(20), "after-errors")[0]["text"]


def test_unknown_extra_key_fails_start(loop, model_path):
    b = vllm_engine.create(EngineConfig(model=model_path, engine="vllm", extra={"no_such_option": 1}))
    with pytest.raises(ValueError, match="no_such_option"):
        loop.run_until_complete(b.start())


# ----------------------------------------------------------------------------- death and orphans (last)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux)")
def test_engine_core_dies_with_its_host(tiny_model_dir, tmp_path):
    """A host that is SIGKILLed takes its EngineCore with it (pdeathsig wrapper).

    The host imitates the embedded interpreter: its code comes from -c (``__main__`` has no file, so
    spawn re-imports nothing) and sys.executable is not a python (what the Go binary would be
    without the bridge's fix), so the backend must find the real interpreter itself.
    """
    host = textwrap.dedent(f"""
        import sys
        sys.executable = "/nonexistent/govllm"
        sys.argv = [sys.executable]
        import asyncio, json
        sys.path.insert(0, {str(PYTHON_DIR)!r})
        import psutil
        from govllm.backend import EngineConfig, SamplingParams
        from govllm.backends import vllm_engine

        async def main():
            cfg = EngineConfig(model={tiny_model_dir!r}, engine="vllm", dtype="float32", max_model_len=512,
                               extra={{"load_format": "dummy", "kv_cache_gib": 0.25}})
            b = vllm_engine.create(cfg)
            await b.start()
            tokens = []
            def relay(outputs, routes, codes, meta, prompt_hook=None, noted=None):
                tokens.extend(t for o in outputs if o.request_id in routes for t in o.new_token_ids)
                return [o.request_id for o in outputs if o.finish_reason is not None]
            b.relay = relay
            await (await b.submit(b.encode("Hi"), SamplingParams(max_tokens=3, ignore_eos=True), "r", 1))
            kids = {{p.pid: p.name() for p in psutil.Process().children(recursive=True)}}
            print("GOVLLM-TEST " + json.dumps({{"children": kids, "env": b.env, "tokens": len(tokens)}}), flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
    """)
    log_path = tmp_path / "host.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", host], stdout=subprocess.PIPE, stderr=log_file, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # vLLM logs to stdout too
            if line.startswith("GOVLLM-TEST "):
                break
        else:
            pytest.fail(f"host exited with {proc.wait()}:\n{log_path.read_text()[-3000:]}")
        info = json.loads(line.removeprefix("GOVLLM-TEST "))
        assert info["env"]["pdeathsig"] is True and info["tokens"] == 3
        assert os.path.basename(info["env"]["python"]).startswith("python")
        cores = [int(pid) for pid, name in info["children"].items() if "EngineCore" in name]
        assert len(cores) == 1, info
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(cores[0], 15), "EngineCore outlived its SIGKILLed host"
        others = [int(pid) for pid in info["children"] if int(pid) not in cores]
        stragglers = [pid for pid in others if not _wait_gone(pid, 15)]
        assert not stragglers, f"host children still alive: {stragglers}"
    finally:
        proc.kill()
        proc.wait(10)


def test_killed_engine_core_is_engine_death(loop, vllm_backend, tiny_model_dir):
    """SIGKILL of EngineCore: the running request and new ones raise EngineDeadError, health() raises.

    Runs on a second, tiny engine, so the module's engine is untouched (checked at the end).
    """
    before = _engine_cores()
    tiny = vllm_engine.create(tiny_config(tiny_model_dir))
    loop.run_until_complete(tiny.start())
    try:
        tiny.health()
        cores = _engine_cores() - before
        assert len(cores) == 1, cores
        core = cores.pop()
        prompt = tiny.encode("Once upon a time")

        async def run():
            done = await _submit_until(tiny, prompt, greedy(400, ignore_eos=True), "doomed", 900003, 3)
            os.kill(core, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(done, 30)

        loop.run_until_complete(run())
        assert sum(len(r["ids"]) for r in tiny.relay.records) < 400
        with pytest.raises(EngineDeadError):
            tiny.health()
        with pytest.raises(EngineDeadError):
            collect(loop, tiny, prompt, greedy(5), "after-death")
    finally:
        t0 = time.perf_counter()
        loop.run_until_complete(tiny.shutdown())
        assert time.perf_counter() - t0 < 30
    # the module's engine is unaffected
    vllm_backend.health()
    out = collect(loop, vllm_backend, vllm_backend.apply_chat_template(PARIS), greedy(20), "after-kill")
    assert "Paris" in out[0]["text"]


def test_logprobs_meta_layout():
    """vLLM's LogprobsLists -> the relay's meta bytes (rows, cols, ids, float32 logprobs, ranks)."""
    import numpy as np
    from vllm.v1.outputs import LogprobsLists

    lp = LogprobsLists(np.array([[5, 1, 2], [7, 7, 3]], dtype=np.int64),
                       np.array([[-2.0, -0.1, -1.0], [float("-inf"), -0.5, -0.7]], dtype=np.float32),
                       np.array([3, 1], dtype=np.int64))
    out = types.SimpleNamespace(new_logprobs=lp)
    rows = decode_logprobs_meta(vllm_compat.logprobs_meta(out))
    assert [r["ids"] for r in rows] == [[5, 1, 2], [7, 7, 3]]
    assert [r["rank"] for r in rows] == [3, 1]
    assert rows[0]["logprobs"][:2] == pytest.approx([-2.0, -0.1]) and rows[1]["logprobs"][0] == float("-inf")


def test_logprobs_sampling_param_range():
    assert SamplingParams.from_dict({"logprobs": 20}).logprobs == 20
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(RequestError) as e:
            SamplingParams.from_dict({"logprobs": bad})
        assert e.value.param == "logprobs"


def test_logprobs_end_to_end(loop, vllm_backend):
    b = vllm_backend

    c = collect(loop, b, b.apply_chat_template(PARIS), greedy(4, ignore_eos=True, logprobs=2), "lp")[0]
    assert len(c["logprobs"]) == len(c["ids"]) == 4
    for tid, row in zip(c["ids"], c["logprobs"]):
        # column 0 is the sampled token; greedy: it is also the most likely (column 1, rank 1)
        assert len(row["ids"]) >= 3 and row["ids"][0] == tid and row["ids"][1] == tid and row["rank"] == 1
        assert row["logprobs"][0] <= 0
