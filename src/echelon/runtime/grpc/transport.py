"""The deployment's transport: long-lived gRPC bidirectional streams between parties, over mutual TLS.

A server (the global plane, or a boundary for its devices) and the clients that dial it exchange
raw frames: the guards' bytes across a boundary, device chunks inside one. This module owns:

- servers and channels: mTLS with a client certificate required, keepalive both ways, one port
  per server (no `SO_REUSEPORT`: a second server on a busy port fails, it does not share it), and
  `--listen` / target addresses checked up front (`parse_address`);
- one live stream per party (`LiveStreams`): a party's first stream stays its stream until that
  connection ends; another stream presenting the same certificate meanwhile is refused with
  ALREADY_EXISTS. An impostor holding a copy of a party's key cannot retire the real party, and
  a party restarting after a crash is admitted as soon as its dead connection is noticed
  (TCP reset, or keepalive within KEEPALIVE_S);
- how a stream ends: OK with the trailing metadata `echelon-run: over` only when the run is over;
  any other end carries a status and details saying why, and the client reconnects or stops;
- reading (`read_frames`): every exception while handling a received frame is a refusal the role
  records; MAX_REFUSALS in a row end the stream with INVALID_ARGUMENT;
- dialling with patience (`Dialer`): a client reconnects with backoff for as long as the run's
  `deployment.patience_s`, and fails loudly when refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from echelon.errors import UserError
from echelon.runtime.grpc.node import Outbox
from echelon.runtime.grpc.tls import Credentials

log = logging.getLogger("echelon.serve")

CROSS_SERVICE = "echelon.v1.CrossBoundary"
LOCAL_SERVICE = "echelon.v1.BoundaryLocal"
CROSS_METHOD = f"/{CROSS_SERVICE}/Exchange"
LOCAL_METHOD = f"/{LOCAL_SERVICE}/Exchange"
MAX_MESSAGE = 4 << 20  # every stream item is at most 1 MiB of data plus framing
KEEPALIVE_S = 15.0  # a silent dead connection is noticed within this long (ping every 10 s, 5 s to answer)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.so_reuseport", 0),
    # Accept the clients' keepalive pings on idle streams (the default answers them with GOAWAY).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]
BACKOFF_S = (0.1, 5.0)  # first and largest reconnect delay
MAX_REFUSALS = 32  # refused frames in a row that end a stream
RUN_OVER = ("echelon-run", "over")  # trailing metadata of a stream ended because the run is over


class StreamClosed(Exception):
    """End the stream being read with `code` and `details` (a status the peer understands)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """(host, port) of `address` given as `flag` (host:port, [v6]:port); UserError when malformed."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        with contextlib.suppress(ValueError):
            ipaddress.IPv6Address(host)
            sep = sep and "v6"
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or " " in host:
        raise UserError(
            f"{flag} {address!r} is not host:port (e.g. 127.0.0.1:50051, [::1]:50051, a port 0-65535)"
        )
    return host, int(port)


def _check_bindable(host: str, port: int, flag: str, address: str) -> None:
    """UserError naming why `address` cannot be listened on (in use, not this machine's, ...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(
            f"{flag} {address}: {host!r} is not an address of this machine ({e.strerror})"
        ) from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a restart may reuse it
        try:
            s.bind(sockaddr)
        except OSError as e:
            why = "the port is in use by another process" if e.errno == errno.EADDRINUSE else e.strerror
            raise UserError(f"{flag} {address}: cannot listen there: {why}") from None


def check_listen(listen: str) -> None:
    """UserError unless a server can listen on `listen` (given as --listen) now."""
    host, port = parse_address(listen, "--listen")
    _check_bindable(host, port, "--listen", listen)


def make_server(creds: Credentials, listen: str, handlers: list[grpc.GenericRpcHandler]) -> grpc.aio.Server:
    """A mutual-TLS server on `listen` with `handlers` and a health service; UserError if it cannot bind."""
    check_listen(listen)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    tls = grpc.ssl_server_credentials(
        [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True
    )
    try:
        server.add_secure_port(listen, tls)  # no insecure port: plaintext is refused by the handshake
    except RuntimeError:
        raise UserError(f"--listen {listen}: cannot listen there (gRPC failed to bind)") from None
    server.add_generic_rpc_handlers(handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.health = health_servicer  # type: ignore[attr-defined]
    return server


async def start_server(server: grpc.aio.Server) -> None:
    await server.start()
    await server.health.set("", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]


def make_channel(creds: Credentials, target: str, server_party: str) -> grpc.aio.Channel:
    tls = grpc.ssl_channel_credentials(
        root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert
    )
    # The server must present the certificate of the party we expect, whatever the address.
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_party)]
    return grpc.aio.secure_channel(target, tls, options=options)


def stream_handler(service: str, exchange: Callable) -> grpc.GenericRpcHandler:
    # No (de)serializers: stream items are the exact frame bytes the guards count.
    return grpc.method_handlers_generic_handler(
        service, {"Exchange": grpc.stream_stream_rpc_method_handler(exchange)}
    )


class LiveStreams:
    """Which party holds a live stream: at most one each; the first one keeps it until it ends."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._next = 0

    def claim(self, party: str) -> int | None:
        """A token for `party`'s new stream, or None while another stream of `party` is live."""
        if party in self._held:
            return None
        self._next += 1
        self._held[party] = self._next
        return self._next

    def release(self, party: str, token: int) -> None:
        if self._held.get(party) == token:
            del self._held[party]

    def __contains__(self, party: str) -> bool:
        return party in self._held


async def read_frames(requests: AsyncIterator[bytes], handle: Callable[[bytes], None]) -> None:
    """Feed every frame of `requests` to `handle`. An exception from `handle` is a refusal (`handle`
    has recorded it) and the stream goes on, until MAX_REFUSALS in a row end it (StreamClosed,
    INVALID_ARGUMENT)."""
    refused = 0
    async for frame in requests:
        try:
            handle(frame)
        except StreamClosed:
            raise
        except Exception as e:
            refused += 1
            if refused >= MAX_REFUSALS:
                raise StreamClosed(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{refused} refused messages in a row; the last: {e}"
                ) from None
        else:
            refused = 0


async def serve_stream(
    context: grpc.aio.ServicerContext,
    reader: Awaitable[None],
    outbox: Outbox,
    *,
    drain_s: float = 0.0,
) -> AsyncIterator[bytes]:
    """The server's side of one admitted stream: yield `outbox` frames while `reader` reads.

    Ends with OK and RUN_OVER once the outbox is closed and drained (after waiting up to `drain_s`
    for the peer to close its side, so what it sent before seeing the end is read and recorded);
    with the StreamClosed status when the reader ends the stream.
    """
    task = asyncio.ensure_future(reader)
    try:
        async for frame in outbox.frames(until=task):
            yield frame
        if task.done() and isinstance(task.exception(), StreamClosed):
            err = task.exception()
            await context.abort(err.code, err.details)
        if not task.done():
            # The outbox ended (run over): the peer closes its side when it has seen the end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), drain_s)
        elif task.exception() is None and not outbox.closed:
            # The peer half-closed early: it still reads, so keep sending until the run is over.
            async for frame in outbox.frames():
                yield frame
        context.set_trailing_metadata((RUN_OVER,))
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class Dialer:
    """A client's stream to its server, held open until the server says the run is over.

    Reconnects with exponential backoff while the server is unreachable, busy with another stream
    of this party (ALREADY_EXISTS) or ended the stream for another reason, for up to `patience_s`
    without a connection; then, or when the server refuses this party (PERMISSION_DENIED, a
    failed TLS handshake), raises UserError. An exception from `on_frame` is a refusal it has
    recorded; MAX_REFUSALS in a row drop the connection and dial again. `on_lost(why)` is called
    when a stream that was connected ends before the run is over.
    """

    def __init__(
        self,
        creds: Credentials,
        target: str,
        server_party: str,
        method: str,
        outbox: Outbox,
        patience_s: float,
        *,
        on_connect: Callable[[], None],
        on_frame: Callable[[bytes], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.creds, self.target, self.server_party, self.method = creds, target, server_party, method
        self.outbox, self.patience_s = outbox, patience_s
        self._on_connect, self._on_frame, self._on_lost = on_connect, on_frame, on_lost

    async def run(self) -> None:
        delay, waiting_since = BACKOFF_S[0], time.monotonic()
        while True:
            channel = make_channel(self.creds, self.target, self.server_party)
            connected = False
            try:
                call = channel.stream_stream(self.method)(self.outbox.frames())
                await call.wait_for_connection()
                connected = True
                if await self._hold(call):
                    return
                problem = "ended the stream without saying the run is over"
            except grpc.aio.AioRpcError as e:
                problem = self._problem(e)
                # A stream refused as it opened was never ours: no loss, and the backoff grows.
                connected = connected and e.code() != grpc.StatusCode.ALREADY_EXISTS
            finally:
                await channel.close()
            if connected:  # patience counts from the loss of a stream
                delay, waiting_since = BACKOFF_S[0], time.monotonic()
                self._on_lost(problem)
            waited = time.monotonic() - waiting_since
            if waited > self.patience_s:
                raise UserError(
                    f"gave up on {self.server_party} at {self.target} after {waited:.0f} s without a stream "
                    f"(deployment.patience_s is {self.patience_s:g}): {problem}"
                )
            log.warning(
                "%s at %s: %s; dialling again in %.1f s", self.server_party, self.target, problem, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _hold(self, call: grpc.aio.StreamStreamCall) -> bool:
        """Read the stream until it ends; True when the server ended it because the run is over."""
        log.info("connected to %s at %s", self.server_party, self.target)
        self._on_connect()
        refused = 0
        async for frame in call:
            try:
                self._on_frame(frame)
            except Exception:
                refused += 1
                if refused >= MAX_REFUSALS:
                    call.cancel()
                    log.error(
                        "%s sent %d refused messages in a row; dropping the stream",
                        self.server_party,
                        refused,
                    )
                    return False
            else:
                refused = 0
        return RUN_OVER in tuple(await call.trailing_metadata() or ())

    def _problem(self, e: grpc.aio.AioRpcError) -> str:
        """What went wrong, for the log; UserError when retrying cannot help."""
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise UserError(f"{self.server_party} at {self.target} refused this party: {details}")
        if code == grpc.StatusCode.UNAVAILABLE and "handshake failed" in details.lower():
            raise UserError(
                f"TLS handshake with {self.server_party} at {self.target} failed: it does not accept this "
                "party's certificate (another deployment's?), or it is not this deployment's server"
            )
        if code == grpc.StatusCode.ALREADY_EXISTS:
            log.error(
                "%s at %s holds another live stream of this party: a connection of ours it has not yet seen "
                "die, or an impostor presenting our certificate",
                self.server_party,
                self.target,
            )
        elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            log.error("%s at %s ended our stream: %s", self.server_party, self.target, details)
        return f"{code.name} ({details})"
