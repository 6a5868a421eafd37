"""The whole network through the Triton backends (interpreter, fp32) equals the torch backends:
every kernel in place, with the shapes and strides the model really passes (odd head dims, V2's
router, both MLA paths, a multi-token causal decode against a cached prefix)."""
import pytest
import torch

from model.loader import load_model
from reference import forward_logits, make_hf_checkpoint
from test_model import CASES, SEQS


@pytest.mark.parametrize("case", ["v3-odd-dims", "v2-group-limited-yarn", "v3"])
def test_triton_backends_match_torch(tmp_path, case):
    base, over = CASES[case]
    make_hf_checkpoint(tmp_path, over, base=base)
    model = load_model(str(tmp_path))
    for path in ("expanded", "absorbed"):
        model.set_backend(attention="torch", moe="torch")
        ref = forward_logits(model, SEQS, mla_path=path)
        model.set_backend(attention="triton", moe="triton")
        out = forward_logits(model, SEQS, mla_path=path)
        assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item()), path
        assert torch.equal(out.argmax(-1), ref.argmax(-1))  # same greedy tokens
