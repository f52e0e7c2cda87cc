"""Alembic migrations for the moerge registry."""
