"""The engine's batched, chunked, preempted and sampled paths must agree with the plain path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tailserve.engine.model_runner import kv_bytes_per_block
from tailserve.engine.step_time import StepTimeModel
from tailserve.sampling import SamplingParams
from tests.tiny import MODEL_KINDS, TINY, run_all, tiny_engine, tiny_model, tiny_model_of

MODEL = tiny_model()
_MODELS: dict = {"torch": MODEL}


def model_of(kind: str):
    """Each model path, built once."""
    if kind not in _MODELS:
        _MODELS[kind] = tiny_model_of(kind)
    return _MODELS[kind]


@pytest.fixture(params=MODEL_KINDS)
def model(request):
    return model_of(request.param)


LENGTHS = [1, 3, 7, 16, 29, 64, 130]


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def sequential(ps: list[list[int]], params: SamplingParams, model=MODEL, **options) -> list[list[int]]:
    outs = []
    for p in ps:
        eng = tiny_engine(model, **options)
        eng.add_request("r", p, params)
        outs.append(run_all(eng)["r"])
    return outs


def batched(ps: list[list[int]], params: SamplingParams, model=MODEL, **options) -> list[list[int]]:
    eng = tiny_engine(model, **options)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, params)
    got = run_all(eng)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return [got[str(i)] for i in range(len(ps))]


def test_batched_equals_sequential(model) -> None:
    ps = prompts()
    ref = sequential(ps, greedy(), model)
    assert all(len(r) == 12 for r in ref)
    assert batched(ps, greedy(), model) == ref


def test_chunked_equals_unchunked(model) -> None:
    ps = prompts(1)
    ref = batched(ps, greedy(), model, max_num_batched_tokens=512, chunked_prefill=False)
    assert batched(ps, greedy(), model, max_num_batched_tokens=8, max_num_seqs=8) == ref
    assert batched(ps, greedy(), model, max_num_batched_tokens=13, max_num_seqs=4) == ref


def test_preempted_and_recomputed_equals_uninterrupted(model) -> None:
    ps = prompts(2)
    ref = batched(ps, greedy(24), model)
    bs = tiny_engine(model).block_manager.block_size
    per_block = kv_bytes_per_block(model, bs)
    eng = tiny_engine(model, kv_cache_memory=240 // bs * per_block / (1 << 30), prefix_cache=False)
    assert eng.block_manager.num_blocks * bs == 240
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, greedy(24))
    got = run_all(eng)
    assert eng.scheduler.num_preemptions > 0
    assert [got[str(i)] for i in range(len(ps))] == ref
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_prefix_cache_on_equals_off(model) -> None:
    shared = prompts(3)[-1]
    ps = [shared + p for p in prompts(4)]
    off = batched(ps, greedy(), model, prefix_cache=False)
    eng = tiny_engine(model)
    eng.add_request("warm", shared, greedy(2))
    run_all(eng)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, greedy())
    got = run_all(eng)
    assert [got[str(i)] for i in range(len(ps))] == off
    bs = eng.block_manager.block_size
    assert eng.block_manager.prefix_hits >= len(ps) * (len(shared) // bs * bs)


def _mid_block_prompts(bs: int, min_partial: int) -> tuple[list[int], int, list[list[int]]]:
    """A long prompt to warm the cache with, a length `cut` that ends inside its last full block with
    more than `min_partial` tokens of that block, and prompts that share exactly its first `cut` tokens."""
    shared = prompts(6)[-1]
    cut = (len(shared) // bs - 1) * bs + min_partial + 2
    tails = [[t if t != shared[cut] else t + 1 for t in p[:1]] + p[1:] for p in prompts(7)[3:]]
    return shared, cut, [shared[:cut] + t for t in tails]


def test_a_prefix_ending_inside_a_block_is_copied_not_recomputed(model) -> None:
    bm = tiny_engine(model).block_manager
    shared, cut, ps = _mid_block_prompts(bm.block_size, bm.min_partial_tokens)
    off = batched(ps, greedy(), model, prefix_cache=False)
    eng = tiny_engine(model)
    eng.add_request("warm", shared, greedy(1))
    run_all(eng)
    cached: dict[str, int] = {}
    for i, p in enumerate(ps):  # together: one step copies several blocks, some from the same source
        eng.add_request(str(i), p, greedy())
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            cached[o.request_id] = o.num_cached_tokens
    assert [got[str(i)] for i in range(len(ps))] == off
    assert all(cached[str(i)] == cut for i in range(len(ps)))  # full blocks, then the partial one
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_a_partial_hits_source_evicted_in_the_same_step_is_still_read(model) -> None:
    """The pool holds one prompt and no more: admitting it evicts the oldest cached block, which is
    the partial hit's source (the warm prompt's last full block, freed first), and hands it to the
    prompt as a fresh block that this very step writes into, after the copy has read it."""
    bm = tiny_engine(model).block_manager
    bs = bm.block_size
    shared, cut, ps = _mid_block_prompts(bs, bm.min_partial_tokens)
    prompt = (ps[0] + shared)[: (cut // bs + 2) * bs + 1]  # room for bs - 1 tokens in its last block
    params = greedy(bs - 1)
    off = batched([prompt], params, model, prefix_cache=False)
    blocks = -(-len(prompt) // bs)
    per_block = kv_bytes_per_block(model, bs)
    eng = tiny_engine(model, kv_cache_memory=blocks * per_block / (1 << 30), max_num_batched_tokens=512)
    assert eng.block_manager.num_blocks == blocks
    eng.add_request("warm", shared, greedy(1))
    run_all(eng)
    hit = eng.block_manager.lookup_partial(prompt, eng.block_manager.lookup(prompt))
    assert hit is not None
    seq = eng.add_request("p", prompt, params)
    got = {"p": [t for o in eng.step() for t in o.new_token_ids]}
    assert hit.block_id in seq.table.blocks[cut // bs + 1 :]  # evicted, then handed out as a fresh block
    got["p"] += run_all(eng).get("p", [])
    assert got["p"] == off[0]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_a_follow_up_reuses_every_computed_token_of_the_conversation(model) -> None:
    """A conversation's next turn re-sends the last one with its reply: the reply's last block, partial
    when the request finished, was indexed then, so only the reply's last token and the new turn run."""
    first = prompts(8)[5]
    eng = tiny_engine(model)
    eng.add_request("1", first, greedy(7))
    reply = run_all(eng)["1"]
    follow = first + reply + [5, 6, 7]
    bm = eng.block_manager
    assert (len(first) + len(reply) - 1) % bm.block_size >= bm.min_partial_tokens  # a tail worth a copy
    eng.add_request("2", follow, greedy())
    got: list[int] = []
    cached = 0
    while eng.has_unfinished():
        for o in eng.step():
            got += o.new_token_ids
            cached = o.num_cached_tokens
    assert cached == len(first) + len(reply) - 1  # the last reply token was sampled, never computed
    assert got == batched([follow], greedy(), model, prefix_cache=False)[0]
    assert bm.num_free_blocks == bm.num_blocks


def test_seeded_sampling_is_reproducible_across_batches(model) -> None:
    ps = prompts(5)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = sequential([ps[3]], seeded, model)[0]
    eng = tiny_engine(model, max_num_batched_tokens=16, max_num_seqs=8)
    for i, p in enumerate(ps):
        params = seeded if i == 3 else SamplingParams(max_tokens=9, temperature=0.8, ignore_eos=True)
        eng.add_request(str(i), p, params)
    assert run_all(eng)["3"] == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert sequential([ps[3]], other_seed, model)[0] != alone


def test_stop_conditions() -> None:
    eng = tiny_engine(MODEL)
    p = prompts(6)[4]
    free_run = sequential([p], greedy(20))[0]
    stop_tok = free_run[5]
    first = free_run.index(stop_tok)
    eng.add_request("stop", p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))
    eng.add_request("len", p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    assert [t for o in outs["stop"] for t in o.new_token_ids] == free_run[: first + 1]
    assert outs["stop"][-1].finish_reason == "stop" and outs["stop"][-1].stop_reason == stop_tok
    assert outs["len"][-1].finish_reason == "length" and outs["len"][-1].num_output_tokens == 3


def test_eos_and_min_tokens() -> None:
    eos = TINY.eos_token_ids[0]
    # Make the end token the obvious choice from the first step on.
    model = tiny_model(seed=7)
    bonus = torch.zeros(TINY.vocab_size)
    bonus[eos] = 1e4
    plain_logits = model.logits
    model.logits = lambda hidden: plain_logits(hidden) + bonus
    eng = tiny_engine(model)
    eng.add_request("eos", [5, 6, 7], SamplingParams(max_tokens=10, temperature=0))
    eng.add_request("min", [5, 6, 7], SamplingParams(max_tokens=10, min_tokens=4, temperature=0))
    eng.add_request("ign", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    got = run_all(eng)
    assert got["eos"] == [eos]
    assert len(got["min"]) == 5 and eos not in got["min"][:4] and got["min"][4] == eos
    assert got["ign"] == [eos] * 6


def test_logprobs() -> None:
    eng = tiny_engine(MODEL)
    eng.add_request(
        "lp", prompts(8)[3], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    )
    lps = []
    while eng.has_unfinished():
        for o in eng.step():
            lps.extend(o.logprobs or [])
    assert len(lps) == 4
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id and lp.top[0][2] == pytest.approx(lp.logprob)


def test_abort_frees_blocks_and_others_continue() -> None:
    eng = tiny_engine(MODEL)
    ps = prompts(9)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, greedy(30))
    counts = dict.fromkeys(map(str, range(len(ps))), 0)
    for _ in range(3):
        for o in eng.step():
            counts[o.request_id] += len(o.new_token_ids)
    out = eng.abort("5")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert eng.abort("5") is None
    for rid, toks in run_all(eng).items():
        counts[rid] += len(toks)
    assert all(counts[str(i)] == 30 for i in range(len(ps)) if i != 5)
    assert counts["5"] < 30
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_deadline_aborts_with_error() -> None:
    eng = tiny_engine(MODEL)
    eng.add_request("late", prompts(10)[2], greedy(1000 - 7), deadline=0.0)
    outs = eng.step()
    assert outs[0].finished and outs[0].finish_reason == "abort" and "deadline" in outs[0].error
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], {}, "prompt is empty"),
        ([1] * 1000, {"max_tokens": 100}, "maximum context length is 1024"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"temperature": -0.5}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_p": 1.5}, "top_p"),
        ([1, 999], {}, "token ids"),
    ],
)
def test_bad_input_is_rejected_before_queueing(prompt: list[int], params: dict, message: str) -> None:
    eng = tiny_engine(MODEL)
    eng.add_request("ok", [3, 4, 5], greedy(4))
    with pytest.raises(ValueError, match=message):
        eng.add_request("bad", prompt, SamplingParams(**params))
    assert "bad" not in eng.requests
    assert len(run_all(eng)["ok"]) == 4


def test_duplicate_request_id_is_rejected() -> None:
    eng = tiny_engine(MODEL)
    eng.add_request("same", [3, 4], greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("same", [3, 4], greedy(2))


@pytest.mark.parametrize("kind", MODEL_KINDS)
@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=10),
    st.sampled_from([8, 16, 64]),
    st.integers(24, 80),
    st.sets(st.integers(0, 9), max_size=3),
)
def test_random_request_streams_under_kv_pressure(
    kind: str, reqs: list[tuple[int, int, int]], budget: int, num_blocks: int, aborted: set[int]
) -> None:
    """Every admitted request finishes or is aborted, outputs match the plain path, no block leaks."""
    model = model_of(kind)
    bases = prompts(11)
    ps = [bases[6][:40][: 4 * pre] + bases[5][:n] for pre, n, _ in reqs]
    bs = tiny_engine(model).block_manager.block_size
    per_block = kv_bytes_per_block(model, bs)
    eng = tiny_engine(
        model,
        kv_cache_memory=num_blocks * 4 // bs * per_block / (1 << 30),
        max_num_batched_tokens=budget,
        max_num_seqs=8,
    )
    for i, (p, (_, _, m)) in enumerate(zip(ps, reqs)):
        eng.add_request(str(i), p, greedy(m))
    got: dict[str, list[int]] = {}
    finished = set()
    step = 0
    while eng.has_unfinished():
        outs = eng.step()
        step += 1
        if step == 2:
            outs += [o for i in aborted if (o := eng.abort(str(i))) is not None]
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished.add(o.request_id)
        assert step < 2000, "the engine stopped making progress"
    assert finished == {str(i) for i in range(len(ps))}
    for i, (p, (_, _, m)) in enumerate(zip(ps, reqs)):
        if i not in aborted:
            assert got[str(i)] == sequential([p], greedy(m), model)[0]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_step_time_model_recovers_affine_cost() -> None:
    model = StepTimeModel()
    assert model.rate(512) == 0.0  # nothing measured: no prediction
    for tokens in [1, 8, 512, 16, 300, 2, 512, 64] * 4:
        model.observe(tokens, 0.010 + 0.0005 * tokens)
    a, b = model.coefficients()
    assert a == pytest.approx(0.010, rel=1e-6) and b == pytest.approx(0.0005, rel=1e-6)
    assert model.rate(512) == pytest.approx(512 / (0.010 + 0.0005 * 512))


def test_step_time_model_keeps_predicting_through_steps_of_one_size() -> None:
    """A saturated engine runs full-budget steps only: the fit keeps its intercept and its slope
    follows those steps' time, instead of the prediction going blank while the queue is longest."""
    model = StepTimeModel()
    for _ in range(300):
        model.observe(512, 0.010 + 0.0005 * 512)
    assert model.rate(512) == 0.0  # one size only, ever: a and b cannot be told apart
    for tokens in [1, 8, 512, 16, 300, 2, 512, 64] * 4:
        model.observe(tokens, 0.010 + 0.0005 * tokens)
    for _ in range(600):  # long enough for the other sizes' weights to decay below the fit's tolerance
        model.observe(512, 0.010 + 0.0005 * 512)
        assert model.seconds(512) == pytest.approx(0.010 + 0.0005 * 512, rel=1e-6)
    assert model.coefficients() == pytest.approx((0.010, 0.0005), rel=1e-3)
    for _ in range(600):  # the machine got busier: full steps take twice as long
        model.observe(512, 2 * (0.010 + 0.0005 * 512))
    assert model.seconds(512) == pytest.approx(2 * (0.010 + 0.0005 * 512), rel=1e-6)


def test_stats_refresh_after_abort_without_a_step() -> None:
    eng = tiny_engine(MODEL)
    eng.add_request("a", prompts(12)[5], greedy(50))
    eng.step()
    assert eng.stats.num_running == 1
    eng.abort("a")
    assert eng.stats.num_running == 0 and eng.stats.num_free_blocks == eng.block_manager.num_blocks
