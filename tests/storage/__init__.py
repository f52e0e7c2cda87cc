"""Tests of moerge.storage: registry, blob store, migrations, tokens and validation."""
