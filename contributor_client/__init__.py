"""Contributor node: local data -> LoRA expert + statistics -> upload; and the CLI."""
