"""bench.fit_cost: the least-squares fit recovers known coefficients, and its JSON loads as a cost model."""
import random

import pytest

from bench.fit_cost import fit, quality, split, write
from scheduler.allocation import attention_pairs
from scheduler.sim import LinearCost, RankWork, make_cost_model

TRUE = {"c0": 0.004, "c_tok": 3e-5, "c_ctx": 2e-9, "c_seq": 1e-4}


def synthetic_records(noise=0.0, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(300):
        if rng.random() < 0.5:   # a decode batch of k sequences over contexts up to 4k
            ctx = [rng.randint(16, 4096) for _ in range(rng.randint(1, 64))]
            items = [(c, 1) for c in ctx]
        else:                    # a prefill chunk after some cached context
            items = [(rng.choice([0, 512, 2048]), rng.randint(16, 2048))]
        tokens = sum(n for _, n in items)
        context = sum(attention_pairs(n, c) for c, n in items)
        t = TRUE["c0"] + TRUE["c_tok"] * tokens + TRUE["c_ctx"] * context + TRUE["c_seq"] * len(items)
        out.append({"tokens": tokens, "context": context, "seqs": len(items),
                    "time_s": t * (1 + noise * rng.uniform(-1, 1))})
    return out


@pytest.mark.parametrize("relative", [True, False])
def test_fit_recovers_known_coefficients(relative):
    coef = fit(synthetic_records(), relative=relative)
    for k, v in TRUE.items():
        assert coef[k] == pytest.approx(v, rel=1e-6)


def test_noisy_fit_is_close_and_scored():
    train, test = split(synthetic_records(noise=0.05), 0.2, seed=1)
    coef = fit(train)
    assert coef["c_tok"] == pytest.approx(TRUE["c_tok"], rel=0.05)
    q = quality(coef, test)
    assert q["r2"] > 0.98 and q["mape"] < 0.05 and q["steps"] == 60


def test_negative_coefficient_is_clipped():
    recs = [{"tokens": n, "context": 0.0, "seqs": 1, "time_s": 0.01 + 1e-4 * n} for n in range(1, 50)]
    recs += [{"tokens": n, "context": 1e6, "seqs": 1, "time_s": 0.009 + 1e-4 * n} for n in range(1, 50)]
    coef = fit(recs)
    assert coef["c_ctx"] == 0.0 and min(coef.values()) >= 0.0


def test_written_json_loads_as_fitted_cost_model(tmp_path):
    path = tmp_path / "fit.json"
    write(str(path), fit(synthetic_records()), {"heldout": {"r2": 1.0}})
    cost = make_cost_model(f"fitted:{path}", 1)
    assert isinstance(cost, LinearCost)
    w = RankWork(tokens=100, seqs=2, prefill_pairs=5000.0)
    t, busy = cost.step([w])
    expect = TRUE["c0"] + TRUE["c_tok"] * 100 + TRUE["c_ctx"] * 5000 + TRUE["c_seq"] * 2
    assert t == pytest.approx(expect, rel=1e-6) and busy == [pytest.approx(expect, rel=1e-6)]


def test_measure_records_each_step_of_a_real_engine(tmp_path):
    """The sweep drives a real engine (tiny-v3): one record per step with what the rank computed,
    prefill and decode steps both, and the scheduler is left as it was found."""
    from bench.fit_cost import measure
    from engine import LLM
    from launch.make_checkpoint import make_checkpoint
    llm = LLM(make_checkpoint(str(tmp_path / "ckpt"), "tiny-v3"), max_num_batched_tokens=64)
    sched = llm.engine.worker.scheduler
    schedule = sched.schedule
    records = measure(llm, [(2, 40, 0), (2, 8, 2)], max_tokens=3)
    assert sched.schedule == schedule
    first = records[0]   # two prompts of 40 under a 64-token budget: 64 tokens, 2 sequences
    assert (first["tokens"], first["seqs"], first["shape"]) == (64, 2, [2, 40, 0])
    assert first["context"] == attention_pairs(40, 0) + attention_pairs(24, 0)
    assert any(r["tokens"] == r["seqs"] for r in records)          # decode steps: one token each
    assert sum(r["shape"] == [2, 8, 2] for r in records) >= 3
    assert all(r["time_s"] > 0 for r in records)
