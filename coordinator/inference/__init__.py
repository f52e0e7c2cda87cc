"""Inference: the engine (base model, LoRA bank of experts, routing, aggregation, continuous
batching of generation in :mod:`.generation`) and the registry-aware services in front of it
(:mod:`.service` for Predict/Route, :mod:`.generation_service` for Generate,
:mod:`.composition_objective` for few-shot compositions)."""
