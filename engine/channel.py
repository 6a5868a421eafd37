"""An authenticated, framed message channel (TCP) between the global scheduler, its instances and
its clients; also carries P/D KV rows between instances that are separate worlds.

Handshake (before anything else crosses): the server sends a magic and a random nonce; the client
answers with its own nonce and HMAC-SHA256(secret, "client" | both nonces); the server checks it
against the per-deployment secret and only then proves itself the same way. A peer that fails is
dropped after reading exactly those fixed-size bytes: nothing it sent is ever decoded.

Frames: 4-byte length, 32-byte HMAC tag (session key, direction, sequence number, body), body.
Bodies are msgpack; dataclasses travel by name through an explicit registry (`Codec`), never
pickle, so a frame can only ever become one of the registered plain types.
"""
import hashlib
import hmac
import os
import secrets
import select
import socket
import struct
import threading
from dataclasses import fields, is_dataclass

import msgpack

MAGIC = b"STG1"
NONCE = 16
TAG = 32
MAX_FRAME = 1 << 31   # KV rows of a long prompt are the largest frames
_EXT_DATACLASS = 1


class ChannelError(ConnectionError):
    """The peer is gone, broke the protocol, or a wait ran out."""


class AuthError(ChannelError):
    """The peer does not hold the deployment's secret."""


def load_secret(path: str | None = None) -> bytes:
    """The deployment's secret: the file `path` or $STAGGER_SECRET_FILE, else $STAGGER_SECRET.
    Never a constant in the code and never a command-line value (visible to every local user)."""
    path = path or os.environ.get("STAGGER_SECRET_FILE")
    if path:
        with open(path, "rb") as f:
            value = f.read().strip()
    else:
        value = os.environ.get("STAGGER_SECRET", "").encode()
    if len(value) < 16:
        raise AuthError("no deployment secret: set STAGGER_SECRET_FILE (a file of >= 16 bytes) or "
                        "STAGGER_SECRET (>= 16 characters); e.g. `head -c 32 /dev/urandom | base64 > FILE`")
    return value


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


class Codec:
    """msgpack with an explicit registry of dataclasses (by class name). Anything else that is not
    plain data (None, bool, int, float, str, bytes, list, dict) is refused on both ends."""

    def __init__(self, types):
        self.types = {t.__name__: t for t in types}
        for t in types:
            if not is_dataclass(t):
                raise TypeError(f"{t.__name__} is not a dataclass")

    def _default(self, obj):
        name = type(obj).__name__
        if is_dataclass(obj) and self.types.get(name) is type(obj):
            body = {f.name: getattr(obj, f.name) for f in fields(obj) if f.init}
            return msgpack.ExtType(_EXT_DATACLASS, self.encode([name, body]))
        raise TypeError(f"cannot send {type(obj).__name__}: not a registered message type")

    def _ext(self, code, data):
        if code != _EXT_DATACLASS:
            raise ChannelError(f"unknown msgpack extension {code}")
        name, body = self.decode(data)
        cls = self.types.get(name)
        if cls is None or not isinstance(body, dict):
            raise ChannelError(f"unknown message type {name!r}")
        return cls(**body)

    def encode(self, obj) -> bytes:
        return msgpack.packb(obj, default=self._default, use_bin_type=True)

    def decode(self, data: bytes):
        return msgpack.unpackb(data, ext_hook=self._ext, raw=False, strict_map_key=False)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            raise ChannelError("peer silent past the deadline") from None
        except OSError as e:
            raise ChannelError(f"connection lost ({e})") from None
        if not chunk:
            raise ChannelError("connection closed by peer")
        buf += chunk
    return bytes(buf)


class Channel:
    """One authenticated connection. send() is thread-safe (a heartbeat thread may share it);
    recv() belongs to one reader."""

    def __init__(self, sock: socket.socket, key: bytes, codec: Codec, server_side: bool):
        self.sock, self.key, self.codec = sock, key, codec
        self._out, self._in = (b"S", b"C") if server_side else (b"C", b"S")
        self._sent = self._got = 0
        self._lock = threading.Lock()
        self.closed = False
        sock.settimeout(None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, obj) -> None:
        self.send_bytes(self.codec.encode(obj))

    def send_bytes(self, body: bytes) -> None:
        with self._lock:
            tag = _mac(self.key, self._out, struct.pack("<Q", self._sent), body)
            self._sent += 1
            head = struct.pack("<I", len(body)) + tag
            try:
                if len(body) < 1 << 16:   # one segment for control messages; no copy of big KV rows
                    self.sock.sendall(head + body)
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(body)
            except OSError as e:
                self.closed = True
                raise ChannelError(f"connection lost ({e})") from None

    def poll(self, timeout: float | None) -> bool:
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        if timeout is not None and not self.poll(timeout):
            raise ChannelError(f"peer silent for {timeout} s")
        n, = struct.unpack("<I", _recv_exact(self.sock, 4))
        if n > MAX_FRAME:
            raise ChannelError(f"frame of {n} bytes exceeds the limit")
        tag = _recv_exact(self.sock, TAG)
        body = _recv_exact(self.sock, n)
        if not hmac.compare_digest(tag, _mac(self.key, self._in, struct.pack("<Q", self._got), body)):
            raise AuthError("frame failed authentication")   # checked before decoding
        self._got += 1
        return body

    def recv(self, timeout: float | None = None):
        return self.codec.decode(self.recv_bytes(timeout))

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def accept(sock: socket.socket, secret: bytes, codec: Codec, timeout_s: float = 5.0) -> Channel:
    """Server side of the handshake on an accepted socket; closes it on failure."""
    try:
        sock.settimeout(timeout_s)
        ns = secrets.token_bytes(NONCE)
        sock.sendall(MAGIC + ns)
        hello = _recv_exact(sock, len(MAGIC) + NONCE + TAG)   # fixed size: raw bytes, never decoded
        magic, nc, mac = hello[:4], hello[4:4 + NONCE], hello[4 + NONCE:]
        if magic != MAGIC or not hmac.compare_digest(mac, _mac(secret, b"client", ns, nc)):
            raise AuthError("peer failed authentication")
        sock.sendall(_mac(secret, b"server", nc, ns))
        return Channel(sock, _mac(secret, b"session", ns, nc), codec, server_side=True)
    except (OSError, ChannelError):
        sock.close()
        raise


def connect(address, secret: bytes, codec: Codec, timeout_s: float = 10.0) -> Channel:
    """Client side: connect and prove the secret; the server must prove it too."""
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as e:
        raise ChannelError(f"cannot reach {address[0]}:{address[1]} ({e})") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = _recv_exact(sock, len(MAGIC) + NONCE)
        if first[:4] != MAGIC:
            raise ChannelError(f"{address[0]}:{address[1]} does not speak the Stagger channel")
        ns, nc = first[4:], secrets.token_bytes(NONCE)
        sock.sendall(MAGIC + nc + _mac(secret, b"client", ns, nc))
        proof = _recv_exact(sock, TAG)
        if not hmac.compare_digest(proof, _mac(secret, b"server", nc, ns)):
            raise AuthError("the server does not hold the deployment secret")
        return Channel(sock, _mac(secret, b"session", ns, nc), codec, server_side=False)
    except ChannelError as e:
        sock.close()
        if isinstance(e, AuthError) or "does not speak" in str(e):
            raise
        raise AuthError(f"handshake with {address[0]}:{address[1]} refused: wrong secret? ({e})") from None
    except OSError as e:
        sock.close()
        raise ChannelError(f"handshake with {address[0]}:{address[1]} failed ({e})") from None


class Listener:
    """Accepts connections; each handshake runs in its own short thread, so a peer that connects
    and says nothing can stall nobody. Authenticated channels are handed to `on_channel`; refused
    peers are counted (and logged by the owner if it wants)."""

    def __init__(self, address, secret: bytes, codec: Codec, on_channel, handshake_timeout_s: float = 5.0):
        self.secret, self.codec, self.on_channel = secret, codec, on_channel
        self.timeout_s = handshake_timeout_s
        self.sock = socket.create_server(address, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self.refused = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="stagger-listener", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()

    def _handshake(self, sock):
        try:
            ch = accept(sock, self.secret, self.codec, self.timeout_s)
        except (OSError, ChannelError):
            self.refused += 1
            return
        self.on_channel(ch)

    def close(self):
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT' or 'PORT' -> (host, port); loopback unless a host is given."""
    host, _, port = text.rpartition(":")
    try:
        return (host.strip("[]") or default_host, int(port))
    except ValueError:
        raise ValueError(f"address must look like HOST:PORT, got {text!r}") from None
