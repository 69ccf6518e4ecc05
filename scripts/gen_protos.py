"""Regenerate the Python code of the protobuf contracts in protos/ (the one committed command).

Writes `*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py` and `*_pb2_grpc.pyi` next to the service code, at
the proto package's path (`protos/modelplane/registry/v1/x.proto` becomes
`services/modelplane/registry/v1/x_pb2.py`), so the code imports as
`from modelplane.registry.v1 import registry_service_pb2`.

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # mypy-protobuf's plugins live beside this interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see its message above")


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in (root / "modelplane").rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh, committed = generated_files(fresh_root), generated_files(OUT_ROOT)
        stale = sorted(
            str(p)
            for p in fresh | committed
            if p not in fresh or p not in committed or not filecmp.cmp(fresh_root / p, OUT_ROOT / p, shallow=False)
        )
        if check:
            if stale:
                print("Generated protobuf code is stale; run `make protos` and commit:", *stale, sep="\n  ")
                return 1
            print(f"Generated protobuf code is up to date ({len(fresh)} files).")
            return 0
        for p in committed - fresh:
            (OUT_ROOT / p).unlink()
        for p in fresh:
            (OUT_ROOT / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh_root / p, OUT_ROOT / p)
        print(f"Regenerated {len(fresh)} files; {len(stale)} changed.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
