"""The user-facing API: `LLM(model_dir, **options).generate(prompts, sampling_params)`."""
import torch

from model.config import load_config
from model.loader import load_model
from model.tokenizer import load_tokenizer
from . import distributed, kv_cache
from .ep import DeepEPComm, ExpertPlacement, make_all_to_all
from .expert_balancer import ExpertBalancer
from . import channel
from .instances import RemoteCoordinator, SchedulerServer, instance_ranks
from .kv_transfer import SocketTransfers
from .pd import Transfers
from .config import EngineConfig
from .coordinator import Coordinator
from .lockstep import LLMEngine
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
        self.model_config = mc = load_config(model)
        # Under torchrun every rank is one DP attention unit; the world splits into `instances`
        # lockstep groups, and each group's ranks share its experts (EP inside the group).
        topo = distributed.Topology.from_env()
        device = distributed.device_for(topo, device)
        self.topology, self.server = topo, None
        ranks, inst, pg, group = _join_world(cfg, topo, device)
        local_rank, n = topo.rank - ranks[0], len(ranks)
        placement = (ExpertPlacement.default(mc.n_routed_experts, n, cfg.num_redundant_experts)
                     if mc.n_routed_experts else None)
        dtype = _resolve_dtype(dtype, device)
        attn, linear, moe = (_resolve_backend(b, device) for b in (cfg.attention_backend, cfg.linear_backend,
                                                                    cfg.moe_backend))
        # FP8 weights stay FP8 only where a block-scaled GEMM consumes them: the dense GEMM backend
        net = load_model(model, dtype=dtype, device=device, keep_fp8=(linear == "triton"),
                         local_experts=placement.local_experts(local_rank) if placement else None)
        net.set_backend(attention=attn, moe=moe, linear=linear)
        if n > 1:
            comm = None
            if cfg.all_to_all_backend == "deepep" and net.moe_layers():   # one DeepEP buffer per group
                comm = DeepEPComm(pg, n, n * placement.slots_per_rank, mc.hidden_size, cfg.max_num_seqs,
                                  cfg.deepep_fp8)
            for layer in net.moe_layers():   # one exchange per layer: EPLB places each layer alone
                layer.ep = make_all_to_all(cfg.all_to_all_backend, placement, pg,
                                           2 if cfg.two_batch_overlap else 1, comm)
        net.eval()
        self.tokenizer = load_tokenizer(model)
        max_len = cfg.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings}")
        n_blocks = kv_cache.plan_num_blocks(mc, cfg, max_len, dtype, device)
        if group is not None:   # every rank sizes the same pool, so request validation agrees
            n_blocks = distributed.agree_min(n_blocks)
        caches = kv_cache.allocate(mc, n_blocks, cfg.kv_block_size, dtype, device)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        pd = cfg.pd is not None   # the first P instances prefill, the other D decode
        role = ("prefill" if inst < cfg.prefill_instances else "decode") if pd else cfg.role
        balancer = (ExpertBalancer(net, local_rank, n, cfg.num_redundant_experts, group=pg)
                    if net.moe_layers() else None)
        transfers = Transfers(cfg.step_timeout_s) if pd else None
        if not pd and role != "mixed":   # P/D across jobs: KV over sockets (engine.kv_transfer)
            transfers = SocketTransfers(channel.load_secret(), cfg.step_timeout_s, serve=role == "prefill")
        worker = RankWorker(net, caches, cfg, self.tokenizer, eos, max_len, device, rank=topo.rank,
                            balancer=balancer, role=role, transfers=transfers)
        decode_ranks = topo.world_size - cfg.prefill_instances * n if pd else 0
        coord = Coordinator(mc, cfg, self.tokenizer, max_len, n_blocks, topo.world_size, decode_ranks)
        self.engine = self._engine(worker, coord, group, ranks, inst, n_blocks)

    def _engine(self, worker, coord, group, ranks, inst, n_blocks) -> LLMEngine:
        """One instance in one world: every rank keeps a Coordinator. Several (instances=M): rank 0
        hosts the global scheduler's server thread and each instance leader holds a channel to it,
        with a secret made for this run. scheduler_address: the global scheduler is a separate
        service and this world is one of its instances (secret from the environment)."""
        cfg, topo = self.config, self.topology
        leader = topo.rank == ranks[0]
        common = dict(role=worker.role, kv_blocks=n_blocks, block_size=cfg.kv_block_size,
                      timeout_s=cfg.step_timeout_s)
        if cfg.scheduler_address is not None:
            kv = getattr(worker.transfers, "address", None)   # prefill ranks' KV servers, to the leader
            kv = (group.gather(kv) if group is not None else [kv]) if kv is not None else None
            remote = RemoteCoordinator(channel.parse_address(cfg.scheduler_address), channel.load_secret(),
                                       ranks, kv_addresses=kv, **common) if leader else None
            return LLMEngine(worker, None, group, ranks, inst, several=True, remote=remote)
        if cfg.instances == 1:
            return LLMEngine(worker, coord, group, ranks, inst)
        address = distributed.scheduler_address(cfg.scheduler_port)
        secret = distributed.share_secret(channel.new_secret() if topo.rank == 0 else None)
        if topo.rank == 0:
            self.server = SchedulerServer(coord, address, secret, topo.world_size, cfg.dead_after_s)
            self.server.start()
        distributed.barrier()
        remote = RemoteCoordinator(address, secret, ranks, wish_ranks=ranks, wish_instance=inst,
                                   **common) if leader else None
        distributed.barrier()   # every instance registered before requests come
        return LLMEngine(worker, self.server and self.server.coordinator, group, ranks, inst, several=True,
                         remote=remote, lock=self.server and self.server.lock)

    @property
    def coordinator(self) -> Coordinator | None:
        """The request registry and global scheduler, where this process holds it."""
        return self.engine.coordinator

    def rebalance_experts(self) -> None:
        """Re-place experts by the load seen so far, at the next step boundary (all ranks)."""
        self.engine.request_rebalance()

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (a str, a list of token ids, or a list of either) to completion. Under
        torchrun every rank calls this with the same arguments and gets the full outputs.

        A prompt that cannot run (empty, too long, never fits the KV pool) comes back with
        finish_reason "error: ..." and no tokens; the others are unaffected."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if self.config.instances > 1:
            return self._generate_instances(prompts, params)
        eng = self.engine
        ids, failed = _submit(eng, prompts, params)
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids) - len(failed), desc="generate", unit="req")
        for out in eng.stream():
            if use_tqdm and out.finished:
                bar.update(1)
        if use_tqdm:
            bar.close()
        return [failed.get(i) or eng.outputs.pop(i) for i in ids]

    def _generate_instances(self, prompts, params) -> list[RequestOutput]:
        """Rank 0 hands the requests to the global scheduler; every instance steps until the
        scheduler says all is done; rank 0's outputs then go to every rank."""
        results = None
        if self.server is not None:
            coord = self.server.coordinator
            with self.server.lock:
                coord.closed = False
                ids, failed = _submit(coord, prompts, params)
                coord.closed = True
        distributed.barrier()   # requests are in before any instance can see "nothing left"
        self.run_until_stopped()
        if self.server is not None:
            with self.server.lock:
                results = [failed.get(i) or coord.outputs.pop(i) for i in ids]
        return distributed.broadcast_from_rank0(results)

    def run_until_stopped(self) -> None:
        """Step this rank's instance until the global scheduler stops it (multi-instance mode, or
        an instance of a separate scheduler service: it stops once drained)."""
        while True:
            self.engine.step()
            if self.server is not None:
                self.server.check()
            if self.engine.stopped:
                return

    def drain(self) -> None:
        """Instance of a scheduler service: take no new work; run_until_stopped() returns when
        what this instance runs is done (call on the leader; the others learn it at the boundary)."""
        if isinstance(self.engine.planner, RemoteCoordinator):
            self.engine.planner.drain()

    def close(self) -> None:
        """Leave the global scheduler cleanly (an instance that just vanishes is presumed dead)."""
        if isinstance(self.engine.planner, RemoteCoordinator):
            self.engine.planner.close()


def _join_world(cfg, topo, device):
    """Under torchrun: join the world and this rank's instance -> (instance ranks, instance id,
    its process group (None: the whole world), the leader's channel to the instance)."""
    if not distributed.under_torchrun():
        if cfg.instances != 1:
            raise ValueError("instances > 1 needs torchrun (one process per rank)")
        return [0], 0, None, None
    distributed.init(device, cfg.step_timeout_s)
    layout = instance_ranks(topo.world_size, cfg.instances)
    inst = topo.rank // len(layout[0])
    pgs = [distributed.new_group(r) for r in layout]   # every rank creates every group
    ranks = layout[inst]
    if cfg.instances == 1:   # the whole world: the default group and the world's control group
        return ranks, inst, None, distributed.DistGroup(topo, None, ranks[0], len(ranks))
    ctl = [distributed.control_group(r, pg) for r, pg in zip(layout, pgs)]
    return ranks, inst, pgs[inst], distributed.DistGroup(topo, ctl[inst], ranks[0], len(ranks))


def _submit(coordinator, prompts, params):
    ids, failed = [], {}
    for p, sp in zip(prompts, params):
        try:
            ids.append(coordinator.add_request(p, sp or SamplingParams()))
        except ValueError as e:
            rid = f"rejected-{len(failed)}-{len(ids)}"
            text, tok = (p, []) if isinstance(p, str) else (None, list(p))
            failed[rid] = RequestOutput(rid, text, tok, finish_reason=f"error: {e}")
            ids.append(rid)
    return ids, failed


def _resolve_dtype(dtype, device):
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(names)}")
    return names[dtype]

