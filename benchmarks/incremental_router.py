"""How soon a new expert is routed: extending an Arrow router against refitting it, in one run.

``E`` random LoRA experts with the real shapes of the 1.1B Llama-shaped model (r=16 on
q/k/v/o of 22 layers: 88 modules, d_in 2048) are generated lazily, one at a time, as the
coordinator streams them from its store. Measured on ``--device``:

* **refit**: ``ArrowRouter.fit`` over all ``E`` experts (what the coordinator did for every new
  expert before: the issue measured 11.3 s on an H100 at E=1,024);
* **extend**: ``router.extended([new expert])`` (what the scheduler now does when experts were
  only added): the new expert's prototypes, and the old tables concatenated;
* **place**: the first token routed by the extended router in every module (its tables copied to
  the device and dtype of the hidden states: bf16 on CUDA);
* **persist**: writing the new version's artifact and its SHA-256 (after serving has started).

The time from a committed upload to its first routed token is about extend + place plus the
scheduler's wake-up (it polls the registry's in-memory write counter every 50 ms) and the
expert's load into the LoRA bank (20 ms measured on the H100 in ``token_routing.md``).

    python benchmarks/incremental_router.py --experts 1024 --device cpu
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import token_routing as tr  # moerge import shim, device names, result sections

from moerge.router_training import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord, LoraModuleWeights

RESULTS = Path(__file__).resolve().parent / "results" / "incremental_router.md"
LAYERS, HIDDEN, KV, RANK = 22, 2048, 256, 16
OUT = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}


def record(index: int, device: str = "cpu") -> ExpertRecord:
    """Expert ``index``'s factors, drawn on ``device`` (as PEFT's Arrow fits on the GPU)."""
    def load() -> dict[str, LoraModuleWeights]:
        generator = torch.Generator(device=device).manual_seed(index)
        return {
            f"model.layers.{layer}.self_attn.{name}": LoraModuleWeights(
                torch.randn(RANK, HIDDEN, generator=generator, device=device) / HIDDEN**0.5,
                0.1 * torch.randn(d_out, RANK, generator=generator, device=device), 2.0)
            for layer in range(LAYERS) for name, d_out in OUT.items()
        }
    return ExpertRecord(expert_id=f"e{index}", load_lora=load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = ArrowRouterConfig(top_k=2)
    records = [record(i, args.device) for i in range(args.experts)]
    start = time.perf_counter()
    router = ArrowRouter.fit(records, config)
    refit = time.perf_counter() - start
    tr.log(f"refit over {args.experts}: {refit:.2f} s")
    new = record(args.experts, args.device)
    tr.sync(args.device)
    start = time.perf_counter()
    extended = router.extended([new])
    tr.sync(args.device)
    extend = time.perf_counter() - start
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden = torch.randn(64, HIDDEN, device=args.device, dtype=dtype)
    tr.sync(args.device)
    start = time.perf_counter()
    for module in extended.modules:
        extended.route_tokens(module, hidden)
    tr.sync(args.device)
    place = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(tmp) / "router.safetensors"
        extended.save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        persist = time.perf_counter() - start
        size = path.stat().st_size
    check = ArrowRouter.fit([*records[:4], new], config)  # the new prototypes equal a refit's
    for module in check.modules:
        torch.testing.assert_close(extended.vectors[module][-1], check.vectors[module][-1])
    device = tr.device_name(args.device)
    body = "\n".join([
        f"- command: `python benchmarks/incremental_router.py --experts {args.experts} "
        f"--device {args.device}`",
        f"- device: {device}; torch {torch.__version__}; python {platform.python_version()}",
        f"- experts: {args.experts} + 1, LoRA r={RANK} on q/k/v/o of {LAYERS} layers (88 "
        f"modules), Arrow top-2; artifact {size / 1e6:,.0f} MB (sha256 {digest[:12]})",
        "",
        "| step | seconds |",
        "| --- | ---: |",
        f"| refit: `ArrowRouter.fit` over {args.experts} experts | {refit:.3f} |",
        f"| extend: `router.extended([new])` | {extend:.3f} |",
        f"| place: first routed token in all 88 modules ({dtype}) | {place:.3f} |",
        f"| persist: artifact + SHA-256 (after serving starts) | {persist:.3f} |",
        "",
        f"Extend + place: {extend + place:.3f} s, {refit / max(extend + place, 1e-9):.0f}x "
        f"sooner than a refit.",
    ])
    print(body)
    title = f"E={args.experts} on {device}"
    tr.write_section(args.output, title, f"## {title}\n\n" + body, header=(
        "# A new expert routable: extending an Arrow router vs refitting it\n\n"
        "Written by `benchmarks/incremental_router.py`; one section per setting and device.\n"))


if __name__ == "__main__":
    main()
