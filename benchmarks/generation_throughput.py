"""Routed generation through the real server against HF ``generate`` with PEFT, in one run.

A Llama-shaped causal LM with random weights (``--preset llama-1b``: 1.1B, hidden 2048, 22
layers; ``--preset tiny`` for a CPU smoke test) and ``--experts`` random LoRA experts (r=16 on
q/k/v/o, with synthetic statistics so that statistics routers can be fitted) are written to a
temporary folder. Then, all in the same run and on the same device:

1. **in-process baselines** on the same ``--concurrency`` prompts of ``--prompt-tokens`` tokens,
   ``--new-tokens`` new tokens each, greedy: HF ``generate`` of the base model; PEFT with one
   adapter (the baseline of every ratio); PEFT's mixed-adapter ``generate(adapter_names=...)``
   with one adapter per prompt; PEFT Arrow (``create_arrow_model``'s steps) top-k over all
   experts;
2. **moerge in-process**: the engine's continuous-batching scheduler with one explicit expert per
   request (what the server adds is measured against this), and time to first token alone;
3. **moerge through the server**: a ``moerge coordinator serve`` child process (SQLite, the
   experts uploaded over gRPC by a contributor, routers fitted by the admin), ``--concurrency``
   concurrent gRPC clients each streaming one ``Generate``: example-level routing (centroid over
   all experts) and token-level routing (Arrow, top-k, every generated token routed). Reported:
   tokens/s, the client-observed time to first token and time per output token (the decode
   step time at that concurrency), against the floor of reading the weights once per step at
   the memory bandwidth measured in this run (a device-to-device copy).

Usage::

    python benchmarks/generation_throughput.py --preset tiny --device cpu      # smoke test
    python benchmarks/generation_throughput.py --preset llama-1b --device cuda # the H100 run

The report is printed and written as a section of ``benchmarks/results/generation_throughput.md``
(named after preset and device, replacing an older one).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import token_routing as tr  # noqa: E402  (moerge import shim, adapters, PEFT Arrow in memory)

RESULTS = ROOT / "benchmarks" / "results" / "generation_throughput.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESETS = {
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1000,
    ),
}
log = tr.log


# ------------------------------------------------------------------------------------------
# model, tokenizer, experts
# ------------------------------------------------------------------------------------------
def write_base(folder: Path, preset: str, dtype: torch.dtype) -> Path:
    """A random Llama-shaped causal LM with a word-level tokenizer ``w0 .. w{V-1}`` and no EOS
    (so that every request generates exactly ``--new-tokens`` tokens, as the baselines do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = PRESETS[preset]
    config = LlamaConfig(
        **shape, max_position_embeddings=2048, pad_token_id=0, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, shape["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", model_max_length=2048
    )
    tokenizer.save_pretrained(folder)
    return folder


def write_experts(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """``count`` PEFT adapters (bf16 factors, real shapes) with synthetic statistics."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from moerge.expert_format import (
        COV_DIAG_KEY,
        COV_FACTOR_KEY,
        MEAN_KEY,
        STATISTICS_META,
        STATISTICS_TENSORS,
        StatisticsMeta,
    )

    with torch.device("meta"):
        shapes = tr.target_shapes(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)), TARGETS
        )
    hidden = AutoConfig.from_pretrained(base).hidden_size
    folders = []
    for i in range(count):
        folder = root / f"expert{i}"
        folder.mkdir(parents=True)
        LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM"
        ).save_pretrained(str(folder))
        state = {k: v.to(torch.bfloat16) for k, v in tr.random_adapter(shapes, rank, i).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(10_000 + i)
        save_file(
            {
                MEAN_KEY: torch.randn(hidden, generator=generator),
                COV_DIAG_KEY: torch.full((hidden,), 0.01),
                COV_FACTOR_KEY: 0.05 * torch.randn(hidden, 2, generator=generator),
            },
            str(folder / STATISTICS_TENSORS),
        )
        StatisticsMeta(
            example_count=100,
            hidden_size=hidden,
            covariance_rank=2,
            task_name=f"task{i}",
            task_type="causal_lm",
            label_names=[],
            label_counts=[],
            gate_modules=[],
        ).write(folder / STATISTICS_META)
        folders.append(folder)
    return folders


def prompts_for(count: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(2, vocab)}" for _ in range(length)) for _ in range(count)]


# ------------------------------------------------------------------------------------------
# in-process baselines
# ------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median wall time of ``reps`` calls after one warm-up."""
    fn()
    tr.sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        tr.sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_baselines(base: Path, folders: list[Path], prompts: list[str], args, dtype) -> dict:
    """tokens/s of HF generate: base, one PEFT adapter, PEFT mixed adapters, PEFT Arrow."""
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    tokens = len(prompts) * args.new_tokens
    kwargs = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    states = [load_file(str(f / "adapter_model.safetensors")) for f in folders]

    def fresh():  # PEFT wraps (and changes) the model it is given
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device).eval()

    def with_adapters(count: int):
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        model = PeftModel(fresh(), lora, adapter_name="a0", autocast_adapter_dtype=False)
        for i in range(1, count):
            model.add_adapter(f"a{i}", lora, autocast_adapter_dtype=False)
        with torch.no_grad():
            for path, module in model.base_model.model.named_modules():
                if hasattr(module, "lora_A") and "a0" in module.lora_A:
                    for i in range(count):
                        key = f"base_model.model.{path}"
                        module.lora_A[f"a{i}"].weight.copy_(states[i][f"{key}.lora_A.weight"])
                        module.lora_B[f"a{i}"].weight.copy_(states[i][f"{key}.lora_B.weight"])
        return model.eval()

    out = {}
    with torch.no_grad():
        model = fresh()
        out["HF generate, base model"] = tokens / timed(
            lambda: model.generate(**enc, **kwargs), args.device, args.reps
        )
        del model
        log("HF base done")
        model = with_adapters(1)
        out["HF generate + PEFT, one adapter"] = tokens / timed(
            lambda: model.generate(**enc, **kwargs), args.device, args.reps
        )
        del model
        log("PEFT one adapter done")
        if not args.skip_peft_mixed:
            mixed = min(len(prompts), len(folders))
            model = with_adapters(len(folders))
            names = [f"a{i % mixed}" for i in range(len(prompts))]
            out[f"PEFT mixed-adapter generate ({mixed} adapters in the batch)"] = tokens / timed(
                lambda: model.generate(**enc, adapter_names=names, **kwargs), args.device, 1
            )
            del model
            log("PEFT mixed done")
        if not args.skip_peft_arrow:
            from peft import ArrowConfig

            model = tr.peft_arrow_in_memory(
                fresh(),
                states,
                args.rank,
                TARGETS,
                ArrowConfig(top_k=args.top_k, router_temperature=1.0),
            )
            out[f"PEFT Arrow generate, top-{args.top_k} of {len(folders)}"] = tokens / timed(
                lambda: model.generate(**enc, **kwargs), args.device, 1
            )
            del model
            log("PEFT Arrow done")
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def pinned_engine(base: Path, folders: list[Path], args, dtype, rows: int):
    """``(expert ids, InferenceEngine)``: the benchmark's causal-LM engine over ``folders``,
    with room for ``rows`` running requests and every expert; ``args`` give the rank, device,
    prompt length and the optional kernels."""
    from moerge.coordinator.inference.engine import InferenceEngine

    ids = [f"e{i}" for i in range(len(folders))]
    engine = InferenceEngine(
        base,
        "causal_lm",
        TARGETS,
        max_rank=args.rank,
        cache_bytes=16 << 30,
        device=args.device,
        dtype=dtype,
        max_length=args.prompt_tokens + 8,
        expert_loader=dict(zip(ids, folders, strict=True)).__getitem__,
        generation_max_batch=max(64, rows),
        initial_capacity=len(folders),
        generation_bgmv_kernels=args.bgmv,
        generation_fused_rotary=args.fused_rotary,
    )
    return ids, engine


def burst(
    engine, prompts: list[str], ids: list[str], sampling, plan=None
) -> tuple[float, list[float], int]:
    """Submit every prompt to the engine's scheduler at once, request i pinned to expert
    ``ids[i % len(ids)]`` (or every request routed by ``plan``); wait for all. Returns
    (seconds, each time to first token in ms, tokens generated)."""
    from moerge.coordinator.inference.generation.requests import (
        GenerationFinished,
        GenerationRequest,
    )
    from moerge.coordinator.inference.plan import RoutingPlan

    done = threading.Semaphore(0)
    firsts: list[float] = []
    count = [0]
    start = time.perf_counter()

    def sink(event):
        if isinstance(event, GenerationFinished):
            firsts.append(event.time_to_first_token_ms)
            count[0] += event.completion_tokens
            done.release()

    for i, prompt in enumerate(prompts):
        engine.scheduler.submit(
            GenerationRequest(
                prompt=prompt,
                routing_text=prompt,
                sampling=sampling,
                sink=sink,
                plan=plan or RoutingPlan.explicit([[ids[i % len(ids)]]]),
            )
        )
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - start, firsts, count[0]


def settle(engine, timeout: float = 180) -> None:
    """Wait until the idle worker has captured the graphs the warm-up's shapes need."""
    start = time.perf_counter()
    time.sleep(0.2)
    while engine.scheduler.graphs_pending and time.perf_counter() - start < timeout:
        time.sleep(0.05)


def moerge_in_process(base: Path, folders: list[Path], prompts: list[str], args, dtype) -> dict:
    """The engine's scheduler in this process: batched throughput and time to first token."""
    from moerge.coordinator.inference.generation.requests import (
        GenerationFinished,
        GenerationRequest,
    )
    from moerge.coordinator.inference.generation.sampling import SamplingParams
    from moerge.coordinator.inference.plan import RoutingPlan

    ids, engine = pinned_engine(base, folders, args, dtype, len(prompts))
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    burst(engine, prompts, ids, sampling)  # warm-up: loads every expert used
    settle(engine)
    elapsed, pinned_firsts, count = burst(engine, prompts, ids, sampling)
    # time to first token alone, routed as the server routes: a centroid router over the same
    # statistics (the prompt is embedded by the base model first)
    from moerge.coordinator.services.expert_store import read_statistics
    from moerge.router_training import fit_router
    from moerge.router_training.base import ExpertRecord

    centroid = fit_router(
        "centroid",
        [
            ExpertRecord(expert_id=e, statistics=read_statistics(f))
            for e, f in zip(ids, folders, strict=True)
        ],
        {"top_k": 1},
    ).router
    routed = RoutingPlan.routed(centroid, 1)
    ttft = []
    for _ in range(6):
        settle(engine)  # the router's first request grew the bank: graphs are captured again
        done = threading.Event()
        firsts: list[float] = []

        def sink(event, firsts=firsts, done=done):
            if isinstance(event, GenerationFinished):
                firsts.append(event.time_to_first_token_ms)
                done.set()

        engine.scheduler.submit(
            GenerationRequest(
                prompt=prompts[0],
                routing_text=prompts[0],
                sampling=sampling,
                sink=sink,
                plan=routed,
            )
        )
        done.wait()
        ttft.append(firsts[0])
    ttft = ttft[1:]  # the first one warms the routing path up
    # the same burst routed by the centroid router, as the server's timed burst is: where its
    # time to first token goes without gRPC (worker seconds per phase)
    burst(engine, prompts, ids, sampling, routed)  # warm-up: loads the experts it picks
    settle(engine)
    before = dict(engine.scheduler.seconds)
    _, routed_firsts, _ = burst(engine, prompts, ids, sampling, routed)
    phases = {k: v - before[k] for k, v in engine.scheduler.seconds.items()}
    engine.close()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "tokens_per_s": count / elapsed,
        "ttft_ms": statistics.median(ttft),
        "burst_ttft_ms": statistics.median(pinned_firsts),
        "routed_burst_ttft_ms": statistics.median(routed_firsts),
        "routed_burst_seconds": phases,
    }


# ------------------------------------------------------------------------------------------
# through the server
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``moerge coordinator serve`` in a child process, configured through MOERGE_* variables."""

    def __init__(self, work: Path, base: Path, args) -> None:
        from moerge.storage.tokens import new_token

        self.admin = new_token("mga")[1]
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.log = work / "coordinator.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
        env.update(
            {
                "MOERGE_DATA_DIR": str(work / "coord"),
                "MOERGE_LISTEN": self.address,
                "MOERGE_METRICS_LISTEN": self.metrics_address,
                "MOERGE_ADMIN_TOKEN": self.admin,
                "MOERGE_BASE_MODEL": str(base),
                "MOERGE_BASE_MODEL_ID": "bench-llama",
                "MOERGE_TASK_TYPE": "causal_lm",
                "MOERGE_TARGET_MODULES": ",".join(TARGETS),
                "MOERGE_MAX_LORA_RANK": str(args.rank),
                "MOERGE_MAX_INPUT_TOKENS": str(args.prompt_tokens + 8),
                "MOERGE_MAX_NEW_TOKENS": str(args.new_tokens),
                "MOERGE_DEVICE": args.device,
                "MOERGE_DTYPE": args.dtype,
                "MOERGE_ADAPTER_CACHE_BYTES": str(16 << 30),
                "MOERGE_GENERATION_MAX_BATCH": str(max(64, args.concurrency)),
                "MOERGE_GENERATION_BGMV_KERNELS": str(args.bgmv).lower(),
                "MOERGE_GENERATION_FUSED_ROTARY": str(args.fused_rotary).lower(),
                "MOERGE_AUTO_RETRAIN": "false",
                "MOERGE_CONSISTENCY_CHECKS": "false",
                "MOERGE_BULK_LISTEN": "off",
                "MOERGE_UPLOADS_PER_HOUR": "0",
                "MOERGE_UPLOAD_BYTES_PER_HOUR": "0",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        with self.log.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from moerge.cli.coordinator import app; app()", "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 300) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with grpc.insecure_channel(self.address) as channel:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(health_pb2.HealthCheckRequest(), timeout=1)
                        .status
                    )
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError("coordinator did not start:\n" + self.log.read_text()[-4000:])

    def counters(self) -> dict[str, float]:
        """Graph captures, replays, adapter loads, admission rounds and worker seconds so far
        (the server's /metrics)."""
        import urllib.request

        wanted = (
            "moerge_generation_graph_captures",
            "moerge_generation_graph_replays",
            "moerge_adapter_cache_loads",
            "moerge_generation_admissions",
            "moerge_generation_admitted_requests",
        )
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            text = r.read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            name = name.removesuffix("_total")
            if name in wanted:
                found[name.removeprefix("moerge_")] = float(value)
            elif name.startswith("moerge_generation_seconds_total{phase="):
                phase = name.split('"')[1]
                found[f"worker seconds: {phase}"] = float(value)
        return found

    def settle(self, timeout: float = 180) -> float:
        """Wait until the idle worker has captured the graphs recent bursts need (the
        ``moerge_generation_graphs_pending`` gauge at 0): the steady state a served burst
        meets. Returns the seconds waited."""
        import urllib.request

        start = time.perf_counter()
        time.sleep(0.2)
        while time.perf_counter() - start < timeout:
            url = f"http://{self.metrics_address}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            pending = next(
                (
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("moerge_generation_graphs_pending ")
                ),
                0.0,
            )
            if not pending:
                break
            time.sleep(0.1)
        return time.perf_counter() - start

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin}"),)

    def enroll_and_upload(self, folders: list[Path]) -> None:
        import grpc

        from moerge.contributor_client.connection import Target
        from moerge.contributor_client.upload import upload_expert
        from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            token = (
                admin_pb2_grpc.AdminServiceStub(channel)
                .CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(note="bench"), metadata=self.metadata()
                )
                .token
            )
            credential = (
                contributor_pb2_grpc.ContributorServiceStub(channel)
                .Join(contributor_pb2.JoinRequest(enrollment_token=token, name="bench"))
                .credential
            )
        target = Target(address=self.address, token=credential)
        for i, folder in enumerate(folders):
            upload_expert(
                target, folder, f"expert{i}", f"task{i}", progress=False, transport="grpc"
            )

    def train(self, method: str, top_k: int) -> float:
        import grpc

        from moerge.v1 import admin_pb2, admin_pb2_grpc

        start = time.perf_counter()
        with grpc.insecure_channel(self.address) as channel:
            response = admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
                admin_pb2.TrainRouterRequest(
                    method=method, params_json=json.dumps({"top_k": top_k})
                ),
                metadata=self.metadata(),
                timeout=900,
            )
        if response.status != "ready":
            raise RuntimeError(f"router {method}: {response.status} {response.error}")
        return time.perf_counter() - start

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def stream_all(server: Server, prompts: list[str], method: str, new_tokens: int) -> dict:
    """One thread and one Generate stream per prompt, all started together."""
    import grpc

    from moerge.v1 import inference_pb2, inference_pb2_grpc

    barrier = threading.Barrier(len(prompts) + 1)
    results: list[dict] = [{} for _ in prompts]

    def client(i: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateRequest(
                prompt=prompts[i],
                routing_method=method,
                sampling=inference_pb2.SamplingParams(max_new_tokens=new_tokens),
            )
            grpc.channel_ready_future(channel).result(timeout=60)  # connected before timing
            barrier.wait()
            start = time.perf_counter()
            first = None
            for message in stub.Generate(request, metadata=server.metadata(), timeout=900):
                kind = message.WhichOneof("event")
                if kind == "delta" and first is None:
                    first = time.perf_counter()
                elif kind == "end":
                    end = time.perf_counter()
                    results[i] = {
                        "tokens": message.end.completion_tokens,
                        "ttft": (first or end) - start,
                        "total": end - start,
                    }

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    per_token = [(r["total"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in results]
    return {
        "tokens_per_s": tokens / elapsed,
        "tokens": tokens,
        "ttft_ms": statistics.median(r["ttft"] for r in results) * 1000,
        "step_ms": statistics.median(per_token) * 1000,
    }


def bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB, counting bytes read and written."""
    n = (1 << 30) // 2 if device == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * x.element_size() / seconds


# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--bgmv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode example routing with the Triton BGMV kernels (generation_bgmv_kernels, "
        "on by default)",
    )
    parser.add_argument(
        "--fused-rotary",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rotary embeddings in one Liger-Kernel kernel per layer (generation_fused_rotary, "
        "on by default)",
    )
    parser.add_argument("--skip-peft-arrow", action="store_true")
    parser.add_argument(
        "--skip-peft-mixed", action="store_true", help="skip PEFT's mixed-adapter baseline (slow)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--server-log", type=Path, default=None, help="keep the coordinator's log at this path"
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    vocab = PRESETS[args.preset]["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="moerge-gen-") as tmp:
        work = Path(tmp)
        base = write_base(work / "base", args.preset, dtype)
        folders = write_experts(base, work / "experts", args.experts, args.rank)
        prompts = prompts_for(args.concurrency, args.prompt_tokens, vocab)
        log(f"model and {len(folders)} experts written")
        floor_bw = bandwidth(args.device)
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        params = sum(p.numel() for p in meta.parameters())
        weight_bytes = params * dtype.itemsize
        floor_ms = weight_bytes / floor_bw * 1000
        baselines = hf_baselines(base, folders, prompts, args, dtype)
        log(f"baselines (tokens/s): {baselines}")
        inproc = moerge_in_process(base, folders, prompts, args, dtype)
        log(f"moerge in-process done: {inproc}")
        server = Server(work, base, args)
        try:
            server.enroll_and_upload(folders)
            log("experts uploaded")
            fit = {
                m: server.train(m, args.top_k if m == "arrow" else 1) for m in ("centroid", "arrow")
            }
            log(f"routers fitted: {fit}")
            served = {}
            for method in ("centroid", "arrow"):
                stream_all(server, prompts, method, args.new_tokens)  # warm-up (expert loads)
                log(f"{method}: idle graph captures took {server.settle():.1f} s")
                before = server.counters()
                served[method] = stream_all(server, prompts, method, args.new_tokens)
                after = server.counters()
                served[method]["during the timed burst"] = {
                    k: after[k] - before.get(k, 0) for k in after
                }
                log(f"{method}: {served[method]}")
            alone = []
            for _ in range(5):
                server.settle()
                alone.append(
                    stream_all(server, prompts[:1], "centroid", args.new_tokens)["ttft_ms"]
                )
        finally:
            server.stop()
            if args.server_log is not None:
                shutil.copyfile(server.log, args.server_log)
    one = baselines["HF generate + PEFT, one adapter"]
    rows = [(name, value, value / one) for name, value in baselines.items()]
    rows.append(
        (
            "moerge in-process scheduler, one expert per request",
            inproc["tokens_per_s"],
            inproc["tokens_per_s"] / one,
        )
    )
    rows.append(
        (
            f"moerge server, example-level routing (centroid over {args.experts})",
            served["centroid"]["tokens_per_s"],
            served["centroid"]["tokens_per_s"] / one,
        )
    )
    rows.append(
        (
            f"moerge server, token-level Arrow top-{args.top_k} of {args.experts}, every "
            "token routed",
            served["arrow"]["tokens_per_s"],
            served["arrow"]["tokens_per_s"] / one,
        )
    )
    device_name = tr.device_name(args.device)
    lines = [
        f"- command: `python benchmarks/generation_throughput.py --preset {args.preset} "
        f"--device {args.device}"
        + (f" --reps {args.reps}" if args.reps != 2 else "")
        + (" --skip-peft-mixed" if args.skip_peft_mixed else "")
        + ("" if args.bgmv else " --no-bgmv")
        + ("" if args.fused_rotary else " --no-fused-rotary")
        + (" --skip-peft-arrow" if args.skip_peft_arrow else "")
        + "`",
        f"- date: {datetime.date.today()}; device: {device_name}; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"- model: {args.preset} ({params / 1e9:.2f}B parameters, {args.dtype}); "
        f"{args.experts} experts, LoRA r={args.rank} on {'/'.join(TARGETS)}; "
        f"{args.concurrency} concurrent requests of {args.prompt_tokens} prompt tokens, "
        f"{args.new_tokens} new tokens, greedy",
        "",
        "| variant | tokens/s | x of one PEFT adapter |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {value:,.0f} | {ratio:.2f}x |" for name, value, ratio in rows],
        "",
        f"- decode step at {args.concurrency} concurrent requests through the server (median "
        f"time per output token): centroid {served['centroid']['step_ms']:.2f} ms, Arrow "
        f"{served['arrow']['step_ms']:.2f} ms; floor (reading {weight_bytes / 1e9:.2f} GB of "
        f"weights at the {floor_bw / 1e9:,.0f} GB/s measured by a copy): {floor_ms:.2f} ms; "
        f"ratio {served['centroid']['step_ms'] / floor_ms:.1f}x (goal <= 5x)",
        f"- time to first token at concurrency 1: through the server (client-observed, "
        f"median of 5) {statistics.median(alone):.1f} ms, in-process scheduler "
        f"{inproc['ttft_ms']:.1f} ms; difference {statistics.median(alone) - inproc['ttft_ms']:.1f}"
        f" ms (goal <= 10 ms)",
        "- router fit on the server: " + ", ".join(f"{m} {s:.1f} s" for m, s in fit.items()),
        f"- in-process bursts of {args.concurrency}: median time to first token "
        f"{inproc['burst_ttft_ms']:.0f} ms with one expert pinned per request, "
        f"{inproc['routed_burst_ttft_ms']:.0f} ms routed by the centroid router (worker seconds: "
        + ", ".join(f"{k} {v:.2f}" for k, v in inproc["routed_burst_seconds"].items())
        + ")",
        *(
            f"- {m} burst: median time to first token {served[m]['ttft_ms']:.0f} ms; during it "
            + ", ".join(
                f"{k.replace('_', ' ')} {v:.2f}"
                if "seconds" in k
                else f"{k.replace('_', ' ')} {v:.0f}"
                for k, v in served[m]["during the timed burst"].items()
            )
            for m in ("centroid", "arrow")
        ),
    ]
    body = "\n".join(lines)
    print(body)
    title = f"{args.preset} on {device_name}"
    tr.write_section(
        args.output,
        title,
        f"## {title}\n\n" + body,
        header=(
            "# Routed generation through the server vs HF generate with PEFT\n\n"
            "Written by `benchmarks/generation_throughput.py`; one section per setting and "
            "device.\n"
        ),
    )


if __name__ == "__main__":
    main()
