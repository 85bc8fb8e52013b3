"""Config checking and parsing for the recipes.

A recipe declares its config as dataclasses (the schema documents every key and its default).
``check_config`` walks a parsed YAML + CLI config against it before anything is built:

* an unknown or misspelt key is an error naming it (with the closest known key);
* a value of the wrong type is an error naming the key, the expected and the given type;
* a ``_component_`` section is checked against the signature of the function it names, so a
  misspelt builder argument fails at once, not after the teacher has loaded.

Missing keys take the schema's defaults; the result is a ``DictConfig`` for ``instantiate``.
"""

import contextlib
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import typing
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.errors import ConfigError, UserError


class Component(dict):
    """Schema marker: a section with ``_component_`` (a dotted path) and its arguments."""


def component_field(default: Optional[Dict[str, Any]] = None, provided: Sequence[str] = ()) -> Any:
    """A schema field holding a component; ``provided`` names arguments the recipe passes."""
    metadata = {"provided": tuple(provided)}
    if default is None:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)


def bounded(
    default: Any = dataclasses.MISSING,
    low: Optional[float] = None,
    high: Optional[float] = None,
    high_open: bool = False,
) -> Any:
    """A schema field whose value (when not null) must lie in ``[low, high]`` (``high`` excluded
    if ``high_open``)."""
    metadata = {"low": low, "high": high, "high_open": high_open}
    return dataclasses.field(default=default, metadata=metadata)


def _check_bounds(value, metadata, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, high_open = metadata.get("low"), metadata.get("high"), metadata.get("high_open")
    if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
        upper = "" if high is None else (f" and below {high}" if high_open else f" and at most {high}")
        raise ConfigError(f"Config key {path!r} must be at least {low}{upper}, got {value}")


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_ok(value, annotation) -> bool:
    """Whether ``value`` (plain YAML data) fits ``annotation``; unknown types are not checked."""
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, str):
        return True
    if isinstance(value, dict) and "_component_" in value:
        return True  # built by instantiate; its own arguments are checked separately
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str or annotation is os.PathLike:
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, typing.Sequence, typing.List, typing.Tuple) or (
        isinstance(container, type) and issubclass(container, (list, tuple)) and container is not str
    ):
        if not isinstance(value, (list, tuple)):
            return False
        if args and len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            return all(_type_ok(v, args[0]) for v in value)
        return True
    if container in (dict, typing.Mapping, typing.Dict) or (
        isinstance(container, type) and issubclass(container, dict) and container is not Component
    ):
        if not isinstance(value, dict):
            return False
        return not args or all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    return True


# Values people try that deserve more than "must be one of".
_HINTS = {
    ("dtype", "fp16"): "fp16 is not offered: NoNorm students (MobileBERT) and long distillation "
    "runs overflow in fp16 (NaN); use dtype=bf16, which has fp32's range",
}


def _check_value(value, annotation, path: str) -> None:
    if not _type_ok(value, annotation):
        hint = _HINTS.get((path, value) if isinstance(value, str) else None)
        raise ConfigError(
            f"Config key {path!r} must be {_type_name(annotation)}, got {type(value).__name__} {value!r}"
            + (f": {hint}" if hint else "")
        )


def _locate(dotted: str, path: str) -> Callable:
    from torchtune.config._utils import _get_component_from_path

    try:
        return _get_component_from_path(dotted)
    except Exception as e:
        raise ConfigError(f"{path}._component_: cannot import {dotted!r}: {e}") from None


def check_component(node: Dict[str, Any], path: str, provided: Sequence[str] = ()) -> None:
    """Check a ``_component_`` section's arguments against the target's signature."""
    if not isinstance(node, dict) or "_component_" not in node:
        raise ConfigError(f"Config key {path!r} must be a section with a _component_ entry")
    target = _locate(node["_component_"], path)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key, value in node.items():
        if key == "_component_":
            continue
        if key not in params and not open_ended:
            raise ConfigError(
                f"Unknown config key '{path}.{key}': {node['_component_']} has no argument "
                f"{key!r}{_suggest(key, accepted)}. Its arguments: {accepted}"
            )
        if key in params:
            _check_value(value, hints.get(key, params[key].annotation), f"{path}.{key}")
        if isinstance(value, dict) and "_component_" in value:
            check_component(value, f"{path}.{key}")
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty and name not in node and name not in provided:
            raise ConfigError(f"Config section {path!r} is missing the required argument {name!r}")


def _check_dataclass(node: Dict[str, Any], schema, path: str) -> Dict[str, Any]:
    if not isinstance(node, dict):
        raise ConfigError(f"Config key {path or 'config'!r} must be a section, got {node!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    where = f" in section {path!r}" if path else ""
    for key in node:
        if key not in fields:
            raise ConfigError(f"Unknown config key {key!r}{where}{_suggest(key, fields)}")
    out: Dict[str, Any] = {}
    for name, f in fields.items():
        full = f"{path}.{name}" if path else name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name in node:
            value = node[name]
            # a component section that only sets arguments keeps the default component
            if (
                hints[name] is Component
                and isinstance(value, dict)
                and "_component_" not in value
                and isinstance(default, dict)
            ):
                value = {**default, **value}
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"Config is missing the required key {full!r}")
        out[name] = _check_field(value, hints[name], full, f.metadata.get("provided", ()))
        _check_bounds(out[name], f.metadata, full)
    return out


def _check_field(value, annotation, path: str, provided: Sequence[str] = ()):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    optional = origin is typing.Union and type(None) in args
    inner = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if value is None and optional:
        return None
    if inner is Component:
        check_component(value, path, provided)
        return value
    if dataclasses.is_dataclass(inner):
        return _check_dataclass(value, inner, path)
    if typing.get_origin(inner) in (list, List) and dataclasses.is_dataclass(typing.get_args(inner)[0]):
        if not isinstance(value, list):
            raise ConfigError(f"Config key {path!r} must be a list, got {value!r}")
        return [_check_dataclass(v, typing.get_args(inner)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    _check_value(value, annotation, path)
    if isinstance(value, dict) and "_component_" in value:
        check_component(value, path)
    return value


def override(cfg: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Set dotted keys (``data.batch_size``) in a plain config dict, as ``key=value`` on the
    command line does; returns ``cfg``."""
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def check_section(node: Mapping[str, Any], schema, path: str) -> Dict[str, Any]:
    """Validate one config section (a plain mapping) against the dataclass ``schema``; return it
    as a plain dict with defaults filled in. ``path`` names the section in messages."""
    return _check_dataclass(dict(node), schema, path)


def check_config(cfg: DictConfig, schema) -> DictConfig:
    """Validate ``cfg`` against the dataclass ``schema``; return it with defaults filled in."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"Could not resolve the config: {e}") from None
    return OmegaConf.create(_check_dataclass(plain, schema, ""))


def instantiate_target(node) -> Callable:
    """The function or class a config section's ``_component_`` names."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    return _locate(node["_component_"], str(node["_component_"]))


def accepts(node, argument: str) -> bool:
    """Whether the ``_component_`` of a config section takes ``argument``."""
    return argument in inspect.signature(instantiate_target(node)).parameters


def missing_arguments(node, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of ``values`` that the ``_component_`` of a config section takes and the
    section leaves out: what a recipe provides unless the config says otherwise (a student
    builder's ``vocab_size`` from the teacher, say; a loaded student brings its own)."""
    return {key: value for key, value in values.items() if accepts(node, key) and key not in node}


def instantiate(node, *args, **kwargs):
    """Call the ``_component_`` of a config section with its arguments, plus ``args`` and
    ``kwargs`` from the recipe (which take precedence). Values are plain Python objects, so
    recipes can pass models or specs that OmegaConf could not hold."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or "_component_" not in node:
        raise ConfigError(f"Cannot instantiate {node!r}: it has no _component_")
    target = _locate(node["_component_"], str(node["_component_"]))
    return target(*args, **{**{k: v for k, v in node.items() if k != "_component_"}, **kwargs})


@contextlib.contextmanager
def config_section(name: str) -> Iterator[None]:
    """Turn a builder's ValueError into a ConfigError naming the config section (errors that
    already say what is wrong, ``UserError``s, pass unchanged)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from e


def _flatten(node, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """Like ``torchtune.config.parse``: ``--config file.yaml key=value ...`` -> ``DictConfig``.

    Bad input (a missing or malformed config file, a malformed override, any
    ``UserError`` raised by the recipe) exits with status 2 (or the
    error's ``exit_code``) and one line naming what is wrong.
    """

    @functools.wraps(recipe_main)
    def wrapper() -> None:
        config_path = _config_path(sys.argv[1:])
        try:
            result = recipe_main(_load(config_path))
        except UserError as e:
            code = e.exit_code  # an interruption is not an error of the input
            prefix = "error: " if code == 2 else ""
            prefix += f"{config_path}: " if isinstance(e, ConfigError) and config_path else ""
            print(f"{prefix}{e}", file=sys.stderr)
            sys.exit(code)
        sys.exit(result)

    return wrapper


def _load(config_path: Optional[str]) -> DictConfig:
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    if config_path and not os.path.isfile(config_path):
        raise ConfigError(f"Config file not found: {config_path}")
    parser = TuneRecipeArgumentParser()
    try:
        yaml_args, cli_args = parser.parse_known_args()
        return _merge_yaml_and_cli_args(yaml_args, cli_args)
    except (ValueError, OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(str(e)) from None


def _config_path(argv: List[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
