"""Regenerate the Python code of the moerge.v1 API from the .proto sources.

The generated modules are committed (like Flower's ``flwr/proto``) so that a plain
``pip install`` needs no protoc; ``tests/protos/test_generated_code.py`` fails when they are out
of date. Run after editing any .proto:

    python protos/generate.py            # rewrite protos/moerge/v1/*_pb2*.py(i)
    python protos/generate.py --out DIR  # write elsewhere (used by the freshness test)
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = sorted((PROTO_ROOT / "moerge" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugin; return written files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins (protoc-gen-mypy*) on PATH: use this interpreter's scripts.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in SOURCES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: see the messages above")
    return sorted((out_dir / "moerge" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    """Command line: regenerate the modules (default: next to the .proto files) and print the files
    written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root folder")
    written = generate(parser.parse_args().out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
