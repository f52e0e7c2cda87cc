"""Upload throughput of a large expert over loopback, against a raw TCP copy of the same bytes.

A coordinator on 127.0.0.1 (SQLite, local blob store), in its own process as in a deployment,
receives a valid ~256 MiB expert: MiniLM shapes with a LoRA rank high enough to reach the size
(the coordinator's rank limit is raised for this run). Reported, as MB/s and as a ratio to a raw
TCP copy of the same number of bytes over loopback measured in the same run (the goal's
reference; a second baseline also writes and fsyncs what it receives):

* ``upload_expert`` over the bulk data channel (the default) to a committed expert: client
  sha256, ``StartBulkUpload``, the bytes (``sendfile`` -> ``recv_into``, staged and hashed by
  the coordinator as they arrive), the manifest-only ``UploadExpert`` commit (verify, validate,
  blob store, registry);
* the same files again under another name, timed in three parts as the client sees them:
  the files' digests (from the client's sha256 cache, filled by the first upload), the data
  channel (ticket + bytes + the coordinator's reply), the commit;
* the same bytes as gRPC ``UploadExpert`` chunks (the fallback path).

Every upload goes under a new expert name; the rows run round-robin ``--rounds`` times and
the table gives the median and the best of each.

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
from moerge.contributor_client.upload import (
    DEFAULT_CHUNK,
    describe_files,
    make_manifest,
    send_bulk,
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
PARTS = ("hash", "stream", "commit")
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_parts(
    target: Target, folder: Path, name: str, pid: int, cache: DigestCache
) -> dict[str, float]:
    """One data-channel upload timed in parts as the client sees them, plus CPU time."""
    import grpc

    from moerge.v1 import contributor_pb2, contributor_pb2_grpc

    with grpc.insecure_channel(target.address) as channel:
        stub = contributor_pb2_grpc.ContributorServiceStub(channel)
        cpu_client, cpu_coordinator = time.process_time(), cpu_seconds(pid)
        started = time.perf_counter()
        files = describe_files(folder, cache)
        manifest = make_manifest(files, name, name, "")
        hashed = time.perf_counter()
        ticket = stub.StartBulkUpload(manifest, metadata=target.metadata(), timeout=60)
        assert ticket.available
        held = send_bulk(target, ticket, manifest.upload_id, files, lambda n: None)
        sent = time.perf_counter()
        response = stub.UploadExpert(
            iter([contributor_pb2.UploadExpertRequest(manifest=manifest)]),
            metadata=target.metadata(),
            timeout=3600,
        )
        done = time.perf_counter()
    assert response.created and held == ticket.status.total_bytes
    return {
        "hash": hashed - started,
        "stream": sent - hashed,
        "commit": done - sent,
        "client_cpu": time.process_time() - cpu_client,
        "coordinator_cpu": cpu_seconds(pid) - cpu_coordinator,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK >> 10)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row, interleaved")
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
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {}
        parts: list[dict[str, float]] = []
        for round_ in range(args.rounds):  # variants interleaved round-robin
            times.setdefault("raw", []).append(raw_tcp_seconds(total))
            sink = Path(tmp) / "raw-copy"
            times.setdefault("raw_file", []).append(raw_tcp_seconds(total, sink=sink))
            cache = DigestCache(Path(tmp) / f"sha256-cache-{round_}.json")  # empty: cold
            started = time.perf_counter()
            response = upload_expert(
                target, folder, f"big-{round_}", "big", progress=False, digest_cache=cache
            )
            times.setdefault("upload", []).append(time.perf_counter() - started)
            assert response.created
            parts.append(timed_parts(target, folder, f"again-{round_}", coordinator.pid, cache))
            times.setdefault("cached", []).append(sum(parts[-1][k] for k in PARTS))
            started = time.perf_counter()
            chunks = upload_expert(
                target,
                folder,
                f"chunks-{round_}",
                "big",
                chunk_size=chunk,
                progress=False,
                bulk=False,
            )
            times.setdefault("chunks", []).append(time.perf_counter() - started)
            assert chunks.created
        load_after = os.getloadavg()
        stop.set()
        coordinator.join(60)
    mb = total / 1e6
    raw_median, raw_best = statistics.median(times["raw"]), min(times["raw"])

    def row(label: str, key: str) -> str:
        median, best = statistics.median(times[key]), min(times[key])
        return (
            f"| {label} | {median:.2f} | {best:.2f} | {mb / median:.0f} | "
            f"{raw_median / median:.2f}x | {raw_best / best:.2f}x |"
        )

    def part(label: str, key: str) -> str:
        values = [p[key] for p in parts]
        return f"| - {label} | {statistics.median(values):.2f} | {min(values):.2f} | | | |"

    lines = [
        "# Upload throughput over loopback",
        "",
        f"- command: `python benchmarks/upload_throughput.py --mib {args.mib} "
        f"--chunk-kib {args.chunk_kib} --rounds {args.rounds}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; {platform.machine()}, {os.cpu_count()} cores (shared); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after",
        f"- expert: {total / 2**20:.1f} MiB (MiniLM shapes, LoRA rank {rank}); coordinator in its "
        f"own process; gRPC chunks of {args.chunk_kib} KiB; {args.rounds} rounds of every row, "
        "interleaved; each upload under a new name",
        "",
        "| transfer | median s | best s | MB/s (median) | ratio to raw TCP (medians) "
        "| ratio (bests) |",
        "|---|---:|---:|---:|---:|---:|",
        row("raw TCP copy of the same bytes (the goal's reference)", "raw"),
        row("raw TCP copy that also writes the bytes to a file and fsyncs it", "raw_file"),
        row(
            "**upload over the bulk data channel** to a committed expert (client sha256 + "
            "ticket + stream + verification + validation + blob store + registry)",
            "upload",
        ),
        row(
            "the same files again, another name (data channel, digests from the client's "
            "sha256 cache, timed in parts)",
            "cached",
        ),
        part("client sha256 of the files for the manifest (cached)", "hash"),
        part(
            "data channel: ticket, bytes, the coordinator's reply (it stages and hashes as "
            "they arrive)",
            "stream",
        ),
        part(
            "commit: manifest-only `UploadExpert` (verify, validate, blob store, registry)",
            "commit",
        ),
        row("the same bytes as gRPC `UploadExpert` chunks (the fallback)", "chunks"),
        "",
        "CPU time of the timed-in-parts upload (median): client "
        f"{statistics.median(p['client_cpu'] for p in parts):.2f} s, coordinator "
        f"{statistics.median(p['coordinator_cpu'] for p in parts):.2f} s (all threads).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
