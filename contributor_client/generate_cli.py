"""``moerge generate``: routed generation streamed to the terminal as the coordinator produces it.

The text goes to stdout as it arrives (so ``moerge generate ... > out.txt`` keeps only the
answer); who served the request and the token counts go to stderr. ``--json`` prints one JSON
object per stream event instead (JSON Lines), for scripts. Ctrl-C cancels the call, which frees
the request's place in the coordinator's batch at once.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moerge.contributor_client.connection import Target
from moerge.contributor_client.options import Coordinator, Json, TlsCa, Token


def generate(
    prompt: Annotated[str | None, typer.Argument(help="the prompt (else stdin)")] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="send the prompt as a user message (chat template)")
    ] = False,
    system: Annotated[str, typer.Option(help="with --chat: a system message first")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="0: the coordinator's default")] = 0,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling (1: off)")] = 1.0,
    top_k: Annotated[int, typer.Option("--sample-top-k", help="sample among k tokens (0: off)")]
    = 0,
    seed: Annotated[int | None, typer.Option(help="fixes the sample")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="1: off")] = 1.0,
    experts: Annotated[int, typer.Option("--top-k", help="experts (0: router default)")] = 0,
    method: Annotated[str, typer.Option(help="routing method (default: active router)")] = "",
    aggregation: Annotated[
        str, typer.Option(help="default|ensemble|merge|ties|dare|mix")
    ] = "default",
    expert: Annotated[list[str] | None, typer.Option(help="restrict to these expert ids")] = None,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Routed generation from a causal-LM coordinator, streamed as it is produced."""
    from google.protobuf.json_format import MessageToDict

    from moerge.contributor_client.cli import AGGREGATIONS
    from moerge.contributor_client.output import err_console
    from moerge.contributor_client.rpc import STUBS, guarded
    from moerge.v1 import inference_pb2

    if aggregation not in AGGREGATIONS:
        raise typer.BadParameter(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
    text = prompt if prompt is not None else sys.stdin.read()
    sampling = inference_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop=stop or [], repetition_penalty=repetition_penalty,
    )
    if seed is not None:
        sampling.seed = seed
    request = inference_pb2.GenerateRequest(
        sampling=sampling, top_k=experts, routing_method=method, expert_ids=expert or [],
        aggregation=AGGREGATIONS[aggregation],
    )
    if chat:
        if system:
            request.messages.add(role="system", content=system)
        request.messages.add(role="user", content=text)
    else:
        request.prompt = text
    target = Target.resolve(coordinator, token, tls_ca)

    def stream() -> None:
        with target.channel() as channel:
            call = STUBS["inference"](channel).Generate(request, metadata=target.metadata())
            try:
                for message in call:
                    if json_out:
                        typer.echo(_json_line(MessageToDict(message)))
                        continue
                    _show(message, err_console)
            except KeyboardInterrupt:
                call.cancel()
                err_console.print("\n[yellow]cancelled[/yellow]")
                raise typer.Exit(130) from None

    guarded(stream)


def _json_line(event: dict[str, object]) -> str:
    import json

    return json.dumps(event, ensure_ascii=False)


def _show(message: object, err_console: object) -> None:
    event = message.WhichOneof("event")  # type: ignore[attr-defined]
    if event == "delta":
        sys.stdout.write(message.delta.text)  # type: ignore[attr-defined]
        sys.stdout.flush()
    elif event == "start":
        start = message.start  # type: ignore[attr-defined]
        experts = ", ".join(f"{e.expert_name or e.expert_id[:8]}:{e.weight:.2f}"
                            for e in start.experts) or "per token"
        err_console.print(  # type: ignore[attr-defined]
            f"[dim]router v{start.router_version} {start.routing_method}, {start.aggregation}: "
            f"{experts}[/dim]"
        )
    elif event == "end":
        end = message.end  # type: ignore[attr-defined]
        sys.stdout.write("\n")
        used = ", ".join(f"{e.expert_name or e.expert_id[:8]}:{e.weight:.2f}"
                         for e in end.experts[:4])
        err_console.print(  # type: ignore[attr-defined]
            f"[dim]{end.finish_reason}; {end.prompt_tokens} prompt + {end.completion_tokens} "
            f"generated tokens; first token {end.time_to_first_token_ms:.0f} ms, "
            f"total {end.latency_ms:.0f} ms; experts {used}[/dim]"
        )
