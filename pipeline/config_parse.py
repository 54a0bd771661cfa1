"""How a configuration is read, whatever its dataclasses: YAML 1.2 scalars, typed
construction of a dataclass from a nested dict (every key and type checked, with a
:class:`ConfigError` naming the key and what is allowed), ``section.key=value`` overrides,
and dotted keys. The dataclasses themselves and what a run does with them live in
:mod:`pipeline.config`, which re-exports :func:`build`, :func:`parse_overrides` and
:func:`flatten`. Torch-free (imported for every command).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans and floats: only true/false are booleans, so `track.wandb=off`
    and `wandb: off` stay the string 'off' instead of silently becoming False; and `1e-3`, `2E5`
    are floats (YAML 1.2 core schema, section 10.3.2) where YAML 1.1 wants `1.0e-3`."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.1's float pattern needs a dot and a signed exponent; add the 1.2 forms it misses: an
# exponent after digits without a dot or with an unsigned exponent. Plain integers stay ints.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def yaml_load(text: str) -> Any:
    """``text`` parsed with YAML 1.2 booleans and floats (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (dotted keys, as in overrides); lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping with keys {_field_names(tp)}, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(repr(a) for a in allowed)}")
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, arm, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list ({_type_name(tp)})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        arg = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", arg, v) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a string")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} for {key}")


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


# Store settings that look harmless by name but belong to the environment, like credentials.
_STORE_SETTINGS = {"endpoint_url", "endpoint", "aws_access_key_id", "storage_options", "s3", "region_name"}


def _refuse_credential(key: str, name: str) -> None:
    """ConfigError for a key that looks like a credential or an object-store setting: the
    config is written to run.dir/config.yaml and to W&B, so they come from the environment."""
    from pipeline.track.secrets import is_secret_name  # stdlib only

    if is_secret_name(name) or name.lower() in _STORE_SETTINGS:
        raise ConfigError(
            f"config key '{key}' looks like a credential or an object-store setting; those are never read "
            "from the config (it is written to run.dir/config.yaml and W&B): set AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and, for S3-compatible stores (MinIO, Ceph), AWS_ENDPOINT_URL in the "
            "environment or in ~/.aws/credentials and ~/.aws/config (WANDB_API_KEY, HF_TOKEN likewise)"
        )


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a nested dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            _refuse_credential(key, k)
            raise ConfigError(f"unknown config key '{key}'; allowed keys here: {_field_names(cls)}")
        kwargs[k] = _coerce(key, hints[k], v)
    missing = [
        n
        for n, f in names.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"required config key(s) missing{where}: {', '.join(missing)}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
