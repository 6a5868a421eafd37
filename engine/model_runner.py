"""Turns a scheduled batch into tensors, runs the network, returns logits of the sampled rows.

Host-built inputs go to the device through pinned memory without blocking (on CUDA), so building a
step never waits for the previous one; per-sequence lengths and query offsets travel once per step
and every layer reads them from `meta.cache` (no per-layer host-to-device copies).
"""
import array

import torch

from model.deepseek import MLA, AttentionMetadata, Experts
from scheduler.batch import ScheduledBatch
from scheduler.block_manager import slots as token_slots


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device, mla_path="auto",
                 static_decode: bool = False, max_num_seqs: int = 64, max_model_len: int = 4096,
                 cuda_graphs: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.device, self.mla_path = block_size, device, mla_path
        self.static = (StaticDecode(kv_caches, block_size, device, max_num_seqs, max_model_len, cuda_graphs)
                       if static_decode else None)

    def drop_graphs(self) -> None:
        """Forget captured CUDA graphs: they hold the addresses of weights that EPLB just replaced."""
        if self.static is not None:
            self.static.graphs.clear()

    def prepare(self, batch: ScheduledBatch):
        """-> (input ids, metadata, indices of rows whose logits are sampled, their requests)."""
        if batch.items and all(n == 1 for _, n in batch.items):
            ids, pos, slots, qsl, seq_lens, tables, sample_rows, sample_reqs = self._one_token_rows(batch)
        else:
            ids, pos, slots, qsl, seq_lens, tables, sample_rows, sample_reqs = self._chunk_rows(batch)
        width = max((len(t) for t in tables), default=1)
        pad = [0] * width
        bt = [b for t in tables for b in (t if len(t) == width else t + pad[len(t):])]   # flat, padded
        dev = self.device
        meta = AttentionMetadata(positions=to_device(pos, torch.int64, dev),
                                 slot_mapping=to_device(slots, torch.int64, dev),
                                 block_tables=to_device(bt, torch.int32, dev).view(-1, width),
                                 seq_lens=seq_lens, query_start_loc=qsl, mla_path=self.mla_path)
        meta.cache["seq_lens_i32"] = to_device(seq_lens, torch.int32, dev)
        meta.cache["query_start_loc_i32"] = to_device(qsl, torch.int32, dev)
        return to_device(ids, torch.int64, dev), meta, sample_rows, sample_reqs

    def _one_token_rows(self, batch: ScheduledBatch):
        """One token per request (decode steps): each field in one comprehension."""
        bs = self.block_size
        reqs = [r for r, _ in batch.items]
        pos = [r.num_computed_tokens for r in reqs]
        slots = [r.block_table[p // bs] * bs + p % bs for r, p in zip(reqs, pos)]
        seq_lens = [p + 1 for p in pos]
        tables = [r.block_table for r in reqs]
        if batch.num_decodes == len(reqs):   # each at its last known token, which samples the next
            ids = [r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1] for r in reqs]
            rows, sample_reqs = list(range(len(reqs))), reqs
        else:   # 1-token prefill chunks among them
            ids = [r.prompt_token_ids[p] if p < len(r.prompt_token_ids)
                   else r.output_token_ids[p - len(r.prompt_token_ids)] for r, p in zip(reqs, pos)]
            rows = [i for i, (r, p) in enumerate(zip(reqs, pos))
                    if p + 1 == len(r.prompt_token_ids) + len(r.output_token_ids)]
            sample_reqs = [reqs[i] for i in rows]
        return ids, pos, slots, list(range(len(reqs) + 1)), seq_lens, tables, rows, sample_reqs

    def _chunk_rows(self, batch: ScheduledBatch):
        """Any mix of prefill chunks and decodes: per-request host lists."""
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, tables, sample_rows, sample_reqs = [], [], [], [0], [], [], [], []
        for req, n in batch.items:
            start = req.num_computed_tokens
            ids += req.tokens(start, start + n)
            table = req.block_table
            pos += range(start, start + n)
            slots += token_slots(table, start, start + n, bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if start + n == req.num_tokens:   # reached its last known token: sample the next one
                sample_rows.append(qsl[-1] - 1)
                sample_reqs.append(req)
        return ids, pos, slots, qsl, seq_lens, tables, sample_rows, sample_reqs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch):
        """Runs even an empty batch (zero tokens) so expert-parallel collectives still match."""
        if self.static is not None and self.static.fits(batch):
            return self.static.run(self.model, batch, self.mla_path)
        ids, meta, rows, reqs = self.prepare(batch)
        hidden = self.model(ids, meta, self.kv_caches)
        if not rows:
            return None, []
        if len(rows) < hidden.shape[0]:   # decode-only steps sample every row: no gather
            hidden = hidden[to_device(rows, torch.int64, hidden.device)]
        return self.model.compute_logits(hidden), reqs


_INT_CODES = {torch.int64: "q", torch.int32: "i"}   # array typecodes of the same width
assert array.array("q").itemsize == 8 and array.array("i").itemsize == 4


def to_device(values, dtype, device) -> torch.Tensor:
    """A host list as a device tensor: staged in pinned memory and copied without blocking on CUDA
    (a pageable torch.tensor(..., device=cuda) would wait for the stream), a plain tensor on CPU.
    A flat list of ints goes through array.array (several times faster than torch.tensor's
    per-element conversion; it raises on values that do not fit instead of wrapping)."""
    code = _INT_CODES.get(dtype)
    if code is not None and values and type(values[0]) is int:
        t = torch.frombuffer(array.array(code, values), dtype=dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class StaticDecode:
    """Decode-only steps through persistent input buffers, padded to a batch bucket: the shape a CUDA
    graph captures once per bucket and replays. Padding rows do no harm: token 0 at position 0 with
    length 1, reading and writing only the scratch KV block past the pool's end
    (engine.kv_cache.allocate keeps one), and no expert (MoE.real_rows masks them to -1).
    Block tables have a fixed width (max_model_len / block_size).

    On CUDA (`cuda_graphs`, the default) each bucket's forward through the logits is captured on
    first use into a torch.cuda.CUDAGraph (one memory pool for all buckets) and later steps only copy
    their inputs into the buffers and replay it. Everything the forward reads per step lives in those
    device buffers (lengths, query offsets, the real-row mask); the host lists it sees are constants
    per bucket: query offsets 0..nb, and context lengths all set to the longest possible context, which
    the Triton MLA decode uses only to pick its KV split count (the kernel reads the true lengths from
    the device and leaves splits past them empty). Eager instead: on CPU, with cuda_graphs off, and
    where the forward reads host values (`graph_blocker`: torch attention or MoE kernels, the
    expanded MLA path, expert parallelism). Beyond the largest bucket steps take the plain path.

    Owed: capture under expert parallelism. Every rank of an instance would replay the same bucket
    (the step plan would carry it) and the all-to-all would run at a fixed capacity per bucket or
    between graph pieces; only the single-rank case captures (and pads), EP > 1 runs eagerly."""

    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

    def __init__(self, kv_caches, block_size, device, max_num_seqs, max_model_len, cuda_graphs=True):
        from .kv_cache import scratch_block
        self.scratch = scratch_block(kv_caches[0])
        if self.scratch is None:
            raise ValueError("static_decode needs KV caches from engine.kv_cache.allocate (a scratch block)")
        self.caches = [c if c._base is None else c._base for c in kv_caches]   # views -> with the scratch
        self.block_size = block_size
        self.max_batch = max(b for b in self.BUCKETS if b <= max(1, max_num_seqs)) if max_num_seqs >= 1 else 1
        self.width = -(-max_model_len // block_size)
        n = self.max_batch
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.pos = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        self.tables = torch.full((n, self.width), self.scratch, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.real = torch.zeros(n, dtype=torch.bool, device=device)
        self.use_graphs = cuda_graphs and torch.device(device).type == "cuda"
        self.blocker: str | None = None   # why graphs stay off for this model (set on first run)
        self.graphs: dict[int, tuple] = {}   # bucket -> (CUDAGraph, its static logits [bucket, vocab])
        self.pool = None                     # the memory pool every bucket's graph shares
        self.replays = 0

    def fits(self, batch) -> bool:
        items = batch.items
        return (0 < len(items) <= self.max_batch
                and all(n == 1 and r.num_computed_tokens + 1 == r.num_tokens for r, n in items))

    def run(self, model, batch, mla_path):
        """-> (logits of the batch's rows, their requests). Replayed logits are a view of the graph's
        output: valid until the next step."""
        items = batch.items
        b = len(items)
        nb = next(x for x in self.BUCKETS if x >= b)   # the padded batch size
        ids, pos, slots, lens, rows = [], [], [], [], []
        for req, _ in items:
            start = req.num_computed_tokens
            ids += req.tokens(start, start + 1)
            pos.append(start)
            slots += token_slots(req.block_table, start, start + 1, self.block_size)
            lens.append(start + 1)
            rows.append(req.block_table + [self.scratch] * (self.width - len(req.block_table)))
        pad = nb - b
        scratch_slot = self.scratch * self.block_size
        dev = self.ids.device
        self.ids[:nb].copy_(to_device(ids + [0] * pad, torch.int64, dev), non_blocking=True)
        self.pos[:nb].copy_(to_device(pos + [0] * pad, torch.int64, dev), non_blocking=True)
        self.slots[:nb].copy_(to_device(slots + [scratch_slot] * pad, torch.int64, dev), non_blocking=True)
        self.tables[:b].copy_(to_device(rows, torch.int32, dev), non_blocking=True)
        self.tables[b:nb].fill_(self.scratch)
        self.lens[:nb].copy_(to_device(lens + [1] * pad, torch.int32, dev), non_blocking=True)
        self.real[:b].fill_(True)
        self.real[b:nb].fill_(False)
        reqs = [r for r, _ in items]
        if self.use_graphs and self.blocker is None:
            self.blocker = graph_blocker(model, mla_path)
        if self.use_graphs and not self.blocker:
            if nb not in self.graphs:
                self._capture(model, nb, mla_path)
            graph, logits = self.graphs[nb]
            graph.replay()
            self.replays += 1
            return logits[:b], reqs
        hidden = self._forward(model, nb, mla_path, lens + [1] * pad)
        return model.compute_logits(hidden[:b]), reqs

    def _forward(self, model, nb, mla_path, seq_lens):
        """The model over the first nb rows of the buffers -> hidden states [nb, hidden]."""
        meta = AttentionMetadata(positions=self.pos[:nb], slot_mapping=self.slots[:nb],
                                 block_tables=self.tables[:nb], seq_lens=seq_lens,
                                 query_start_loc=list(range(nb + 1)), mla_path=mla_path)
        meta.cache["seq_lens_i32"], meta.cache["query_start_loc_i32"] = self.lens[:nb], self.qsl[:nb + 1]
        moe = model.moe_layers()
        for layer in moe:
            layer.real_rows = self.real[:nb]
        try:
            return model(self.ids[:nb], meta, self.caches)
        finally:
            for layer in moe:
                layer.real_rows = None

    def _capture(self, model, nb, mla_path):
        """Record bucket nb's forward through the logits (the caller replays it for this step).
        The warm-up runs recompute this step's KV rows (the same values); their EPLB counts are
        undone (capture itself executes nothing)."""
        longest = [self.width * self.block_size] * nb   # constant host lengths (see the class doc)

        def forward():
            return model.compute_logits(self._forward(model, nb, mla_path, longest))

        counted = [layer for layer in model.moe_layers() if layer.expert_load is not None]
        saved = [layer.expert_load.clone() for layer in counted]
        self.graphs[nb] = self._record(forward)
        for layer, load in zip(counted, saved):
            layer.expert_load.copy_(load)

    def _record(self, forward):
        """-> (CUDAGraph, its output). Two warm-up runs on a side stream first compile the Triton
        kernels and build lazily made weights: nothing may compile or allocate outside the pool
        during capture. One pool serves every bucket (replays never overlap, and each graph's
        output stays held, so no capture reuses another's output memory)."""
        side = torch.cuda.Stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: work other threads put on the device (KV transfers) is not this capture's
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward()
        return graph, out


def graph_blocker(model, mla_path) -> str:
    """Why this model's decode forward cannot be captured in a CUDA graph ("" when it can): the
    parts below read host values that change per step, or synchronize with the host."""
    if mla_path == "expanded":
        return "mla_path=expanded gathers each context by host lengths"
    if any(layer.ep is not None for layer in model.moe_layers()):
        return "expert parallelism: capture is single-rank only"
    for m in model.modules():
        if isinstance(m, MLA) and m.backend != "triton":
            return "torch attention builds its index tensors from host lengths"
        if isinstance(m, Experts) and m.backend != "triton":
            return "torch MoE reads expert counts back to the host"
    return ""
