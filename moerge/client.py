"""``moerge.Client`` and ``moerge.AsyncClient``: everything the CLI does, from Python.

Both take the CLI's settings: ``coordinator`` (HOST:PORT), ``token`` (a contributor credential,
or the admin token) and ``tls_ca``, each defaulting to what ``moerge join`` saved or to the
``MOERGE_COORDINATOR``, ``MOERGE_TOKEN`` and ``MOERGE_TLS_CA`` environment variables. Results
are the frozen dataclasses of :mod:`moerge.results`; every failure is a
:class:`~moerge.errors.MoergeError` with the gRPC status code, the message and, where no
coordinator answered, a hint.

The unary calls are written once, in :class:`~moerge.calls.Calls`; this module adds the two
transports, the streamed ``generate``, and the work done locally (train, upload), which
:class:`AsyncClient` runs in a worker thread since it is blocking file and CPU work.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from moerge.calls import FULL_IDS, Calls
from moerge.client_training import TrainOptions, build, local_base_model, train_config
from moerge.errors import MoergeError
from moerge.results import (
    ComposeEvent,
    GenerateEvent,
    Upload,
    compose_event,
    generate_event,
)
from moerge.streamed_requests import compose_request, generate_request
from moerge.v1 import admin_pb2_grpc, contributor_pb2_grpc, inference_pb2_grpc

T = TypeVar("T")
STUBS = {
    "admin": admin_pb2_grpc.AdminServiceStub,
    "contributor": contributor_pb2_grpc.ContributorServiceStub,
    "inference": inference_pb2_grpc.InferenceServiceStub,
}


class Client(Calls):
    """A synchronous client; close it, or use it as a context manager.

    >>> with moerge.Client("127.0.0.1:50051", token=admin_token) as client:
    ...     client.predict(["the film was a delight"]).predictions[0].output
    """

    _channel: grpc.Channel | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the client may be closed twice."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _stub(self, service: str) -> Any:
        if self._channel is None:
            self._channel = self.target.channel()
        return STUBS[service](self._channel)

    def _unary(self, service: str, method: str, request: Any, convert: Callable[[Any], T]) -> T:
        rpc = getattr(self._stub(service), method)
        try:
            response = rpc(request, metadata=self.target.metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise MoergeError.from_rpc(exc, self.target.address) from None
        return convert(response)

    def generate(
        self, prompt: str | None = None, **options: Any
    ) -> Generator[GenerateEvent, None, None]:
        """Routed generation, streamed: a :class:`GenerateStart`, :class:`GenerateDelta` events
        as tokens come, a :class:`GenerateEnd` (causal-LM coordinators only).

        ``options``: the keywords of :func:`generate_request` (``messages``,
        ``max_new_tokens``, ``temperature``, ``seed``, ``stop``, ``top_k``, ...). Leaving the
        loop early cancels the call, which frees its place in the coordinator's batch.
        """
        options["experts"] = self.resolve_ids("expert", options.get("experts", ()))
        yield from self._stream("Generate", generate_request(prompt, **options), generate_event)

    def compose(
        self, name: str, examples: Iterable[tuple[str, str]], **options: Any
    ) -> Generator[ComposeEvent, None, None]:
        """Few-shot composition, streamed: a :class:`ComposeProgress` after every loss
        evaluation, then the stored :class:`Composition` (serve it with
        ``predict(..., composition=name)``).

        ``options``: the keywords of :func:`compose_request` (``experts``, ``budget``,
        ``time_limit_s``, ``l1``, ``seed``, ``keep_examples``). Leaving the loop early cancels
        the search; nothing is stored.
        """
        options["experts"] = self.resolve_ids("expert", options.get("experts", ()))
        yield from self._stream(
            "Compose", compose_request(name, examples, **options), compose_event
        )

    def _stream(
        self, method: str, request: Any, convert: Callable[[Any], T]
    ) -> Generator[T, None, None]:
        """A server-streaming InferenceService call, each response converted; cancelled when
        the caller stops iterating."""
        stream = getattr(self._stub("inference"), method)(
            request, metadata=self.target.metadata(), timeout=self.timeout
        )
        try:
            for response in stream:
                yield convert(response)
        except grpc.RpcError as exc:
            raise MoergeError.from_rpc(exc, self.target.address) from None
        finally:
            stream.cancel()

    # -- contributing: local work, then an upload ---------------------------------------------

    def upload_adapter(
        self,
        adapter_dir: str | Path,
        task_name: str,
        name: str | None = None,
        *,
        label_names: Sequence[str] | None = None,
        description: str = "",
        **upload: Any,
    ) -> Upload:
        """Upload a bare PEFT adapter folder as an *adapter-only* expert (no data statistics).

        For an adapter whose training data is gone: the two statistics files are written,
        claiming no data (:mod:`moerge.contributor_client.adapter_only`), into a temporary
        copy, which :meth:`upload` sends (``upload`` takes its keyword options). ``label_names``
        are the head's labels in order (default ``LABEL_i``); ``name`` defaults to the folder's.
        Statistics routers leave such experts out; Arrow routes them (docs/routing.md).
        """
        from moerge.contributor_client.adapter_only import write_adapter_only

        folder = Path(adapter_dir)
        with tempfile.TemporaryDirectory(prefix="moerge-adapter-only-") as tmp:
            try:
                staged = write_adapter_only(
                    folder, Path(tmp) / "expert", task_name,
                    None if label_names is None else list(label_names), description,
                )  # fmt: skip
            except (FileNotFoundError, ValueError) as exc:
                raise MoergeError.invalid(str(exc)) from None
            return self.upload(staged, name or folder.resolve().name, **upload)

    def upload(
        self,
        expert_dir: str | Path,
        name: str | None = None,
        *,
        task_name: str | None = None,
        description: str | None = None,
        transport: str = "auto",
        chunk_size: int | None = None,
        progress: bool = False,
    ) -> Upload:
        """Upload an expert folder (resuming an interrupted upload of the same files).

        ``name`` defaults to the folder's name, ``task_name`` and ``description`` to its
        statistics.json. ``transport``: auto (straight into the coordinator's object store
        if it has one, else gRPC chunks), object (the object store or fail) or grpc (chunks).
        """
        from moerge.contributor_client.upload import (
            DEFAULT_CHUNK,
            TransportUnavailable,
            upload_expert,
        )
        from moerge.expert_format import STATISTICS_META, StatisticsMeta

        folder = Path(expert_dir)
        meta_path = folder / STATISTICS_META
        if not meta_path.is_file():
            raise MoergeError.invalid(
                f"{folder} has no {STATISTICS_META}: compute it with "
                "`moerge stats DATA --adapter DIR` first"
            )
        meta = StatisticsMeta.read(meta_path)
        try:
            response = upload_expert(
                self.target,
                folder,
                name or folder.resolve().name,
                task_name or meta.task_name,
                description if description is not None else meta.task_description,
                chunk_size=chunk_size or DEFAULT_CHUNK,
                progress=progress,
                transport=transport,
            )
        except grpc.RpcError as exc:
            raise MoergeError.from_rpc(exc, self.target.address) from None
        except TransportUnavailable as exc:
            raise MoergeError.precondition(str(exc)) from None
        except (FileNotFoundError, ValueError) as exc:
            raise MoergeError.invalid(str(exc)) from None
        return Upload.from_proto(response)

    def train(
        self,
        data: str | Path,
        task_name: str,
        out: str | Path,
        *,
        description: str = "",
        base_model: str | None = None,
        offline: bool = False,
        progress: bool = False,
        **options: Any,
    ) -> Any:
        """Train a LoRA expert on ``data`` and write its statistics to ``out``; nothing is sent.

        The coordinator is asked which base model revision and LoRA limits to use unless
        ``offline``. ``options`` are :class:`~moerge.client_training.TrainOptions` fields
        (``epochs=2``, ``rank=4``, ...). Returns the
        :class:`~moerge.contributor_client.build.BuildReport`.
        """
        settings = TrainOptions(**options)
        info = None if offline else self.base_model()
        path = local_base_model(base_model, info)
        config = train_config(path, info, settings)
        return build(data, out, task_name, description, settings, config, info, progress)

    def contribute(
        self,
        data: str | Path,
        task_name: str,
        *,
        name: str | None = None,
        out: str | Path | None = None,
        description: str = "",
        base_model: str | None = None,
        transport: str = "auto",
        progress: bool = False,
        **options: Any,
    ) -> tuple[Upload, Any]:
        """Train, compute statistics and upload in one step: ``(upload, build report)``.

        ``out`` keeps the expert folder (default: a temporary folder, removed after upload);
        ``options`` as in :meth:`train`.
        """
        with tempfile.TemporaryDirectory(prefix="moerge-expert-") as tmp:
            folder = Path(out) if out is not None else Path(tmp) / "expert"
            report = self.train(
                data, task_name, folder, description=description, base_model=base_model,
                progress=progress, **options,
            )  # fmt: skip
            upload = self.upload(
                folder,
                name or task_name,
                task_name=task_name,
                description=description,
                transport=transport,
                progress=progress,
            )
        return upload, report

    # -- ids: unique prefixes, as git takes them ---------------------------------------------

    def _resolving(self, kind: str, prefixes: list[str], call: Callable[[list[str]], T]) -> T:
        return call(self.resolve_ids(kind, prefixes))

    def resolve_id(self, kind: str, prefix: str) -> str:
        """The one id of ``kind`` (expert, contributor, API key, enrollment token) that starts
        with ``prefix``; a complete id is returned as is, without a call.

        No match is ``NOT_FOUND``; more than one is ``INVALID_ARGUMENT``, naming the
        candidates. Every method that takes an id does this for an incomplete one.
        """
        return self.resolve_ids(kind, [prefix])[0]

    def resolve_ids(self, kind: str, prefixes: Iterable[str]) -> list[str]:
        """:meth:`resolve_id` of each prefix, with one listing for all of them (if any)."""
        given = list(prefixes)
        complete = FULL_IDS[kind].fullmatch
        known = [] if all(complete(p) for p in given) else self._ids(kind)
        return [p if complete(p) else unique_prefix(kind, p, known) for p in given]

    def resolve_expert_id(self, prefix: str) -> str:
        """:meth:`resolve_id` of an expert: among the whole registry for the admin, else among
        the active experts (:meth:`models`), which any inference credential may list."""
        return self.resolve_id("expert", prefix)

    def resolve_contributor_id(self, prefix: str) -> str:
        """:meth:`resolve_id` of a contributor (admin token)."""
        return self.resolve_id("contributor", prefix)

    def _ids(self, kind: str) -> list[str]:
        if kind == "contributor":
            return [c.contributor_id for c in self._every(self.list_contributors)]
        if kind == "API key":
            return [k.key_id for k in self._every(self.list_api_keys)]
        if kind == "enrollment token":
            return [t.token_id for t in self._every(self.list_enrollment_tokens)]
        try:
            return [e.expert_id for e in self._every(self.list_experts)]
        except MoergeError as exc:
            if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                raise
            return [e.expert_id for e in self.models().experts]

    @staticmethod
    def _every(list_page: Callable[..., Any]) -> list[Any]:
        """Every item of a paginated admin listing."""
        items: list[Any] = []
        token = ""
        while True:
            page = list_page(page_size=1000, page_token=token)
            items += page.items
            token = page.next_page_token
            if not token:
                return items


def unique_prefix(kind: str, prefix: str, ids: Iterable[str]) -> str:
    """The one id in ``ids`` that starts with ``prefix``, or ``INVALID_ARGUMENT`` saying why."""
    if not prefix:
        raise MoergeError.invalid(f"an empty {kind} id")
    matches = sorted({i for i in ids if i.startswith(prefix.lower())})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MoergeError(grpc.StatusCode.NOT_FOUND, f"no {kind} id starts with {prefix!r}")
    shown = ", ".join(m[:12] for m in matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise MoergeError.invalid(
        f"{kind} id prefix {prefix!r} is ambiguous: {len(matches)} match ({shown})"
    )


class AsyncClient(Calls):
    """The asyncio twin of :class:`Client`: the same methods, awaited.

    >>> async with moerge.AsyncClient("127.0.0.1:50051", token=admin_token) as client:
    ...     routing = await client.route(["the film was a delight"])

    The channel opens on the first call, inside the running event loop. ``upload``, ``train``
    and ``contribute`` run :class:`Client`'s in a worker thread.
    """

    _channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; the client may be closed twice."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _stub(self, service: str) -> Any:
        if self._channel is None:
            self._channel = self.target.aio_channel()
        return STUBS[service](self._channel)

    async def _unary(  # type: ignore[override]
        self, service: str, method: str, request: Any, convert: Callable[[Any], T]
    ) -> T:
        rpc = getattr(self._stub(service), method)
        try:
            response = await rpc(request, metadata=self.target.metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise MoergeError.from_rpc(exc, self.target.address) from None
        return convert(response)

    async def generate(
        self, prompt: str | None = None, **options: Any
    ) -> AsyncGenerator[GenerateEvent, None]:
        """:meth:`Client.generate`, as an async iterator (``async for event in ...``)."""
        options["experts"] = await self.resolve_ids("expert", options.get("experts", ()))
        async for event in self._stream(
            "Generate", generate_request(prompt, **options), generate_event
        ):
            yield event

    async def compose(
        self, name: str, examples: Iterable[tuple[str, str]], **options: Any
    ) -> AsyncGenerator[ComposeEvent, None]:
        """:meth:`Client.compose`, as an async iterator (``async for event in ...``)."""
        options["experts"] = await self.resolve_ids("expert", options.get("experts", ()))
        async for event in self._stream(
            "Compose", compose_request(name, examples, **options), compose_event
        ):
            yield event

    async def _stream(
        self, method: str, request: Any, convert: Callable[[Any], T]
    ) -> AsyncGenerator[T, None]:
        """:meth:`Client._stream`, awaited."""
        call = getattr(self._stub("inference"), method)(
            request, metadata=self.target.metadata(), timeout=self.timeout
        )
        try:
            async for response in call:
                yield convert(response)
        except grpc.RpcError as exc:
            raise MoergeError.from_rpc(exc, self.target.address) from None
        finally:
            call.cancel()

    def _blocking(self) -> Client:
        """A :class:`Client` with this client's target, for the work done in threads."""
        client = Client(timeout=self.timeout)
        client.target = self.target
        return client

    async def _resolving(  # type: ignore[override]
        self, kind: str, prefixes: list[str], call: Callable[[list[str]], Awaitable[T]]
    ) -> T:
        """:meth:`Client._resolving`: the list calls run on a worker thread, then ``call``."""
        return await call(await self.resolve_ids(kind, prefixes))

    async def resolve_id(self, kind: str, prefix: str) -> str:
        """:meth:`Client.resolve_id`, awaited (a complete id makes no call)."""
        return (await self.resolve_ids(kind, [prefix]))[0]

    async def resolve_ids(self, kind: str, prefixes: Iterable[str]) -> list[str]:
        """:meth:`Client.resolve_ids`, awaited; the listing runs in a worker thread."""
        given = list(prefixes)
        if all(FULL_IDS[kind].fullmatch(p) for p in given):
            return given
        with self._blocking() as client:
            return await asyncio.to_thread(client.resolve_ids, kind, given)

    async def resolve_expert_id(self, prefix: str) -> str:
        """The one expert id that starts with ``prefix`` (see :meth:`resolve_id`)."""
        return await self.resolve_id("expert", prefix)

    async def resolve_contributor_id(self, prefix: str) -> str:
        """The one contributor id that starts with ``prefix`` (see :meth:`resolve_id`)."""
        return await self.resolve_id("contributor", prefix)

    async def upload(
        self, expert_dir: str | Path, name: str | None = None, **kwargs: Any
    ) -> Upload:
        """:meth:`Client.upload` in a worker thread."""
        with self._blocking() as client:
            return await asyncio.to_thread(client.upload, expert_dir, name, **kwargs)

    async def train(self, data: str | Path, task_name: str, out: str | Path, **kwargs: Any) -> Any:
        """:meth:`Client.train` in a worker thread."""
        with self._blocking() as client:
            return await asyncio.to_thread(client.train, data, task_name, out, **kwargs)

    async def contribute(
        self, data: str | Path, task_name: str, **kwargs: Any
    ) -> tuple[Upload, Any]:
        """:meth:`Client.contribute` in a worker thread."""
        with self._blocking() as client:
            return await asyncio.to_thread(client.contribute, data, task_name, **kwargs)
