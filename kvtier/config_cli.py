"""Command-line options generated from the config schema: one option per config key, so a flag and its
key never drift apart and no command copies settings by hand.

A process command (``kvtier server``, ``kvtier controller``, ``kvtier router``) is declared with
:func:`config_command` and the config keys it exposes; its body receives the effective
:class:`~kvtier.config.KvtierConfig` (defaults < ``--config`` file or ``$KVTIER_CONFIG`` < ``KVTIER_*``
environment < the options given on the command line).

Invariants:
- An option left out never overrides anything: every generated option defaults to "not given".
- The flag of key ``section.name`` is ``--name`` without a ``_s`` suffix, underscores as dashes
  (``controller.claim_ttl_s`` -> ``--claim-ttl``), unless :data:`FLAGS` names it otherwise; booleans get
  ``--name/--no-name``, list keys are repeatable, mapping keys are repeatable ``KEY=VALUE``.
- Values are validated by the schema, so a bad option fails exactly like a bad file value (one
  :class:`~kvtier.errors.ConfigError` naming the key), secrets masked.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Callable, Sequence
from typing import Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kvtier.config import KvtierConfig, fallback_note, is_secret, load_config, parse_bytes
from kvtier.errors import ConfigError

# Flags whose names are not derived from their key (kept as users and deploy/ manifests know them).
FLAGS: dict[str, tuple[str, ...]] = {
    "server.persist_path": ("--persist",),
    "controller.ttl_s": ("--heartbeat-ttl",),
    "controller.heartbeat_s": ("--heartbeat",),
    "controller.tokenizers": ("--tokenizer",),
    "router.backends": ("--backend", "--decode"),
    "router.controller_url": ("--controller",),
}


def flags_of(key: str) -> tuple[str, ...]:
    """The option names of config key ``key`` (dotted)."""
    name = key.rsplit(".", 1)[-1]
    return FLAGS.get(key) or ("--" + name.removesuffix("_s").replace("_", "-"),)


def _fields(keys: Sequence[str]) -> list[tuple[str, FieldInfo]]:
    """``(dotted key, field)`` for each entry of ``keys``: a section name stands for all its keys."""
    out: list[tuple[str, FieldInfo]] = []
    for key in keys:
        model: type[BaseModel] = KvtierConfig
        *sections, name = key.split(".")
        for section in sections:
            model = typing.cast(type[BaseModel], model.model_fields[section].annotation)
        field = model.model_fields[name]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [(f"{key}.{sub}", f) for sub, f in ann.model_fields.items()]
        else:
            out.append((key, field))
    return out


def _kind(field: FieldInfo) -> str:
    """How the option of ``field`` is given: bool, int, float, list, map or str."""
    ann = field.annotation
    origin = typing.get_origin(ann)
    if origin in (tuple, list):
        return "list"
    if origin is dict:
        return "map"
    if ann is bool:
        return "bool"
    if ann in (int, float) and not any(getattr(m, "func", None) is parse_bytes for m in field.metadata):
        return "int" if ann is int else "float"
    return "str"  # strings, sizes ("4GiB") and choices: the schema converts and checks them


_TYPES: dict[str, Any] = {"bool": bool | None, "int": int | None, "float": float | None, "str": str | None,
                          "list": list[str] | None, "map": list[str] | None}


def _option(key: str, field: FieldInfo) -> typer.models.OptionInfo:
    flags = flags_of(key)
    if _kind(field) == "bool":
        flags = tuple(f"{f}/--no-{f[2:]}" for f in flags)
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ()
    extra = f" One of: {', '.join(choices)}." if choices else ""
    extra += " Repeatable KEY=VALUE." if _kind(field) == "map" else " Repeatable." if _kind(field) == "list" else ""
    metavar = {"map": "KEY=VALUE", "list": "VALUE"}.get(_kind(field))
    text = f"{field.description or ''}{extra}{fallback_note(key).replace('`', '')} (config key {key})"
    return typer.Option(None, *flags, help=text,
                        show_default=False, metavar=metavar)


def _pairs(key: str, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            shown = "<redacted>" if is_secret(key.rsplit(".", 1)[-1]) else repr(item)
            raise ConfigError(f"{flags_of(key)[0]} (config key {key}) expects KEY=VALUE, got {shown}")
        out[name] = value
    return out


def _overrides_from(fields: list[tuple[str, FieldInfo]], values: dict[str, Any]) -> dict[str, Any]:
    """The nested override mapping of the options given (``values`` by parameter name)."""
    out: dict[str, Any] = {}
    for key, field in fields:
        value = values.get(_param(key))
        if value is None or (isinstance(value, list) and not value):
            continue
        node = out
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = _pairs(key, value) if _kind(field) == "map" else value
    return out


def _param(key: str) -> str:
    return key.replace(".", "__")


def config_command(app: typer.Typer, name: str, keys: Sequence[str], *, log_level: str = "info",
                   ) -> Callable[[Callable[[KvtierConfig], None]], Callable[[KvtierConfig], None]]:
    """Register ``kvtier NAME`` with one option per config key in ``keys`` (a section name stands for
    all its keys), ``--config`` and ``--log-level``; the decorated body gets the effective config. The
    body's docstring is the command's help."""
    fields = _fields(keys)

    def register(body: Callable[[KvtierConfig], None]) -> Callable[[KvtierConfig], None]:
        def command(**values: Any) -> None:
            logging.getLogger("kvtier").setLevel(str(values.pop("log_level")).upper())
            body(load_config(values.pop("config"), overrides=_overrides_from(fields, values)))

        params = [inspect.Parameter(_param(key), inspect.Parameter.KEYWORD_ONLY, default=_option(key, field),
                                    annotation=_TYPES[_kind(field)]) for key, field in fields]
        params += [
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                              default=typer.Option(None, "--config", "-c",
                                                   help="YAML config file (default: $KVTIER_CONFIG).")),
            inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                              default=typer.Option(log_level, help="Logging level: debug, info, warning, error.")),
        ]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = body.__doc__
        app.command(name)(command)
        return body

    return register
