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
