"""Upload throughput of a large expert over loopback: presigned URLs vs gRPC chunks, one run.

Two coordinators on 127.0.0.1 (SQLite, each in its own process as in a deployment) receive the
same valid ~256 MiB expert (MiniLM shapes, a LoRA rank high enough to reach the size; the rank
limit is raised for this run), each upload under a new expert name, rows interleaved
``--rounds`` times, the table giving the median and the best:

* **gRPC chunks** (``UploadExpert``) to a coordinator with a local blob store: the client's
  sha256, the chunks, verification, validation, blob store, registry;
* **presigned URLs** to a coordinator whose blobs are in an S3 API server: the client's
  sha256 per file and per part, ``StartObjectUpload``, the parts PUT straight into the store
  (4 at a time), ``CompleteObjectUpload`` (the coordinator reads every file back from the
  store, verifies, validates, copies into the content-addressed names, registers).

The S3 server is moto's (``moto[server]``, in its own process; MinIO's server cannot be
installed here): a Python server that keeps objects in memory, so the presigned row measures
moto as much as the protocol; a real object store moves parts in parallel on other machines.
A raw TCP copy of the same bytes over loopback is measured in the same run as the reference.

    python benchmarks/upload_throughput.py [--mib 256] [--chunk-kib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moerge.contributor_client.connection import Target
from moerge.contributor_client.digests import DigestCache
from moerge.contributor_client.upload import DEFAULT_CHUNK, describe_files, upload_expert
from moerge.coordinator.config import CoordinatorConfig, default_base_model
from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
)
from moerge.storage.tokens import new_token

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the S3 test server lives in tests/

from tests.s3server import REGION, S3Server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "upload_throughput.md"
HIDDEN, LAYERS = 384, 6


def write_expert(folder: Path, mib: int) -> int:
    """A valid MiniLM-shaped expert of about ``mib`` MiB; returns its LoRA rank."""
    modules = [
        f"bert.encoder.layer.{i}.attention.self.{m}"
        for i in range(LAYERS)
        for m in ("query", "value")
    ]
    rank = max(1, (mib << 20) // (len(modules) * 2 * HIDDEN * 4))
    rng = np.random.default_rng(0)
    tensors = {}
    for module in modules:
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, HIDDEN), np.float32) * 0.01
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((HIDDEN, rank), np.float32) * 0.01
    tensors["base_model.model.classifier.weight"] = np.zeros((2, HIDDEN), np.float32)
    tensors["base_model.model.classifier.bias"] = np.zeros(2, np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"],
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(
        {
            MEAN_KEY: np.zeros(HIDDEN, np.float32),
            COV_DIAG_KEY: np.ones(HIDDEN, np.float32),
            COV_FACTOR_KEY: np.zeros((HIDDEN, 4), np.float32),
        },
        str(folder / STATISTICS_TENSORS),
    )
    StatisticsMeta(
        example_count=100,  # above any minimum for statistics without DP
        hidden_size=HIDDEN,
        covariance_rank=4,
        task_name="big",
        label_names=["a", "b"],
        label_counts=[50, 50],
    ).write(folder / STATISTICS_META)
    return rank


def raw_tcp_seconds(total: int, chunk: int = 1 << 20, sink: Path | None = None) -> float:
    """Send ``total`` bytes over a loopback TCP socket to a reader that discards them (or, with
    ``sink``, writes them to that file and fsyncs it)."""
    server = socket.create_server(("127.0.0.1", 0))
    received = 0

    def drain() -> None:
        nonlocal received
        conn, _ = server.accept()
        with conn:
            if sink is None:
                while data := conn.recv(chunk):
                    received += len(data)
                return
            buffer = memoryview(bytearray(4 << 20))
            fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while count := conn.recv_into(buffer):
                    view = buffer[:count]
                    while view:
                        view = view[os.write(fd, view) :]
                    received += count
                os.fsync(fd)
            finally:
                os.close(fd)
                sink.unlink()

    reader = threading.Thread(target=drain)
    reader.start()
    payload = b"\x01" * chunk
    started = time.perf_counter()
    with socket.create_connection(server.getsockname()) as client:
        sent = 0
        while sent < total:
            client.sendall(payload[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
    reader.join()
    elapsed = time.perf_counter() - started
    server.close()
    assert received == total
    return elapsed


def serve(config: CoordinatorConfig, ports: Queue, stop: Event) -> None:
    """The coordinator process: report the bound port, serve until ``stop`` is set."""
    from moerge.coordinator.server import start

    async def run() -> None:
        running = await start(config)
        ports.put(running.port)
        await asyncio.to_thread(stop.wait)
        await running.stop(grace=1.0)

    asyncio.run(run())


def start_coordinator(config: CoordinatorConfig) -> tuple[multiprocessing.Process, Event, str]:
    """A coordinator in its own process; returns it, its stop event and its address."""
    spawn = multiprocessing.get_context("spawn")
    ports, stop = spawn.Queue(), spawn.Event()
    process = spawn.Process(target=serve, args=(config, ports, stop))
    process.start()
    return process, stop, f"127.0.0.1:{ports.get(timeout=300)}"


def join(address: str, admin: str, name: str) -> Target:
    """Enrol a contributor; its target."""
    import grpc

    from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc

    auth = (("authorization", f"Bearer {admin}"),)
    with grpc.insecure_channel(address) as channel:
        token = (
            admin_pb2_grpc.AdminServiceStub(channel)
            .CreateEnrollmentToken(admin_pb2.CreateEnrollmentTokenRequest(), metadata=auth)
            .token
        )
        credential = (
            contributor_pb2_grpc.ContributorServiceStub(channel)
            .Join(contributor_pb2.JoinRequest(enrollment_token=token, name=name))
            .credential
        )
    return Target(address=address, token=credential)


def moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK >> 10)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row, interleaved")
    args = parser.parse_args()

    import grpc

    chunk = args.chunk_kib << 10
    s3 = S3Server()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "expert"
        rank = write_expert(folder, args.mib)
        total = sum(f.size for f in describe_files(folder))
        _, admin = new_token("mga")
        common = dict(
            listen="127.0.0.1:0",
            admin_token=admin,
            base_model=default_base_model(),
            max_lora_rank=rank,
            auto_retrain=False,
            max_upload_bytes=2 * total,
            max_message_bytes=2 * chunk + (1 << 20),
        )
        local = CoordinatorConfig(data_dir=Path(tmp) / "local", **common)  # type: ignore[arg-type]
        objects = CoordinatorConfig(  # type: ignore[arg-type]
            data_dir=Path(tmp) / "s3",
            blob_store=f"s3://{s3.new_bucket()}/moerge",
            s3_endpoint_url=s3.endpoint_url,
            s3_region=REGION,
            **common,
        )
        started_local = start_coordinator(local)
        started_s3 = start_coordinator(objects)
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {}
        for round_ in range(args.rounds):  # variants interleaved round-robin
            times.setdefault("raw", []).append(raw_tcp_seconds(total))
            for key, address, transport in (  # a new contributor each round: the same content
                ("chunks", started_local[2], "grpc"),  # from the same one is not stored again
                ("presigned", started_s3[2], "object"),
            ):
                target = join(address, admin, f"bench-{round_}")
                cache = DigestCache(Path(tmp) / f"sha256-{key}-{round_}.json")  # empty: cold
                started = time.perf_counter()
                response = upload_expert(
                    target,
                    folder,
                    f"{key}-{round_}",
                    "big",
                    chunk_size=chunk,
                    progress=False,
                    digest_cache=cache,
                    transport=transport,
                )
                times.setdefault(key, []).append(time.perf_counter() - started)
                assert response.created
        load_after = os.getloadavg()
        for process, stop, _ in (started_local, started_s3):
            stop.set()
            process.join(60)
    s3.stop()
    mb = total / 1e6
    raw_median, raw_best = statistics.median(times["raw"]), min(times["raw"])

    def row(label: str, key: str) -> str:
        median, best = statistics.median(times[key]), min(times[key])
        return (
            f"| {label} | {median:.2f} | {best:.2f} | {mb / median:.0f} | "
            f"{raw_median / median:.2f}x | {raw_best / best:.2f}x |"
        )

    lines = [
        "# Upload throughput over loopback",
        "",
        f"- command: `python benchmarks/upload_throughput.py --mib {args.mib} "
        f"--chunk-kib {args.chunk_kib} --rounds {args.rounds}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; {platform.machine()}, {os.cpu_count()} cores (shared); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after",
        f"- expert: {total / 2**20:.1f} MiB (MiniLM shapes, LoRA rank {rank}); each coordinator "
        f"in its own process, the S3 server (moto {moto_version()}) in a third; gRPC chunks of "
        f"{args.chunk_kib} KiB, parts of 16 MiB; {args.rounds} rounds of every row, interleaved; "
        "each upload under a new name",
        "",
        "| transfer | median s | best s | MB/s (median) | ratio to raw TCP (medians) "
        "| ratio (bests) |",
        "|---|---:|---:|---:|---:|---:|",
        row("raw TCP copy of the same bytes (reference)", "raw"),
        row("gRPC `UploadExpert` chunks to a committed expert (local blob store)", "chunks"),
        row(
            "presigned multipart URLs straight into the S3 server (moto), 4 PUTs at a time, "
            "to a committed expert (read back, verified, validated, copied in)",
            "presigned",
        ),
        "",
        "Presigned / gRPC chunks (medians): "
        f"{statistics.median(times['presigned']) / statistics.median(times['chunks']):.2f}x "
        "the time.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
