"""Kernel profile of the in-process decode step: where a step's GPU time goes, by kernel.

The engine's scheduler (no server) generates ``--new-tokens`` tokens for ``--concurrency``
prompts of ``--prompt-tokens`` tokens, each request pinned to one of ``--experts`` experts
(example-level routing), twice to warm up (graph captures, Triton builds), three times timed,
then once under ``torch.profiler``. Prints the bursts' wall time and tokens/s, the GPU time per
decode step (all kernels of the profiled burst over its steps; prefill included, so an upper
bound) and the kernels by total GPU time. The decode-step breakdown in docs/inference.md comes
from this script; ``--bgmv`` and ``--fused-rotary`` turn on the kernels the server uses by
default (this script leaves them off unless asked, to compare); ``--plain-norm-and-kv`` turns
off the Triton RMSNorm and KV-write kernels, to compare.

    python benchmarks/decode_profile.py [--preset llama-1b] [--bgmv] [--fused-rotary]
        [--plain-norm-and-kv]

On a CPU (``--device cpu --preset tiny``) it times the bursts only (a smoke test): the profiler
sees this thread's operators, not the engine worker's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generation_throughput, by folder

import generation_throughput as gt

from moerge.coordinator.inference.generation import fused_norm, kv_write_triton
from moerge.coordinator.inference.generation.sampling import SamplingParams


def profile_decode(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """Build the model and experts in ``workdir``, time the bursts, profile one; the numbers
    and the profiler's table."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = gt.write_base(workdir / "base", args.preset, dtype)
    folders = gt.write_experts(base, workdir / "experts", args.experts, args.rank)
    ids, engine = gt.pinned_engine(base, folders, args, dtype, args.concurrency)
    vocab = gt.PRESETS[args.preset]["vocab_size"]
    prompts = gt.prompts_for(args.concurrency, args.prompt_tokens, vocab)
    sampling = SamplingParams(max_new_tokens=args.new_tokens)

    def timed_burst() -> float:
        return gt.burst(engine, prompts, ids, sampling)[0]

    try:
        timed_burst()
        timed_burst()
        walls = [timed_burst() for _ in range(3)]
        cuda = args.device == "cuda"
        activity = torch.profiler.ProfilerActivity
        activities = [activity.CUDA if cuda else activity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            timed_burst()
            if cuda:
                torch.cuda.synchronize()
    finally:
        engine.close()
    events = prof.key_averages()
    total_us = sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events)
    sort = "device_time_total" if cuda else "self_cpu_time_total"
    return {
        "walls": walls,
        "tokens_per_s": args.concurrency * args.new_tokens / min(walls),
        "ms_per_step": total_us / 1e3 / args.new_tokens,
        "table": events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(gt.PRESETS), default="llama-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=30, help="kernels listed")
    parser.add_argument("--bgmv", action="store_true", help="generation_bgmv_kernels on")
    parser.add_argument("--fused-rotary", action="store_true", help="generation_fused_rotary on")
    parser.add_argument(
        "--plain-norm-and-kv",
        action="store_true",
        help="RMSNorm in two PyTorch kernels and the KV write as two scatters (not the Triton "
        "kernels of fused_norm.py and kv_write_triton.py), to compare",
    )
    args = parser.parse_args(argv)
    if args.plain_norm_and_kv:
        fused_norm.TRITON_KERNEL = kv_write_triton.TRITON_KERNEL = False
    with tempfile.TemporaryDirectory() as tmp:
        result = profile_decode(args, Path(tmp))
    walls = ", ".join(f"{w:.3f}" for w in result["walls"])  # type: ignore[attr-defined]
    step = (
        f"GPU time per decode step (prefill included) {result['ms_per_step']:.3f} ms"
        if args.device == "cuda"
        else "CPU: the profiler sees only this thread's operators, not the engine's (smoke test)"
    )
    print(
        f"{args.preset} on {gt.tr.device_name(args.device)}, {args.concurrency} requests x "
        f"{args.new_tokens} new tokens, {args.experts} experts; bgmv {args.bgmv}, fused rotary "
        f"{args.fused_rotary}, Triton norm and KV write "
        f"{not args.plain_norm_and_kv}\nbursts {walls} s; "
        f"{result['tokens_per_s']:.0f} tokens/s; {step}\n"
        f"{result['table']}"
    )
    return result


if __name__ == "__main__":
    main()
