"""Federated router rounds on Flower's deployment runtime: a SuperLink and real SuperNodes.

The in-process and simulation runtimes (:mod:`.federated_rounds`) run simulated contributors. Real
contributors run Flower SuperNodes (``moerge contributor serve``) connected to a Flower
SuperLink, and the rounds run as a Flower *run* on it, with Flower's own machinery only:

1. :class:`SuperLinkProcess` starts ``flower-superlink`` as a child process (or the coordinator
   points at an existing SuperLink). In flwr 1.41 one HTTP(S) port serves the Fleet API (the
   SuperNodes) and the Control API (``flwr run``).
2. :meth:`SuperLinkFederation.run_rounds` writes a *job* directory (the starting router as a
   safetensors artifact, the round settings as JSON), writes the Flower app project (a
   ``pyproject.toml`` whose components are :data:`server_app` and
   :data:`moerge.contributor_client.supernode.app`, see :func:`write_app_project`) and submits
   it with ``flwr run APP moerge --run-config job-dir=...`` (Flower builds the FAB and starts the
   run through the Control API).
3. The SuperLink starts ``flwr-serverapp`` for the run, which runs :data:`server_app`: it waits
   for ``min-nodes`` connected SuperNodes, runs the rounds with the same strategy as the other
   runtimes (:func:`~.flower_server.build_strategy`, :func:`~.flower_server.start_rounds`) and
   writes the trained router and the per-round metrics and participants into the job directory.
   Each SuperNode runs the ClientApp on its own data for every round.

The job directory is how the coordinator and the ServerApp exchange the router: a SuperLink the
coordinator starts runs its ServerApps on the same machine. An existing SuperLink must run the
ServerApp where ``federation_dir`` is the same path (a shared volume), with moerge installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from moerge.router_training.base import ExpertRecord, load_router
from moerge.router_training.federated import FederatedRouter, as_federated
from moerge.router_training.federated_rounds import FederationOutcome, collect_outcome
from moerge.router_training.fitting import FitResult, fit_metrics, fit_router
from moerge.router_training.flower_server import RoundRecord, build_strategy, start_rounds
from moerge.router_training.gaussian import GaussianBank

log = logging.getLogger(__name__)

#: The Flower app the SuperLink runs (FAB id ``moerge/moerge-router``).
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "moerge-router"
version = "1.0.0"
description = "moerge federated router rounds"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "moerge"

[tool.flwr.app.components]
serverapp = "moerge.router_training.superlink:server_app"
clientapp = "moerge.contributor_client.supernode:app"

[tool.flwr.app.config]
job-dir = ""
"""
APP_MODULE = '"""moerge federated router rounds: the components live in the moerge package."""\n'

JOB_ROUTER, JOB_SPEC = "router.safetensors", "job.json"
RESULT_ROUTER, RESULT_JSON, RESULT_ERROR = "result.safetensors", "result.json", "error.txt"


def flower_binary(name: str) -> str:
    """``name`` next to this Python (the venv's ``bin``), else on ``PATH``."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; install flwr (pip install 'flwr==1.41.*')")
    return found


def _child_env() -> dict[str, str]:
    """Environment for Flower processes: this venv's ``bin`` first (the SuperLink starts
    ``flwr-serverapp`` and a SuperNode ``flwr-clientapp`` by name)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for_port(address: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (``RuntimeError`` if ``process`` exits)."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Flower process exited with code {process.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address} after {timeout:.0f}s") from None
            time.sleep(0.2)


class SuperLinkProcess:
    """A ``flower-superlink`` child process: TLS with a certificate, else ``--insecure``;
    ``node_auth`` adds Flower's SuperNode authentication (``--enable-supernode-auth``)."""

    def __init__(
        self,
        listen: str,
        log_path: Path,
        *,
        certfile: str = "",
        keyfile: str = "",
        ca_certfile: str = "",
        database: str = "",
        node_auth: bool = False,
    ) -> None:
        host, port = listen.rsplit(":", 1)
        self.listen = listen
        self.argv = [
            flower_binary("flower-superlink"),
            "--host",
            host.strip("[]"),
            "--port",
            port,
            # moerge is installed already; never `uv sync` an app's dependencies at run time
            "--disable-runtime-dependency-installation",
        ]
        if certfile:
            self.argv += ["--ssl-certfile", certfile, "--ssl-keyfile", keyfile]
            if ca_certfile:
                self.argv += ["--ssl-ca-certfile", ca_certfile]
        else:
            self.argv.append("--insecure")
        if node_auth:  # Flower refuses it without TLS
            self.argv.append("--enable-supernode-auth")
        if database:
            self.argv += ["--database", database]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> SuperLinkProcess:
        """Start ``flower-superlink`` in its own session (its children stop with it), logging to
        ``log_path``, and wait up to ``timeout`` for its ports."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,  # its flwr-serverapp children go with it on stop()
            )
        try:
            wait_for_port(self.listen, timeout, self.process)
        except Exception:
            self.stop()
            raise
        log.info("Flower SuperLink listening on %s (log: %s)", self.listen, self.log_path)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the SuperLink, killing it if it has not exited after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_app_project(directory: Path) -> Path:
    """The Flower app project ``flwr run`` packs into a FAB (components in the moerge package)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    (directory / "moerge_router_app.py").write_text(APP_MODULE, encoding="utf-8")
    return directory


class SuperLinkFederation:
    """Runs router rounds as Flower runs on a SuperLink (started here or existing)."""

    def __init__(
        self,
        address: str,
        work_dir: Path,
        *,
        root_certificates: str = "",
        process: SuperLinkProcess | None = None,
        node_auth: bool = False,
    ) -> None:
        self.address = address
        self.work_dir = Path(work_dir).resolve()
        self.root_certificates = root_certificates  # "" = plain HTTP (loopback tests only)
        self.process = process
        #: the SuperLink admits only the SuperNode keys registered through :meth:`admit_node_keys`
        self.node_auth = node_auth
        self._node_keys_lock = threading.Lock()
        self.app_dir = write_app_project(self.work_dir / "app")
        self._write_flower_config()

    @classmethod
    def start(
        cls,
        listen: str,
        work_dir: Path,
        *,
        certfile: str = "",
        keyfile: str = "",
        root_certificates: str = "",
        timeout: float = 60.0,
    ) -> SuperLinkFederation:
        """Start a SuperLink child process on ``listen`` and connect to it. With TLS
        (``certfile``) it runs Flower's SuperNode authentication: only the keys given to
        :meth:`admit_node_keys` connect (Flower allows node authentication over TLS only)."""
        work_dir = Path(work_dir).resolve()
        process = SuperLinkProcess(
            listen,
            work_dir / "superlink.log",
            certfile=certfile,
            keyfile=keyfile,
            ca_certfile=root_certificates,
            database=str(work_dir / "superlink.db"),
            node_auth=bool(certfile),
        ).start(timeout)
        ca = (root_certificates or certfile) if certfile else ""
        return cls(listen, work_dir, root_certificates=ca, process=process, node_auth=bool(ca))

    def close(self) -> None:
        """Stop the SuperLink this federation started, if any."""
        if self.process is not None:
            self.process.stop()

    def _write_flower_config(self) -> None:
        """``$FLWR_HOME/config.toml`` naming this SuperLink as the connection ``moerge``."""
        home = self.work_dir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        address = self.address.replace("0.0.0.0", "127.0.0.1")
        tls = (
            f'root-certificates = "{self.root_certificates}"'
            if self.root_certificates
            else "insecure = true"
        )
        connection = f'[superlink.moerge]\naddress = "{address}"\n{tls}\n'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "moerge"\n\n{connection}', encoding="utf-8"
        )

    def run_rounds(
        self,
        router: FederatedRouter,
        rounds: int,
        *,
        min_nodes: int = 2,
        node_wait_seconds: float = 120.0,
        round_timeout: float = 600.0,
    ) -> FederationOutcome[FederatedRouter]:
        """Run ``rounds`` rounds of ``router`` over the connected SuperNodes (at least
        ``min_nodes``, waited for up to ``node_wait_seconds``); returns the trained router."""
        router = as_federated(router)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        job = self.work_dir / "jobs" / f"{stamp}-{os.getpid()}-{time.monotonic_ns()}"
        job.mkdir(parents=True)
        router.save(job / JOB_ROUTER)
        spec = {
            "rounds": rounds,
            "min-nodes": min_nodes,
            "node-wait-seconds": node_wait_seconds,
            "round-timeout": round_timeout,
        }
        (job / JOB_SPEC).write_text(json.dumps(spec), encoding="utf-8")
        run_id = self._submit(job)
        log.info("federated router run %s on SuperLink %s (job %s)", run_id, self.address, job)
        deadline = time.monotonic() + node_wait_seconds + rounds * round_timeout + 60
        next_status = time.monotonic() + 10.0
        while not (job / RESULT_JSON).exists():
            if (job / RESULT_ERROR).exists():
                error = (job / RESULT_ERROR).read_text(encoding="utf-8")
                raise RuntimeError(f"federated run {run_id} failed: {error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"federated run {run_id} wrote no result in {job}")
            if time.monotonic() > next_status:  # e.g. a ServerApp that could not even start
                status, details = self._status(run_id)
                if status.startswith("finished") and not (job / RESULT_JSON).exists():
                    time.sleep(1.0)  # the result is renamed into place before the run ends
                    if not (job / RESULT_JSON).exists():
                        raise RuntimeError(f"federated run {run_id} {status}: {details}")
                next_status = time.monotonic() + 10.0
            time.sleep(0.5)
        return read_outcome(job)

    def admit_node_keys(self, keys: Mapping[str, str]) -> dict[str, int]:
        """Make the SuperLink's registered SuperNodes exactly ``keys`` (OpenSSH public key text
        -> a name, the contributor id): register the missing ones and unregister every other
        node, through Flower's Control API (``RegisterNode``/``UnregisterNode``, what
        ``flwr supernode register``/``unregister`` call). Returns key text -> Flower node id
        of the keys now admitted. An unregistered node's Fleet calls fail at once, so a
        running SuperNode of a dropped key stops; Flower keeps an unregistered key's row, so
        that key can never be registered again (a re-enrolled contributor needs a new key)."""
        from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key
        from flwr.proto.control_pb2 import (
            ListNodesRequest,
            RegisterNodeRequest,
            UnregisterNodeRequest,
        )
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        wanted: dict[bytes, str] = {}
        for k in keys:  # the registry takes only ECDSA P-384 keys, the only kind Flower admits
            key = load_ssh_public_key(k.encode())
            if not isinstance(key, EllipticCurvePublicKey):
                raise ValueError(f"a SuperNode key must be ECDSA, got {type(key).__name__}")
            wanted[public_key_to_bytes(key)] = k
        admitted: dict[str, int] = {}
        with self._node_keys_lock, self._control_client() as control:
            nodes = control.ListNodes(ListNodesRequest()).nodes_info
            for node in nodes:
                if node.status == "unregistered":
                    continue
                if node.public_key in wanted:
                    admitted[wanted[node.public_key]] = node.node_id
                else:
                    control.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                    log.info("SuperNode %s (%s) unregistered", node.node_id, node.name)
            used = {node.public_key for node in nodes}
            for flower_key, text in wanted.items():
                if text in admitted:
                    continue
                if flower_key in used:  # unregistered before: Flower keeps the key taken
                    log.warning(
                        "SuperNode key of %s was unregistered before; not admitted", keys[text]
                    )
                    continue
                request = RegisterNodeRequest(public_key=flower_key, name=keys[text])
                admitted[text] = control.RegisterNode(request).node_id
                log.info("SuperNode %s of %s registered", admitted[text], keys[text])
        return admitted

    def _control_client(self) -> Any:
        """Flower's Control API client for this SuperLink (closed on exit)."""
        from flwr.supercore.control import ControlHttpClient

        address = self.address.replace("0.0.0.0", "127.0.0.1")
        ca = self.root_certificates
        return ControlHttpClient.from_server_address(
            address,
            insecure=not ca,
            root_certificates=Path(self.root_certificates).read_bytes() if ca else None,
            interceptors=[],
        )

    def _flwr(self, *args: str) -> dict[str, Any]:
        """Run Flower's CLI against this SuperLink; its JSON reply."""
        argv = [flower_binary("flwr"), *args, "--format", "json"]
        env = {**_child_env(), "FLWR_HOME": str(self.work_dir / "flwr-home")}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        start = done.stdout.find("{")
        reply = json.loads(done.stdout[start:]) if start >= 0 else {}
        if done.returncode != 0 or not reply.get("success"):
            raise RuntimeError(
                f"flwr {args[0]} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}"
            )
        return reply

    def _status(self, run_id: str) -> tuple[str, str]:
        """Flower's status of the run (``flwr ls``), e.g. ``finished:failed``."""
        try:
            runs = self._flwr("ls", "moerge", "--run-id", run_id)["runs"]
        except (RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired):
            return "unknown", ""
        return (
            (str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", "")))
            if runs
            else ("unknown", "")
        )

    def _submit(self, job: Path) -> str:
        """``flwr run`` the app with ``job-dir`` set; returns Flower's run id."""
        reply = self._flwr("run", str(self.app_dir), "moerge", "--run-config", f'job-dir="{job}"')
        return str(reply["run-id"])


def read_outcome(job: Path) -> FederationOutcome[FederatedRouter]:
    """What :data:`server_app` wrote into ``job``."""
    router = as_federated(load_router(job / RESULT_ROUTER))
    raw = json.loads((job / RESULT_JSON).read_text(encoding="utf-8"))
    participants = []
    for record in raw["participants"]:
        record["contributors"] = {int(k): v for k, v in record["contributors"].items()}
        participants.append(RoundRecord(**record))
    return FederationOutcome(
        router=router,
        round_metrics=raw["round_metrics"],
        participants=participants,
        seconds_per_round=raw["seconds_per_round"],
    )


def run_job(grid: Grid, job: Path) -> FederationOutcome[FederatedRouter]:
    """The ServerApp's work: wait for nodes, run the rounds, return the outcome."""
    spec = json.loads((job / JOB_SPEC).read_text(encoding="utf-8"))
    router = as_federated(load_router(job / JOB_ROUTER))
    rounds, min_nodes = int(spec["rounds"]), int(spec["min-nodes"])
    deadline = time.monotonic() + float(spec["node-wait-seconds"])
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} SuperNodes connected, need {min_nodes}")
        time.sleep(0.5)
    strategy, fedavg = build_strategy(router, len(nodes), min_available=min_nodes)
    start = time.perf_counter()
    result = start_rounds(grid, router, rounds, strategy, timeout=float(spec["round-timeout"]))
    return collect_outcome(router, result, fedavg, rounds, time.perf_counter() - start)


#: The ServerApp the SuperLink runs for every federated router run (``run_config["job-dir"]``).
server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    job = Path(str(context.run_config["job-dir"]))
    try:
        outcome = run_job(grid, job)
    except Exception as exc:
        (job / RESULT_ERROR).write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
        raise
    outcome.router.save(job / RESULT_ROUTER)
    result = {
        "round_metrics": outcome.round_metrics,
        "participants": [asdict(r) for r in outcome.participants],
        "seconds_per_round": outcome.seconds_per_round,
    }
    tmp = job / (RESULT_JSON + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(job / RESULT_JSON)  # the coordinator polls for this name


def fit_on_superlink(
    federation: SuperLinkFederation, experts: Sequence[ExpertRecord], params: Mapping[str, Any]
) -> FitResult:
    """The coordinator's ``federated`` fit with real contributors: the LDA start from the
    uploaded statistics, ``rounds`` rounds over the SuperLink's SuperNodes, the temperature
    refitted on the statistics, and the fit metrics with the rounds and their participants."""
    start_time = time.perf_counter()
    start = fit_router("federated", experts, {**params, "rounds": 0, "backend": "inprocess"})
    router = as_federated(start.router)
    config = router.config
    rounds = int(params.get("rounds", 0))
    outcome = federation.run_rounds(
        router, rounds, min_nodes=config.min_nodes, node_wait_seconds=config.node_wait_seconds
    )
    trained = outcome.router
    trained.config = replace(trained.config, rounds=rounds, backend="superlink")
    trained.recalibrate(GaussianBank.from_experts(experts, config.variance_floor))
    trained.federation_metrics = outcome.summary()
    metrics = fit_metrics(trained, experts)
    return FitResult(router=trained, metrics=metrics, fit_seconds=time.perf_counter() - start_time)
