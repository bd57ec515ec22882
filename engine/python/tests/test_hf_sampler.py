"""PerRequestSampler on synthetic logits: distributions, the planned path, and transformers' own
logits processors as the reference."""

from __future__ import annotations

import pytest

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
    assert record.rank == 2  # token 3 is more likely than the token chosen under the mask

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


# ----------------------------------------------------------------------------- against transformers' warpers


def _sampling_args(rows):
    """The sampler's argument tensor for rows of (temperature, top_p, top_k, min_p, key, position)."""
    import torch

    def floats(i):
        return torch.tensor([float(r[i]) for r in rows], dtype=torch.float32).view(torch.int32)

    a = torch.zeros(6, len(rows), dtype=torch.int32)
    a[0], a[1], a[5] = floats(0), floats(1), floats(3)
    a[2] = torch.tensor([r[2] for r in rows], dtype=torch.int32)
    a[3] = torch.tensor([r[4] for r in rows], dtype=torch.int32)
    a[4] = torch.tensor([r[5] for r in rows], dtype=torch.int32)
    return a


def hf_distribution(logits, temperature, top_p, top_k, min_p, input_ids=(), repetition=1.0):
    """One row's sampling distribution by transformers' own processors, chained in vLLM's order:
    repetition penalty, temperature, min_p, top-k, top-p (transformers' generate applies min_p last;
    vLLM and govllm before top-k/top-p)."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([list(input_ids) or [0]])
    scores = logits.float().unsqueeze(0).clone()
    if repetition != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty=repetition)(ids, scores)
    if temperature < hf_sampler.SAMPLING_EPS:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.size(-1)).float()[0]
    chain = [TemperatureLogitsWarper(float(temperature))]
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p=float(min_p)))
    if top_k > 0:
        chain.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=float(top_p)))
    for processor in chain:
        scores = processor(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


def govllm_distribution(scores, args, exact=False, candidates=None):
    """What PerRequestSampler.choose draws each row's token from, [rows, vocab]: its own filtering
    steps (scaled_logits, kept_candidates) assembled as choose assembles them."""
    import torch

    logits, is_sampled = hf_sampler.scaled_logits(scores, args, min_p=True)
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    row_filtered, order, kept = hf_sampler.kept_candidates(logits, log_total, args, is_sampled, exact, candidates)
    filtered = torch.zeros_like(logits).scatter_(-1, order, kept)
    filtered = filtered / filtered.sum(dim=-1, keepdim=True)
    dist = torch.where(row_filtered.unsqueeze(-1), filtered, torch.softmax(logits, dim=-1))
    greedy = torch.nn.functional.one_hot(scores.argmax(-1), scores.size(-1)).float()
    return torch.where(is_sampled.unsqueeze(-1), dist, greedy)


GRID = [(t, p, k, m) for t in (0.0, 0.5, 1.0, 1.7) for p in (1.0, 0.95, 0.6, 0.2) for k in (0, 1, 3, 40)
        for m in (0.0, 0.05, 0.3)]


def _grid_batch(vocab=1000, per_combo=3, seed=0):
    """Random logits for every GRID combination, rows of all combinations shuffled into one batch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = [combo for combo in GRID for _ in range(per_combo)]
    order = torch.randperm(len(rows), generator=gen).tolist()
    rows = [rows[i] for i in order]
    scores = torch.randn(len(rows), vocab, generator=gen) * 2.0
    return rows, scores


def _assert_rows_match(ours, scores, rows, **reference_kw):
    import torch

    for i, (t, p, k, m) in enumerate(rows):
        ref = hf_distribution(scores[i], t, p, k, m, **reference_kw)
        kept, ref_kept = (ours[i] > 0).nonzero().flatten(), (ref > 0).nonzero().flatten()
        assert torch.equal(kept, ref_kept), (
            f"row {i} (temperature={t}, top_p={p}, top_k={k}, min_p={m}): kept {kept.tolist()[:12]}..., "
            f"transformers keeps {ref_kept.tolist()[:12]}...")
        assert torch.allclose(ours[i], ref, atol=1e-5), (i, t, p, k, m, (ours[i] - ref).abs().max())


def test_topk_then_topp_keeps_the_renormalised_top_k_mass():
    """p = [.5, .3, .15, .05], top_k=2, top_p=0.6: the top-2 survivors renormalise to [.625, .375],
    so token 0 alone reaches 0.6 (vLLM's apply_top_k_top_p, TopKLogitsWarper then TopPLogitsWarper)."""
    import torch

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for exact in (False, True):
        dist = govllm_distribution(scores, _sampling_args([(1.0, 0.6, 2, 0.0, 7, 0)]), exact=exact)
        assert dist[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert hf_distribution(scores[0], 1.0, 0.6, 2, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["growing", "exact", "top_k_bound"])
def test_filtering_matches_transformers_warpers(mode):
    """Row by row over temperature x top_p x top_k x min_p, the rows of all combinations mixed in one
    batch: the kept set and the renormalised distribution equal transformers' processors'. "growing"
    is the CPU path (a candidate set grown until it holds every kept token), "exact" the full sort
    (CUDA, graph capture), "top_k_bound" the candidate set sized by the batch's largest top_k."""
    import torch

    rows, scores = _grid_batch()
    if mode == "top_k_bound":  # only valid when every filtering row has a top_k
        keep = [i for i, (t, p, k, _) in enumerate(rows) if not (t > 0 and k == 0 and p < 1.0)]
        rows, scores = [rows[i] for i in keep], scores[keep]
    args = _sampling_args([(t, p, k, m, i, 0) for i, (t, p, k, m) in enumerate(rows)])
    candidates = max(k for _, _, k, _ in rows) if mode == "top_k_bound" else None
    ours = govllm_distribution(scores, args, exact=mode == "exact", candidates=candidates)
    assert torch.allclose(ours.sum(-1), torch.ones(len(rows)), atol=1e-5)
    _assert_rows_match(ours, scores, rows)


def test_draws_stay_within_transformers_kept_set():
    """The tokens sample() draws (the path the manager runs) lie in the support of transformers'
    processors and follow its probabilities, for rows of many parameter sets mixed in one batch."""
    import torch

    base = torch.log(torch.tensor([0.34, 0.2, 0.14, 0.11, 0.09, 0.06, 0.04, 0.02]))
    combos = [(t, p, k, m) for t in (0.0, 0.7, 1.0, 1.5) for p in (1.0, 0.85, 0.6) for k in (0, 2, 4)
              for m in (0.0, 0.2)]
    draws = 2000
    rows = [(t, p, k, m, c, pos) for c, (t, p, k, m) in enumerate(combos) for pos in range(draws)]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [rows[i] for i in perm]
    scores = base.repeat(len(rows), 1)
    sampler = hf_sampler.build_sampler_class()
    picks = sampler.sample(scores, _sampling_args(rows)).argmax(-1)
    combo_of = torch.tensor([r[4] for r in rows])
    for c, (t, p, k, m) in enumerate(combos):
        ref = hf_distribution(base, t, p, k, m)
        freq = torch.bincount(picks[combo_of == c], minlength=base.numel()).float() / draws
        outside = [tok for tok in freq.nonzero().flatten().tolist() if ref[tok] == 0]
        assert not outside, f"temperature={t} top_p={p} top_k={k} min_p={m}: drew {outside}, outside {ref.tolist()}"
        assert (freq - ref).abs().max() < 0.035, (t, p, k, m, freq.tolist(), ref.tolist())


def test_planned_path_matches_repetition_penalty_processor():
    """The planned path (penalties, here repetition) then sampling equals transformers'
    RepetitionPenaltyLogitsProcessor over prompt and output tokens, then the warpers."""
    import torch

    gen = torch.Generator().manual_seed(3)
    vocab = 50
    combos = [(t, p, k, m, r) for t in (0.0, 0.8, 1.3) for p in (1.0, 0.7) for k in (0, 5) for m in (0.0, 0.1)
              for r in (1.0, 1.4, 0.7)]
    requests, rows, histories = [], [], []
    for i, (t, p, k, m, r) in enumerate(combos):
        prompt = torch.randint(0, vocab, (6,), generator=gen).tolist()
        output = torch.randint(0, vocab, (3,), generator=gen).tolist()
        params = RequestSampling(temperature=t, top_p=p, top_k=k, min_p=m, repetition_penalty=r, key=i, prompt_len=6)
        requests.append(fake_request(f"r{i}", params, prompt, output))
        rows.append((t, p, k, m))
        histories.append(prompt + output)
    sampler = hf_sampler.build_sampler_class()()
    storage = torch.zeros(sampler.ROWS, len(combos), dtype=torch.int32)
    sampler.fill_defaults(storage)
    sampler.prepare_tensor_args(requests, storage)
    assert sampler._plan is not None
    scores = torch.randn(len(combos), vocab, generator=gen) * 2.0
    logits = sampler.planned_logits(scores, sampler._plan)
    ours = govllm_distribution(logits, storage)
    for i, ((t, p, k, m), r) in enumerate(zip(rows, (c[4] for c in combos))):
        ref = hf_distribution(scores[i], t, p, k, m, input_ids=histories[i], repetition=r)
        assert torch.equal(ours[i] > 0, ref > 0), (i, combos[i])
        assert torch.allclose(ours[i], ref, atol=1e-5), (i, combos[i])
    picks = sampler(None, scores, storage).argmax(-1)
    assert all(ours[i, tok] > 0 for i, tok in enumerate(picks.tolist()))
