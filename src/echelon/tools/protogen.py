"""Generate the wire code in src/echelon/v1 from proto/echelon/v1, or check it is current.

Usage: python -m echelon.tools.protogen src      # (re)generate into src/
       python -m echelon.tools.protogen --check  # exit 1 when the committed code is stale
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "proto"
GENERATED = Path("echelon") / "v1"


def generate(out_root: Path) -> None:
    """Run the protoc bundled with grpcio-tools over every .proto file."""
    from grpc_tools import protoc  # dev dependency, pinned in pyproject.toml

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GENERATED).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / GENERATED / "__init__.py").write_text(
        '"""Generated wire code (do not edit): see proto/."""\n'
    )


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            fresh, committed = Path(tmp) / GENERATED, ROOT / "src" / GENERATED
            names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in committed.glob("*.py*")})
            stale = [
                n
                for n in names
                if not (committed / n).exists()
                or not (fresh / n).exists()
                or not filecmp.cmp(fresh / n, committed / n, shallow=False)
            ]
        if stale:
            print(f"generated wire code is stale: {', '.join(stale)}; run `make proto` and commit")
            return 1
        print("generated wire code is current")
        return 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    generate(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
