"""Overhead of the Predict path: a coordinator against a bare ``grpc.aio`` echo server, one run.

The same ``--clients`` threads (one channel each) send the same requests (one input; half of
them restricted to one random expert, as in ``load_test.py``) back to back, for ``--seconds``
each, to:

1. a bare ``grpc.aio`` unary echo server in its own process (the transport's ceiling);
2. a ``moerge coordinator serve`` process (tiny random BERT, ``--experts`` LoRA experts behind a
   centroid router, SQLite, an adapter cache holding every expert, warmed before timing);
3. the echo server again (the machine's load drifts: the ratio uses the mean of 1 and 3).

Reported: requests/s and p50/p99 latency of each phase, the ratio Predict / echo, and the
model-only time of the engine (in this process, no gRPC, no registry) for one batch of
``--clients`` such requests and for one request alone: what the model itself allows.

    python benchmarks/predict_overhead.py [--seconds 20] [--clients 16] [--experts 4]
        [--batch-wait-ms MS] [--traced-forwards] [--predict-process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tiny model and expert builders live in tests/
# load_test by its own folder: a top-level ``benchmarks`` package installed by opacus would
# shadow this folder (a namespace package) if it were imported as ``benchmarks.load_test``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from load_test import predict_request, seed  # noqa: E402

from moerge.v1 import inference_pb2  # noqa: E402
from tests.experts import make_expert_dir  # noqa: E402
from tests.processes import children  # noqa: E402
from tests.reliability.coordinator_process import CoordinatorProcess, bearer  # noqa: E402
from tests.tiny_models import make_tiny_bert  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "predict_overhead.md"
ECHO_METHOD = "/bench.Echo/Echo"
PREDICT_METHOD = "/moerge.v1.InferenceService/Predict"
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client


# -- the echo server (its own process) ---------------------------------------------------------
async def _serve_echo() -> None:
    async def echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class EchoProcess:
    """``python predict_overhead.py --serve-echo`` as a child, listening at ``address``."""

    def __enter__(self) -> EchoProcess:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-echo"], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.address = f"127.0.0.1:{int(self.process.stdout.readline())}"
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(30)


# -- closed-loop clients -----------------------------------------------------------------------
def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time so far of process ``pid``, all its threads (or thread ``tid``)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # a thread that has ended
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of ``pid`` and its child processes."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU time so far of each thread of ``pid`` by thread id."""
    return {int(t.name): cpu_seconds(pid, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}


@dataclass
class Phase:
    name: str
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_seconds: float = 0.0  # the server's CPU time during the phase, children included
    engine_cpu_seconds: float = 0.0  # of which its engine process (``predict_process``)
    #: the server's main thread (the event loop), its busiest other thread (the coordinator's
    #: model thread), all its other threads: CPU seconds during the phase
    thread_cpu_seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_seconds / max(1, len(self.latencies_ms)) * 1e6

    def thread_us_per_request(self) -> tuple[float, ...]:
        return tuple(t / max(1, len(self.latencies_ms)) * 1e6 for t in self.thread_cpu_seconds)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


Call = Callable[[bytes], object]


def hammer(
    name: str,
    connect: Callable[[grpc.Channel], Call],
    address: str,
    requests: Callable[[random.Random], bytes],
    clients: int,
    seconds: float,
    server_pid: int,
) -> Phase:
    """``clients`` threads, each on its own channel, calling back to back for ``seconds``."""
    phase = Phase(name, seconds)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(index: int) -> None:
        rng = random.Random(index)
        with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
            call = connect(channel)
            call(requests(rng))  # connect before the clock starts
            start.wait()
            while not stop.is_set():
                request = requests(rng)
                began = time.perf_counter()
                try:
                    call(request)
                    code = None
                except grpc.RpcError as exc:
                    code = exc.code().name
                elapsed = (time.perf_counter() - began) * 1000
                with lock:
                    if code is None:
                        phase.latencies_ms.append(elapsed)
                    else:
                        phase.errors[code] = phase.errors.get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    cpu, before = tree_cpu_seconds(server_pid), thread_seconds(server_pid)
    engine = sum(cpu_seconds(child) for child in children(server_pid))
    time.sleep(seconds)
    stop.set()
    phase.server_cpu_seconds = tree_cpu_seconds(server_pid) - cpu
    phase.engine_cpu_seconds = sum(cpu_seconds(c) for c in children(server_pid)) - engine
    spent = {t: s - before.get(t, 0.0) for t, s in thread_seconds(server_pid).items()}
    main = spent.pop(server_pid, 0.0)
    busiest = max(spent.values(), default=0.0)
    phase.thread_cpu_seconds = (main, busiest, sum(spent.values()) - busiest)
    for thread in threads:
        thread.join(120)
    return phase


# -- the model alone ---------------------------------------------------------------------------
@dataclass
class ModelTimes:
    """Median CPU time of the engine's worker thread (this process, torch on one thread: other
    jobs' load cannot inflate it as it inflates wall time on a shared machine)."""

    batch_ms: float  # one batch of ``clients`` requests
    single_ms: float  # one request alone
    #: one batch of ``clients`` requests while another thread of the process runs Python (as
    #: the coordinator's event loop does beside its model thread)
    contended_batch_ms: float


def model_only(
    base: Path,
    folders: list[Path],
    rank: int,
    clients: int,
    rounds: int = 30,
    traced_forwards: bool = False,
) -> ModelTimes:
    """The coordinator's engine in this process, with the router objects the server would use."""
    import torch

    from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
    from moerge.coordinator.inference.service import InferenceService, RestrictedRouter
    from moerge.coordinator.services.expert_store import read_statistics
    from moerge.router_training.base import ExpertRecord
    from moerge.router_training.fitting import fit_router

    torch.set_num_threads(1)  # as the coordinator process runs (OMP_NUM_THREADS=1)
    by_id = {folder.name: folder for folder in folders}
    records = [ExpertRecord(e, e, read_statistics(f)) for e, f in by_id.items()]
    router = fit_router("centroid", records, {}).router
    engine = InferenceEngine(
        base,
        max_rank=rank,
        expert_loader=by_id.__getitem__,
        router=router,
        truncate=True,
        traced_forwards=traced_forwards,
    )
    restricted = {e: RestrictedRouter(router, [e]) for e in by_id}

    def plan(rng: random.Random) -> InferenceRequest:
        message = predict_request(rng, list(by_id))
        chosen = restricted[message.expert_ids[0]] if message.expert_ids else router
        plan = InferenceService.request_plan(chosen, 0, None, len(message.inputs))
        return InferenceRequest(list(message.inputs), plan)

    rng = random.Random(0)
    batches = [[plan(rng) for _ in range(clients)] for _ in range(rounds)]

    def median_cpu_ms(items: list[list[InferenceRequest]]) -> float:
        """Median CPU time of the engine's worker thread per ``predict_many`` of an item."""

        def timed(requests: list[InferenceRequest]) -> float:
            began = time.thread_time()
            engine.predict_many(requests)  # on the worker already: runs here
            return time.thread_time() - began

        def on_worker(requests: list[InferenceRequest]) -> float:
            return engine.executor.submit(timed, requests).result()

        on_worker(items[0])  # warm: experts loaded, kernels picked
        return statistics.median(on_worker(item) for item in items) * 1000

    stop = threading.Event()

    def python_work() -> None:  # holds the GIL as much as the interpreter lets it
        while not stop.is_set():
            sum(range(1000))

    try:
        batch_ms = median_cpu_ms(batches)
        single_ms = median_cpu_ms([[b[0]] for b in batches])
        busy = threading.Thread(target=python_work)
        busy.start()
        try:
            contended_ms = median_cpu_ms(batches[:10])  # slow: the GIL changes hands per op
        finally:
            stop.set()
            busy.join()
        return ModelTimes(batch_ms, single_ms, contended_ms)
    finally:
        engine.close()


# -- the run -----------------------------------------------------------------------------------
def mean_batch(log: str) -> float:
    """Requests per engine batch over the coordinator's life, from its shutdown log line."""
    match = re.search(r"served (\d+) requests in (\d+) engine batches", log)
    return int(match.group(1)) / max(1, int(match.group(2))) if match else float("nan")


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Phase], ModelTimes, float]:
    base = make_tiny_bert(workdir / "tiny-bert")
    folders = [
        make_expert_dir(
            base, workdir / "experts" / f"e{i}", rank=args.rank, seed=i, task_name=f"task{i}"
        )
        for i in range(args.experts)
    ]
    settings: dict[str, object] = {"adapter_cache_bytes": 64 << 20, "max_lora_rank": args.rank}
    if args.batch_wait_ms is not None:
        settings["batch_wait_ms"] = args.batch_wait_ms
    if args.traced_forwards:
        settings["traced_forwards"] = "true"
    if args.predict_process:
        settings["predict_process"] = "true"
    coordinator = CoordinatorProcess(workdir / "data", base, **settings)
    for name in args.unset_env:  # run the coordinator as it is deployed, without the harness's
        coordinator.env.pop(name, None)  # thread limits
    with coordinator:
        expert_ids = seed(coordinator, folders)
        metadata = bearer(coordinator.admin_token)

        def predict_bytes(rng: random.Random) -> bytes:
            return predict_request(rng, expert_ids).SerializeToString()

        def predict(channel: grpc.Channel) -> Call:
            # serialized once by the caller, so both servers are sent the same bytes
            method = channel.unary_unary(
                PREDICT_METHOD, response_deserializer=inference_pb2.PredictResponse.FromString
            )
            return lambda request: method(request, metadata=metadata, timeout=60)

        def echo(channel: grpc.Channel) -> Call:
            method = channel.unary_unary(ECHO_METHOD)
            return lambda request: method(request, metadata=metadata, timeout=60)

        for expert_id in [*expert_ids, ""]:  # warm: every expert in the adapter cache
            warm = predict_request(random.Random(0), expert_ids)
            warm.expert_ids[:] = [expert_id] if expert_id else []
            with grpc.insecure_channel(coordinator.address) as channel:
                predict(channel)(warm.SerializeToString())
        with EchoProcess() as server:
            runs = {
                "echo": (echo, server.address, server.pid),
                "Predict": (predict, coordinator.address, coordinator.pid),
            }
            hammer(
                "warm-up",
                predict,
                coordinator.address,
                predict_bytes,
                args.clients,
                3,
                coordinator.pid,
            )
            phases = []
            for name in ("echo", "Predict", "echo"):
                connect, address, pid = runs[name]
                phases.append(
                    hammer(name, connect, address, predict_bytes, args.clients, args.seconds, pid)
                )
    batch = mean_batch(coordinator.log_text())
    model = model_only(base, folders, args.rank, args.clients, traced_forwards=args.traced_forwards)
    return phases, model, batch


def markdown(phases: list[Phase], model: ModelTimes, batch: float, args: argparse.Namespace) -> str:
    import torch

    echo = statistics.mean(p.per_second for p in phases if p.name == "echo")
    echo_cpu = statistics.mean(p.cpu_us_per_request for p in phases if p.name == "echo")
    predict = next(p for p in phases if p.name == "Predict")
    model_us = model.batch_ms * 1000 / args.clients  # per prediction, full batches
    floor_us = echo_cpu + model_us
    predict_cpu = predict.cpu_us_per_request
    loop_us, model_thread_us, other_us = predict.thread_us_per_request()
    engine_us = predict.engine_cpu_seconds / max(1, len(predict.latencies_ms)) * 1e6
    load = os.getloadavg()
    lines = [
        "# Predict overhead: the coordinator against a bare grpc.aio echo server",
        "",
        f"- command: `{' '.join(['python benchmarks/predict_overhead.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, torch {torch.__version__}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only, shared by the "
        f"clients, the server and other jobs; load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
        f"- workload: {args.clients} closed-loop client threads (one channel each), one input per "
        f"call, half restricted to one random expert; tiny random BERT, {args.experts} experts "
        f"(LoRA r={args.rank}) behind a centroid router, adapter cache warm; "
        f"{args.seconds:.0f} s per phase, echo before and after Predict"
        + ("; traced forwards (`traced_forwards = true`)" if args.traced_forwards else "")
        + (
            "; the model in its own process (`predict_process = true`)"
            if args.predict_process
            else ""
        ),
        "",
        "| phase | requests | errors | requests/s | p50 | p99 | server CPU per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in phases:
        lines.append(
            f"| {phase.name} | {len(phase.latencies_ms)} | {sum(phase.errors.values())} "
            f"{phase.errors or ''} | {phase.per_second:.1f} | {phase.percentile(0.5):.1f} ms | "
            f"{phase.percentile(0.99):.1f} ms | {phase.cpu_us_per_request:.0f} us |"
        )
    lines += [
        "",
        f"**Predict / echo: {predict.per_second / echo:.2f}x** (goal >= 0.5x; echo = mean of "
        f"its two phases, {echo:.1f} requests/s).",
        "",
        f"Model only (the engine in-process, no gRPC, no registry, 1 thread; CPU time): "
        f"{model.batch_ms:.1f} ms per batch of {args.clients} requests "
        f"({args.clients / model.batch_ms * 1000:.0f} predictions/s if every batch were full), "
        f"{model.single_ms:.1f} ms for one request alone "
        f"({1000 / model.single_ms:.0f} predictions/s unbatched). The coordinator's engine "
        f"batches held {batch:.1f} requests on average over its life (warm-up included).",
        "",
        f"Server CPU per request: the echo's transport work {echo_cpu:.0f} us + the model alone "
        f"at full batches {model_us:.0f} us = {floor_us:.0f} us, against {predict_cpu:.0f} us "
        f"measured per Predict: the coordinator's own code (interceptors, handler, batcher, "
        f"routing bookkeeping, thread hand-offs) adds {predict_cpu - floor_us:.0f} us. Held to "
        f"the same CPU as the echo server, Predict could not pass {echo_cpu / floor_us:.2f}x of "
        f"its throughput even with none of that code.",
        "",
        f"By thread, per Predict: the event loop (the server's main thread) {loop_us:.0f} us, "
        f"the model thread (its busiest other thread) {model_thread_us:.0f} us, all other "
        f"threads {other_us:.0f} us"
        + (
            f"; the engine process (`predict_process`) {engine_us:.0f} us"
            if args.predict_process
            else ""
        )
        + f". The engine alone, its worker thread's CPU time per batch of "
        f"{args.clients}: {model.batch_ms:.1f} ms, and {model.contended_batch_ms:.1f} ms while "
        f"another thread of the process runs Python "
        f"({model.contended_batch_ms / model.batch_ms:.2f}x: torch's operator bindings release "
        f"the GIL, so two busy threads hand it over hundreds of times per forward).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="the coordinator's batch_wait_ms (default: its own default)",
    )
    parser.add_argument(
        "--traced-forwards",
        action="store_true",
        help="the coordinator (and the model-only engine) with traced_forwards = true",
    )
    parser.add_argument(
        "--predict-process",
        action="store_true",
        help="the coordinator with predict_process = true (Predict's model in its own process)",
    )
    parser.add_argument(
        "--unset-env",
        nargs="*",
        default=[],
        metavar="NAME",
        help="variables the test harness sets for the coordinator (OMP_NUM_THREADS, "
        "MKL_NUM_THREADS, TOKENIZERS_PARALLELISM) to leave unset, as a deployment would",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(_serve_echo())
        return
    workdir = Path(tempfile.mkdtemp(prefix="moerge-overhead-"))
    try:
        phases, model, batch = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(phases, model, batch, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
