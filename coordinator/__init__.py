"""The coordinator: the server that pools contributors' LoRA experts and routes among them.

Imported as ``moerge.coordinator``; the files live in the top-level ``coordinator/`` folder
(pyproject's ``[tool.setuptools] package-dir``). It serves the three gRPC services of
:mod:`moerge.v1` (``ContributorService``, ``AdminService``, ``InferenceService``) and an
OpenAI-compatible HTTP API (:mod:`.http`), and stores everything through :mod:`moerge.storage`.

A request goes through one interceptor per concern (metrics, authentication with its rate limits,
request decoding), then a servicer (:mod:`.servicers`: protobuf in, status codes out, nothing more),
then a plain handler (``*_handler.py``, which never imports grpc) over the shared state; domain
errors become statuses in one table (:mod:`.errors`). Behind the handlers: expert uploads (staged,
validated, screened, committed), router versions fitted with :mod:`moerge.router_training`, and the
inference engine (:mod:`.inference`: base model, LoRA banks, routing, aggregation, generation).
:mod:`.state` wires it all together and :mod:`.server` runs it (``moerge coordinator serve``,
settings in :mod:`.config`). ``docs/architecture.md`` draws the whole picture.
"""
