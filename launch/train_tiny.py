"""Train a small DeepSeek-V3 on the Python language reference and save it in Hugging Face layout.

    python -m launch.train_tiny OUT [--steps 600] [--seed 0] [--threads 1] [--samples]

The network trains in transformers' DeepseekV3ForCausalLM (the engine's network is inference-only):
MLA with a power-of-two latent (64 + 16 rope per cached token), one dense layer then three MoE layers
of 12 routed experts (top-2 of 2 groups out of 4) plus a shared expert, the V3 sigmoid router whose
correction bias is updated after every step the way DeepSeek-V3 balances load without an auxiliary
loss (at 1e-2 per step rather than V3's 1e-3: this run is only hundreds of steps). The corpus is
`pydoc_data.topics` of Python 3.11 committed as text (it differs between Python versions); a
validation slice of whole topics is held out. Same seed, steps, thread count, torch build
and CPU -> the same bytes.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from launch.make_checkpoint import write_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_CORPUS = os.path.join(HERE, "corpus_pydoc_train.txt")
VALID_CORPUS = os.path.join(HERE, "corpus_pydoc_valid.txt")
DOC_SEPARATOR = "\n\n\n\n"   # between topics in the corpus files; never inside one

ARCH = dict(model_type="deepseek_v3", hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
            num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid",
            max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rope_interleave=True, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=1, num_nextn_predict_layers=0, attention_dropout=0.0, initializer_range=0.02)
SAMPLE_PROMPTS = ["The assert statement", "The import statement", "A function definition",
                  "The while loop", "Exceptions"]


def token_stream(tok, path: str) -> torch.Tensor:
    """Every topic as BOS + text + EOS, concatenated: the model learns where a topic ends."""
    with open(path, encoding="utf-8") as f:
        docs = f.read().split(DOC_SEPARATOR)
    ids = []
    for d in docs:
        ids += [ARCH["bos_token_id"], *tok.encode(d.strip("\n")).ids, ARCH["eos_token_id"]]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))   # cosine down to 10 %


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step every router's correction bias
    moves by `rate` towards the experts that got fewer tokens than average (the bias only steers
    selection; gate weights still come from the unbiased scores)."""

    def __init__(self, model, rate: float):
        self.rate, self.counts, self.routers = rate, {}, []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                self.routers.append(gate)
                gate.register_forward_hook(self._count)

    def _count(self, module, args, out):
        idx = out[2]
        c = torch.bincount(idx.reshape(-1), minlength=module.num_experts).float()
        self.counts[id(module)] = self.counts.get(id(module), 0) + c

    @torch.no_grad()
    def update(self):
        for g in self.routers:
            c = self.counts.pop(id(g), None)
            if c is not None:
                g.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)

    def imbalance(self) -> float:
        """max/mean expert load of the last counted step, worst layer."""
        return max((float(c.max() / c.mean()) for c in self.counts.values()), default=1.0)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, max_windows: int, batch: int) -> float:
    """Mean next-token loss over the first `max_windows` non-overlapping windows."""
    n = min(max_windows, (len(ids) - 1) // seq_len)
    x = ids[: n * seq_len + 1]
    total, count = 0.0, 0
    for i in range(0, n, batch):
        k = min(batch, n - i)
        inp = torch.stack([x[(i + j) * seq_len:(i + j + 1) * seq_len] for j in range(k)])
        tgt = torch.stack([x[(i + j) * seq_len + 1:(i + j + 1) * seq_len + 1] for j in range(k)])
        logits = model(input_ids=inp).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                 reduction="sum").item()
        count += tgt.numel()
    return total / count


def build_model(vocab_size: int, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(vocab_size=vocab_size, **ARCH)
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(cfg), cfg


def save(model, out: str, dtype) -> None:
    """bf16/fp16 weights; the routers' correction bias stays fp32, as in DeepSeek-V3's checkpoint."""
    biases = {id(m): m.e_score_correction_bias.detach().clone() for m in model.modules()
              if hasattr(m, "e_score_correction_bias")}
    model.to(dtype)
    for m in model.modules():
        if id(m) in biases:
            m.e_score_correction_bias = biases[id(m)]
    model.save_pretrained(out)
    for extra in ("generation_config.json",):   # greedy/sampling settings belong to the caller
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)


def train(a) -> dict:
    """Train, save to a.out, return the final losses. Thread count and deterministic mode are the
    process's own again afterwards (tests call this in-process)."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(a)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _train(a) -> dict:
    from tokenizers import Tokenizer
    from tqdm import tqdm
    os.makedirs(a.out, exist_ok=True)
    write_tokenizer(a.out, "bpe", a.vocab_size, corpus=a.corpus,
                    model_max_length=ARCH["max_position_embeddings"])
    tok = Tokenizer.from_file(os.path.join(a.out, "tokenizer.json"))
    train_ids, valid_ids = token_stream(tok, a.corpus), token_stream(tok, a.valid)
    print(f"corpus: {len(train_ids)} train / {len(valid_ids)} validation tokens, "
          f"vocabulary {tok.get_vocab_size()}", file=sys.stderr)
    model, _ = build_model(a.vocab_size, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", file=sys.stderr)
    balancer = BiasBalancer(model, a.bias_rate)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)   # the data order: window starts drawn from the seed
    model.train()
    t0, recent, hist = time.perf_counter(), [], []
    bar = tqdm(range(a.steps), desc="train", file=sys.stderr, disable=a.quiet, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        starts = torch.randint(0, len(train_ids) - a.seq_len - 1, (a.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + a.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imb = balancer.imbalance()
        balancer.update()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}", imb=f"{imb:.2f}")
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            hist.append({"step": step + 1, "train_loss_avg20": round(sum(recent) / len(recent), 4)})
            msg = (f"step {step + 1}/{a.steps}: train loss {hist[-1]['train_loss_avg20']:.3f} "
                   "(mean of last 20)")
            (bar.write if not a.quiet else lambda s: print(s, file=sys.stderr))(msg)
    bar.close()
    elapsed = time.perf_counter() - t0
    model.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    with torch.no_grad():   # losses of the weights as saved: rounded to the checkpoint dtype
        for n, p in model.named_parameters():
            p.copy_(p.to(dtype).float())
    result = {"train_loss": evaluate(model, train_ids, a.seq_len, a.eval_windows, a.batch),
              "valid_loss": evaluate(model, valid_ids, a.seq_len, a.eval_windows, a.batch)}
    print(f"done in {elapsed:.0f} s; {a.dtype} weights: train loss {result['train_loss']:.3f}, "
          f"validation loss {result['valid_loss']:.3f} (first {a.eval_windows} windows of {a.seq_len})",
          file=sys.stderr)
    save(model, a.out, dtype)
    with open(os.path.join(a.out, "training.json"), "w") as f:   # no timings: the bytes must not vary
        args = {k: v for k, v in vars(a).items() if k not in ("out", "quiet", "samples")}
        args.update(corpus=os.path.basename(a.corpus), valid=os.path.basename(a.valid))  # no machine paths
        json.dump({"args": args,
                   "train_tokens": len(train_ids), "valid_tokens": len(valid_ids), "parameters": n_params,
                   "history": hist, "final": {k: round(v, 4) for k, v in result.items()}}, f, indent=1)
    if a.samples:
        print_samples(a.out)
    return result


def print_samples(model_dir: str, max_new_tokens: int = 40) -> None:
    """Greedy completions by transformers from the saved checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in SAMPLE_PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        print(f"{p!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    # one thread: the bytes then do not depend on the core count, and on a shared 2-core machine two
    # OpenMP threads spin against each other (measured 5-10x the CPU time per step of one thread)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--bias-rate", type=float, default=1e-2, help="router correction-bias update per step")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--corpus", default=TRAIN_CORPUS)
    ap.add_argument("--valid", default=VALID_CORPUS)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--samples", action="store_true", help="print greedy completions when done")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "threads", "eval_windows", "log_every"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return a


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
