"""Engine options: one dataclass, validated once, so a typo is an error and not a silent default."""
from dataclasses import dataclass, field, fields


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None        # default: the model's max_position_embeddings
    kv_block_size: int = 64
    num_kv_blocks: int | None = None        # default: from memory (see engine.kv_cache)
    gpu_memory_utilization: float = 0.9     # fraction of free device memory for weights' neighbours: KV
    cpu_kv_cache_bytes: int = 1 << 30       # KV budget on CPU
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"         # torch | triton | auto (MLA, norms, rope)
    linear_backend: str = "auto"            # torch | triton | auto (dense GEMMs; triton keeps FP8 weights)
    moe_backend: str = "auto"               # torch | triton | auto (routers and routed experts)
    all_to_all_backend: str = "torch"       # torch | deepep
    deepep_fp8: bool = True                 # deepep: FP8 dispatch payloads where the hidden size allows
    two_batch_overlap: bool = False         # EP: two micro-batches per MoE layer, exchange under compute
    scheduler: str = "sbs"                  # sbs | immediate-rr | immediate-lb | adp-balance
    scheduler_options: dict = field(default_factory=dict)
    order: str = "fcfs"                     # request order inside a rank: fcfs | sjf | priority
    order_options: dict = field(default_factory=dict)   # e.g. {"aging_rate": 1000.0}
    seed: int = 0
    mla_path: str = "auto"                  # auto | absorbed | expanded (testing both MLA paths)
    static_decode: bool = False             # decode-only steps through padded static buffers (CUDA graphs)
    cuda_graphs: bool = True                # with static_decode on CUDA: capture and replay each bucket
    num_redundant_experts: int = 0          # EPLB: extra expert slots for copies of hot experts
    eplb_interval_steps: int = 0            # rebalance experts every N steps (0: only on request)
    instances: int = 1                      # lockstep groups the torchrun world splits into
    pd: str | None = None                   # "P:D": P prefill + D decode instances (sets instances)
    scheduler_port: int | None = None       # global scheduler's port (default MASTER_PORT + 1)
    step_timeout_s: float = 300.0           # a rank silent this long brings the job down
    scheduler_address: str | None = None    # "HOST:PORT": this world is one instance of a separate
                                            # global scheduler (launch.instance); secret from the env
    role: str = "mixed"                     # with scheduler_address: mixed | prefill | decode
    dead_after_s: float = 10.0              # an instance silent this long is presumed dead
    prefill_instances: int = field(default=0, init=False)   # from pd: the first P instances prefill

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known options: {sorted(known)}")
        cfg = cls(**options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine option {name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"engine option num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.pd is not None:
            try:
                p, d = (int(x) for x in self.pd.split(":"))
                assert p >= 1 and d >= 1
            except (ValueError, AssertionError):
                raise ValueError(f"engine option pd must look like 'P:D' with P, D >= 1, got {self.pd!r}") \
                    from None
            self.instances, self.prefill_instances = p + d, p
        if self.scheduler_address is not None and (self.instances != 1 or self.pd is not None):
            raise ValueError("scheduler_address makes this world one instance: instances and pd do not apply")
        for name, allowed in (("role", ("mixed", "prefill", "decode")),
                              ("attention_backend", ("auto", "torch", "triton")),
                              ("linear_backend", ("auto", "torch", "triton")),
                              ("moe_backend", ("auto", "torch", "triton")),
                              ("all_to_all_backend", ("torch", "deepep")),
                              ("mla_path", ("auto", "absorbed", "expanded"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"engine option {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
