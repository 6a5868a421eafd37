"""The batched sampler: exact greedy, per-request streams independent of the batch, filtered supports
and the sampled distribution."""
import torch

from engine import sampling
from engine.sampling import Sampler, SamplingParams


def _logits(b, v=300, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_are_the_argmax_even_beside_sampled_rows():
    x = _logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(top_k=1, temperature=2.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0), SamplingParams(temperature=0.5, min_p=0.2)]
    out = Sampler()(x, [str(i) for i in range(6)], params)
    want = x.argmax(-1).tolist()
    assert [out[i] for i in (0, 2, 4)] == [want[i] for i in (0, 2, 4)]
    assert Sampler()(x, [str(i) for i in range(6)], [SamplingParams(temperature=0)] * 6) == want


def test_seeded_streams_do_not_depend_on_batch_composition_or_row():
    sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, min_p=0.01, seed=7)
    x = _logits(1, seed=3)
    alone, crowd = Sampler(0), Sampler(99)
    a, b = [], []
    for step in range(20):
        a += alone(x, ["r"], [sp])
        others = _logits(5, seed=100 + step)
        pos = step % 6
        batch = torch.cat([others[:pos], x, others[pos:]])
        ps = [SamplingParams(temperature=0.7, top_k=-1 if step % 2 else 5)] * 5
        ps = ps[:pos] + [sp] + ps[pos:]
        ids = [f"o{j}" for j in range(pos)] + ["r"] + [f"o{j}" for j in range(pos, 5)]
        b.append(crowd(batch, ids, ps)[pos])
    assert a == b
    assert len(set(a)) > 3   # it really samples
    c = Sampler(0)
    other_seed = [c(x, ["r"], [SamplingParams(temperature=1.0, top_p=0.95, top_k=200, min_p=0.01, seed=8)])[0]
                  for _ in range(20)]
    assert other_seed != a


def test_skip_continues_the_same_stream():
    sp = SamplingParams(temperature=1.0, seed=5)
    x = _logits(1, seed=4)
    full = Sampler()
    whole = [full(x, ["r"], [sp])[0] for _ in range(6)]
    resumed = Sampler()
    resumed.skip("r", sp)
    assert [resumed(x, ["r"], [sp])[0] for _ in range(5)] == whole[1:]


def _draws(row, sp, n=6000):
    """n independent draws (one request per seed) from one logits row, in one batched call."""
    params = [SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p,
                             seed=s) for s in range(n)]
    return torch.tensor(Sampler()(row.expand(n, -1), [str(s) for s in range(n)], params))


def _expected(row, sp):
    """The filtered distribution, computed the slow way (sort per row)."""
    v = row / sp.temperature
    order = v.argsort(descending=True)
    keep = torch.zeros_like(v, dtype=torch.bool)
    k = sp.top_k if sp.top_k > 0 else v.numel()
    keep[order[:k]] = True
    p = v.masked_fill(~keep, float("-inf")).softmax(-1)
    if sp.min_p > 0:
        keep &= p >= sp.min_p * p.max()
        p = v.masked_fill(~keep, float("-inf")).softmax(-1)
    sp_, o = p.sort(descending=True)
    nucleus = (sp_.cumsum(0) - sp_) < sp.top_p
    keep2 = torch.zeros_like(keep)
    keep2[o[nucleus]] = True
    keep &= keep2
    return v.masked_fill(~keep, float("-inf")).softmax(-1)


def test_supports_and_frequencies_follow_the_filtered_distribution():
    row = _logits(1, v=64, seed=11)[0]
    for sp in (SamplingParams(temperature=0.7, top_k=10), SamplingParams(temperature=1.0, top_p=0.8),
               SamplingParams(temperature=0.7, top_p=0.9, top_k=50),
               SamplingParams(temperature=1.5, min_p=0.1),
               SamplingParams(temperature=1.0)):
        want = _expected(row, sp)
        got = torch.bincount(_draws(row, sp), minlength=row.numel()).float() / 6000
        assert (got[want == 0] == 0).all(), sp                 # never outside the support
        # each kept token's frequency within 5 standard errors of its probability
        se = (want * (1 - want) / 6000).sqrt()
        assert ((got - want).abs() <= 5 * se + 1e-3).all(), (sp, (got - want).abs().max())


def test_topk_candidates_and_full_sort_give_the_same_token(monkeypatch):
    x = _logits(8, v=500, seed=2)
    ps = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=i) for i in range(8)]
    a = Sampler()(x, [str(i) for i in range(8)], ps)
    monkeypatch.setattr(sampling, "TOPK_CAP", 0)    # force the sorted full-vocabulary path
    assert Sampler()(x, [str(i) for i in range(8)], ps) == a
