"""What govllm relies on below AsyncLLM.generate (backends/vllm_compat.py), checked against the
installed vLLM without starting an engine: this fails the day an upgrade changes any of it."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this interpreter", allow_module_level=True)

from govllm.backends import vllm_compat  # noqa: E402


def _fields(struct_type) -> list[str]:
    fields = getattr(struct_type, "__struct_fields__", None)
    if fields is not None:  # msgspec.Struct
        return list(fields)
    return [f.name for f in dataclasses.fields(struct_type)]


def test_engine_core_output_fields():
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    fields = _fields(EngineCoreOutput)
    # relay reads these by name (cshim/shim.c s_request_id etc.)
    assert {"request_id", "new_token_ids", "finish_reason", "new_logprobs"} <= set(fields), fields
    assert "outputs" in _fields(EngineCoreOutputs)


def test_finish_reasons_map_onto_shim_codes():
    from vllm.v1.engine import FinishReason

    names = {r.name for r in FinishReason}
    assert names <= set(vllm_compat.SHIM_FINISH_BY_NAME), names - set(vllm_compat.SHIM_FINISH_BY_NAME)
    codes = vllm_compat.finish_codes()
    assert codes[int(FinishReason.STOP)] == 1 and codes[int(FinishReason.LENGTH)] == 2
    assert codes[int(FinishReason.ABORT)] == 3 and codes[int(FinishReason.ERROR)] == 4


def test_logprobs_lists_layout():
    from vllm.v1.outputs import LogprobsLists

    assert list(LogprobsLists._fields[:3]) == ["logprob_token_ids", "logprobs", "sampled_token_ranks"]


def test_input_processor_surface():
    from vllm.v1.engine.input_processor import InputProcessor

    params = inspect.signature(InputProcessor.process_inputs).parameters
    assert list(params)[1:4] == ["request_id", "prompt", "params"], list(params)
    assert "supported_tasks" in params
    assert callable(getattr(InputProcessor, "assign_request_id", None))


def test_engine_core_request_fields():
    from vllm.v1.engine import EngineCoreRequest

    fields = _fields(EngineCoreRequest)
    assert {"request_id", "sampling_params", "external_req_id"} <= set(fields), fields


def test_async_llm_surface():
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import AsyncMPClient

    src = inspect.getsource(AsyncLLM.__init__)
    assert "self.engine_core" in src and "self.input_processor" in src and "self.output_handler" in src
    # errored reads a None output handler as running (detach_output_handler sets it so)
    assert "self.output_handler is None or not self.output_handler.done()" in inspect.getsource(AsyncLLM.is_running.fget)
    assert inspect.iscoroutinefunction(AsyncLLM.get_supported_tasks)
    for name in ("add_request_async", "get_output_async", "abort_requests_async"):
        assert inspect.iscoroutinefunction(getattr(AsyncMPClient, name)), name


def test_child_request_naming_matches_parent_request():
    """n > 1: govllm names and seeds child requests as vLLM's ParentRequest does."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    class Req:
        request_id = "parent"
        external_req_id = "parent"
        sampling_params = SamplingParams(n=3, seed=7)
        params = sampling_params

    parent = ParentRequest(Req())
    want = [parent.get_child_info(i) for i in range(3)]

    class Processor:
        def process_inputs(self, request_id, prompt, params, supported_tasks):
            r = Req()
            r.sampling_params = params
            return r

        def assign_request_id(self, request):
            pass

    class Engine:
        input_processor = Processor()

    got = vllm_compat.make_requests(Engine(), "parent", {}, SamplingParams(n=3, seed=7), ())
    assert [c.request_id for c in got] == [w[0] for w in want]
    assert [c.sampling_params.seed for c in got] == [w[1].seed for w in want]
    assert all(c.sampling_params.n == 1 for c in got)


def test_engine_stats_fields():
    """The engine's own stats govllm reads for /metrics (vllm/v1/metrics/stats.py)."""
    from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.metrics.stats import PrefillStats, PrefixCacheStats, SchedulerStats

    assert {"scheduler_stats", "timestamp"} <= set(_fields(EngineCoreOutputs))
    assert {"events", "prefill_stats"} <= set(_fields(EngineCoreOutput))  # relay reads events by name
    assert {"num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs", "kv_cache_usage",
            "prefix_cache_stats"} <= set(_fields(SchedulerStats))
    assert {"queries", "hits"} <= set(_fields(PrefixCacheStats))
    assert "num_computed_tokens" in _fields(PrefillStats)
    assert {e.name for e in EngineCoreEventType} == {"QUEUED", "SCHEDULED", "PREEMPTED"}
    assert set(_fields(EngineCoreEvent)) == {"type", "timestamp"}


def test_read_scheduler_stats_and_events():
    from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.metrics.stats import PrefillStats, PrefixCacheStats, SchedulerStats

    st = SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1, kv_cache_usage=0.25,
                        prefix_cache_stats=PrefixCacheStats(requests=2, queries=40, hits=16))
    assert vllm_compat.read_scheduler_stats(EngineCoreOutputs(scheduler_stats=st)) == (3, 3, 0.25, 40, 16)
    assert vllm_compat.read_scheduler_stats(EngineCoreOutputs()) is None
    assert vllm_compat.step_timestamp(EngineCoreOutputs(timestamp=12.5)) == 12.5
    prefill = PrefillStats()
    prefill.set(num_prompt_tokens=10, num_local_cached_tokens=4, num_external_cached_tokens=0)
    out = EngineCoreOutput(request_id="r", new_token_ids=[1], prefill_stats=prefill, events=[
        EngineCoreEvent(EngineCoreEventType.QUEUED, 1.0), EngineCoreEvent(EngineCoreEventType.SCHEDULED, 1.5),
        EngineCoreEvent(EngineCoreEventType.PREEMPTED, 2.0)])
    assert vllm_compat.request_events(out) == [("queued", 1.0), ("scheduled", 1.5), ("preempted", 2.0)]
    assert vllm_compat.prefill_computed_tokens(out) == 6
    bare = EngineCoreOutput(request_id="r", new_token_ids=[2])
    assert vllm_compat.request_events(bare) == [] and vllm_compat.prefill_computed_tokens(bare) == 0


def test_cache_config_metrics_info():
    from vllm.config import CacheConfig

    engine = type("E", (), {})()
    engine.vllm_config = type("V", (), {})()
    engine.vllm_config.cache_config = CacheConfig(block_size=16)
    info = vllm_compat.cache_config_info(engine)
    assert info["block_size"] == "16" and all(isinstance(v, str) for v in info.values())
    assert {"cache_dtype", "enable_prefix_caching", "num_gpu_blocks"} <= set(info), sorted(info)


def test_lora_request_surface():
    """--lora-modules: a LoRARequest per adapter goes to process_inputs, which copies it onto the request."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor

    req = vllm_compat.lora_request("sql", 1, "/adapters/sql", "base")
    assert (req.lora_name, req.lora_int_id, req.lora_path, req.base_model_name) == ("sql", 1, "/adapters/sql", "base")
    with pytest.raises(ValueError):
        vllm_compat.lora_request("bad", 0, "/x")  # ids start at 1
    assert "lora_request" in inspect.signature(InputProcessor.process_inputs).parameters
    assert "lora_request" in _fields(EngineCoreRequest)
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"} <= fields


def test_cpu_lora_kernels_give_base_tokens_the_last_slot():
    """The pinned vLLM's CPU LoRA ops index the stacked weights with -1 (no adapter) as is, so a
    base-model token gets the last slot's adapter; the CPU backend works around it with an
    all-zero adapter for base requests. When this fails, vLLM fixed it: drop the workaround."""
    assert vllm_compat.cpu_lora_selects_last_slot_for_base()


def test_null_lora_is_zero_and_shaped_like_the_adapter(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    save_file({"m.q_proj.lora_A.weight": torch.ones(4, 8), "m.q_proj.lora_B.weight": torch.ones(8, 4)},
              str(src / "adapter_model.safetensors"))
    path = vllm_compat.write_null_lora(str(src), str(tmp_path))
    assert json.loads(open(f"{path}/adapter_config.json").read())["r"] == 4
    got = load_file(f"{path}/adapter_model.safetensors")
    assert got["m.q_proj.lora_B.weight"].shape == (8, 4) and not got["m.q_proj.lora_B.weight"].any()
    assert got["m.q_proj.lora_A.weight"].eq(1).all()


def test_pooling_pieces():
    """The pooling runner's uses (vllm_compat.embed_pooling_params, pooled_data, embedding_shape)."""
    from vllm import PoolingParams
    from vllm.config import ModelConfig
    from vllm.outputs import PoolingOutput, PoolingRequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    params = vllm_compat.embed_pooling_params(16)
    assert isinstance(params, PoolingParams) and params.task == "embed" and params.dimensions == 16
    assert "data" in inspect.signature(PoolingOutput).parameters
    assert "outputs" in inspect.signature(PoolingRequestOutput).parameters
    assert callable(AsyncLLM.encode)
    assert isinstance(inspect.getattr_static(ModelConfig, "embedding_size"), property) or hasattr(ModelConfig, "embedding_size")
    assert callable(ModelConfig.get_vocab_size)
    assert isinstance(inspect.getattr_static(ModelConfig, "is_matryoshka"), property)
