"""P/D across separate worlds: latent KV rows travel over the authenticated channel.

torch.distributed cannot span two torchrun jobs, so each prefill rank of a job serves its handed-off
requests' rows on a socket of its own (engine.channel, same deployment secret), and the decode rank
fetches them by transfer tag. The interface and the polling are engine.pd.Transfers' (send/recv/poll at step
boundaries, callbacks run on the step loop's thread, every transfer with a deadline), so the worker
and the decode-side rule are unchanged. Rows go as raw bytes with a dtype/shape header, never pickle.
"""
import os
import threading
import time
from dataclasses import dataclass

import torch

from . import channel
from .pd import Transfers

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)}


@dataclass
class KvFetch:
    tag: int


@dataclass
class KvRows:
    tag: int
    dtype: str
    shape: list[int]
    data: bytes


def _codec():
    return channel.Codec([KvFetch, KvRows])


class SocketTransfers(Transfers):
    """A rank's KV transfers to and from other worlds. `serve=True` (prefill ranks) listens on
    $STAGGER_KV_HOST (loopback by default) at a free port: `address` is advertised at registration."""

    def __init__(self, secret: bytes, timeout_s: float, serve: bool):
        super().__init__(timeout_s)
        self.secret, self.codec = secret, _codec()
        self._ready: dict[int, tuple[KvRows, threading.Event]] = {}   # tag -> rows posted, fetched flag
        self._lock = threading.Lock()
        self.listener = self.address = None
        if serve:
            host = os.environ.get("STAGGER_KV_HOST", "127.0.0.1")
            self.listener = channel.Listener((host, 0), secret, self.codec, self._serve_peer)
            self.address = f"{self.listener.address[0]}:{self.listener.address[1]}"

    # ---- prefill side ------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst, tag: int, on_done) -> None:
        t = tensor.detach().to("cpu").contiguous()
        rows = KvRows(tag, str(t.dtype), list(t.shape), t.view(torch.uint8).numpy().tobytes())
        fetched = threading.Event()
        with self._lock:
            self._ready[tag] = (rows, fetched)
        self._expect(fetched, [tensor], on_done)

    def _serve_peer(self, ch):
        def serve():
            try:
                while True:
                    msg = ch.recv(timeout=self.timeout_s)
                    if not isinstance(msg, KvFetch):
                        break
                    deadline = time.time() + self.timeout_s
                    while True:   # the decode side may ask before this rank reached its boundary
                        with self._lock:
                            entry = self._ready.pop(msg.tag, None)
                        if entry is not None or time.time() > deadline:
                            break
                        time.sleep(0.002)
                    if entry is None:
                        break
                    ch.send(entry[0])
                    entry[1].set()
            except channel.ChannelError:
                pass
            ch.close()
        threading.Thread(target=serve, daemon=True).start()

    # ---- decode side -------------------------------------------------------------------------
    def recv(self, shape, dtype, device, src, tag: int, on_done) -> None:
        """`src`: the prefill rank's advertised 'HOST:PORT'."""
        if not isinstance(src, str):
            raise RuntimeError(f"KV transfer {tag}: no address for the prefill rank ({src!r})")
        box, done = [None], threading.Event()

        def fetch():
            try:
                ch = channel.connect(channel.parse_address(src), self.secret, self.codec, self.timeout_s)
                ch.send(KvFetch(tag))
                rows = ch.recv(timeout=self.timeout_s)
                ch.close()
                if not isinstance(rows, KvRows) or rows.tag != tag or rows.dtype != str(dtype) \
                        or list(rows.shape) != list(shape):
                    raise channel.ChannelError(f"KV transfer {tag}: unexpected rows")
                t = torch.frombuffer(bytearray(rows.data), dtype=torch.uint8).view(DTYPES[rows.dtype])
                box[0] = t.reshape(shape).to(device)
            except (channel.ChannelError, OSError) as e:
                box[0] = e
            finally:
                done.set()
        threading.Thread(target=fetch, daemon=True).start()
        self._expect(done, box, on_done)
