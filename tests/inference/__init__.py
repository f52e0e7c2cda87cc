"""Tests of the inference engine: LoRA bank, mixing, caching, batching, routed predictions."""
