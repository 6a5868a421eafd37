"""The paged latent KV cache tensors: one [num_blocks, block_size, kv_lora_rank + rope_dim] per layer."""
import torch


def plan_num_blocks(model_cfg, cfg, max_model_len: int, dtype, device) -> int:
    """Blocks per rank: the explicit option, else what memory allows (after the weights are
    loaded on CUDA; a fixed budget on CPU), never more than max_num_seqs full-length sequences."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    elem = torch.empty((), dtype=dtype).element_size()
    per_block = model_cfg.num_hidden_layers * cfg.kv_block_size * model_cfg.kv_cache_dim * elem
    useful = cfg.max_num_seqs * -(-max_model_len // cfg.kv_block_size)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()   # cached blocks freed by the load (casts, fp8 swaps) count as free
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
    else:
        budget = cfg.cpu_kv_cache_bytes
    n = min(useful, int(budget // per_block))
    if n < 1:
        raise RuntimeError(f"no memory left for even one KV block of {per_block} bytes")
    return n


def allocate(model_cfg, num_blocks: int, block_size: int, dtype, device) -> list[torch.Tensor]:
    """Per-layer caches of `num_blocks` blocks. Each is a view of a tensor one block longer: the block
    past the end is scratch that padded rows of a static decode batch may write (never allocated
    to a request)."""
    shape = (num_blocks + 1, block_size, model_cfg.kv_cache_dim)
    layers = model_cfg.num_hidden_layers
    return [torch.zeros(shape, dtype=dtype, device=device)[:num_blocks] for _ in range(layers)]


def scratch_block(cache: torch.Tensor) -> int | None:
    """Index of the scratch block behind a cache from `allocate` (None for a plain tensor)."""
    base = cache._base
    if base is None or base.shape[0] != cache.shape[0] + 1 or base.data_ptr() != cache.data_ptr():
        return None
    return cache.shape[0]
