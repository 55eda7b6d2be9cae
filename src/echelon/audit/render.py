"""`echelon audit` as tables: the verdict in the spirit of the paper's Table 15, then the detail."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from echelon.audit.report import AuditReport, Finding, LogReport

SHOWN = 50  # findings listed per table; --json lists all


def _n(value: int) -> str:
    return f"{value:,}"


def _signatures(log: LogReport) -> str:
    if log.signatures_ok:
        return f"[green]ok[/] (through seq {log.signed_through})"
    bad = sum(v.category == "signature" for v in log.violations)
    parts = [f"{bad} bad"] if bad else []
    if log.unsigned:
        parts.append(f"{log.unsigned} unsigned")
    return "[red]" + ", ".join(parts or ["unverified"]) + "[/]"


def _notes(log: LogReport) -> str:
    notes = []
    if log.restarts:
        notes.append(f"{log.restarts} restart(s), {log.crashes} crash(es)")
    if log.countersigned_after_restart:
        notes.append(f"{log.countersigned_after_restart} records signed only after a restart")
    if log.repairs:
        notes.append(f"{len(log.repairs)} torn tail(s) repaired")
    if log.torn_bytes:
        notes.append(f"torn tail of {log.torn_bytes} B")
    return "; ".join(notes)


def _accepted(count: int, accepted: bool) -> str:
    if count == 0:
        return "0"
    return f"{count} (accepted)" if accepted else f"[bold red]{count}[/]"


def _findings(title: str, findings: list[Finding], style: str, with_record: bool) -> Table:
    table = Table(title=f"{title} ({len(findings)})", title_justify="left", title_style=style)
    for name in ("Party", "Seq", "Category", "Reason"):
        table.add_column(name, overflow="fold")
    for f in findings[:SHOWN]:
        reason = escape(f.reason)
        if with_record and f.record is not None:
            reason += "\n[dim]" + escape(json.dumps(f.record, sort_keys=True)) + "[/]"
        table.add_row(f.party, "" if f.seq is None else str(f.seq), f.category, reason)
    if len(findings) > SHOWN:
        table.add_row("…", "", "", f"{len(findings) - SHOWN} more (--json lists all)")
    return table


def render(report: AuditReport, console: Console) -> None:
    violations, refused, failures = report.violations, report.refused, report.failures
    verdict = Table(title=f"Information-flow audit of {escape(str(report.run_dir))}", title_justify="left")
    for name in (
        "Per-device payload observed",
        "Audit violations",
        "Refused attempts",
        "In flight at a crash",
        "Reopened after a crash",
    ):
        verdict.add_column(name, justify="right")
    verdict.add_column("Crossings", justify="right")
    verdict.add_column("Cross-boundary bytes", justify="right")
    device_style = "green" if report.per_device_bytes == 0 else "bold red"
    violation_style = "green" if not violations else "bold red"
    verdict.add_row(
        f"[{device_style}]{_n(report.per_device_bytes)} B[/]",
        f"[{violation_style}]{len(violations)}[/]",
        str(len(refused)),
        _accepted(len(report.in_flight), "in_flight" in report.accepted),
        _accepted(len(report.crashes), "crash" in report.accepted),
        _n(report.traffic.total_messages),
        _n(report.traffic.total_bytes),
    )
    console.print(verdict)
    pinned = "[yellow]" if report.unanchored else "[green]"
    console.print(f"Public keys: {pinned}{escape(report.anchor)}[/]")

    parties = Table(title="Logs", title_justify="left")
    for name in ("Party", "Clock", "Records", "Chain", "Signatures", "Closed", "Key (SHA-256)", "Notes"):
        parties.add_column(name, justify="right" if name == "Records" else "left")
    for party, log in sorted(report.logs.items()):
        parties.add_row(
            party,
            log.clock or "?",
            _n(log.records),
            "[green]ok[/]" if log.chain_ok else "[red]broken[/]",
            _signatures(log),
            "[green]yes[/]" if log.closed else "[red]no[/]",
            (log.fingerprint or "none")[:16],
            _notes(log),
        )
    console.print(parties)

    traffic = Table(
        title="Cross-boundary traffic by flow class and type (each crossing once)", title_justify="left"
    )
    for name, justify in (
        ("Flow class", "left"),
        ("Message type", "left"),
        ("Messages", "right"),
        ("Bytes", "right"),
    ):
        traffic.add_column(name, justify=justify)  # type: ignore[arg-type]
    for cls, totals in report.traffic.by_class().items():
        for (c, t), n in sorted(report.traffic.messages.items()):
            if c == cls:
                traffic.add_row(cls, t, _n(n), _n(report.traffic.bytes[c, t]))
        traffic.add_row(
            f"[bold]{cls}[/]", "[bold]all[/]", _n(totals["messages"]), _n(totals["bytes"]), end_section=True
        )
    console.print(traffic)

    per_party = Table(title="Traffic per party", title_justify="left")
    for name in ("Party", "Sent", "Sent bytes", "Received", "Received bytes", "Refused", "Per-device bytes"):
        per_party.add_column(name, justify="left" if name == "Party" else "right")
    for party, log in sorted(report.logs.items()):
        per_party.add_row(
            party,
            _n(log.sent.total_messages),
            _n(log.sent.total_bytes),
            _n(log.received.total_messages),
            _n(log.received.total_bytes),
            _n(len(log.refused)),
            _n(log.per_device_bytes),
        )
    console.print(per_party)

    if refused:
        console.print(
            _findings("Refused attempts: the guard stopped these, nothing crossed", refused, "yellow", False)
        )
    if report.conditional:
        console.print(
            _findings(
                "Accepted only with a flag (--accept-..., --trust-run-keys)",
                report.conditional,
                "yellow",
                True,
            )
        )
    if violations:
        console.print(_findings("Violations", violations, "bold red", True))
    if report.ok:
        console.print(
            "[bold green]AUDIT PASSED[/]: 0 B of per-device payload crossed; chains, signatures, countersigned "
            "heads and both ends agree"
        )
    else:
        unaccepted = len(failures) - len(violations)
        console.print(
            f"[bold red]AUDIT FAILED[/]: {_n(report.per_device_bytes)} B of per-device payload, "
            f"{len(violations)} violation(s), {unaccepted} finding(s) not accepted"
        )
