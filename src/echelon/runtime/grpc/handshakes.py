"""Refused TLS handshakes, logged as the party's own warnings.

gRPC core refuses a connection that fails mutual TLS (plaintext, a certificate of another CA,
no client certificate) before any of our code runs, and says so only in an INFO line of its own
on the process's stderr, without the peer's identity (there is none to give). `HandshakeTap`
passes the process's stderr through a pipe; a thread copies every line on unchanged and turns
each such line into a warning of the party's log ("refused a TLS handshake: ..."), counted in
`refused`, and hands its reason to the role's `sink` once one is attached: the role records it in
its audit log as a `handshake` record (such a peer names no party, so it has no channel; the
record keeps the time and the reason). Refusals before a sink is attached wait for it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable

FAILED = re.compile(
    rb"Handshake failed with error [A-Z_]+: (?:error:[0-9a-fA-F]+:)?(?:[A-Za-z ]+routines:)?(?:OPENSSL_internal:)?([A-Z_]+)"
)
WHY = {
    b"WRONG_VERSION_NUMBER": "not TLS (a plaintext client?)",
    b"PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate",
    b"BAD_SIGNATURE": "a certificate this deployment's CA did not sign",
    b"CERTIFICATE_VERIFY_FAILED": "a certificate this deployment's CA did not sign",
}


class HandshakeTap:
    """Routes stderr (fd 2) through a pipe while open; `close` restores it and drains the pipe."""

    def __init__(self, log_format: str) -> None:
        self.refused = 0
        self._sink: Callable[[str], None] | None = None
        self._waiting: list[str] = []  # reasons refused before a sink was attached
        self._sink_lock = threading.Lock()
        self._stderr = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        # Our warnings go straight to the real stderr: the pump must never write into its own pipe.
        self._log = logging.getLogger("echelon.serve.tls")
        self._log.propagate = False
        handler = logging.StreamHandler(os.fdopen(os.dup(self._stderr), "w"))
        handler.setFormatter(logging.Formatter(log_format))
        self._log.addHandler(handler)
        self._pump = threading.Thread(target=self._copy, args=(read,), name="stderr-tap", daemon=True)
        self._pump.start()

    def _copy(self, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                os.write(self._stderr, line)
                match = FAILED.search(line)
                if match:
                    self.refused += 1
                    why = WHY.get(match.group(1), match.group(1).decode(errors="replace"))
                    self._log.warning("refused a TLS handshake: %s (%s)", why, match.group(1).decode())
                    self._deliver(f"{why} ({match.group(1).decode()})")

    def _deliver(self, reason: str) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._waiting.append(reason)
                return
            try:
                self._sink(reason)
            except (OSError, ValueError) as e:  # a closed or failed audit log: the warning stands
                self._log.warning("could not record a refused TLS handshake in the audit log: %s", e)

    def attach(self, sink: Callable[[str], None]) -> None:
        """Hand every refusal (the waiting ones first) to `sink` until `detach`."""
        with self._sink_lock:
            self._sink, waiting, self._waiting = sink, self._waiting, []
        for reason in waiting:
            self._deliver(reason)

    def detach(self) -> None:
        with self._sink_lock:
            self._sink = None

    def close(self) -> None:
        """Put stderr back; the pipe then ends and everything written before is passed on."""
        import sys

        sys.stderr.flush()
        os.dup2(self._stderr, 2)
        self._pump.join(timeout=5)
        for handler in self._log.handlers:
            handler.flush()
