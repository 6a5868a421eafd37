"""The engine end to end on CPU: greedy tokens equal transformers' generate token for token."""
import pytest
import torch

from engine import LLM, SamplingParams
from launch.make_checkpoint import make_checkpoint
from reference import TINY_V2, TINY_V3, make_hf_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [list(range(3, 3 + n)) for n in (1, 7, 23, 40)] + [[9, 8, 7, 6, 5]]
# shared prefixes: three prompts open with the same 40 tokens (2+ full blocks of 16)
# three distinct 14-token prompts: each grows past its first 16-token block while decoding
PREEMPT = [list(range(10 + 30 * i, 24 + 30 * i)) for i in range(3)]
SHARED = [[(i * 7) % 200 + 2 for i in range(40)] + tail for tail in ([5, 6], [7], [8, 9, 10])]


def hf_greedy(hf, prompts, n=10):
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module", params=["v3", "v2"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(d, base=TINY_V3 if request.param == "v3" else TINY_V2)
    prompts = PROMPTS + SHARED + PREEMPT
    return str(d), {tuple(p): r for p, r in zip(prompts, hf_greedy(hf, prompts))}


@pytest.mark.parametrize("opts", [
    dict(),                                               # plenty of room, mixed lengths in one batch
    dict(max_num_batched_tokens=8, max_num_seqs=4),       # chunked prefill across many steps
    dict(mla_path="expanded"),                            # decode through the expanded path too
], ids=["plain", "chunked", "expanded"])
def test_greedy_matches_transformers(ckpt, opts):
    path, ref = ckpt
    llm = LLM(path, kv_block_size=16, **dict(dict(num_kv_blocks=64), **opts))
    outs = llm.generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == ref[tuple(p)], (p, opts)
        assert o.finish_reason == "length" and len(o.metrics.token_times) == 10
    bm = llm.engine.worker.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_by_recompute_keeps_outputs_exact(ckpt):
    path, ref = ckpt
    # 3 blocks for 3 requests that each need 2: immediate dispatch admits all, then must preempt
    llm = LLM(path, kv_block_size=16, num_kv_blocks=3, max_num_seqs=3, scheduler="immediate-rr")
    outs = llm.generate(PREEMPT, GREEDY)
    assert llm.engine.worker.num_preempted > 0
    for p, o in zip(PREEMPT, outs):
        assert o.token_ids == ref[tuple(p)]


def test_prefix_cache_hits_keep_outputs_exact(ckpt):
    path, ref = ckpt
    llm = LLM(path, kv_block_size=16, num_kv_blocks=64)
    first = llm.generate(SHARED[:1], GREEDY)[0]
    worker = llm.engine.worker
    rest = llm.generate(SHARED[1:], GREEDY)
    assert first.token_ids == ref[tuple(SHARED[0])]
    for p, o in zip(SHARED[1:], rest):
        assert o.token_ids == ref[tuple(p)]
    bm = worker.scheduler.block_manager
    assert len(bm.hash_to_block) >= 2  # the shared 40-token prefix is cached as full blocks


def test_prefix_cache_is_used(tmp_path):
    make_hf_checkpoint(tmp_path)
    llm = LLM(str(tmp_path), kv_block_size=16, num_kv_blocks=64, scheduler="immediate-rr")
    llm.generate(SHARED[:1], GREEDY)
    seen = []
    sched = llm.engine.worker.scheduler
    orig = sched.schedule

    def spy(budget=None):
        b = orig(budget)
        seen.extend((r.request_id, r.num_cached_tokens) for r, _ in b.items)
        return b
    sched.schedule = spy
    out = llm.generate(SHARED[1:2], GREEDY)[0]
    assert max(c for _, c in seen) == 32   # two full 16-token blocks of the shared prefix
    assert out.num_cached_tokens == 32     # ...and the output says so


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(str(d), "tiny-v3")
    return str(d)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    llm = LLM(tiny)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, max_tokens=12, seed=123,
                        ignore_eos=True)
    a = llm.generate(["Hello world"], sp)[0].token_ids
    b = llm.generate(["Hello world", "Another prompt entirely"],
                     [sp, SamplingParams(temperature=1.0, max_tokens=5)])[0].token_ids
    c = llm.generate(["Hello world"],
                     SamplingParams(temperature=1.0, max_tokens=12, seed=124, ignore_eos=True))[0].token_ids
    assert a == b
    assert a != c


def test_stop_strings_and_stop_ids(tiny):
    llm = LLM(tiny)
    free = llm.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert free.text and len(free.token_ids) == 24
    stop = free.text[len(free.text) // 2:][:2]
    out = llm.generate(["The quick brown"],
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    tid = free.token_ids[5]
    out = llm.generate(["The quick brown"],
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[tid]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(tid) + 1]


def test_bad_input_is_a_clear_error_for_that_request_only(tiny):
    llm = LLM(tiny, max_model_len=64, num_kv_blocks=4, kv_block_size=16)
    good = [5, 6, 7]
    outs = llm.generate([good, [], list(range(70)), good], SamplingParams(temperature=0, max_tokens=4))
    assert outs[0].token_ids == outs[3].token_ids and len(outs[0].token_ids) == 4
    assert outs[1].finish_reason.startswith("error:") and "empty" in outs[1].finish_reason
    assert "max_model_len" in outs[2].finish_reason
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(tiny, max_num_seq=4)
    small = LLM(tiny, max_model_len=2048, num_kv_blocks=2, kv_block_size=16)
    with pytest.raises(ValueError, match="never fit"):
        small.engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=2))


def test_online_add_step_and_stream(tiny):
    llm = LLM(tiny)
    eng = llm.engine
    a = eng.add_request("first request", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    seen = {}
    for i, out in enumerate(eng.stream()):
        seen.setdefault(out.request_id, []).extend(out.new_token_ids)
        if i == 1:   # arrives while the first is running
            b = eng.add_request([7, 8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert seen[a] == eng.outputs[a].token_ids and len(seen[a]) == 6
    assert seen[b] == eng.outputs[b].token_ids and len(seen[b]) == 3
    m = eng.outputs[a].metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time and m.ttft >= 0


def test_triton_backends_generate_the_same_tokens(tiny):
    """Through the Triton kernels (interpreted on CPU) the engine's greedy tokens equal the torch path."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], list(range(100, 120))]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ref = [o.token_ids for o in LLM(tiny, kv_block_size=16).generate(prompts, sp)]
    tri = LLM(tiny, kv_block_size=16, attention_backend="triton", moe_backend="triton")
    assert [o.token_ids for o in tri.generate(prompts, sp)] == ref


def test_request_order_options(tiny):
    """sjf / priority orders change who is admitted first on a rank, never the tokens."""
    sp_long = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sp_short_urgent = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, priority=5)
    prompts = [list(range(10, 200)), [7, 8]]
    outs = {}
    for order in ("fcfs", "sjf", "priority"):
        llm = LLM(tiny, kv_block_size=16, max_num_seqs=1, scheduler="immediate-rr", order=order)
        res = llm.generate(prompts, [sp_long, sp_short_urgent])
        outs[order] = ([o.token_ids for o in res], [o.metrics.first_token_time for o in res])
    assert outs["fcfs"][0] == outs["sjf"][0] == outs["priority"][0]
    assert outs["fcfs"][1][0] < outs["fcfs"][1][1]          # arrival order: the long prompt first
    assert outs["sjf"][1][1] < outs["sjf"][1][0]            # shortest job first
    assert outs["priority"][1][1] < outs["priority"][1][0]  # the urgent one first
    with pytest.raises(ValueError, match="order"):
        LLM(tiny, order="random")


def test_serving_replay_runs_a_request_that_arrives_while_the_engine_is_idle(tiny):
    # The replay loop sleeps while idle until the next arrival; the request read after that sleep
    # (here the last one, long after the first has finished) must still be served.
    from bench.serving import serve
    from scheduler.sim.workload import RequestSpec
    specs = [RequestSpec(0.0, 4, 2, prompt_token_ids=[5, 6, 7, 8]),
             RequestSpec(0.3, 4, 2, prompt_token_ids=[9, 10, 11, 12])]
    run = serve(LLM(tiny), specs, progress=False)
    assert [len(o.token_ids) for o in run.outputs] == [2, 2]
    assert run.summary()["completed"] == 2
