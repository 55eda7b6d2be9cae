"""`echelon profile`: measure this machine's devices and write them as fleet file entries.

Compute is the achieved rate of a square matmul timed with torch (fp32 on the CPU, bf16 on CUDA
devices), in TFLOP/s; memory is the physical memory (CPU) or the device's total memory (CUDA).
The entries need the user's boundary, site and access tier (flags, or edit the output).

With `--model`, each device also gets a `measured_steps` entry: one training step of that model
timed on it, which the planner's cost model calibrates against. `--ranks N` splits this machine's
CPU into N devices (the processes `echelon execute` runs), timed while all N run at once, and
`--fleet NAME` writes a whole fleet file with this host as one site whose network is measured
between two local processes over gloo.

With `--peer`, it measures the link to another host instead (`probe`): run
`echelon profile --peer :PORT --site A` on one host and `echelon profile --peer HOST:PORT --site B`
on the other; both print the same `links` entry.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import TYPE_CHECKING

import yaml

from echelon.cliargs import MAX_THREADS, count, out_path, real
from echelon.rundir import write_atomic

if TYPE_CHECKING:
    from echelon.yellowstone.measure import Timed

GIB = 1024**3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=out_path(), default=None, help="write the YAML here (default: print it)"
    )
    parser.add_argument("--boundary", default="my-boundary", help="boundary id for the entries")
    parser.add_argument("--site", default=None, help="site id (default: this host's name)")
    parser.add_argument("--access-tier", default="internal", help="access tier the devices are cleared for")
    parser.add_argument(
        "--seconds",
        type=real(0, 60),
        default=0.5,
        help="timing budget per device (per direction with --peer)",
    )
    parser.add_argument(
        "--peer",
        default=None,
        metavar="HOST:PORT",
        help="measure the link to another host instead: HOST:PORT dials a peer waiting with --peer :PORT",
    )
    parser.add_argument(
        "--model", default=None, help="time a training step of this model (tiny or a checkpoint dir)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora", dest="trainable", action="store_const", const="lora", help="time LoRA training"
    )
    mode.add_argument(
        "--full", dest="trainable", action="store_const", const="full", help="time full training"
    )
    parser.set_defaults(trainable="lora")
    parser.add_argument("--lora-rank", type=count(4096), default=16, help="LoRA rank r of the timed step")
    parser.add_argument(
        "--seq-len", type=count(2**20), default=128, help="tokens per sequence of the timed step"
    )
    parser.add_argument(
        "--micro-batch", type=count(4096), default=4, help="sequences per micro-batch of the timed step"
    )
    parser.add_argument(
        "--micro-batches",
        type=count(4096),
        default=8,
        help="micro-batches of the timed step (as the plan's --micro-batches)",
    )
    parser.add_argument(
        "--ranks", type=count(MAX_THREADS), default=None, help="split this machine's CPU into N devices"
    )
    parser.add_argument("--fleet", default=None, help="write a whole fleet file with this name")


def matmul_tflops(device: str, seconds: float) -> float:
    """Achieved TFLOP/s of repeated n x n matmuls on `device` for about `seconds`."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype = (4096, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    a @ b  # warm-up
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def measure(seconds: float) -> list[dict]:
    """(name, memory GiB, TFLOP/s) of the CPU and each CUDA device, as fleet device fields."""
    import torch

    host = socket.gethostname().split(".")[0] or "host"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = [
        {
            "id": f"{host}-cpu",
            "memory_gib": round(memory / GIB, 1),
            "tflops": round(matmul_tflops("cpu", seconds), 3),
        }
    ]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "id": f"{host}-cuda{i}",
                "memory_gib": round(props.total_memory / GIB, 1),
                "tflops": round(matmul_tflops(f"cuda:{i}", seconds), 2),
            }
        )
    return out


def cpu_ranks(ranks: int, seconds: float) -> list[dict]:
    """This machine's CPU as `ranks` devices: memory and cores split evenly."""
    host = socket.gethostname().split(".")[0] or "host"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    threads = max(1, (os.cpu_count() or 1) // ranks)
    import torch

    torch.set_num_threads(threads)
    tflops = round(matmul_tflops("cpu", seconds), 4)
    return [
        {"id": f"{host}-cpu{r}", "memory_gib": round(memory / ranks / GIB, 2), "tflops": tflops}
        for r in range(ranks)
    ]


def _with_steps(devices: list[dict], args: argparse.Namespace) -> list[dict]:
    from echelon.yellowstone.measure import StepProbe, measure_model_steps
    from echelon.yellowstone.model_profile import resolve_model

    name, _shape, source = resolve_model(args.model)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if args.ranks else (os.cpu_count() or 1)
    probe = StepProbe(
        source,
        args.trainable,
        args.lora_rank,
        args.seq_len,
        args.micro_batch,
        args.micro_batches,
        threads=threads,
    )
    steps = measure_model_steps(probe, len(devices))
    measured = dict(
        model=name, trainable=args.trainable, seq_len=args.seq_len, micro_batch=args.micro_batch,
        micro_batches=args.micro_batches,
    )  # fmt: skip
    return [
        {**d, "measured_steps": [{**measured, **measured_fields(t)}]}
        for d, t in zip(devices, steps, strict=True)
    ]


def measured_fields(t: Timed) -> dict:
    """A measured step's timings as fleet fields (FSDP's, DDP's and the pipeline's only where they
    were timed: two ranks or more)."""
    out = {"step_s": round(t.step_s, 5), "update_s": round(t.update_s, 5)}
    for name, by_size in (("fsdp_s", t.fsdp_s), ("ddp_s", t.ddp_s)):
        if by_size is not None:
            out[name] = {n: round(v, 5) for n, v in by_size.items()}
    if t.stage_s is not None:
        out["stage_s"] = round(t.stage_s, 6)
    return out


def run_peer(args: argparse.Namespace, site: str) -> int:
    """Measure the link to a peer and print (or write) it as a fleet `links` entry."""
    from echelon.yellowstone.probe import dial, parse_peer, wait

    host, port = parse_peer(args.peer)
    if host:
        measured = dial(host, port, site, args.seconds)
    else:
        print(f"waiting for a peer on port {port} (run `echelon profile --peer THIS_HOST:{port}` there)")
        measured = wait(port, site, args.seconds)
    text = (
        f"# measured by `echelon profile --peer`: {measured.gbps_out:.3f} Gbit/s {measured.sites[0]} -> "
        f"{measured.sites[1]}, {measured.gbps_back:.3f} back; paste under `links:` of a fleet file\n"
        + yaml.safe_dump({"links": [measured.entry()]}, sort_keys=False, default_flow_style=None)
    )
    _emit(args, text, "1 link entry")
    return 0


def _emit(args: argparse.Namespace, text: str, what: str) -> None:
    if args.out is None:
        print(text, end="")
    else:
        write_atomic(args.out, text)
        print(f"wrote {what} to {args.out}")


def run(args: argparse.Namespace) -> int:
    site = args.site or socket.gethostname().split(".")[0] or "site"
    if args.peer is not None:
        return run_peer(args, site)
    measured = cpu_ranks(args.ranks, args.seconds) if args.ranks else measure(args.seconds)
    if args.model is not None:
        measured = _with_steps(measured, args)
    devices = [
        {**d, "boundary": args.boundary, "site": site, "access_tier": args.access_tier, "reliability": 0.99}
        for d in measured
    ]
    if args.fleet is not None:
        from echelon.yellowstone.measure import measure_local_link

        bandwidth, latency = measure_local_link()
        fleet = {
            "name": args.fleet,
            "access_tiers": sorted({"public", args.access_tier}, key=lambda t: t != "public"),
            "boundaries": [{"id": args.boundary, "data_tier": args.access_tier}],
            "sites": [{"id": site, "bandwidth_gbps": round(bandwidth, 3), "latency_ms": round(latency, 4)}],
            "devices": devices,
        }
        text = f"# measured by `echelon profile` on {site}\n" + yaml.safe_dump(fleet, sort_keys=False)
    else:
        text = (
            f"# measured by `echelon profile` on {site}; paste under `devices:` of a fleet file\n"
            + yaml.safe_dump({"devices": devices}, sort_keys=False)
        )
    _emit(args, text, f"{len(devices)} device entries")
    return 0
