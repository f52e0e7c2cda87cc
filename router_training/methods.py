"""The catalogue of routing methods: each router class registered and looked up by its name.

Every method module decorates its :class:`~moerge.router_training.base.Router` subclass with
:func:`register_router`. Python imports a package before any of its modules, and
``moerge.router_training``'s ``__init__`` imports every method module, so every built-in method
is registered before this module can be used: ``get_router_class("arrow")`` just works.

(Not to be confused with :mod:`moerge.storage.registry`, the SQL registry of experts, router
versions and the rest.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from moerge.router_training.base import Router

RouterT = TypeVar("RouterT", bound="type[Router]")

_METHODS: dict[str, type[Router]] = {}


def register_router(cls: RouterT) -> RouterT:
    """Class decorator: make ``cls`` available under ``cls.method``.

    Raises ``ValueError`` if the class has no ``method`` name or the name is already taken by
    another class (re-registering the same class, e.g. on module reload, is allowed).
    """
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute 'method'")
    existing = _METHODS.get(name)
    if existing is not None and _path(existing) != _path(cls):
        raise ValueError(f"routing method '{name}' is already registered by {_path(existing)}")
    _METHODS[name] = cls
    return cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; ``ValueError`` listing known methods if none."""
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(available_methods())
        raise ValueError(f"unknown routing method {name!r}; known methods: {known}") from None


def available_methods() -> list[str]:
    """Names of every registered routing method, sorted."""
    return sorted(_METHODS)
