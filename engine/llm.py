"""The user-facing API: `LLM(model_dir, **options).generate(prompts, sampling_params)`."""
import torch

from model.config import load_config
from model.loader import load_model
from model.tokenizer import load_tokenizer
from . import distributed, kv_cache
from .ep import ExpertPlacement, make_all_to_all
from .eplb import ExpertBalancer
from .config import EngineConfig
from .coordinator import Coordinator
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling import SamplingParams
from .worker import RankWorker


def _resolve_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" else "torch"


class LLM:
    """A DeepSeek-V3/V2 engine over a Hugging Face checkpoint folder.

    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16", "float16" or a torch dtype.
    options: see engine.config.EngineConfig (an unknown option is an error).
    """

    def __init__(self, model: str, *, dtype="auto", device=None, **options):
        self.config = cfg = EngineConfig.from_options(**options)
        self.model_config = load_config(model)
        # Under torchrun every rank is one DP attention unit and holds 1/world of the experts.
        topo, group, local_experts = distributed.Topology.from_env(), None, None
        device = distributed.device_for(topo, device)
        if distributed.under_torchrun():
            distributed.init(device, cfg.step_timeout_s)
            group = distributed.DistGroup(topo)
            placement = ExpertPlacement.default(self.model_config.n_routed_experts, topo.world_size,
                                                cfg.num_redundant_experts)
            local_experts = placement.local_experts(topo.rank)
        dtype = _resolve_dtype(dtype, device)
        attn, moe = (_resolve_backend(cfg.attention_backend, device), _resolve_backend(cfg.moe_backend, device))
        if local_experts is None and cfg.num_redundant_experts:
            local_experts = ExpertPlacement.default(self.model_config.n_routed_experts, 1,
                                                    cfg.num_redundant_experts).local_experts(0)
        net = load_model(model, dtype=dtype, device=device, keep_fp8=(moe == "triton"),
                         local_experts=local_experts)
        net.set_backend(attention=attn, moe=moe)
        if group is not None:
            for layer in net.moe_layers():   # one exchange per layer: EPLB places each layer alone
                layer.ep = make_all_to_all(cfg.all_to_all_backend, placement)
        net.eval()
        self.tokenizer = load_tokenizer(model)
        max_len = cfg.max_model_len or self.model_config.max_position_embeddings
        if max_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{self.model_config.max_position_embeddings}")
        n_blocks = kv_cache.plan_num_blocks(self.model_config, cfg, max_len, dtype, device)
        if group is not None:   # every rank sizes the same pool, so request validation agrees
            n_blocks = group.agree_min(n_blocks)
        caches = kv_cache.allocate(self.model_config, n_blocks, cfg.kv_block_size, dtype, device)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        worker = RankWorker(net, caches, cfg, self.tokenizer, eos, max_len, device, rank=topo.rank)
        if net.moe_layers():
            worker.balancer = ExpertBalancer(net, topo.rank, topo.world_size, cfg.num_redundant_experts)
        coordinator = Coordinator(self.model_config, cfg, self.tokenizer, max_len, n_blocks, topo.world_size)
        self.engine = LLMEngine(worker, coordinator, group)

    def rebalance_experts(self) -> None:
        """Re-place experts by the load seen so far, at the next step boundary (all ranks)."""
        self.engine.request_rebalance()

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (a str, a list of token ids, or a list of either) to completion.

        A prompt that cannot run (empty, too long, never fits the KV pool) comes back with
        finish_reason "error: ..." and no tokens; the others are unaffected."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        eng = self.engine
        ids, failed = [], {}
        for p, sp in zip(prompts, params):
            try:
                ids.append(eng.add_request(p, sp or SamplingParams()))
            except ValueError as e:
                rid = f"rejected-{len(failed)}-{len(ids)}"
                text, tok = (p, []) if isinstance(p, str) else (None, list(p))
                failed[rid] = RequestOutput(rid, text, tok, finish_reason=f"error: {e}")
                ids.append(rid)
        bar = _progress(len(ids) - len(failed)) if use_tqdm else None
        for out in eng.stream():
            if bar is not None and out.finished:
                bar.update(1)
        if bar is not None:
            bar.close()
        return [failed.get(i) or eng.outputs.pop(i) for i in ids]


def _resolve_dtype(dtype, device):
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(names)}")
    return names[dtype]


def _progress(total):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="req")
