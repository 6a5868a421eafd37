"""engine.channel: a peer without the deployment secret is refused before anything it sent is
decoded; every message type of the scheduler protocol survives the codec."""
import json
import os
import pickle
import socket
import threading
import time

import pytest

from engine import channel
from engine.channel import AuthError, Codec
from engine.instances import (CODEC, TYPES, Abort, Bye, Drain, Heartbeat, Plan, Refused, Register, Registered,
                              Report, Submit)
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling import SamplingParams
from engine.messages import Recv, RequestSpec, Send, StepPlanMsg, StepStats, TokenEvent
from scheduler.load import RankLoad

SECRET = b"s3cret-for-this-test-only-0123456789"


class _Evil:
    """Unpickling this creates a file: the proof that a payload was decoded."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def echo_server():
    got = []
    codec = CODEC

    def on_channel(ch):
        def serve():
            try:
                while True:
                    msg = ch.recv(timeout=10)
                    got.append(msg)
                    ch.send(msg)
            except channel.ChannelError:
                ch.close()
        threading.Thread(target=serve, daemon=True).start()
    lst = channel.Listener(("127.0.0.1", 0), SECRET, codec, on_channel, handshake_timeout_s=2)
    yield lst, got
    lst.close()


def _raw_attack(address, payload: bytes):
    """Connect like a peer that does not know the secret and send `payload` right away."""
    s = socket.create_connection(address, timeout=5)
    try:
        s.recv(64)                 # the server's hello
        s.sendall(payload)
        s.settimeout(3)
        try:
            return s.recv(64)      # the server closes: b"" (or a reset)
        except (ConnectionResetError, socket.timeout):
            return b""
    finally:
        s.close()


def test_peer_without_the_secret_is_refused_and_nothing_it_sent_is_decoded(tmp_path, echo_server):
    lst, got = echo_server
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker)))
    frame_json = json.dumps({"kind": "plan", "loads": []}).encode()
    # raw pickle, raw JSON, a well-formed frame with a made-up tag, and a wrong-secret handshake
    for payload in (evil * 4, frame_json * 4,
                    len(evil).to_bytes(4, "little") + b"\0" * 32 + evil,
                    channel.MAGIC + b"\1" * channel.NONCE + b"\2" * channel.TAG + evil):
        assert _raw_attack(lst.address, payload) == b""
    with pytest.raises(AuthError):
        channel.connect(lst.address, b"the-wrong-secret-0123456789", CODEC)
    deadline = time.time() + 5
    while lst.refused < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert lst.refused == 5
    assert not marker.exists()
    assert got == []                  # nothing from those peers reached the application
    ok = channel.connect(lst.address, SECRET, CODEC)   # and the server still serves
    ok.send(Heartbeat())
    assert ok.recv(timeout=5) == Heartbeat()
    ok.close()


def test_client_refuses_a_server_without_the_secret():
    lst = channel.Listener(("127.0.0.1", 0), b"another-deployment-secret-xyz", CODEC, lambda ch: None)
    try:
        with pytest.raises(AuthError):
            channel.connect(lst.address, SECRET, CODEC)
    finally:
        lst.close()


def test_tampered_frame_is_refused_before_decoding(echo_server):
    lst, got = echo_server
    ch = channel.connect(lst.address, SECRET, CODEC)
    body = CODEC.encode(Heartbeat())
    ch.sock.sendall(len(body).to_bytes(4, "little") + b"\0" * 32 + body)   # right format, wrong tag
    with pytest.raises(channel.ChannelError):
        ch.recv(timeout=5)            # the server dropped the connection
    assert got == []


def test_secret_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("STAGGER_SECRET", raising=False)
    monkeypatch.delenv("STAGGER_SECRET_FILE", raising=False)
    with pytest.raises(AuthError, match="STAGGER_SECRET"):
        channel.load_secret()
    monkeypatch.setenv("STAGGER_SECRET", "short")
    with pytest.raises(AuthError):
        channel.load_secret()
    monkeypatch.setenv("STAGGER_SECRET", "x" * 20)
    assert channel.load_secret() == b"x" * 20
    f = tmp_path / "secret"
    f.write_bytes(b"y" * 40 + b"\n")
    monkeypatch.setenv("STAGGER_SECRET_FILE", str(f))
    assert channel.load_secret() == b"y" * 40
    assert channel.new_secret() != channel.new_secret()


def _samples():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=5, stop=["x"], seed=3,
                        session_id="s1")
    spec = RequestSpec("r1", [1, 2, 3], sp, 12.5)
    load = RankLoad(3, 1, 2, 30, 40, 10, 64, 16, 8, 256, 0.25)
    ev = TokenEvent("r1", 7, "ab", "stop", 1.5, text="abc", handoff=True, cached_tokens=16)
    stats = StepStats(3, 12, 0.01, 0)
    plan = StepPlanMsg(assignments={3: [spec]}, aborts=["r9"], rebalance=True, stop=False,
                       sends={0: [Send("r1", 4, 7)]}, recvs={4: [Recv(spec, 0, 7, 11, 3)]})
    out = RequestOutput("r1", "hi", [1, 2], [7, 8], "hello", "length",
                        RequestMetrics(1.0, 1.1, 1.2, [1.2, 1.3], 1.4, 3), [8], sp, 16)
    return [Register(2, "prefill", 100, 16, "a", [0, 1], 0), Registered(1, [2, 3]), Refused("no"),
            Plan([load]), Report([[[ev], stats]]), Heartbeat(), Drain(), Bye(),
            Submit([1, 2], sp, "r1", True), Submit("text", sp), Abort("r1"), load, plan, spec, ev, stats,
            Send("r", 1, 2), Recv(spec, 1, 2, 3, 4, "127.0.0.1:9"),
            sp, out, out.metrics]


def test_every_message_type_round_trips():
    samples = _samples()
    assert {type(s) for s in samples} == set(TYPES)    # the test covers the whole registry
    for s in samples:
        back = CODEC.decode(CODEC.encode(s))
        assert type(back) is type(s) and back == s, s


def test_codec_refuses_unregistered_types():
    with pytest.raises(TypeError, match="not a registered"):
        CODEC.encode(_Evil("x"))
    small = Codec([Heartbeat])
    with pytest.raises(channel.ChannelError, match="unknown message type"):
        small.decode(CODEC.encode(Drain()))


def test_large_frames_and_heartbeats_from_another_thread(echo_server):
    lst, _ = echo_server
    ch = channel.connect(lst.address, SECRET, CODEC)
    blob = os.urandom(3 << 20)
    ch.send_bytes(CODEC.encode(blob))
    assert ch.recv(timeout=10) == blob
    t = threading.Thread(target=lambda: [ch.send(Heartbeat()) for _ in range(50)])
    t.start()
    for _ in range(50):
        ch.send(Drain())
    t.join()
    kinds = [type(ch.recv(timeout=10)) for _ in range(100)]
    assert kinds.count(Heartbeat) == 50 and kinds.count(Drain) == 50
    ch.close()
