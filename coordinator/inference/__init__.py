"""Inference engine: base model, expert LoRA banks, routing and aggregation."""
