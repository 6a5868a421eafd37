"""The static-buffer padded decode path (what CUDA graphs capture) gives exactly the plain path's
tokens, keeps EPLB counts free of padding rows, and writes nothing outside the scratch block."""
import torch

from engine import LLM, SamplingParams
from engine.kv_cache import scratch_block
from launch.make_checkpoint import make_checkpoint

PROMPTS = [list(range(3, 3 + n)) for n in (1, 7, 23, 40, 5)]   # 5 sequences: bucket 8, 3 padding rows


def _run(path, **opts):
    llm = LLM(path, kv_block_size=16, num_kv_blocks=64, max_num_seqs=8, **opts)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    sampled = llm.generate(PROMPTS, [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12,
                                                    ignore_eos=True) for i in range(len(PROMPTS))])
    loads = [layer.expert_load.clone() for layer in llm.engine.worker.runner.model.moe_layers()]
    return llm, [o.token_ids for o in greedy + sampled], loads


def test_static_decode_gives_exactly_the_plain_tokens(tmp_path):
    path = make_checkpoint(str(tmp_path / "t"), "tiny-v3", tokenizer="none")
    _, plain, plain_loads = _run(path)
    llm, static, static_loads = _run(path, static_decode=True)
    assert static == plain
    for a, b in zip(static_loads, plain_loads):   # padding rows chose no expert
        assert torch.equal(a, b)
    runner = llm.engine.worker.runner
    assert runner.static is not None and runner.static.max_batch == 8
    cache = runner.kv_caches[0]
    assert scratch_block(cache) == cache.shape[0] == runner.static.scratch
    assert runner.static.caches[0][runner.static.scratch].abs().sum() > 0   # padding wrote only there
