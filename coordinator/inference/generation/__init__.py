"""Streamed, continuously batched, routed generation for causal-LM engines.

:mod:`.scheduler` (the loop), :mod:`.requests` (request states and events), :mod:`.kv_rows`
(the running batch's KV cache), :mod:`.batch_routing` (how the LoRA bank routes each row),
:mod:`.cuda_graphs` (captured decode steps), :mod:`.sampling`
(next-token choice), :mod:`.detokenizer` (ids to streamed text). See ``docs/inference.md``.
"""
