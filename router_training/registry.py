"""The one place where routing methods are registered and looked up by name.

Every method module decorates its :class:`~moerge.router_training.base.Router` subclass with
:func:`register_router`; importing :mod:`moerge.router_training` imports every method module, so
``get_router_class("arrow")`` works after a plain ``import moerge.router_training``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from moerge.router_training.base import Router

RouterT = TypeVar("RouterT", bound="type[Router]")

_REGISTRY: dict[str, type[Router]] = {}


def register_router(cls: RouterT) -> RouterT:
    """Class decorator: make ``cls`` available under ``cls.method``.

    Raises ``ValueError`` if the class has no ``method`` name or the name is already taken by
    another class (re-registering the same class, e.g. on module reload, is allowed).
    """
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute 'method'")
    existing = _REGISTRY.get(name)
    if existing is not None and _path(existing) != _path(cls):
        raise ValueError(f"routing method '{name}' is already registered by {_path(existing)}")
    _REGISTRY[name] = cls
    return cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ensure_builtin_methods() -> None:
    # Importing the package registers every built-in method (see ``__init__.py``).
    import moerge.router_training  # noqa: F401


def get_router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; ``ValueError`` listing known methods if none."""
    _ensure_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_methods())
        raise ValueError(f"unknown routing method {name!r}; known methods: {known}") from None


def available_methods() -> list[str]:
    """Names of every registered routing method, sorted."""
    _ensure_builtin_methods()
    return sorted(_REGISTRY)
