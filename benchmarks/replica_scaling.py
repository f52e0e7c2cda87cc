"""Predict throughput with 1, 2 and 4 inference replicas behind a load balancer, one run.

Set-up (every piece a real process on this machine):

* one shared registry: PostgreSQL when ``initdb``/``pg_ctl`` are found (a throw-away cluster on
  loopback, ``tests/postgres.py``), else one SQLite file in WAL mode, which serves this
  read-only workload (the replicas only read experts, routers and credentials);
* one blob store: a blob folder every replica's ``data_dir/blobs`` links to, as replicas on one
  host sharing a filesystem would (content-addressed files, atomic renames);
* a seeding coordinator (role ``all``) takes ``--experts`` tiny experts and fits a centroid
  router, then stops; the replicas (role ``inference``, one torch thread each) load that router;
* a load balancer: nginx with ``grpc_pass`` when the ``nginx`` binary is found, else gRPC's
  client-side ``round_robin`` policy over the replicas' addresses;
* closed-loop Predict clients in separate processes, ``--clients-per-replica`` calls in flight
  per replica served on grpc.aio, spread over the same number of client processes in every
  phase (``--client-processes``, default the most replicas asked for); the request mix and
  tiny model of ``benchmarks/predict_overhead.py``.

Why the same client processes in every phase: one client process whose calls all go to one
replica answers a whole engine batch at once and sends the next batch's calls together, a
lockstep that fills every batch; spread over several replicas, its calls arrive at each replica
in pieces. The same client processes in every phase give every phase the same clients; they do
not stop the lockstep (4 processes still filled one replica's batches on 2026-12-07, and 4
replicas then served 0.78x linear; results/replica_scaling.md).

Each phase serves through the first N replicas and reports requests/s, p50/p99, the CPU the
replicas and the clients used, and the ratio to linear: (requests/s at N / N) over (requests/s
at the fewest replicas / that number), measured in the same run. Replicas start with
``python benchmarks/replica_scaling.py --serve-replica`` (the coordinator's own
``moerge.coordinator.server.serve``), not the ``moerge`` script, so the package may be laid
out on PYTHONPATH; seeding speaks the gRPC API directly, so nothing beyond the coordinator's
own dependencies is needed.

    python benchmarks/replica_scaling.py --replicas 1 2 4 --seconds 20 --clients-per-replica 16

``--pin`` (Linux) gives each replica a physical core of its own (both hyperthreads) and the
client processes the cores left, so that a replica added never shares a core with another
replica or a client. Each phase also reports the replicas' CPU per request and their requests
per engine batch (from each replica's ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # last: the tiny model, expert builder and PostgreSQL helper live in tests/, while a
    # ``moerge`` package laid out on PYTHONPATH must win over this checkout's partial moerge/
    sys.path.append(str(ROOT))

import grpc  # noqa: E402

from moerge.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
)

RESULTS = Path(__file__).parent / "results" / "replica_scaling.md"
PREDICT = "/moerge.v1.InferenceService/Predict"
SERVING = "moerge coordinator serving on port "
WORDS = ("the", "film", "was", "a", "delight", "dull", "plot", "strong", "cast", "weak", "ending")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its child processes (a replica's engine process, with
    ``predict_process``)."""
    from tests.processes import children

    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def python_path() -> str:
    """The children's PYTHONPATH: the caller's own, then this repository (tests/ helpers)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))


def predict_request(rng: random.Random, expert_ids: list[str]) -> bytes:
    """One input; half of the calls restricted to one random expert (predict_overhead's mix)."""
    only = [rng.choice(expert_ids)] if rng.random() < 0.5 else []
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
    return inference_pb2.PredictRequest(inputs=[text], expert_ids=only).SerializeToString()


# -- the coordinator processes -----------------------------------------------------------------
def serve_replica() -> None:
    """The child: one coordinator from ``MOERGE_*`` variables, until SIGTERM."""
    from moerge.coordinator.config import CoordinatorConfig
    from moerge.coordinator.logs import setup_logging
    from moerge.coordinator.server import serve

    setup_logging()
    asyncio.run(serve(CoordinatorConfig.load()))


def physical_cores() -> list[set[int]]:
    """The logical CPUs this process may use, grouped by physical core (hyperthread siblings
    together; Linux sysfs), in CPU order. One group per CPU where the topology is unreadable."""
    groups: list[set[int]] = []
    for cpu in sorted(os.sched_getaffinity(0)):
        if any(cpu in group for group in groups):
            continue
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            group = set()
            for part in siblings.read_text().strip().split(","):
                low, _, high = part.partition("-")
                group |= set(range(int(low), int(high or low) + 1))
        except (OSError, ValueError):
            group = {cpu}
        groups.append(group & os.sched_getaffinity(0) or {cpu})
    return groups


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that confines a child (and every thread it starts) to ``cpus``."""
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


class Replica:
    """A coordinator child process on a free loopback port; ``address`` once it serves."""

    def __init__(
        self,
        data_dir: Path,
        blobs: Path,
        settings: dict[str, object],
        cpus: set[int] | None = None,
    ) -> None:
        data_dir.mkdir(parents=True)
        (data_dir / "blobs").symlink_to(blobs, target_is_directory=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env |= {"HF_HUB_OFFLINE": "1", "MOERGE_DATA_DIR": str(data_dir)}
        env |= {f"MOERGE_{k.upper()}": str(v) for k, v in settings.items()}
        env["PYTHONPATH"] = python_path()
        self.log = data_dir / "coordinator.err"
        with self.log.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--serve-replica"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                preexec_fn=pinned(cpus),
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(SERVING):
                self.address = f"127.0.0.1:{int(line[len(SERVING) :])}"
                found = re.search(r"metrics on http://[^:]+:(\d+)/metrics", self.log.read_text())
                self.metrics_port = int(found.group(1)) if found else None
                return
        self.stop()
        raise RuntimeError(f"a replica did not start:\n{self.log.read_text()[-4000:]}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def batch_counters(self) -> tuple[float, float]:
        """(engine batches run for Predict, requests they served) so far, from /metrics;
        (0, 0) if the replica serves no metrics."""
        if self.metrics_port is None:
            return 0.0, 0.0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for name in ("moerge_predict_batches_total", "moerge_predict_batched_requests_total"):
            found = re.search(rf"^{name} (\S+)$", text, re.M)
            values[name] = float(found.group(1)) if found else 0.0
        return values["moerge_predict_batches_total"], values[
            "moerge_predict_batched_requests_total"
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def upload(channel: grpc.Channel, token: str, folder: Path) -> str:
    """One expert over ``UploadExpert`` in one chunk (tiny experts); its id."""
    from moerge.expert_format import EXPERT_FILES

    data = {name: (folder / name).read_bytes() for name in EXPERT_FILES}
    files = [
        contributor_pb2.UploadFile(name=n, size=len(d), sha256=hashlib.sha256(d).hexdigest())
        for n, d in data.items()
    ]
    manifest = contributor_pb2.UploadManifest(
        upload_id=hashlib.sha256(folder.name.encode()).hexdigest()[:32],
        expert_name=folder.name,
        task_name=folder.name,
        files=files,
    )
    chunk = contributor_pb2.UploadChunk(offset=0, data=b"".join(data.values()))
    messages = [
        contributor_pb2.UploadExpertRequest(manifest=manifest),
        contributor_pb2.UploadExpertRequest(chunk=chunk),
    ]
    stub = contributor_pb2_grpc.ContributorServiceStub(channel)
    return stub.UploadExpert(iter(messages), metadata=bearer(token), timeout=120).expert.expert_id


def seed(address: str, admin: str, folders: list[Path]) -> list[str]:
    """Enroll a contributor, upload ``folders``, fit and activate a centroid router."""
    with grpc.insecure_channel(address) as channel:
        admin_stub = admin_pb2_grpc.AdminServiceStub(channel)
        token = admin_stub.CreateEnrollmentToken(
            admin_pb2.CreateEnrollmentTokenRequest(note="benchmark"), metadata=bearer(admin)
        ).token
        credential = (
            contributor_pb2_grpc.ContributorServiceStub(channel)
            .Join(contributor_pb2.JoinRequest(enrollment_token=token, name="seeder"))
            .credential
        )
        expert_ids = [upload(channel, credential, folder) for folder in folders]
        admin_stub.TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid"), metadata=bearer(admin), timeout=300
        )
    return expert_ids


def warm(address: str, admin: str, expert_ids: list[str]) -> None:
    """Every expert into the replica's adapter cache, and one routed call."""
    with grpc.insecure_channel(address) as channel:
        predict = channel.unary_unary(PREDICT)
        for expert_id in [*expert_ids, ""]:
            request = inference_pb2.PredictRequest(inputs=["the film was good"])
            request.expert_ids[:] = [expert_id] if expert_id else []
            predict(request.SerializeToString(), metadata=bearer(admin), timeout=120)


# -- the shared registry and the balancer -----------------------------------------------------
class Registry:
    """PostgreSQL (a private cluster) when its binaries are here, else a SQLite file."""

    def __init__(self, kind: str, workdir: Path) -> None:
        from tests.postgres import PostgresCluster, find_postgres_bin

        self.cluster = None
        bin_dir = find_postgres_bin() if kind in ("auto", "postgresql") else None
        if kind == "postgresql" and bin_dir is None:
            raise SystemExit("--registry postgresql: initdb/pg_ctl not found")
        if bin_dir is not None:
            self.cluster = PostgresCluster(bin_dir)
            self.cluster.start()
            self.url = self.cluster.create_database("moerge")
            self.description = "PostgreSQL (a private cluster on loopback)"
        else:
            self.url = f"sqlite:///{workdir / 'registry.db'}"
            why = "asked for" if kind == "sqlite" else "no PostgreSQL binaries here"
            self.description = f"one SQLite file in WAL mode ({why})"

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


class Balancer:
    """nginx (``grpc_pass``, a round robin per call) when found, else the clients' own
    ``round_robin`` policy over the replicas; ``target`` and channel ``options`` for clients."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.nginx = shutil.which("nginx") if kind in ("auto", "nginx") else None
        if kind == "nginx" and self.nginx is None:
            raise SystemExit("--balancer nginx: no nginx binary on PATH")
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.description = (
            "nginx grpc_pass (one upstream per replica, keepalive)"
            if self.nginx
            else "gRPC client-side round_robin over the replicas' addresses ("
            + ("asked for)" if kind == "round_robin" else "no nginx here)")
        )

    def serve(self, addresses: list[str]) -> tuple[str, list[tuple[str, object]]]:
        """Balance over ``addresses``; the clients' channel target and options."""
        self.stop()
        if self.nginx is None:
            target = "ipv4:" + ",".join(addresses)
            return target, [("grpc.lb_policy_name", "round_robin")]
        with socket.socket() as probe:  # a free port for nginx to listen on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        servers = "".join(f"    server {a};\n" for a in addresses)
        temp = "".join(
            f"  {what}_temp_path {prefix / what};\n"
            for what in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"daemon off;\nworker_processes auto;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n{temp}"
            f"  upstream replicas {{\n{servers}    keepalive 64;\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{port} http2;\n"
            f"    location / {{ grpc_pass grpc://replicas; }}\n  }}\n}}\n"
        )
        self.process = subprocess.Popen(
            [self.nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # nginx binds at once; a second is plenty
        return f"127.0.0.1:{port}", []

    def cpu_seconds(self) -> float:
        """nginx's CPU so far, master and workers (round_robin runs inside the clients: 0)."""
        if self.process is None:
            return 0.0
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sum(cpu_seconds(int(p)) for p in [pid, *children])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


# -- closed-loop clients (their own processes) ------------------------------------------------
@dataclass
class ClientPlan:
    """What one client process does; it travels as JSON on the command line."""

    target: str
    options: list[tuple[str, object]]
    admin: str
    expert_ids: list[str]
    in_flight: int
    seconds: float
    warm_seconds: float


async def client_loop(plan: ClientPlan) -> dict[str, object]:
    """``in_flight`` calls back to back; warm until the parent says go, then timed."""
    metadata = bearer(plan.admin)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    phase = {"timed": False, "stop": False}
    options = [tuple(option) for option in plan.options]  # JSON made them lists
    async with grpc.aio.insecure_channel(plan.target, options=options) as channel:
        predict = channel.unary_unary(PREDICT)

        async def one(index: int) -> None:
            rng = random.Random(f"{os.getpid()}-{index}")
            while not phase["stop"]:
                request = predict_request(rng, plan.expert_ids)
                timed = phase["timed"]
                began = time.perf_counter()
                try:
                    await predict(request, metadata=metadata, timeout=60)
                    code = None
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if timed and not phase["stop"]:  # calls begun and ended inside the window
                    if code is None:
                        latencies.append((time.perf_counter() - began) * 1000)
                    else:
                        errors[code] = errors.get(code, 0) + 1

        tasks = [asyncio.create_task(one(i)) for i in range(plan.in_flight)]
        await asyncio.sleep(plan.warm_seconds)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        phase["timed"] = True
        cpu = time.process_time()  # every thread of this process, gRPC's included
        await asyncio.sleep(plan.seconds)
        phase["stop"] = True
        cpu = time.process_time() - cpu
        await asyncio.gather(*tasks)
    return {"latencies_ms": latencies, "errors": errors, "cpu_seconds": cpu}


@dataclass
class Phase:
    replicas: int
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    replica_cpu_seconds: float = 0.0
    balancer_cpu_seconds: float = 0.0  # nginx's; round_robin's work is in the clients'
    client_cpu_seconds: list[float] = field(default_factory=list)  # per client process
    batches: float = 0.0  # the replicas' engine batches for Predict during the phase
    batched_requests: float = 0.0  # and the requests they served

    @property
    def per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_phase(
    replicas: list[Replica],
    balancer: Balancer,
    args: argparse.Namespace,
    admin: str,
    expert_ids: list[str],
    client_cpus: set[int] | None = None,
) -> Phase:
    target, options = balancer.serve([r.address for r in replicas])
    processes = args.client_processes or max(args.replicas)
    calls = args.clients_per_replica * len(replicas)  # in flight, spread over the processes
    plans = [
        ClientPlan(
            target=target,
            options=options,
            admin=admin,
            expert_ids=expert_ids,
            in_flight=calls // processes + (i < calls % processes),
            seconds=args.seconds,
            warm_seconds=min(3.0, max(1.0, args.seconds / 4)),
        )
        for i in range(processes)
    ]
    env = {**os.environ, "PYTHONPATH": python_path()}
    clients = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", json.dumps(dataclasses.asdict(plan))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=pinned(client_cpus),
        )
        for plan in plans
    ]
    try:
        for client in clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")
        phase = Phase(len(replicas), calls, args.seconds)
        before = sum(tree_cpu_seconds(r.pid) for r in replicas)
        batches_before = [r.batch_counters() for r in replicas]
        balancer_before = balancer.cpu_seconds()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        time.sleep(args.seconds)
        phase.replica_cpu_seconds = sum(tree_cpu_seconds(r.pid) for r in replicas) - before
        phase.balancer_cpu_seconds = balancer.cpu_seconds() - balancer_before
        for replica, (batches, requests) in zip(replicas, batches_before, strict=True):
            batches_now, requests_now = replica.batch_counters()
            phase.batches += batches_now - batches
            phase.batched_requests += requests_now - requests
        for client in clients:
            out, _ = client.communicate(timeout=120)
            result = json.loads(out.strip().splitlines()[-1])
            phase.latencies_ms += result["latencies_ms"]
            phase.client_cpu_seconds.append(result["cpu_seconds"])
            for code, count in result["errors"].items():
                phase.errors[code] = phase.errors.get(code, 0) + count
        return phase
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        balancer.stop()


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Placement:
    """With ``--pin``: replica i alone on physical core i (both hyperthreads), the clients on
    the cores left; so a replica added never shares a core, and the clients never take one."""

    replicas: list[set[int]]
    clients: set[int] | None

    @classmethod
    def plan(cls, count: int, per_replica: int = 1) -> Placement:
        """``per_replica`` physical cores each (2 with ``predict_process``: the front and its
        engine process)."""
        cores = physical_cores()
        needed = count * per_replica + 1
        if len(cores) < needed:
            raise SystemExit(f"--pin needs {needed} physical cores, found {len(cores)}")
        replicas = [
            set().union(*cores[i * per_replica : (i + 1) * per_replica]) for i in range(count)
        ]
        return cls(replicas, set().union(*cores[count * per_replica :]))

    def describe(self) -> str:
        if not self.replicas:
            return "none (the kernel places every process)"
        mapping = "; ".join(f"replica {i}: {sorted(c)}" for i, c in enumerate(self.replicas))
        return f"{mapping}; client processes: {sorted(self.clients or ())}"


@dataclass
class Run:
    registry: str
    balancer: str
    phases: list[Phase]
    placement: str


def run(args: argparse.Namespace, workdir: Path) -> Run:
    from moerge.storage.tokens import new_token
    from tests.experts import make_expert_dir
    from tests.tiny_models import make_tiny_bert

    base = make_tiny_bert(workdir / "tiny-bert")
    folders = [
        make_expert_dir(base, workdir / "experts" / f"e{i}", rank=8, seed=i, task_name=f"t{i}")
        for i in range(args.experts)
    ]
    admin = new_token("mga")[1]
    blobs = workdir / "blobs"
    blobs.mkdir()
    registry = Registry(args.registry, workdir)
    balancer = Balancer(args.balancer, workdir)
    settings: dict[str, object] = {
        "db_url": registry.url,
        "admin_token": admin,
        "base_model": base,
        "base_model_id": "tiny-bert",
        "listen": "127.0.0.1:0",
        "device": "cpu",
        "auto_retrain": "false",
        "adapter_cache_bytes": 64 << 20,
        "max_lora_rank": 8,
        "grace_seconds": 1,
        "metrics_listen": "127.0.0.1:0",  # requests per engine batch, from each replica
    }
    if args.predict_process:
        settings["predict_process"] = "true"
    replicas: list[Replica] = []
    try:
        seeder = Replica(workdir / "seeder", blobs, settings)
        try:
            expert_ids = seed(seeder.address, admin, folders)
        finally:
            seeder.stop()
        placement = (
            Placement.plan(max(args.replicas), 2 if args.predict_process else 1)
            if args.pin
            else Placement([], None)
        )
        for i in range(max(args.replicas)):
            replicas.append(
                Replica(
                    workdir / f"r{i}",
                    blobs,
                    settings | {"role": "inference"},
                    placement.replicas[i] if placement.replicas else None,
                )
            )
        for replica in replicas:
            warm(replica.address, admin, expert_ids)
        phases = [
            run_phase(replicas[:n], balancer, args, admin, expert_ids, placement.clients)
            for n in args.replicas
        ]
    finally:
        for replica in replicas:
            replica.stop()
        registry.close()
    return Run(registry.description, balancer.description, phases, placement.describe())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def markdown(result: Run, args: argparse.Namespace) -> str:
    import torch

    cores = os.cpu_count() or 1
    base = min(result.phases, key=lambda p: p.replicas)
    per_replica = base.per_second / base.replicas
    load = os.getloadavg()
    command = " ".join(["python benchmarks/replica_scaling.py", *sys.argv[1:]])
    lines = [
        "# Predict throughput with several inference replicas behind a load balancer",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, torch {torch.__version__}",
        f"- machine: {platform.machine()} {cpu_model()}, {cores} cores, CPU only, shared by the "
        f"replicas, the clients and other jobs; load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
        f"- registry: {result.registry}; blob store: one folder shared by every replica",
        f"- balancer: {result.balancer}",
        f"- CPU placement: {result.placement}",
        f"- workload: tiny random BERT, {args.experts} experts (LoRA r=8) behind a centroid "
        f"router, adapter caches warm; replicas of role `inference`, one torch thread each; "
        f"{args.clients_per_replica} closed-loop Predict calls in flight per replica served "
        f"(one input, half restricted to one random expert), "
        f"spread over {args.client_processes or max(args.replicas)} client processes in every "
        f"phase; {args.seconds:.0f} s per phase"
        + ("; `predict_process = true`" if args.predict_process else ""),
        "",
        "| replicas | clients | requests | errors | requests/s | ratio to linear | p50 | p99 "
        "| replica CPU (cores) | replica CPU per request | requests per engine batch "
        "| balancer CPU (cores) | client CPU (cores; busiest process) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.phases:
        ratio = p.per_second / (per_replica * p.replicas) if per_replica else float("nan")
        client_cores = sum(p.client_cpu_seconds) / p.seconds
        busiest = max(p.client_cpu_seconds) / p.seconds
        lines.append(
            f"| {p.replicas} | {p.clients} | {len(p.latencies_ms)} | "
            f"{sum(p.errors.values())} {p.errors or ''} | {p.per_second:.1f} | {ratio:.2f}x | "
            f"{p.percentile(0.5):.1f} ms | {p.percentile(0.99):.1f} ms | "
            f"{p.replica_cpu_seconds / p.seconds:.2f} | "
            f"{1e6 * p.replica_cpu_seconds / max(1, len(p.latencies_ms)):.0f} us | "
            f"{p.batched_requests / p.batches if p.batches else float('nan'):.1f} | "
            f"{p.balancer_cpu_seconds / p.seconds:.2f} | "
            f"{client_cores:.2f}; {busiest:.2f} |"
        )
    lines += [
        "",
        f"Ratio to linear: requests/s at N replicas over N x the requests/s per replica at "
        f"{base.replicas} replica(s) ({per_replica:.1f}), same run; goal >= 0.9x. A client "
        f"process whose CPU nears 1.00 core (one GIL) would be the bottleneck, not the replicas.",
    ]
    needed = 2 * max(p.replicas for p in result.phases) + 1
    if cores < needed:
        lines += [
            "",
            f"**Scaling cannot be shown on this machine**: {cores} cores for "
            f"{max(p.replicas for p in result.phases)} replica(s) (about one core each) and their "
            f"clients (about {needed} cores wanted): the phases share the same cores, so this "
            f"run only shows that the set-up works.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per phase")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--clients-per-replica", type=int, default=16)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--registry", choices=("auto", "postgresql", "sqlite"), default="auto")
    parser.add_argument("--balancer", choices=("auto", "nginx", "round_robin"), default="auto")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="each replica on a physical core of its own, the clients on the rest (Linux)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        help="client processes in every phase, the phase's calls in flight spread over them "
        "(default: the most replicas of --replicas), so that every phase's replicas see the "
        "same arrival pattern",
    )
    parser.add_argument(
        "--predict-process",
        action="store_true",
        help="replicas with predict_process = true (each replica's model in a process of its own)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve-replica", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_replica:
        serve_replica()
        return
    if args.client:
        plan = ClientPlan(**json.loads(args.client))
        print(json.dumps(asyncio.run(client_loop(plan))), flush=True)
        return
    workdir = Path(tempfile.mkdtemp(prefix="moerge-replicas-"))
    try:
        result = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(result, args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
