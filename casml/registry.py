"""The class registry: stored class names back to classes, without running stored code.

A Persistable subclass registers itself when its class statement runs. The index and the
manifests store the registered name (and the defining module), never the class. Loading an
unregistered name imports its recorded module, which must be installed: a module name is
only ever passed to ``importlib.import_module``; nothing from the store is executed.

This registry is casml's one piece of process-wide mutable state, by design: a class
statement has no Store to register with.
"""

from __future__ import annotations

import importlib
import re

from casml.errors import RegistrationError, UnregisteredClassError

__all__ = ["default_name", "lookup", "register", "registered_classes"]

_classes: dict[str, type] = {}

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][\w.:<>-]*$")


def default_name(cls: type) -> str:
    """The name a class registers under unless it chooses one: ``"module:QualName"``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register(cls: type, name: str | None = None) -> str:
    """Register ``cls`` under ``name`` (default ``module:QualName``) and return the name.

    Re-running the same class statement (a notebook cell, ``importlib.reload``) replaces the
    old class; a *different* class claiming a taken name raises RegistrationError.
    """
    name = default_name(cls) if name is None else name
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 255:
        raise RegistrationError(
            f"invalid registered name {name!r} for {default_name(cls)}: use letters, digits "
            "and . : _ - (at most 255 characters), e.g. name='myproject.Scaler'"
        )
    existing = _classes.get(name)
    if existing is not None and existing is not cls:
        same_statement = (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if not same_statement:
            raise RegistrationError(
                f"registered name {name!r} is already taken by {default_name(existing)}; "
                f"{default_name(cls)} must choose another: class X(Persistable, name='...')"
            )
    _classes[name] = cls
    return name


def lookup(name: str, module: str | None = None) -> type:
    """Return the class registered as ``name``, importing ``module`` first if needed.

    ``module`` defaults to the part of a default name before the colon. Raises
    UnregisteredClassError naming the class and the module when neither works.
    """
    cls = _classes.get(name)
    if cls is not None:
        return cls
    if module is None and ":" in name:
        module = name.partition(":")[0]
    hint = (
        "define the class in an importable module (not __main__ or a notebook) and make "
        "sure that module is installed, or import it before loading"
    )
    if not module or not _MODULE.match(module):
        raise UnregisteredClassError(f"class {name!r} is not registered in this process; {hint}")
    if module != "__main__":
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UnregisteredClassError(
                f"class {name!r} is not registered and importing its module {module!r} failed "
                f"({exc}); {hint}"
            ) from None
    cls = _classes.get(name)
    if cls is None:
        raise UnregisteredClassError(
            f"class {name!r} is not registered, even after importing its module {module!r}; {hint}"
        )
    return cls


def registered_classes() -> dict[str, type]:
    """A snapshot of every registered name and its class."""
    return dict(_classes)
