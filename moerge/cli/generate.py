"""``moerge generate``: routed generation streamed to the terminal as the coordinator produces it.

The text goes to stdout as it arrives (so ``moerge generate ... > out.txt`` keeps only the
answer); who served the request and the token counts go to stderr. ``--json`` prints one JSON
object per stream event instead (JSON Lines), for scripts. Ctrl-C cancels the call, which frees
the request's place in the coordinator's batch at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated

import typer

from moerge.cli.options import Coordinator, TlsCa, Token

if TYPE_CHECKING:
    from moerge.results import ExpertWeight


def generate(
    prompt: Annotated[str | None, typer.Argument(help="the prompt (else stdin)")] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="send the prompt as a user message (chat template)")
    ] = False,
    system: Annotated[str, typer.Option(help="with --chat: a system message first")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="0: the coordinator's default")] = 0,
    temperature: Annotated[float | None, typer.Option(help="unset or 0: greedy")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling (unset: off)")] = None,
    top_k: Annotated[
        int, typer.Option("--sample-top-k", help="sample among k tokens (0: off)")
    ] = 0,
    seed: Annotated[int | None, typer.Option(help="fixes the sample")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="unset: off")] = None,
    experts: Annotated[int, typer.Option("--top-k", help="experts (0: router default)")] = 0,
    method: Annotated[str, typer.Option(help="routing method (default: active router)")] = "",
    aggregation: Annotated[
        str, typer.Option(help="default|ensemble|merge|ties|dare|mix")
    ] = "default",
    expert: Annotated[
        list[str] | None, typer.Option(help="restrict to these expert ids (unique prefixes ok)")
    ] = None,
    composition: Annotated[
        str, typer.Option(help="serve this few-shot composition (moerge compose) instead")
    ] = "",
    composition_version: Annotated[int, typer.Option(help="its version (0: newest)")] = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="one JSON object per stream event (JSON Lines)")
    ] = False,
) -> None:
    """Routed generation from a causal-LM coordinator, streamed as it is produced."""
    from moerge.cli.output import err_console
    from moerge.cli.rpc import client, guarded

    text = prompt if prompt is not None else sys.stdin.read()
    messages = None
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
    options = {
        "messages": messages,
        "max_new_tokens": max_new_tokens,
        "sample_top_k": top_k,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or (),
        "repetition_penalty": repetition_penalty,
        "top_k": experts,
        "method": method,
        "experts": expert or (),
        "aggregation": aggregation,
        "composition": composition,
        "composition_version": composition_version,
    }

    def stream() -> None:
        with client(coordinator, token, tls_ca) as moerge_client:
            events = moerge_client.generate(None if chat else text, **options)
            try:
                for event in events:
                    if json_out:
                        typer.echo(
                            json.dumps({type(event).__name__: event.to_dict()}, ensure_ascii=False)
                        )
                    else:
                        _show(event, err_console)
            except KeyboardInterrupt:
                events.close()  # cancels the call: the coordinator frees the request's rows
                err_console.print("\n[yellow]cancelled[/yellow]")
                raise typer.Exit(130) from None

    guarded(stream)


def _experts(weights: Iterable[ExpertWeight]) -> str:
    return ", ".join(f"{w.expert_name or w.expert_id[:8]}:{w.weight:.2f}" for w in weights)


def _show(event: object, err_console: object) -> None:
    from moerge.results import GenerateDelta, GenerateEnd, GenerateStart

    if isinstance(event, GenerateDelta):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif isinstance(event, GenerateStart):
        err_console.print(  # type: ignore[attr-defined]
            f"[dim]router v{event.router_version} {event.routing_method}, {event.aggregation}: "
            f"{_experts(event.experts) or 'per token'}[/dim]"
        )
    elif isinstance(event, GenerateEnd):
        sys.stdout.write("\n")
        err_console.print(  # type: ignore[attr-defined]
            f"[dim]{event.finish_reason}; {event.prompt_tokens} prompt + "
            f"{event.completion_tokens} generated tokens; first token "
            f"{event.time_to_first_token_ms:.0f} ms, total {event.latency_ms:.0f} ms; experts "
            f"{_experts(event.experts[:4])}[/dim]"
        )
