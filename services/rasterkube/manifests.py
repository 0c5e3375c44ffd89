"""Reading and validating manifests, with one clear message per problem (no tracebacks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rasterkube.api import RESOURCE_MODELS, Resource
from rasterkube.constants import API_VERSION, Kind
from rasterkube.errors import UserError

KIND_NAMES = ", ".join(k.value for k in Kind)


class ManifestError(UserError):
    """One or more problems in the manifests; each line names a field and the fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Loaded:
    """A validated resource and where it came from (for messages)."""

    resource: Resource[Any]
    origin: str

    @property
    def key(self) -> tuple[Kind, str, str]:
        return Kind(self.resource.kind), self.resource.namespace, self.resource.name

    @property
    def label(self) -> str:
        return f"{self.resource.kind}/{self.resource.name}"


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-after", "function-before", "function-wrap")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown field: remove it or fix its spelling (see `kubectl explain` or docs/api.md)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("enum", "literal_error"):
        return f"{value!r} is not allowed: {msg[0].lower()}{msg[1:]}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind in ("int_parsing", "float_parsing", "bool_parsing", "string_type", "int_type", "float_type",
                "bool_type", "list_type", "dict_type", "model_type", "int_from_float"):  # fmt: skip
        return f"{msg[0].lower()}{msg[1:]} (got {value!r})"
    return f"{msg[0].lower()}{msg[1:]}"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = _loc(err["loc"])
        where = f"{prefix}.{path}" if prefix and path else (path or prefix or "manifest")
        lines.append(f"{where}: {_message(err)}")
    return "\n".join(dict.fromkeys(lines))


def validate(doc: Any, origin: str) -> Loaded:
    if not isinstance(doc, dict):
        raise ManifestError([f"{origin}: a manifest must be a mapping with apiVersion, kind, metadata, spec"])
    kind = doc.get("kind")
    if kind not in {k.value for k in Kind}:
        raise ManifestError([f"{origin}: kind: {kind!r} is not a rasterkube kind; use one of {KIND_NAMES}"])
    if doc.get("apiVersion") != API_VERSION:
        raise ManifestError([f"{origin}: apiVersion: {doc.get('apiVersion')!r} must be {API_VERSION}"])
    label = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
    try:
        resource = RESOURCE_MODELS[Kind(kind)].model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(
            [f"{origin}: {label}: {line}" for line in format_validation_error(exc).splitlines()]
        ) from None
    return Loaded(resource, origin)


def load_documents(path: str | Path) -> list[tuple[Any, str]]:
    """(document, origin) for every non-empty YAML document of a file ('-' is stdin)."""
    import sys

    name = str(path)
    try:
        text = sys.stdin.read() if name == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"{name}: no such file"]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{name}: cannot read it ({exc.__class__.__name__})"]) from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([f"{name}: not valid YAML{where}: {problem}"]) from None
    out = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend((item, f"{name}#{i + 1}.items[{j}]") for j, item in enumerate(doc["items"]))
        else:
            out.append((doc, f"{name}#{i + 1}" if len(docs) > 1 else name))
    return out


def load(paths: Sequence[str | Path]) -> list[Loaded]:
    """Validate every document of every file; collect all problems before failing."""
    problems: list[str] = []
    loaded: list[Loaded] = []
    seen: dict[tuple[Kind, str, str], str] = {}
    for path in paths:
        try:
            docs = load_documents(path)
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        for doc, origin in docs:
            try:
                item = validate(doc, origin)
            except ManifestError as exc:
                problems.extend(exc.problems)
                continue
            if item.key in seen:
                problems.append(f"{origin}: {item.label} is also defined in {seen[item.key]}; names must be unique")
                continue
            seen[item.key] = origin
            loaded.append(item)
    if problems:
        raise ManifestError(problems)
    if not loaded:
        raise ManifestError([f"{', '.join(map(str, paths))}: no rasterkube resources found"])
    return loaded
