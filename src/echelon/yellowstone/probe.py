"""Measure the link between two hosts: latency and bandwidth, from both ends, as a fleet `links` entry.

One end waits (`echelon profile --peer :PORT`), the other dials it (`echelon profile --peer
HOST:PORT`); both print the same entry. Over one TCP connection, in frames of a type byte, a
4-byte length and a payload of at most `MAX_FRAME` bytes:

1. hello: each end names its site (JSON);
2. latency: each end sends `PINGS` small pings the other echoes; one-way latency is half the
   median round trip, averaged over both ends;
3. bandwidth, each way in turn: one end streams data frames for `seconds`, then an end frame;
   the receiver times the bytes after the first frame, from its arrival to the end frame's (so
   latency does not count), and answers with the rate; the link's bandwidth is the slower way;
4. results: the ends exchange what they measured, so both report the same entry.

Anything else on the connection (another protocol, a frame too large, a malformed hello) is
refused with the peer's address and what was wrong.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import time
from dataclasses import dataclass

from echelon.errors import UserError

MAGIC = "echelon-probe"
VERSION = 1
MAX_FRAME = 1 << 20
CHUNK = 256 << 10
PINGS = 20
TIMEOUT_S = 30.0  # per socket operation, and for the waiting end to be dialled


@dataclass(frozen=True)
class Measured:
    """A link measured between two sites: Gbit/s each way and one-way latency in milliseconds."""

    sites: tuple[str, str]
    gbps_out: float  # from the first site to the second
    gbps_back: float
    latency_ms: float

    def entry(self) -> dict:
        """The fleet file's `links` entry: the slower direction, the measured latency."""
        return {
            "sites": list(self.sites),
            "bandwidth_gbps": round(min(self.gbps_out, self.gbps_back), 3),
            "latency_ms": round(self.latency_ms, 3),
        }


def parse_peer(text: str) -> tuple[str, int]:
    """HOST:PORT to dial, or :PORT to wait on; refuse anything else with the fix."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--peer {text!r}: expected HOST:PORT to dial a peer, or :PORT to wait for one (port 1-65535)"
        )
    return host.strip("[]"), int(port)


class _Conn:
    """Frames over a socket; every failure becomes a UserError naming the peer."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        sock.settimeout(TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            self.sock.sendall(kind + struct.pack("!I", len(payload)) + payload)
        except OSError as e:
            raise UserError(f"peer {self.peer}: the connection failed while sending: {e}") from None

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                part = self.sock.recv(min(n - len(out), CHUNK))
            except OSError as e:
                raise UserError(f"peer {self.peer}: the connection failed while receiving: {e}") from None
            if not part:
                raise UserError(f"peer {self.peer}: closed the connection in the middle of the probe")
            out += part
        return bytes(out)

    def recv(self, *kinds: bytes) -> tuple[bytes, bytes]:
        head = self._exact(5)
        kind, size = head[:1], struct.unpack("!I", head[1:])[0]
        if kind not in kinds or size > MAX_FRAME:
            raise UserError(
                f"peer {self.peer}: not an echelon probe, or out of step (frame {kind!r} of {size} bytes, "
                f"expected {b'/'.join(kinds)!r} of at most {MAX_FRAME}); run `echelon profile --peer` on both ends"
            )
        return kind, self._exact(size)

    def send_json(self, kind: bytes, obj: dict) -> None:
        self.send(kind, json.dumps(obj).encode())

    def recv_json(self, kind: bytes) -> dict:
        _, payload = self.recv(kind)
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise UserError(f"peer {self.peer}: sent a malformed {kind!r} frame; is it an echelon probe?")
        return obj


def _pings(conn: _Conn) -> list[float]:
    rtts = []
    for k in range(PINGS):
        start = time.perf_counter()
        conn.send(b"P", struct.pack("!I", k))
        _, back = conn.recv(b"O")
        if back != struct.pack("!I", k):
            raise UserError(f"peer {conn.peer}: answered ping {k} with something else")
        rtts.append(time.perf_counter() - start)
    return rtts


def _echo(conn: _Conn) -> None:
    for _ in range(PINGS):
        _, payload = conn.recv(b"P")
        conn.send(b"O", payload)


def _stream(conn: _Conn, seconds: float) -> float:
    """Send data frames for `seconds`; return the rate in Gbit/s the receiver measured."""
    block = bytes(CHUNK)
    stop = time.perf_counter() + seconds
    frames = 0
    while time.perf_counter() < stop or frames < 2:
        conn.send(b"D", block)
        frames += 1
    conn.send(b"E")
    rate = conn.recv_json(b"A").get("gbps")
    if not isinstance(rate, int | float) or not 0 < rate < 1e9:
        raise UserError(f"peer {conn.peer}: reported an impossible rate {rate!r}")
    return float(rate)


def _sink(conn: _Conn) -> None:
    """Receive data frames until the end frame; answer the rate after the first frame."""
    first, nbytes = None, 0
    while True:
        kind, payload = conn.recv(b"D", b"E")
        now = time.perf_counter()
        if kind == b"E":
            break
        if first is None:
            first = now
        else:
            nbytes += len(payload)
    if first is None or nbytes == 0 or now <= first:
        raise UserError(f"peer {conn.peer}: sent too little data to time")
    conn.send_json(b"A", {"gbps": nbytes * 8 / (now - first) / 1e9})


def _run(conn: _Conn, site: str, seconds: float, dialer: bool) -> Measured:
    conn.send_json(b"H", {"probe": MAGIC, "version": VERSION, "site": site, "seconds": seconds})
    hello = conn.recv_json(b"H")
    if (
        hello.get("probe") != MAGIC
        or hello.get("version") != VERSION
        or not isinstance(hello.get("site"), str)
    ):
        raise UserError(f"peer {conn.peer}: not an echelon probe of version {VERSION} (hello {hello!r})")
    other = hello["site"][:64]
    # The dialer leads every step, so both ends always agree on who speaks next.
    if dialer:
        rtts = _pings(conn)
        _echo(conn)
        out = _stream(conn, seconds)
        _sink(conn)
    else:
        _echo(conn)
        rtts = _pings(conn)
        _sink(conn)
        out = _stream(conn, seconds)
    conn.send_json(b"R", {"latency_ms": statistics.median(rtts) / 2 * 1000, "gbps": out})
    peer = conn.recv_json(b"R")
    lat, back = peer.get("latency_ms"), peer.get("gbps")
    if not all(isinstance(x, int | float) and 0 <= x < 1e9 for x in (lat, back)):
        raise UserError(f"peer {conn.peer}: sent impossible results {peer!r}")
    latency = (statistics.median(rtts) / 2 * 1000 + float(lat)) / 2
    return Measured((site, other), out, float(back), latency)


def dial(host: str, port: int, site: str, seconds: float) -> Measured:
    """Measure the link to a waiting peer."""
    peer = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
    except OSError as e:
        raise UserError(
            f"peer {peer}: cannot connect ({e}); start `echelon profile --peer :{port}` there first"
        ) from None
    with sock:
        return _run(_Conn(sock, peer), site, seconds, dialer=True)


def wait(port: int, site: str, seconds: float, host: str = "", ready=None) -> Measured:
    """Wait for one peer to dial `port` and measure the link with it. `ready(port)` is called
    once listening (the actual port when `port` is 0)."""
    try:
        server = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"--peer :{port}: cannot listen on port {port}: {e}") from None
    with server:
        server.settimeout(TIMEOUT_S)
        if ready is not None:
            ready(server.getsockname()[1])
        try:
            sock, addr = server.accept()
        except TimeoutError:
            raise UserError(f"--peer :{port}: no peer dialled within {TIMEOUT_S:.0f} s") from None
    with sock:
        return _run(_Conn(sock, f"{addr[0]}:{addr[1]}"), site, seconds, dialer=False)
