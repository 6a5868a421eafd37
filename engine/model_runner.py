"""Turns a scheduled batch into tensors, runs the network, returns logits of the sampled rows."""
import torch

from model.deepseek import AttentionMetadata
from scheduler.batch import ScheduledBatch
from scheduler.block_manager import slots as token_slots


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device, mla_path="auto"):
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.device, self.mla_path = block_size, device, mla_path

    def prepare(self, batch: ScheduledBatch):
        """-> (input ids, metadata, indices of rows whose logits are sampled, their requests)."""
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
        width = max((len(t) for t in tables), default=1)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(-1, width)
        dev = self.device
        meta = AttentionMetadata(positions=torch.tensor(pos, dtype=torch.int64, device=dev),
                                 slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                                 block_tables=bt.to(dev), seq_lens=seq_lens, query_start_loc=qsl,
                                 mla_path=self.mla_path)
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch):
        """Runs even an empty batch (zero tokens) so expert-parallel collectives still match."""
        ids, meta, rows, reqs = self.prepare(batch)
        hidden = self.model(ids, meta, self.kv_caches)
        if not rows:
            return None, []
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]), reqs
