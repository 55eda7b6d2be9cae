"""Secure aggregation cost: SecAgg+ against a plain float sum and against Flower's SecAgg+.

For n participants and d-element vectors, one round without dropouts, all in this process:
client time (mean per participant, all stages) and server time (all stages), each the fastest
of --repeat alternating rounds, and the bytes each participant sends and receives (protobuf
sizes), for SecAgg+ (k = min(n - 1, 2 ceil(log2 n)), t = ceil((k + 1) / 2)) and for the plain
weighted float sum. When `flwr` is importable, the same
round through Flower's SecAgg+ primitives (the computations of its secaggplus mod and workflow:
EC keys, Fernet, pycryptodome Shamir, its quantizer and its numpy PRG) on the same neighbour
graph, side by side (target: SecAgg+ faster at every size, >= 3x at n = 16, d = 1e6).
Also: mask PRG speed as a fraction of the raw ChaCha20 keystream (target >= 0.8), the peak RSS
of a server process at the largest n and d against 3 x d x 8 bytes above its baseline, and the
malicious-server defences the deployment turns on (certificate-signed keys checked by every
participant, the consistency round, t > m/2) against the same round without them, at n = 16 and
d = 1e6 (--quick: d = 1e5), with the deployment's own certificates (ECDSA P-256, `certs init`).

    .venv/bin/python benchmarks/secagg.py [--quick] [--defences]
    (an environment with `pip install -e .[peers]` adds the Flower columns)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from echelon.contract.provenance import AggregateResult, RoundSeal
from echelon.planes.aggregation import Aggregator, PlainAggregator
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.sansio import Send
from echelon.secagg import SecAggPlusAggregator, neighbour_graph
from echelon.secagg.primitives import MaskStream, apply_masks
from echelon.v1 import device_pb2, secagg_pb2, tensor_pb2

SERVER = "boundary/b0"


@dataclass
class Cost:
    """Seconds of protocol compute and protobuf bytes of one round."""

    client_s: float = 0.0  # all participants together
    server_s: float = 0.0
    up: int = 0  # bytes sent by all participants
    down: int = 0  # bytes received by all participants


def fastest(costs: list[Cost]) -> Cost:
    """The least client and the least server time over repetitions (bytes do not vary)."""
    return Cost(min(c.client_s for c in costs), min(c.server_s for c in costs), costs[0].up, costs[0].down)


def secagg_degree(n: int) -> int:
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def secagg_aggregator(n: int, **kw) -> SecAggPlusAggregator:
    return SecAggPlusAggregator(threshold=0.5, degree=secagg_degree(n), clip=1.0, **kw)


def defended(n: int, certs: str) -> tuple[SecAggPlusAggregator, dict[str, SecAggPlusAggregator]]:
    """A round's server and participants with the deployment's defences and certificates."""
    init_certs(certs, {"b0": [f"d{i:03d}" for i in range(n)]})
    verifier = load_credentials(certs, "boundary.b0").identity().verifier
    joins = {
        f"device/d{i:03d}": secagg_aggregator(n, defended=True, verifier=verifier, signer=identity.signer)
        for i in range(n)
        for identity in [load_credentials(certs, f"device.d{i:03d}").identity()]
    }
    return secagg_aggregator(n, defended=True, verifier=verifier), joins


def drive(
    aggregator: Aggregator,
    vector: np.ndarray,
    weights: dict[str, float],
    joins: dict[str, Aggregator] | None = None,
) -> tuple[AggregateResult, Cost]:
    """One round, no dropouts, delivering depth-first (one masked input in flight at a time).

    `joins`: each participant's own aggregator (its signer, in a defended round).
    """
    cost = Cost()
    t0 = time.perf_counter()
    server = aggregator.server(1, weights, vector.size, tensor_pb2.DEVICE, RoundSeal.open(1, len(weights)))
    stack: list[tuple[str, Send]] = [(SERVER, a) for a in reversed(server.start(0.0)) if isinstance(a, Send)]
    cost.server_s += time.perf_counter() - t0
    clients = {}
    while stack:
        origin, send = stack.pop()
        t0 = time.perf_counter()
        if send.to == SERVER:
            actions = server.receive(0.0, origin, send.message)
            cost.server_s += time.perf_counter() - t0
        else:
            if isinstance(send.message, device_pb2.AggregationRequest):
                joined = (joins or {}).get(send.to, aggregator)
                clients[send.to] = joined.join(SERVER, send.message, vector, tensor_pb2.DEVICE)
                actions = clients[send.to].start(0.0)
            else:
                actions = clients[send.to].receive(0.0, send.message)
            cost.client_s += time.perf_counter() - t0
            cost.down += send.message.ByteSize()
            cost.up += sum(a.message.ByteSize() for a in actions if isinstance(a, Send))
        stack.extend((send.to, a) for a in reversed(actions) if isinstance(a, Send))
    outcome = server.outcome
    assert isinstance(outcome, AggregateResult), outcome
    return outcome, cost


def flower_round(vector: np.ndarray, weights: dict[str, float], degree: int, threshold: int) -> Cost:
    """The same round through Flower's SecAgg+ primitives, as its client mod and server workflow do."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    clip, q_range, mod_range = 1.0, 2**22, 2**32  # Flower's defaults, clipping range as ours
    n = len(weights)
    graph = neighbour_graph(1, n, degree)
    nodes = sorted(graph)
    w = dict(zip(nodes, weights.values(), strict=True))
    cost = Cost()

    def client(f: Callable[[], int]) -> None:
        t0 = time.perf_counter()
        cost.up += f()
        cost.client_s += time.perf_counter() - t0

    keys, seeds, inbox = {}, {}, {i: [] for i in nodes}
    held: dict[int, dict[int, bytes]] = {i: {} for i in nodes}

    def setup(i: int) -> int:
        (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        keys[i] = (
            private_key_to_bytes(sk1),
            public_key_to_bytes(pk1),
            private_key_to_bytes(sk2),
            public_key_to_bytes(pk2),
        )
        return len(keys[i][1]) + len(keys[i][3])

    def share_keys(i: int) -> int:
        members = sorted(graph[i] | {i})
        seeds[i] = os.urandom(32)
        b_shares = create_shares(seeds[i], threshold, len(members))
        sk1_shares = create_shares(keys[i][0], threshold, len(members))
        sent = 0
        for idx, j in enumerate(members):
            if j == i:
                held[i][i] = b_shares[idx]
                continue
            shared = generate_shared_key(bytes_to_private_key(keys[i][2]), bytes_to_public_key(keys[j][3]))
            ciphertext = encrypt(shared, share_keys_plaintext_concat(i, j, b_shares[idx], sk1_shares[idx]))
            inbox[j].append((i, ciphertext))
            sent += len(ciphertext)
        return sent

    payloads: dict[int, list[bytes]] = {}

    def masked_input(i: int) -> int:
        for src, ciphertext in inbox[i]:
            shared = generate_shared_key(bytes_to_private_key(keys[i][2]), bytes_to_public_key(keys[src][3]))
            _, _, b_share, _ = share_keys_plaintext_separate(decrypt(shared, ciphertext))
            held[i][src] = b_share
        q_ratio = round(w[i] * q_range)
        quantized = quantize(parameters_multiply([vector], q_ratio / q_range), clip, q_range)
        quantized = factor_combine(q_ratio, quantized)
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(seeds[i], mod_range, dims))
        for j in sorted(graph[i]):
            shared = generate_shared_key(bytes_to_private_key(keys[i][0]), bytes_to_public_key(keys[j][1]))
            mask = pseudo_rand_gen(shared, mod_range, dims)
            add = parameters_addition if i > j else parameters_subtraction
            quantized = add(quantized, mask)
        payloads[i] = [ndarray_to_bytes(a) for a in parameters_mod(quantized, mod_range)]
        return sum(len(b) for b in payloads[i])

    for i in nodes:
        client(lambda i=i: setup(i))
    for i in nodes:
        client(lambda i=i: share_keys(i))
    total = None
    for i in nodes:
        client(lambda i=i: masked_input(i))
        t0 = time.perf_counter()
        vec = [bytes_to_ndarray(b) for b in payloads.pop(i)]
        total = vec if total is None else parameters_addition(total, vec)
        cost.server_s += time.perf_counter() - t0
    collected: dict[int, list[bytes]] = {i: [] for i in nodes}

    def unmask(i: int) -> int:
        for j in sorted(graph[i] | {i}):
            collected[j].append(held[i][j])
        return sum(len(held[i][j]) for j in graph[i] | {i})

    for i in nodes:
        client(lambda i=i: unmask(i))
    t0 = time.perf_counter()
    assert total is not None
    total = parameters_mod(total, mod_range)
    for shares in collected.values():
        mask = pseudo_rand_gen(combine_shares(shares), mod_range, get_parameters_shape(total))
        total = parameters_subtraction(total, mask)
    q_total, recon = factor_extract(parameters_mod(total, mod_range))
    (average,) = dequantize(recon, clip, q_range)
    average += -(n - 1) * clip
    average *= q_range / q_total
    cost.server_s += time.perf_counter() - t0
    return cost


def prg_speed(total: int = 1 << 28, reps: int = 3) -> tuple[float, float, float]:
    """GB/s of the raw ChaCha20 keystream (one call per 16 MiB), of the mask PRG's chunked
    expansion (MaskStream.fill, 2^16 words a call), and of applying 13 masks into a vector."""
    key, block, chunk = os.urandom(32), 1 << 24, 1 << 16
    zeros, out = bytes(block), bytearray(block)
    words = np.empty(chunk, dtype=np.uint32)
    keys = [(os.urandom(32), 1) for _ in range(13)]
    acc = np.zeros(total // 4 // len(keys), dtype=np.uint32)
    raw, expansion, application = [], [], []
    for _ in range(reps):
        encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        t0 = time.perf_counter()
        for _ in range(total // block):
            encryptor.update_into(zeros, out)
        raw.append(total / (time.perf_counter() - t0) / 1e9)
        stream = MaskStream(key)
        t0 = time.perf_counter()
        for _ in range(total // words.nbytes):
            stream.fill(words)
        expansion.append(total / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        apply_masks(acc, keys, chunk)
        application.append(acc.nbytes * len(keys) / (time.perf_counter() - t0) / 1e9)
    return statistics.median(raw), statistics.median(expansion), statistics.median(application)


def flower_prg_speed(total: int = 1 << 28) -> float:
    """GB/s of 32-bit ring words from Flower's pseudo_rand_gen (counted as 4 bytes per word)."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    words = total // 4
    t0 = time.perf_counter()
    pseudo_rand_gen(os.urandom(32), 2**32, [(words,)])
    return total / (time.perf_counter() - t0) / 1e9


def _rss(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since exec or the last reset) of this process, in bytes.

    Not getrusage's ru_maxrss: a spawned child inherits its parent's peak through fork + exec.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _server_process(conn, n: int, dim: int, weights: dict[str, float]) -> None:
    """A SecAgg+ server alone in a process, fed serialized messages; reports its peak RSS."""
    server = secagg_aggregator(n).server(1, weights, dim, tensor_pb2.DEVICE, RoundSeal.open(1, len(weights)))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS: import-time peaks are not the server's
    baseline = _rss("VmRSS")

    def reply(actions) -> None:
        """The server's sends, and once it has an outcome (baseline, peak RSS, success)."""
        sends = [
            (a.to, type(a.message).__name__, a.message.SerializeToString())
            for a in actions
            if isinstance(a, Send)
        ]
        peak = _rss("VmHWM")
        ended = server.outcome is not None
        conn.send((sends, (baseline, peak, isinstance(server.outcome, AggregateResult)) if ended else None))

    reply(server.start(0.0))
    while server.outcome is None:
        origin = conn.recv()
        message = secagg_pb2.SecAggMessage.FromString(conn.recv_bytes())
        actions = server.receive(0.0, origin, message)
        del message
        reply(actions)


def server_peak_rss(n: int, dim: int) -> tuple[int, int, bool]:
    """(baseline, peak RSS, success) of a server process running a round of n clients on d = dim."""
    vector = np.random.default_rng(0).uniform(-0.5, 0.5, dim).astype(np.float32)
    weights = {f"device/d{i:03d}": 1.0 for i in range(n)}
    aggregator = secagg_aggregator(n)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_server_process, args=(child, n, dim, weights))
    proc.start()
    kinds: dict[str, type[Message]] = {
        "AggregationRequest": device_pb2.AggregationRequest,
        "SecAggMessage": secagg_pb2.SecAggMessage,
    }
    clients = {}
    sends, result = parent.recv()
    stack = list(reversed(sends))
    while result is None:
        to, kind, data = stack.pop()
        message = kinds[kind].FromString(data)
        if isinstance(message, device_pb2.AggregationRequest):
            clients[to] = aggregator.join(SERVER, message, vector, tensor_pb2.DEVICE)
            actions = clients[to].start(0.0)
        else:
            actions = clients[to].receive(0.0, message)
        for a in actions:
            if isinstance(a, Send):
                parent.send(to)
                parent.send_bytes(a.message.SerializeToString())
                sends, result = parent.recv()
                stack.extend(reversed(sends))
    proc.join()
    return result


def defences_table(n: int, d: int, repeat: int, quick: bool) -> Table:
    """One round with and without the malicious-server defences, alternating; fastest kept."""
    vector = np.random.default_rng(1).uniform(-0.05, 0.05, d).astype(np.float32)
    weights = {f"device/d{i:03d}": 1.0 for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        server, joins = defended(n, f"{tmp}/certs")
        runs: dict[str, list[Cost]] = {"off": [], "on": []}
        for _ in range(repeat):
            runs["off"].append(drive(secagg_aggregator(n), vector, weights)[1])
            outcome, cost = drive(server, vector, weights, joins)
            runs["on"].append(cost)
    off, on = fastest(runs["off"]), fastest(runs["on"])
    params = server.parameters(n)
    title = f"Malicious-server defences, one SecAgg+ round at n = {n}, d = {d:.0e}"
    table = Table(title=title + (" (--quick: d = 1e5, not 1e6)" if quick else ""))
    for col in (
        "defences",
        "k",
        "t",
        "client s (mean)",
        "server s",
        "round s (clients + server)",
        "up B/client",
        "down B/client",
    ):
        table.add_column(col, justify="right")
    for name, c, t in (
        ("off", off, secagg_aggregator(n).parameters(n).threshold),
        ("on", on, params.threshold),
    ):
        table.add_row(
            name,
            str(params.degree),
            str(t),
            f"{c.client_s / n:.4f}",
            f"{c.server_s:.4f}",
            f"{c.client_s + c.server_s:.3f}",
            f"{c.up // n:,}",
            f"{c.down // n:,}",
        )
    ratio = (on.client_s + on.server_s) / (off.client_s + off.server_s)
    table.caption = f"defences cost {ratio:.2f}x the round's compute; result exact: {isinstance(outcome, AggregateResult)}"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d in {1e4, 1e5}; RSS at d = 1e6")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per size, alternating; fastest kept")
    parser.add_argument("--defences", action="store_true", help="only the malicious-server defences table")
    args = parser.parse_args()
    console = Console(width=240)
    if args.defences:
        console.print(defences_table(16, 10**5 if args.quick else 10**6, args.repeat, args.quick))
        return
    try:
        import flwr  # noqa: F401

        have_flwr = True
    except ImportError:
        have_flwr = False
        console.print(
            "flwr not installed, run with .venv-peers (pip install -e .[peers]) for the Flower columns",
            markup=False,
        )
    sizes = [10**4, 10**5] if args.quick else [10**5, 10**6, 10**7]
    table = Table(
        title="SecAgg+ vs plain float sum" + (" vs Flower SecAgg+" if have_flwr else "") + ", one round"
    )
    columns = ["n", "d", "k", "t", "client s", "server s", "up B/client", "down B/client"]
    columns += ["plain client s", "plain server s", "plain up B", "max |err| / bound"]
    if have_flwr:
        columns += ["flwr client s", "flwr server s", "flwr up B", "speedup client", "speedup server"]
    for col in columns:
        table.add_column(col, justify="right")
    rng = np.random.default_rng(0)
    warm = {f"device/d{i}": 1.0 for i in range(4)}
    drive(secagg_aggregator(4), np.zeros(1000, dtype=np.float32), warm)  # first-call costs out of the table
    for n in (4, 16, 64):
        for d in sizes:
            vector = rng.uniform(-0.5, 0.5, d).astype(np.float32)
            weights = {f"device/d{i:03d}": float(rng.uniform(0.5, 1.0)) for i in range(n)}
            aggregator = secagg_aggregator(n)
            params = aggregator.parameters(n)
            runs: dict[str, list[Cost]] = {"secagg": [], "plain": [], "flwr": []}
            for _ in range(args.repeat):  # alternating, so load on the machine hits all alike
                outcome, c = drive(aggregator, vector, weights)
                runs["secagg"].append(c)
                runs["plain"].append(drive(PlainAggregator(), vector, weights)[1])
                if have_flwr:
                    runs["flwr"].append(flower_round(vector, weights, params.degree, params.threshold))
            cost, plain_cost = fastest(runs["secagg"]), fastest(runs["plain"])
            error = np.abs(outcome.weighted_sum - sum(weights.values()) * vector.astype(np.float64)).max()
            row = [
                str(n),
                f"{d:.0e}",
                str(params.degree),
                str(params.threshold),
                f"{cost.client_s / n:.4f}",
                f"{cost.server_s:.4f}",
                f"{cost.up // n:,}",
                f"{cost.down // n:,}",
                f"{plain_cost.client_s / n:.4f}",
                f"{plain_cost.server_s:.4f}",
                f"{plain_cost.up // n:,}",
                f"{error / params.codec.error_bound(n):.2f}",
            ]
            del outcome
            if have_flwr:
                fl = fastest(runs["flwr"])
                row += [
                    f"{fl.client_s / n:.4f}",
                    f"{fl.server_s:.4f}",
                    f"{fl.up // n:,}",
                    f"{fl.client_s / cost.client_s:.1f}x",
                    f"{fl.server_s / cost.server_s:.1f}x",
                ]
            table.add_row(*row)
    console.print(table)
    raw, expansion, application = prg_speed()
    console.print(
        f"mask PRG expansion {expansion:.2f} GB/s vs raw ChaCha20 keystream {raw:.2f} GB/s: fraction "
        f"{expansion / raw:.2f} (target >= 0.8); 13 masks added into a vector: {application:.2f} GB/s of "
        f"keystream, fraction {application / raw:.2f}"
    )
    if have_flwr:
        console.print(f"Flower pseudo_rand_gen: {flower_prg_speed():.2f} GB/s of 32-bit words")
    console.print(defences_table(16, 10**5 if args.quick else 10**6, args.repeat, args.quick))
    n, d = 64, sizes[-1] * (10 if args.quick else 1)
    baseline, peak, ok = server_peak_rss(n, d)
    console.print(
        f"server peak RSS at n = {n}, d = {d:.0e}: {(peak - baseline) / 1e6:,.0f} MB above its baseline of "
        f"{baseline / 1e6:,.0f} MB; 3 x d x 8 B = {3 * d * 8 / 1e6:,.0f} MB; "
        f"ratio {(peak - baseline) / (3 * d * 8):.2f} (target < 1){'' if ok else ' [round failed]'}"
    )


if __name__ == "__main__":
    main()
