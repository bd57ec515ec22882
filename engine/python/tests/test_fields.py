"""vLLM's chat-template options (ChatOptions through render_chat) on the default model's own
template, and prompt logprobs: the transformers backend's against a plain forward pass, the vLLM
backend's relay hook against the pinned vLLM's LogprobsTensors and EngineCoreOutput."""

from __future__ import annotations

import json

import pytest

from govllm.backend import ChatOptions, RequestError, prompt_logprobs_meta, render_chat
from govllm.request import parse_request

PREFILLED = [
    {"role": "user", "content": "Count from one to ten."},
    {"role": "assistant", "content": "one, two, three,"},
]


def test_continue_final_message_renders_the_last_message_open(tokenizer):
    default = render_chat(tokenizer, PREFILLED)
    assert default.endswith("one, two, three,<|im_end|>\n<|im_start|>assistant\n")
    open_ = render_chat(tokenizer, PREFILLED, options=ChatOptions(add_generation_prompt=False,
                                                                  continue_final_message=True))
    assert open_.endswith("<|im_start|>assistant\none, two, three,")
    assert default.startswith(open_)
    closed = render_chat(tokenizer, PREFILLED, options=ChatOptions(add_generation_prompt=False))
    assert closed.endswith("one, two, three,<|im_end|>\n")


def test_template_kwargs_and_documents(tokenizer):
    template = ("{% for d in documents %}[{{ d.title }}]{% endfor %}{{ greeting }}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    text = render_chat(tokenizer, PREFILLED, chat_template=template,
                       options=ChatOptions(chat_template_kwargs={"greeting": "hey:"},
                                           documents=[{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]))
    assert text == "[a][b]hey:Count from one to ten.one, two, three,"
    with pytest.raises(RequestError) as err:
        render_chat(tokenizer, PREFILLED, options=ChatOptions(chat_template_kwargs={"tools": []}))
    assert err.value.param == "chat_template_kwargs"


def test_chat_options_from_the_request():
    req = parse_request(json.dumps({"messages": PREFILLED, "sampling": {"prompt_logprobs": 2},
                                    "chat": {"add_generation_prompt": False, "continue_final_message": True,
                                             "add_special_tokens": True}}).encode(), "1", {})
    assert req.chat == ChatOptions(add_generation_prompt=False, continue_final_message=True, add_special_tokens=True)
    assert req.sampling.prompt_logprobs == 2
    assert parse_request(json.dumps({"messages": PREFILLED}).encode(), "1", {}).chat is None
    for chat, param in (({"continue_final_message": True}, "continue_final_message"),
                        ({"chat_template_kwargs": [1]}, "chat_template_kwargs"), ("x", "chat")):
        with pytest.raises(RequestError) as err:
            parse_request(json.dumps({"messages": PREFILLED, "chat": chat}).encode(), "1", {})
        assert err.value.param == param
    with pytest.raises(RequestError) as err:
        parse_request(json.dumps({"prompt": "x", "sampling": {"prompt_logprobs": 21}}).encode(), "1", {})
    assert err.value.param == "prompt_logprobs"


def test_prompt_logprobs_meta():
    import numpy as np

    meta = json.loads(prompt_logprobs_meta(np.array([[5, 5, 9]]), np.array([[-0.5, -0.5, -np.inf]], np.float32),
                                           np.array([1])))
    assert meta == {"token_ids": [[5, 5, 9]], "logprobs": [[-0.5, -0.5, -9999.0]], "ranks": [1]}


def test_hf_prompt_logprobs_match_a_forward_pass(loop, backend):
    import torch

    prompt = backend.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    meta = json.loads(loop.run_until_complete(backend.prompt_logprobs(prompt, 4)))
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([prompt], device=backend.device)).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1).cpu()
    assert len(meta["token_ids"]) == len(prompt) - 1
    for r, (ids, lps, rank) in enumerate(zip(meta["token_ids"], meta["logprobs"], meta["ranks"])):
        row = ref[r]
        assert ids[0] == prompt[r + 1]
        assert lps[0] == pytest.approx(float(row[prompt[r + 1]]), abs=1e-4)
        assert rank == int((row >= row[prompt[r + 1]]).sum())
        top = torch.topk(row, 4)
        assert ids[1:] == top.indices.tolist()
        assert lps[1:] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert json.loads(loop.run_until_complete(backend.prompt_logprobs(prompt[:1], 0))) == {
        "token_ids": [], "logprobs": [], "ranks": []}


def test_vllm_prompt_hook_reads_the_pinned_outputs():
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.outputs import LogprobsTensors

    from govllm.backends import vllm_engine
    from helpers import relay_outputs

    tensors = LogprobsTensors(logprob_token_ids=torch.tensor([[11, 7], [12, 12]]),
                              logprobs=torch.tensor([[-2.5, -0.5], [-0.25, -0.25]]),
                              selected_token_ranks=torch.tensor([3, 1]))
    outs = [EngineCoreOutput(request_id=rid, new_token_ids=[5], new_prompt_logprobs_tensors=tensors)
            for rid in ("0_r", "1_r")]
    records: list = []
    relay_outputs(outs, {"0_r": 9 << 16, "1_r": 9 << 16 | 1}, (0,), None, records.append, vllm_engine._prompt_hook)
    # One prompt-logprobs record (choice 0's), before its delta.
    assert records[0] == {"go_id": 9, "prompt_logprobs": {"token_ids": [[11, 7], [12, 12]],
                                                          "logprobs": [[-2.5, -0.5], [-0.25, -0.25]],
                                                          "ranks": [3, 1]}}
    assert [r.get("index") for r in records[1:]] == [0, 1]
