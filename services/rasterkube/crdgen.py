"""Generate the CustomResourceDefinitions from the typed models (one source of truth).

pydantic emits JSON Schema 2020-12 with ``$defs``/``$ref`` and ``anyOf`` for optionals;
Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no references, no
unions, ``exclusiveMinimum`` as a boolean. This module does that translation and wraps the
result in a CRD with printer columns, short names, the category and the status subresource.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from rasterkube.api import RESOURCE_MODELS, SHORT_NAMES, Status
from rasterkube.api.common import CEL
from rasterkube.constants import CATEGORY, GROUP, VERSION, Kind

GENERATED_HEADER = "# Generated from the rasterkube API models by `rasterkube crds`. Do not edit.\n"
PRESERVE = "x-kubernetes-preserve-unknown-fields"
# JSON Schema keys with no meaning (or no place) in a Kubernetes structural schema.
DROPPED_KEYS = {"title", "additionalProperties", "$defs"}
# Keys copied as they are.
KEPT_KEYS = {
    "type", "description", "enum", "default", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "pattern", "format", CEL, PRESERVE,
}  # fmt: skip

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent done."},
    {"name": "Output", "type": "string", "jsonPath": ".status.outputs.uri", "description": "Committed output."},
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.progress.message",
        "priority": 1,
        "description": "What the job is doing.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class SchemaError(ValueError):
    """A model cannot be expressed as a structural schema."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Inline ``$ref``/``allOf``/``anyOf[..., null]``; return the node and whether it was nullable."""
    nullable = False
    node = dict(node)
    while True:
        if "$ref" in node:
            target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
            # Sibling keys (the field's own description/default) win over the definition's.
            target.update(node)
            node = target
        elif "allOf" in node and len(node["allOf"]) == 1:
            inner = node.pop("allOf")[0]
            node = {**inner, **node}
        elif "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            nullable = True
            if len(options) != 1:
                raise SchemaError(f"unions are not structural: {options}")
            node = {**options[0], **node}
            if node.get("default", ...) is None:
                del node["default"]
        else:
            return node, nullable


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node, _ = _resolve(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in KEPT_KEYS:
            out[key] = value
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key in DROPPED_KEYS or key in {"properties", "items", "required"}:
            continue
        else:
            raise SchemaError(f"unsupported JSON Schema keyword {key!r} in {node}")

    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties", {})
        if props:
            required = set(node.get("required", []))
            out["properties"] = {}
            for name, sub in props.items():
                resolved, nullable = _resolve(sub, defs)
                child = to_structural(resolved, defs)
                # A non-nullable nested object with defaults inside: default it to {} so the
                # API server materialises the inner defaults (e.g. spec.resources.cpus).
                if (
                    name not in required
                    and not nullable
                    and child.get("type") == "object"
                    and "properties" in child
                    and "default" not in child
                ):
                    child["default"] = {}
                out["properties"][name] = child
            if required:
                out["required"] = sorted(required)
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = to_structural(node["additionalProperties"], defs)
        else:
            out[PRESERVE] = True
    if node.get("type") == "array":
        out["items"] = to_structural(node["items"], defs)
    if "type" not in out and not out.get(PRESERVE):
        raise SchemaError(f"schema node has no type: {node}")
    return out


def model_schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


def crd_for(kind: Kind) -> dict[str, Any]:
    resource = RESOURCE_MODELS[kind]
    spec_model = resource.model_fields["spec"].annotation
    spec_schema = model_schema(spec_model)
    status_schema = model_schema(Status)
    status_schema["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    status_schema["properties"]["conditions"]["items"]["required"] = ["type", "status", "reason"]
    status_schema.pop("default", None)
    description = (spec_model.__doc__ or kind.value).strip()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "rasterkube"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.value,
                "listKind": f"{kind.value}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": SHORT_NAMES[kind],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"{kind.value}: {description}",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "rasterkube.dev/v1alpha1"},
                                "kind": {"type": "string", "description": kind.value},
                                "metadata": {"type": "object"},
                                "spec": {**spec_schema, "description": description},
                                "status": {**status_schema, "description": "Observed state, written by the operator."},
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_filename(kind: Kind) -> str:
    return f"{GROUP}_{kind.plural}.yaml"


class _Yaml11SafeDumper(yaml.SafeDumper):
    """Quotes every string YAML 1.1 reads as a boolean.

    PyYAML only treats yes/no/true/false/on/off as booleans, but kubectl, Helm, Argo CD and
    Flux parse YAML 1.1 with go-yaml, where a bare ``y`` or ``n`` is a boolean too: the
    ``y`` property of a selector would arrive at the API server as ``true``.
    """


_Yaml11SafeDumper.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)


def render(kind: Kind) -> str:
    body = yaml.dump(crd_for(kind), Dumper=_Yaml11SafeDumper, sort_keys=False, width=120, allow_unicode=True)
    return GENERATED_HEADER + body


def write_crds(*directories: Path) -> list[Path]:
    """Write one YAML file per kind into every directory (crds/ and the chart's copy)."""
    written = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for kind in Kind:
            path = directory / crd_filename(kind)
            path.write_text(render(kind), encoding="utf-8")
            written.append(path)
    return written
