"""Who takes part in a run, by name: the one place party names and addresses are spelled.

A *party* names a principal: `global`, `boundary.<id>`, `device.<id>`. It is the name in a
deployment certificate, in an audit log and in the contract's guards. An *address* names an
endpoint a plane sends to: `global`, `boundary/<id>`, `device/<id>`; both runtimes route by it.
"""

from __future__ import annotations

GLOBAL = "global"  # the global plane: its party name and its address
BOUNDARY = "boundary"
DEVICE = "device"


def boundary_party(boundary_id: str) -> str:
    return f"{BOUNDARY}.{boundary_id}"


def device_party(device_id: str) -> str:
    return f"{DEVICE}.{device_id}"


def boundary_address(boundary_id: str) -> str:
    return f"{BOUNDARY}/{boundary_id}"


def device_address(device_id: str) -> str:
    return f"{DEVICE}/{device_id}"


def party_of(address: str) -> str:
    """The party at a cross-boundary endpoint: `global` or `boundary.<id>`."""
    return GLOBAL if address == GLOBAL else boundary_party(address.split("/", 1)[1])


def boundary_id_of(party: str | None) -> str | None:
    """The id in a `boundary.<id>` party name; None for any other name."""
    return _id_of(party, BOUNDARY)


def device_id_of(party: str | None) -> str | None:
    """The id in a `device.<id>` party name; None for any other name."""
    return _id_of(party, DEVICE)


def _id_of(party: str | None, role: str) -> str | None:
    prefix = f"{role}."
    if party is None or not party.startswith(prefix) or len(party) == len(prefix):
        return None
    return party.removeprefix(prefix)


def run_parties(boundaries: dict[str, list[str]]) -> list[tuple[str, str | None]]:
    """(party, the party of its boundary or None) for the global plane, every boundary and device;
    `boundaries` maps boundary id -> its device ids."""
    out: list[tuple[str, str | None]] = [(GLOBAL, None)]
    for b, devices in boundaries.items():
        out.append((boundary_party(b), None))
        out += [(device_party(d), boundary_party(b)) for d in devices]
    return out
