"""How soon a new expert is routed: extending a serving Arrow router against refitting it.

``E`` random LoRA experts with the real shapes of the 1.1B Llama-shaped model (r=16 on
q/k/v/o of 22 layers: 88 modules, d_in 2048) are generated lazily, one at a time, as the
coordinator streams them from its store. Measured on ``--device``:

* **refit**: ``ArrowRouter.fit`` over all ``E`` experts, factors on ``--device`` (what the
  coordinator did for every new expert before: an earlier measurement took 11.3 s on an H100
  at E=1,024);
* then the router is set up as the coordinator serves it, untimed: loaded from its artifact's
  tensors (float32 tables on CPU) and 64 tokens routed in every module on ``--device`` (its
  tables placed there in the tokens' dtype, bf16 on CUDA, and the kernels warm), as on a
  loaded server;
* **extend**: ``router.extended([new expert])``, the new expert's factors on CPU as the
  coordinator loads them (what the scheduler does when experts were only added): its
  prototypes, appended to the CPU tables;
* **place**: the extended router's tables on ``--device`` in every module (what its first
  routed token does first): the new rows appended to the serving router's placed tables;
* **first routed tokens**: then 64 tokens routed in every module (a new number of experts may
  need the kernels to be built for it: Triton specialises on whether E is a multiple of 16);
* **place afresh**, for comparison: a router over the same rows placed from its CPU tables
  (what every extension cost before tables were appended to);
* both twice: the first extension after a fit or load grows the exact-size buffers (one
  ``O(E)`` copy each, on CPU and on the device), a second finds room and writes the new rows
  alone (see ``router_training/expert_table.py``);
* **persist**: writing the new version's artifact and its SHA-256 (after serving has started).

The time from a committed upload to its first routed token is about extend + place + first
routed tokens, plus the scheduler's wake-up (it polls the registry's in-memory write counter
every 50 ms) and the expert's load into the LoRA bank (20 ms measured on the H100 in
``token_routing.md``).
Each extended router's decisions are checked to equal, bit for bit, those of a router whose
tables were placed afresh from the same rows.

    python benchmarks/incremental_router.py --experts 1024 --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import token_routing as tr  # moerge import shim, device names, result sections

from moerge.router_training import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord, LoraModuleWeights, RoutingDecision
from moerge.router_training.token_router import score_dtype

RESULTS = Path(__file__).resolve().parent / "results" / "incremental_router.md"
LAYERS, HIDDEN, KV, RANK = 22, 2048, 256, 16
OUT = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
T = TypeVar("T")


def record(index: int, device: str = "cpu", load_on: str | None = None) -> ExpertRecord:
    """Expert ``index``'s factors, drawn on ``device`` (as PEFT's Arrow fits on the GPU) and
    handed over on ``load_on`` (default: ``device``)."""

    def load() -> dict[str, LoraModuleWeights]:
        generator = torch.Generator(device=device).manual_seed(index)
        return {
            f"model.layers.{layer}.self_attn.{name}": LoraModuleWeights(
                (torch.randn(RANK, HIDDEN, generator=generator, device=device) / HIDDEN**0.5).to(
                    load_on or device
                ),
                0.1
                * torch.randn(d_out, RANK, generator=generator, device=device).to(
                    load_on or device
                ),
                2.0,
            )
            for layer in range(LAYERS)
            for name, d_out in OUT.items()
        }

    return ExpertRecord(expert_id=f"e{index}", load_lora=load)


def route_all(router: ArrowRouter, hidden: torch.Tensor) -> list[RoutingDecision]:
    return [router.route_tokens(module, hidden) for module in router.modules]


def place_all(router: ArrowRouter, hidden: torch.Tensor) -> None:
    """Place every module's table where ``hidden`` is routed (what its first token does)."""
    for module in router.modules:
        router.placed_tables(module, hidden.device, score_dtype(hidden))


def timed(device: str, step: Callable[..., T], *args: object) -> tuple[T, float]:
    """``step(*args)`` and its wall-clock seconds, the device's queue drained before and after."""
    tr.sync(device)
    start = time.perf_counter()
    result = step(*args)
    tr.sync(device)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = ArrowRouterConfig(top_k=2)
    records = [record(i, args.device) for i in range(args.experts)]
    fitted, refit = timed(args.device, ArrowRouter.fit, records, config)
    tr.log(f"refit over {args.experts}: {refit:.2f} s")
    router = ArrowRouter(config, fitted.expert_ids)  # as the coordinator serves it: CPU tables
    router.load_state_dict({k: v.cpu() for k, v in fitted.state_dict().items()})
    del fitted
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden = torch.randn(64, HIDDEN, device=args.device, dtype=dtype)
    route_all(router, hidden)  # placed on the device, kernels warm: a loaded server
    steps: list[tuple[float, float, float]] = []
    for new in (args.experts, args.experts + 1):
        router, extend = timed(args.device, router.extended, [record(new, args.device, "cpu")])
        _, place = timed(args.device, place_all, router, hidden)
        decisions, first = timed(args.device, route_all, router, hidden)
        steps.append((extend, place, first))
        tr.log(
            f"extended to {router.num_experts}: extend {extend:.3f} s, place {place:.3f} s, "
            f"first routed token {first:.3f} s"
        )
        fresh = ArrowRouter(config, router.expert_ids)  # tables placed afresh from the same rows
        fresh.load_state_dict(router.state_dict())
        _, place_fresh = timed(args.device, place_all, fresh, hidden)
        for a, b in zip(decisions, route_all(fresh, hidden), strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(tmp) / "router.safetensors"
        router.save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        persist = time.perf_counter() - start
        size = path.stat().st_size
    # the new prototypes equal a fit's on the same device (CPU: PEFT's start vector depends on
    # the device that draws it, see arrow.peft_start_vector)
    check = ArrowRouter.fit([record(args.experts, args.device, "cpu")], ArrowRouterConfig(top_k=1))
    for module in check.modules:
        torch.testing.assert_close(router.vectors[module][args.experts], check.vectors[module][0])
    (extend, place, first), (extend_again, place_again, first_again) = steps
    device = tr.device_name(args.device)
    body = "\n".join(
        [
            f"- command: `python benchmarks/incremental_router.py --experts {args.experts} "
            f"--device {args.device}`",
            f"- device: {device}; torch {torch.__version__}; python {platform.python_version()}",
            f"- experts: {args.experts} + 2, LoRA r={RANK} on q/k/v/o of {LAYERS} layers (88 "
            f"modules), Arrow top-2; artifact {size / 1e6:,.0f} MB (sha256 {digest[:12]})",
            f"- the serving router: float32 tables on CPU, placed on {args.device} in {dtype} by "
            "routing 64 tokens (untimed) before the extensions; new experts' factors on CPU",
            "",
            "| step | seconds |",
            "| --- | ---: |",
            f"| refit: `ArrowRouter.fit` over {args.experts} experts on {args.device} "
            f"| {refit:.3f} |",
            "| extend: `router.extended([new])`, first after the load (buffers grow) "
            f"| {extend:.3f} |",
            f"| place: its tables on {args.device} in {dtype}, all 88 modules | {place:.3f} |",
            f"| first routed tokens (64) in all 88 modules | {first:.3f} |",
            f"| extend again (buffers have room) | {extend_again:.3f} |",
            f"| place again | {place_again:.3f} |",
            f"| first routed tokens again | {first_again:.3f} |",
            f"| for comparison, place afresh: all {router.num_experts} rows from the CPU tables "
            f"(what an extension cost before) | {place_fresh:.3f} |",
            f"| persist: artifact + SHA-256 (after serving starts) | {persist:.3f} |",
            "",
            "Commit -> first routed token (extend + place + route): "
            f"{extend + place + first:.3f} s the first time, "
            f"{extend_again + place_again + first_again:.3f} s the second; "
            f"{refit / max(extend + place + first, 1e-9):.0f}x sooner than a refit. "
            "Decisions equal a fresh placement's, bit for bit.",
        ]
    )
    print(body)
    title = f"## E={args.experts} on {device}, extending a serving router"  # replaced on a rerun
    tr.write_section(
        args.output,
        title,
        f"{title}\n\n" + body,
        header=(
            "# A new expert routable: extending an Arrow router vs refitting it\n\n"
            "Written by `benchmarks/incremental_router.py`; one section per setting and device.\n"
        ),
    )


if __name__ == "__main__":
    main()
