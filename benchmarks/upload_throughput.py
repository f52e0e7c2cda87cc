"""Upload throughput of a large expert over loopback, against a raw TCP copy of the same bytes.

A coordinator on 127.0.0.1 (SQLite, local blob store), in its own process as in a deployment,
receives a valid ~256 MiB expert: MiniLM shapes with a LoRA rank high enough to reach the size
(the coordinator's rank limit is raised for this run). Reported: the client-streaming
``UploadExpert`` time to a committed expert (client sha256, stream, verification, validation,
blob store, registry), as MB/s and as a ratio to a raw TCP copy of the same number of bytes over
loopback measured in the same run; then a second upload of the same bytes under another name,
timed in three parts as the client sees them: hashing the files for the manifest, streaming
(until the last chunk is handed to gRPC; the coordinator stages and hashes as it receives), and
the commit (from the end of the stream to the response: verify, validate, blob store, registry).

    python benchmarks/upload_throughput.py [--mib 256] [--chunk-kib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import (
    DEFAULT_CHUNK,
    _stream,
    describe_files,
    make_manifest,
    upload_expert,
)
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
        example_count=10,
        hidden_size=HIDDEN,
        covariance_rank=4,
        task_name="big",
        label_names=["a", "b"],
        label_counts=[5, 5],
    ).write(folder / STATISTICS_META)
    return rank


def raw_tcp_seconds(total: int, chunk: int = 1 << 20) -> float:
    """Send ``total`` bytes over a loopback TCP socket to a reader that discards them."""
    server = socket.create_server(("127.0.0.1", 0))
    received = 0

    def drain() -> None:
        nonlocal received
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(chunk):
                received += len(data)

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_parts(target: Target, folder: Path, name: str, chunk: int, pid: int) -> dict[str, float]:
    """One upload timed in parts as the client sees them, plus CPU time on both sides."""
    import grpc

    from moerge.v1 import contributor_pb2, contributor_pb2_grpc

    cpu_client, cpu_coordinator = time.process_time(), cpu_seconds(pid)
    started = time.perf_counter()
    files = describe_files(folder)
    manifest = make_manifest(files, name, name, "")
    hashed = time.perf_counter()
    marks: list[float] = []

    def requests() -> Iterator[contributor_pb2.UploadExpertRequest]:
        yield from _stream(manifest, files, 0, chunk, lambda n: None)
        marks.append(time.perf_counter())

    with grpc.insecure_channel(target.address) as channel:
        response = contributor_pb2_grpc.ContributorServiceStub(channel).UploadExpert(
            requests(), metadata=target.metadata(), timeout=3600
        )
    done = time.perf_counter()
    assert response.created
    return {
        "hash": hashed - started,
        "stream": marks[0] - hashed,
        "commit": done - marks[0],
        "client_cpu": time.process_time() - cpu_client,
        "coordinator_cpu": cpu_seconds(pid) - cpu_coordinator,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK >> 10)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import grpc

    from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc

    chunk = args.chunk_kib << 10
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "expert"
        rank = write_expert(folder, args.mib)
        total = sum(f.size for f in describe_files(folder))
        _, admin = new_token("mga")
        config = CoordinatorConfig(
            data_dir=Path(tmp) / "coordinator",
            listen="127.0.0.1:0",
            admin_token=admin,
            base_model=default_base_model(),
            max_lora_rank=rank,
            auto_retrain=False,
            max_upload_bytes=2 * total,
            max_message_bytes=2 * chunk + (1 << 20),
        )
        spawn = multiprocessing.get_context("spawn")
        ports, stop = spawn.Queue(), spawn.Event()
        coordinator = spawn.Process(target=serve, args=(config, ports, stop))
        coordinator.start()
        address = f"127.0.0.1:{ports.get(timeout=300)}"
        auth = (("authorization", f"Bearer {admin}"),)
        with grpc.insecure_channel(address) as channel:
            token = (
                admin_pb2_grpc.AdminServiceStub(channel)
                .CreateEnrollmentToken(admin_pb2.CreateEnrollmentTokenRequest(), metadata=auth)
                .token
            )
            credential = (
                contributor_pb2_grpc.ContributorServiceStub(channel)
                .Join(contributor_pb2.JoinRequest(enrollment_token=token, name="bench"))
                .credential
            )
        target = Target(address=address, token=credential)
        raw = raw_tcp_seconds(total)
        started = time.perf_counter()
        response = upload_expert(target, folder, "big", "big", chunk_size=chunk, progress=False)
        upload = time.perf_counter() - started
        parts = timed_parts(target, folder, "big-again", chunk, coordinator.pid)
        raw_after = raw_tcp_seconds(total)
        stop.set()
        coordinator.join(60)
    assert response.created
    raw_best = min(raw, raw_after)
    mb = total / 1e6
    seconds = parts["hash"] + parts["stream"] + parts["commit"]
    lines = [
        "# Upload throughput over loopback",
        "",
        f"- command: `python benchmarks/upload_throughput.py --mib {args.mib} "
        f"--chunk-kib {args.chunk_kib}`",
        f"- date: {time.strftime('%Y-%m-%d')}; python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; {platform.machine()}, {os.cpu_count()} cores (shared, "
        "loaded by other work)",
        f"- expert: {total / 2**20:.1f} MiB (MiniLM shapes, LoRA rank {rank}), "
        f"{args.chunk_kib} KiB chunks; coordinator in its own process",
        "",
        "| transfer | seconds | MB/s | ratio to raw TCP |",
        "|---|---:|---:|---:|",
        f"| raw TCP copy of the same bytes (best of before/after) | {raw_best:.2f} | "
        f"{mb / raw_best:.0f} | 1.00x |",
        f"| `UploadExpert` to a committed expert (sha256 + stream + verification + validation "
        f"+ blob store + registry) | {upload:.2f} | {mb / upload:.0f} | {raw_best / upload:.2f}x |",
        f"| the same bytes again, another name (a second upload, timed in parts) | "
        f"{seconds:.2f} | {mb / seconds:.0f} | {raw_best / seconds:.2f}x |",
        f"| - client sha256 of the files for the manifest | {parts['hash']:.2f} | | |",
        f"| - stream (coordinator writes and hashes as bytes arrive) | {parts['stream']:.2f} | | |",
        f"| - commit (verify, validate, blob store, registry) | {parts['commit']:.2f} | | |",
        "",
        f"CPU time of the second upload: client {parts['client_cpu']:.2f} s, coordinator "
        f"{parts['coordinator_cpu']:.2f} s (all threads).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
