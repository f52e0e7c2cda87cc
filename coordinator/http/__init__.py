"""The coordinator's HTTP API: OpenAI-compatible completions and JSON predict/route.

Laid out like vLLM's ``vllm/entrypoints/openai/``: :mod:`.protocol` holds the pydantic request
and response models, :mod:`.api_router` the routes, :mod:`.serving` the translation to the same
plain handlers the gRPC servicers call (:mod:`moerge.coordinator.rpc.inference_handler`), and
:mod:`.app` builds the FastAPI app and runs it with uvicorn in the coordinator's event loop.
Statuses come from one table (:mod:`.errors`) over :func:`moerge.coordinator.rpc.status.status_for`.
See ``docs/http-api.md``.
"""
