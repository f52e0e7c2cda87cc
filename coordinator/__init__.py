"""The coordinator: the server that pools contributors' LoRA experts and routes among them.

Imported as ``moerge.coordinator``; the files live in the top-level ``coordinator/`` folder
(pyproject's ``[tool.setuptools] package-dir``). It serves the three gRPC services of
:mod:`moerge.v1` (``ContributorService``, ``AdminService``, ``InferenceService``) and an
OpenAI-compatible HTTP API, and stores everything through :mod:`moerge.storage`.

The folder is grouped by role, in the order a request meets the pieces::

    coordinator/
      config.py state.py server.py    the process: settings; CoordinatorState.open, the one
      checks.py logs.py               place that wires the pieces; the grpc.aio server;
      leadership.py                   ``serve --check``; logging; which replica leads; the
      housekeeping.py                 sweep of orphan blobs and uploads
      interceptors/  every RPC before a servicer: metrics, auth and the caller's limits, decoding
      rpc/           the gRPC edge: servicers, one grpc-free handler per service, the status table
      http/          the OpenAI-compatible HTTP API over the same handlers and the same table
      uploads/       expert intake: stage, validate against the base model and policy, screen
      services/      router versions, experts read back from the blobs, the request-path cache
      inference/     the one place for inference: the registry-aware services (service.py,
                     generation_service.py) over the engine (engine.py and its modules)

Why these lines: "what happens to every request" is ``interceptors/`` then ``rpc/``; "what
happens to an upload" is ``uploads/``; "how a prediction is served" is ``inference/`` and
nowhere else (the handler in ``rpc/`` only checks and converts messages). The process-level
modules stay at the top because they build and run everything below. The coordinator's commands
(``moerge coordinator serve|health``) are :mod:`moerge.cli.coordinator`. Calls go down the list:
the edges call ``uploads/``, ``services/`` and ``inference/``, which use ``services/``; only the
edges import grpc. A refusal anywhere is one of :mod:`moerge.refusals`' errors, given its gRPC
status by one table (:mod:`.rpc.status`) and its HTTP status from that (:mod:`.http.errors`).
``docs/architecture.md`` draws the whole picture.
"""
