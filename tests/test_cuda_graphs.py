"""Static decode's CUDA-graph bookkeeping, on CPU: the graph is stood in for by a recorder whose
replay re-runs the recorded forward into the same output tensor. What this checks is everything
but the capture itself: one capture per bucket, replays on later steps, the device-side padding
mask and the constant host lengths the recorded forward sees (Triton kernels, interpreted), EPLB
counts free of warm-up runs. The real capture runs in bench/gpu_validate.py stage 2."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import StaticDecode, graph_blocker
from launch.make_checkpoint import make_checkpoint

PROMPTS = [list(range(3, 3 + n)) for n in (1, 7, 23, 40, 5)]
LENGTHS = [6, 5, 3, 2, 1]      # the decode batch shrinks: buckets 4, 2, 1
TRITON = dict(attention_backend="triton", moe_backend="triton", linear_backend="torch")


class RerunGraph:
    def __init__(self, forward):
        self.forward = forward
        self.out = forward()   # a real capture executes nothing; _capture undoes this run's counts

    def replay(self):
        self.out.copy_(self.forward())


def _run(path, graphs: bool, **opts):
    llm = LLM(path, kv_block_size=16, num_kv_blocks=64, max_num_seqs=8, **TRITON, **opts)
    if graphs:
        llm.engine.worker.runner.static.use_graphs = True   # CPU: graphs are otherwise off
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
                                  for k in LENGTHS])
    loads = [layer.expert_load.clone() for layer in llm.engine.worker.runner.model.moe_layers()]
    return llm, [o.token_ids for o in outs], loads


def test_replayed_buckets_give_the_plain_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(StaticDecode, "_record", lambda self, forward: (g := RerunGraph(forward), g.out))
    path = make_checkpoint(str(tmp_path / "t"), "tiny-v3", tokenizer="none")
    _, plain, plain_loads = _run(path, graphs=False)
    llm, got, loads = _run(path, graphs=True, static_decode=True)
    assert got == plain
    for a, b in zip(loads, plain_loads):   # neither padding rows nor warm-up runs were counted
        assert torch.equal(a, b)
    sd = llm.engine.worker.runner.static
    assert sd.blocker == "" and sorted(sd.graphs) == [1, 2, 4]
    assert sd.replays == max(LENGTHS) - 1   # every decode step replayed (the first token: prefill)
    llm.engine.worker.runner.drop_graphs()
    assert not sd.graphs


@pytest.mark.parametrize("backends, mla_path, reason", [
    (dict(attention_backend="torch", moe_backend="triton"), "auto", "torch attention"),
    (dict(attention_backend="triton", moe_backend="torch"), "auto", "torch MoE"),
    (TRITON, "expanded", "expanded"),
])
def test_graph_blockers(tmp_path, backends, mla_path, reason):
    path = make_checkpoint(str(tmp_path / "t"), "tiny-v3", tokenizer="none")
    llm = LLM(path, kv_block_size=16, num_kv_blocks=64, max_num_seqs=8, **backends)
    assert reason in graph_blocker(llm.engine.worker.runner.model, mla_path)
