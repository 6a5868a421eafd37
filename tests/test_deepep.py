"""The deepep all-to-all backend, written against DeepEP's Buffer API and run here on an emulation
of it (tests/deep_ep_emul/deep_ep, gloo): the emulated calls, the backend against the torch backend
and a closed form, and the engine's greedy tokens with either backend, with and without two-batch
overlap, on 2 and 3 ranks."""
import json
import os
import subprocess
import sys

import pytest
from reference import make_hf_checkpoint
from test_distributed import PROMPTS, free_port

HERE = os.path.dirname(__file__)
EMUL = os.path.join(HERE, "deep_ep_emul")


def torchrun(args, nproc, any_ranks=False, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([EMUL, os.environ.get("PYTHONPATH", "")]))
    if any_ranks:
        env["DEEP_EP_EMUL_ANY_RANKS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), os.path.join(HERE, "deepep_worker.py")]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env)


def load(prefix, n):
    return [json.load(open(f"{prefix}.{r}.json")) for r in range(n)]


@pytest.fixture
def emulated_deep_ep(monkeypatch):
    monkeypatch.syspath_prepend(EMUL)
    sys.modules.pop("deep_ep", None)
    import deep_ep
    yield deep_ep
    sys.modules.pop("deep_ep", None)


def test_missing_deep_ep_is_a_clear_error(monkeypatch):
    import builtins

    from engine.ep import DeepEPComm
    real_import = builtins.__import__

    def no_deep_ep(name, *a, **kw):
        if name == "deep_ep":
            raise ImportError("No module named 'deep_ep'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_deep_ep)
    with pytest.raises(RuntimeError, match="needs the deep_ep package.*all_to_all_backend='torch'"):
        DeepEPComm(None, 2, 8, 128, 4)


def test_incomplete_deep_ep_names_what_is_missing(monkeypatch):
    import types

    from engine.ep import DeepEPComm
    fake = types.ModuleType("deep_ep")
    fake.Buffer = type("Buffer", (), {"dispatch": None, "combine": None})   # no low-latency kernels
    fake.Config = object
    monkeypatch.setitem(sys.modules, "deep_ep", fake)
    with pytest.raises(RuntimeError, match="lacks.*low_latency_dispatch"):
        DeepEPComm(None, 2, 8, 128, 4)


def test_low_latency_only_for_compiled_hidden_sizes(emulated_deep_ep):
    import types

    from engine.ep import low_latency_hidden_ok
    real = types.ModuleType("deep_ep")   # the real package lists no sizes: DeepEP's compiled ones apply
    assert low_latency_hidden_ok(real, 7168) and low_latency_hidden_ok(real, 2048)
    assert not low_latency_hidden_ok(real, 1024) and not low_latency_hidden_ok(real, 128)
    assert low_latency_hidden_ok(emulated_deep_ep, 128) and not low_latency_hidden_ok(emulated_deep_ep, 64)


def test_buffer_sizes_come_from_deep_ep_hints(emulated_deep_ep, monkeypatch):
    from engine.ep import deepep_buffer_bytes
    B = emulated_deep_ep.Buffer
    nvl, rdma = deepep_buffer_bytes(emulated_deep_ep, 8, 7168, 256, 128, low_latency=True)
    assert nvl == max(c.get_nvl_buffer_size_hint(7168 * 2, 8)
                      for c in (B.get_dispatch_config(8), B.get_combine_config(8)))
    assert rdma == B.get_low_latency_rdma_size_hint(128, 7168, 8, 256) > 0
    assert deepep_buffer_bytes(emulated_deep_ep, 8, 7168, 256, 128, low_latency=False)[1] == 0   # intranode
    monkeypatch.delenv("DEEP_EP_EMUL_ANY_RANKS", raising=False)
    with pytest.raises(RuntimeError, match="no config for an EP group of 3 ranks"):
        deepep_buffer_bytes(emulated_deep_ep, 3, 128, 12, 8, low_latency=True)


def test_deepep_backend_equals_torch_backend(tmp_path):
    """3 ranks. The backend: uneven counts, empty ranks, replicated experts; normal and low-latency
    mode; bf16-width and FP8 payloads; one and two micro-batches. Then the emulated calls
    themselves, against expectations computed here from the gathered routing."""
    nproc = 3
    p = torchrun(["a2a", str(tmp_path / "a2a")], nproc=nproc, any_ranks=True)
    assert p.returncode == 0, p.stderr[-3000:]
    for res in load(tmp_path / "a2a.api", nproc):
        assert all(res.values()), res
    ranks = load(tmp_path / "a2a", nproc)
    for res in ranks:
        cases, stats = [c for c in res if "stats" not in c], [c for c in res if "stats" in c]
        assert len(cases) == 2 * 2 * 4 * 2
        for c in cases:
            assert c["side"] == 42 and c["shape_ok"], c
            assert c["err_closed"] < 1e-4, c                  # FP8: exact against the dequantized rows
            if not c["fp8"]:
                assert c["err_torch"] < 1e-5, c
        assert {c["ll"] for c in cases} == {False, True}        # both modes really ran
        for s in stats:
            st = s["stats"]
            assert st["ll_dispatch"] == st["ll_combine"] > 0
            assert st["normal_dispatch"] == st["normal_combine"] > 0
            assert st["clean"] > 0
    assert any(c["received"] for c in ranks[0] if "received" in c)


@pytest.fixture(scope="module")
def ckpt12(tmp_path_factory):
    """hidden 128 (low-latency mode needs a multiple of 128) and 12 experts (2 and 3 ranks)."""
    d = tmp_path_factory.mktemp("deepep")
    make_hf_checkpoint(d, {"n_routed_experts": 12, "n_group": 4, "hidden_size": 128})
    return str(d)


@pytest.mark.parametrize("nproc", [2, 3])
def test_engine_greedy_tokens_deepep_equal_torch(tmp_path, ckpt12, nproc):
    spec = tmp_path / "spec.json"
    variants = {"torch": {}, "deepep_tbo": {"all_to_all_backend": "deepep", "two_batch_overlap": True}}
    if nproc == 2:
        variants.update(deepep={"all_to_all_backend": "deepep"}, torch_tbo={"two_batch_overlap": True})
    spec.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": 6, "variants": variants, "options": dict(
        scheduler="immediate-rr", kv_block_size=16, num_kv_blocks=32, max_num_batched_tokens=32,
        max_num_seqs=4, deepep_fp8=False)}))
    p = torchrun(["generate", str(tmp_path / "out"), ckpt12, str(spec)], nproc=nproc, any_ranks=nproc == 3)
    assert p.returncode == 0, p.stderr[-3000:]
    outs = load(tmp_path / "out", nproc)
    for o in outs:
        ref = o["torch"]
        assert len(ref) == len(PROMPTS) and all(len(t) == 6 for t in ref)
        for name in variants:
            assert o[name] == ref, name
        assert o["deepep_tbo:mb"] == 2 and o["torch:mb"] == 1
        for name in [v for v in variants if v.startswith("deepep")]:
            st = o[name + ":stats"]
            assert st["normal_dispatch"] > 0 and st["ll_dispatch"] > 0, st   # prefill and decode-only steps
    assert outs[0]["torch"] == outs[-1]["torch"]
