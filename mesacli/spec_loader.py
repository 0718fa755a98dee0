"""Strict YAML loading of frozen-dataclass specs, for any schema (synthetic tasks, language models).

``build_spec(cls, data, overrides, check)`` turns parsed YAML into a frozen dataclass ``cls``: an unknown key is
an error with a did-you-mean hint, a value of the wrong type is an error, ``--set section.key=value`` overrides
are parsed as YAML and applied first, and ``check`` rejects impossible combinations.  The YAML is read strictly
too: a key given twice in one mapping, a recursive alias, a NaN and an empty spec file are errors.  ``choice``,
``positive``, ``non_negative`` and ``adam_betas`` are the one-line validators the schemas share;
``spec_to_dict``/``spec_to_yaml``/``spec_diff`` go the other way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mesacli.errors import MesaError

# ----------------------------------------------------------------------------- YAML -> dataclass


MAX_VALUES = 100_000  # values of a parsed document, aliases expanded (a spec has about a hundred)


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (YAML says keys are unique; PyYAML would keep the last silently)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (no dot) as a float, as people write it, and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:  # before the merge keys (<<: *defaults) are flattened in
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first_line:
                    raise _DuplicateKey(None, None, f"duplicate key '{key}' (first given on line "
                                                    f"{first_line[key] + 1})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, _DuplicateKey):
            raise MesaError(f"{source}: {problem}, again on line {mark.line + 1}") from None
        raise MesaError(f"{source}: YAML syntax error{where}: {problem}") from None
    _check_acyclic_and_small(data, source)
    return data


def _check_acyclic_and_small(data: Any, source: str) -> None:
    """Refuse a recursive alias (``a: &x [*x]``: a list that contains itself) and documents whose aliases expand
    to more than MAX_VALUES values, before anything walks them."""
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    count = 0
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in on_path:
            raise MesaError(f"{source}: a YAML alias is used inside its own anchor's value (e.g. `a: &x [*x]`), "
                            f"which makes an endless value")
        children = list(node.values()) if isinstance(node, dict) else node
        count += len(children)
        if count > MAX_VALUES:
            raise MesaError(f"{source}: more than {MAX_VALUES:,} values once its aliases are expanded; "
                            f"this is not a spec")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except MesaError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise MesaError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MesaError(f"{path}: expected a number, got {value!r}")
        if math.isnan(value):
            raise MesaError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MesaError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MesaError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MesaError(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f"unsupported spec field type {_type_name(tp)}")  # a bug in this module


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    where = f"{path}: " if path else ""
    if not isinstance(data, dict):
        raise MesaError(f"{where}expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{(path + '.') if path else ''}{close[0]}'?)" if close else ""
            raise MesaError(f"unknown spec key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise MesaError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.layers=4")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    value = parse_yaml(raw, f"--set {dotted}") if raw.strip() else None
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MesaError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def build_spec(cls: type, data: Any, overrides: typing.Sequence[str], check: typing.Callable[[Any], None]) -> Any:
    """A spec of dataclass ``cls`` from parsed YAML: apply the ``--set`` overrides, build strictly, ``check``."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise MesaError(f"a spec must be a mapping of sections, got {type(data).__name__}")
    data = _deepcopy(data)
    for assignment in overrides:
        _apply_override(data, assignment)
    spec = _build(cls, data, "")
    check(spec)
    return spec


EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"  # the shipped specs (package data)


def find_spec_file(name_or_path: str | Path) -> Path:
    """A spec file as given, or the shipped spec of that name (``softmax7_full`` -> experiments/softmax7_full.yaml).
    A bare name that is neither is a MesaError with a did-you-mean hint; a missing path is left to read_spec_file."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) != 1:
        return path
    shipped = EXPERIMENTS_DIR / f"{path.name}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(path.name, sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise MesaError(f"spec not found: {name_or_path} is neither a file nor a shipped spec{hint}; "
                    f"`mesacli specs` lists the shipped ones")


def list_spec_files(directory: str | Path | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """The *.yaml files of ``directory`` (default: the shipped experiments/) with each one's first comment line."""
    directory = Path(directory) if directory is not None else EXPERIMENTS_DIR
    if not directory.is_dir():
        raise MesaError(f"{directory} is not a directory")
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise MesaError(f"no *.yaml spec in {directory}")
    described = []
    for path in files:
        lines = path.read_text().splitlines()
        described.append((path, next((line[1:].strip() for line in lines if line.startswith("#")), "")))
    return directory, described


def read_spec_file(path: str | Path) -> Any:
    """The parsed YAML of a spec file (MesaError if it is missing, a directory, unreadable, empty or not YAML)."""
    path = Path(path)
    if path.is_dir():
        raise MesaError(f"{path} is a directory, not a spec file (`mesacli specs {path}` lists the specs in it)")
    if not path.exists():
        raise MesaError(f"spec file not found: {path}")
    if not path.is_file():
        raise MesaError(f"{path} is not a regular file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise MesaError(f"cannot read spec file {path}: {err}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise MesaError(f"spec file {path} is empty" + (" (only comments)" if text.strip() else ""))
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def spec_to_dict(spec: Any) -> dict:
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(spec))


def spec_to_yaml(spec: Any) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


def spec_diff(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two specs."""
    da, db = spec_to_dict(a), spec_to_dict(b)
    out = []
    for section in da:
        if isinstance(da[section], dict):
            for key in da[section]:
                if da[section][key] != db[section][key]:
                    out.append(f"{section}.{key}: {da[section][key]!r} -> {db[section][key]!r}")
        elif da[section] != db[section]:
            out.append(f"{section}: {da[section]!r} -> {db[section]!r}")
    return out


# ----------------------------------------------------------------------------- validators shared by the schemas


def choice(value: str, allowed: typing.Sequence[str], path: str) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MesaError(f"{path}: '{value}' is not one of {', '.join(allowed)}{hint}")


def positive(value: float, path: str) -> None:
    if not 0 < value < math.inf:
        raise MesaError(f"{path}: must be positive" + (" and finite" if value == math.inf else "") + f", got {value}")


def non_negative(value: float, path: str) -> None:
    if not 0 <= value < math.inf:
        raise MesaError(f"{path}: must be >= 0" + (" and finite" if value == math.inf else "") + f", got {value}")


def adam_betas(b1: float, b2: float, eps: float, section: str = "train") -> None:
    """Adam's decay rates lie in [0, 1) (1 would never forget the first gradient); eps >= 0."""
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise MesaError(f"{section}.{name}: Adam's decay rate must lie in [0, 1), got {value}")
    non_negative(eps, f"{section}.eps")
