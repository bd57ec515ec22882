"""PerRequestSampler on synthetic logits: distributions and the planned path."""

from __future__ import annotations

from govllm.backends.hf import sampler as hf_sampler
from govllm.backends.hf.sampler import RequestSampling
from hf_helpers import fake_request


def test_sampler_distribution():
    """The tensor sampler itself: frequencies follow softmax(logits / T) within top-k/top-p."""
    import torch

    sampler = hf_sampler.build_sampler_class()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    rows = 4000

    def args(t, p, k, min_p=0.0):
        a = torch.zeros(6, rows, dtype=torch.int32)
        a[0] = torch.full((rows,), t, dtype=torch.float32).view(torch.int32)
        a[1] = torch.full((rows,), p, dtype=torch.float32).view(torch.int32)
        a[2] = k
        a[3] = 7
        a[4] = torch.arange(rows, dtype=torch.int32)
        a[5] = torch.full((rows,), min_p, dtype=torch.float32).view(torch.int32)
        return a

    def freqs(t, p, k, min_p=0.0):
        out = sampler.sample(logits, args(t, p, k, min_p))
        picks = out.argmax(-1)
        assert torch.isinf(out).sum() == rows * 3  # exactly one finite score per row
        return torch.bincount(picks, minlength=4).float() / rows

    f = freqs(1.0, 1.0, 0)
    assert torch.allclose(f, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), f
    f = freqs(1.0, 1.0, 2)
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03), f
    f = freqs(1.0, 0.7, 0)  # smallest prefix reaching 0.7: tokens 0 and 1
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.625) < 0.03, f
    f = freqs(0.0, 1.0, 0)  # greedy row
    assert f[0] == 1.0
    # min_p is relative to the most likely token, after temperature: at T=1, 0.5 keeps p >= 0.25
    # (tokens 0 and 1); at T=2 the probabilities are sqrt-flattened to [.38, .29, .21, .12] and it
    # keeps tokens 0-2, renormalised.
    f = freqs(1.0, 1.0, 0, min_p=0.5)
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03), f
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    f = freqs(2.0, 1.0, 0, min_p=0.5)
    assert f[3] == 0 and torch.allclose(f[:3], flat[:3] / flat[:3].sum(), atol=0.03), f
    assert (freqs(5.0, 1.0, 0, min_p=1.0) == torch.tensor([1.0, 0, 0, 0])).all()

    # The growing candidate set (CPU / eager path) picks exactly what a full sort (graph path) picks.
    wide = torch.randn(64, 5000) * 2.0
    a = torch.zeros(6, 64, dtype=torch.int32)
    a[0] = torch.linspace(0.0, 1.5, 64).view(torch.int32)
    a[1] = torch.tensor([1.0, 0.5, 0.95, 0.999] * 16).view(torch.int32)
    a[2] = torch.tensor([0, 0, 5, 0, 300, 0, 0, 0] * 8, dtype=torch.int32)
    a[3] = torch.arange(64, dtype=torch.int32) * 7919
    a[4] = 11
    fast = sampler.sample(wide, a, filtered=True, exact=False).argmax(-1)
    full = sampler.sample(wide, a, filtered=True, exact=True).argmax(-1)
    assert torch.equal(fast, full)


def test_sampler_penalties_min_tokens_and_logprobs():
    """The planned path on synthetic logits: vLLM's penalty formulas, token history kept on the device
    across steps (and rebuilt after a gap), min_tokens masking, raw logprobs."""
    import torch

    sampler = hf_sampler.build_sampler_class()()
    storage = torch.zeros(sampler.ROWS, 8, dtype=torch.int32)
    sampler.fill_defaults(storage)
    raw = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]] * 3)
    rep = RequestSampling(repetition_penalty=2.0, prompt_len=2)
    freq = RequestSampling(frequency_penalty=0.5, presence_penalty=1.0, prompt_len=2)
    mins = RequestSampling(min_tokens=3, stop_ids=(3, 5), logprobs=2, prompt_len=2)
    step = [
        fake_request("rep", rep, [0, 1], [4]),  # tokens seen: 0, 1 (prompt), 4 (output)
        fake_request("freq", freq, [0, 1], [2, 2, 4]),  # output counts: 2 twice, 4 once (prompt ignored)
        fake_request("min", mins, [0, 1], [0]),  # one output token: 3 and 5 stay masked
    ]
    sampler.prepare_tensor_args(step, storage)
    plan = sampler._plan
    assert plan.rebuild_slots == [0, 1]  # first sight: histories rebuilt from the request states
    logits = raw.clone()
    sampler._apply_penalties(logits, plan)
    assert logits[0].tolist() == [1.0, -2.0, 0.5, 3.0, -4.0, 1.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5 - 1.0 - 1.0, 3.0, -2.0 - 0.5 - 1.0, 1.0]
    assert logits[2].tolist() == raw[2].tolist()

    chosen = sampler(None, raw.clone(), storage).argmax(-1).tolist()
    assert chosen[:2] == [3, 3]  # greedy over the penalised logits
    assert chosen[2] == 0  # 3 and 5 are masked: the next best
    record = mins.records.popleft()
    expected = torch.log_softmax(raw[2], -1)  # raw logits: the mask does not change the logprobs
    assert record.index == 1 and record.token == 0
    assert abs(record.logprob - expected[0].item()) < 1e-6
    assert record.top_ids == (3, 0) and abs(record.top_logprobs[0] - expected[3].item()) < 1e-6

    # Next step: the picks (3) were counted on the device, so the histories are reused as they are.
    step2 = [
        fake_request("rep", rep, [0, 1], [4, 3]),
        fake_request("freq", freq, [0, 1], [2, 2, 4, 3]),
    ]
    sampler.prepare_tensor_args(step2, storage)
    plan = sampler._plan
    assert plan.rebuild_slots == []
    logits = raw[:2].clone()
    sampler._apply_penalties(logits, plan)
    assert logits[0, 3].item() == 1.5 and logits[1, 3].item() == 3.0 - 0.5 - 1.0

    # A gap (a batch without "rep") frees its slot; when it comes back its history is rebuilt.
    sampler.prepare_tensor_args([step2[1]], storage)
    sampler(None, raw[:1].clone(), storage)
    sampler.prepare_tensor_args([fake_request("rep", rep, [0, 1], [4, 3, 1])], storage)
    assert sampler._plan.rebuild_slots and sampler._plan.output_tokens == [4, 3, 1]
    # min_tokens reached: nothing masked any more
    sampler.prepare_tensor_args([fake_request("min", mins, [0, 1], [0, 0, 0])], storage)
    assert sampler._plan.mask_rows == [] and sampler._plan.logprob_rows == [0]

