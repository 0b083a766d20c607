"""Immich's real OpenAPI spec, loaded once, and checks of requests and responses against it.

The stand-in Immich server (``tests/immich_server.py``) runs every request it receives and
every response it produces through this module, so a client that drifts from the real API
fails a test, and so does a stand-in that drifts from it.

The spec is Immich's file, not ours: it lives in ``<repo>/../shared/immich/`` or wherever
``$DARKROOM_IMMICH_SPEC`` points, and is never copied into the project. When it is absent,
:data:`SPEC_MISSING_REASON` says why, and only the checks are skipped.

The spec is OpenAPI 3.0, so schemas are checked with ``OAS30Validator`` (``nullable``,
formats ``uuid`` and ``date-time``), with ``#/components/...`` references resolved against
the whole document. Error messages imitate class-validator, which Immich 2.x answers with
(``"rating must not be greater than 5"``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from jsonschema import ValidationError
from openapi_schema_validator import OAS30ReadValidator, OAS30WriteValidator, oas30_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SPEC_ENV_VAR = "DARKROOM_IMMICH_SPEC"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC_PATH = REPO_ROOT.parent / "shared" / "immich" / "immich-openapi-specs.json"
SPEC_URI = "urn:immich-openapi-spec"
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
BINARY_TYPE = "application/octet-stream"
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
FIRST_ERROR_STATUS = 400
#: Placeholder a multipart file part is checked as (the spec types it as a binary string).
BINARY_PLACEHOLDER = "<binary>"
#: Lists longer than this are checked on an evenly spread sample of this many items.
DEFAULT_RESPONSE_SAMPLE = 16
_PARAM_PATTERN = re.compile(r"\{([^}/]+)\}")
_TYPE_WORDS = {
    "string": "a string",
    "number": "a number conforming to the specified constraints",
    "integer": "an integer number",
    "boolean": "a boolean value",
    "array": "an array",
    "object": "an object",
}
_FORMAT_WORDS = {"uuid": "a UUID", "date-time": "a valid ISO 8601 date string"}


def spec_path() -> Path:
    """Where the spec is read from: ``$DARKROOM_IMMICH_SPEC`` if set, else ``../shared``."""
    override = os.environ.get(SPEC_ENV_VAR)
    return Path(override) if override else DEFAULT_SPEC_PATH


def spec_missing_reason(path: Path) -> str | None:
    """Why the spec at ``path`` cannot be used, or None when it can."""
    if not path.is_file():
        return f"Immich OpenAPI spec not found at {path} (set ${SPEC_ENV_VAR} to its path)"
    return None


SPEC_PATH = spec_path()
#: None when the spec is present; otherwise the reason tests about spec checks skip with.
SPEC_MISSING_REASON = spec_missing_reason(SPEC_PATH)


@dataclass(frozen=True)
class SpecParameter:
    """One query or path parameter of an operation."""

    name: str
    required: bool
    schema_pointer: str
    schema_type: str | None


@dataclass(frozen=True)
class SpecOperation:
    """What the spec says about one operation (method + path template)."""

    operation_id: str
    method: str
    template: str
    permission: str | None
    authenticated: bool
    pointer: str
    body_required: bool = False
    body_types: tuple[str, ...] = ()
    query: tuple[SpecParameter, ...] = ()
    path: tuple[SpecParameter, ...] = ()
    responses: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        """A pattern matching concrete request paths of this template."""
        return template_regex(self.template)


def template_regex(template: str) -> re.Pattern[str]:
    """Compile ``/assets/{id}/edits`` into a pattern with one named group per parameter."""
    pattern = _PARAM_PATTERN.sub(lambda match: f"(?P<{match.group(1)}>[^/]+)", template)
    return re.compile(f"^{pattern}$")


def _escape_pointer(token: str) -> str:
    """Escape one JSON-pointer token (``/`` and ``~``)."""
    return token.replace("~", "~0").replace("/", "~1")


def _make_nullable_refs_explicit(node: Any) -> Any:
    """Rewrite ``{allOf|$ref..., nullable: true}`` so a null value validates.

    OpenAPI 3.0.3 says ``nullable`` admits null even next to ``allOf``; the validator only
    honours it beside ``type``. Immich's spec uses the ``allOf`` form (``stack``, ``license``).
    """
    if isinstance(node, list):
        return [_make_nullable_refs_explicit(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _make_nullable_refs_explicit(value) for key, value in node.items()}
    composite = any(key in node for key in ("$ref", "allOf", "anyOf", "oneOf"))
    if node.get("nullable") is True and composite and "type" not in node:
        inner = {key: value for key, value in node.items() if key != "nullable"}
        return {"anyOf": [inner, {"enum": [None]}]}
    return node


def _field_name(error: ValidationError, prefix: str) -> str:
    """The dotted field path an error is about (``edits.0.parameters``)."""
    parts = [str(part) for part in error.absolute_path]
    if prefix:
        parts.insert(0, prefix)
    return ".".join(parts) or "body"


def describe_error(error: ValidationError, prefix: str = "") -> str:
    """Word one schema error the way class-validator would, for an Immich-like 400."""
    name = _field_name(error, prefix)
    rule, value = error.validator, error.validator_value
    if rule == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "property"
        return f"{name + '.' if error.absolute_path or prefix else ''}{missing} is required"
    if rule == "maximum":
        return f"{name} must not be greater than {value}"
    if rule == "minimum":
        return f"{name} must not be less than {value}"
    if rule == "enum":
        return f"{name} must be one of the following values: {', '.join(map(str, value))}"
    if rule == "format":
        return f"{name} must be {_FORMAT_WORDS.get(value, f'in {value} format')}"
    if rule == "type":
        return f"{name} must be {_TYPE_WORDS.get(value, value)}"
    if rule == "minItems":
        return f"{name} must contain at least {value} elements"
    if rule == "pattern":
        return f"{name} must match {value} regular expression"
    if rule in ("anyOf", "oneOf"):
        return f"{name} does not match any allowed shape"
    return f"{name} {error.message}"


def sample_lists(instance: Any, limit: int | None) -> Any:
    """Copy ``instance`` with every list longer than ``limit`` cut to a spread-out sample.

    All items of a list come from the same serializer, so a sample that includes the first
    and last item finds drift at a fraction of the cost of 1000-item pages.
    """
    if isinstance(instance, dict):
        return {key: sample_lists(value, limit) for key, value in instance.items()}
    if isinstance(instance, list):
        items = instance
        if limit is not None and len(items) > limit > 1:
            step = (len(items) - 1) / (limit - 1)
            items = [items[round(index * step)] for index in range(limit)]
        return [sample_lists(item, limit) for item in items]
    return instance


class ImmichSpec:
    """The operations of Immich's OpenAPI document and validators for their schemas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = _make_nullable_refs_explicit(document)  # a rewritten copy
        self.version: str = document.get("info", {}).get("version", "unknown")
        resource = Resource.from_contents(self.document, default_specification=DRAFT4)
        self._registry: Registry = Registry().with_resource(SPEC_URI, resource)
        self._validators: dict[tuple[str, bool], Any] = {}
        self.operations: list[SpecOperation] = list(self._parse_operations())
        self._by_key = {(op.method, op.template): op for op in self.operations}
        self._by_specificity = sorted(self.operations, key=lambda op: op.template.count("{"))

    @classmethod
    def load(cls, path: Path = SPEC_PATH) -> ImmichSpec:
        """Read and index the spec file at ``path``."""
        return cls(json.loads(path.read_text(encoding="utf-8")))

    # ----------------------------------------------------------------- operations

    def _parse_operations(self) -> Iterator[SpecOperation]:
        """Yield one :class:`SpecOperation` per method of every path in the document."""
        for template, item in self.document.get("paths", {}).items():
            for method in HTTP_METHODS:
                if method in item:
                    yield self._parse_operation(template, method, item[method])

    def _parse_operation(self, template: str, method: str, raw: dict[str, Any]) -> SpecOperation:
        """Index one operation: parameters, body content types, declared responses."""
        pointer = f"#/paths/{_escape_pointer(template)}/{method}"
        body = raw.get("requestBody", {})
        params = [
            self._parameter(pointer, index, p) for index, p in enumerate(raw.get("parameters", []))
        ]
        kinds = [p.get("in") for p in raw.get("parameters", [])]
        return SpecOperation(
            operation_id=raw.get("operationId", f"{method} {template}"),
            method=method.upper(),
            template=template,
            permission=raw.get("x-immich-permission"),
            authenticated=bool(raw.get("security")),
            pointer=pointer,
            body_required=bool(body.get("required")),
            body_types=tuple(body.get("content", {})),
            query=tuple(p for p, kind in zip(params, kinds, strict=True) if kind == "query"),
            path=tuple(p for p, kind in zip(params, kinds, strict=True) if kind == "path"),
            responses={
                int(status): tuple((answer or {}).get("content", {}))
                for status, answer in raw.get("responses", {}).items()
                if status.isdigit()
            },
        )

    def _parameter(self, pointer: str, index: int, raw: dict[str, Any]) -> SpecParameter:
        """Index one parameter, resolving its schema's type for query-string coercion."""
        schema = raw.get("schema", {})
        if "$ref" in schema:
            schema = self.resolve(schema["$ref"])
        return SpecParameter(
            name=raw["name"],
            required=bool(raw.get("required")),
            schema_pointer=f"{pointer}/parameters/{index}/schema",
            schema_type=schema.get("type"),
        )

    def resolve(self, ref: str) -> dict[str, Any]:
        """Follow a local ``#/...`` reference inside the document."""
        node: Any = self.document
        for token in ref.removeprefix("#/").split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
        return node

    def operation(self, method: str, template: str) -> SpecOperation | None:
        """The operation declared for exactly this method and path template."""
        return self._by_key.get((method.upper(), template))

    def match(self, method: str, path: str) -> tuple[SpecOperation, dict[str, str]] | None:
        """The operation a concrete path (relative to ``/api``) belongs to, with its params.

        Literal templates win over parameterised ones (``/assets/metadata`` before
        ``/assets/{id}``), as in the real router.
        """
        for op in self._by_specificity:
            if op.method != method.upper():
                continue
            found = op.regex.match(path)
            if found:
                return op, found.groupdict()
        return None

    # ----------------------------------------------------------------- validation

    def _validator(self, pointer: str, *, response: bool) -> Any:
        """A cached validator for the schema at ``pointer`` (read side for responses)."""
        key = (pointer, response)
        if key not in self._validators:
            cls = OAS30ReadValidator if response else OAS30WriteValidator
            schema = {"$ref": f"{SPEC_URI}{pointer}"}
            self._validators[key] = cls(
                schema, registry=self._registry, format_checker=oas30_format_checker
            )
        return self._validators[key]

    def _errors(
        self, pointer: str, instance: Any, *, response: bool, prefix: str = ""
    ) -> list[str]:
        """Every schema error of ``instance`` against ``pointer``, worded for people."""
        validator = self._validator(pointer, response=response)
        found = sorted(validator.iter_errors(instance), key=lambda error: list(error.path))
        return list(dict.fromkeys(describe_error(error, prefix) for error in found))

    def check_path(self, op: SpecOperation, params: Mapping[str, str]) -> list[str]:
        """Errors in the path parameters (e.g. an ``id`` that is not a UUID)."""
        errors: list[str] = []
        for param in op.path:
            if param.name in params:
                errors += self._errors(
                    param.schema_pointer, params[param.name], response=False, prefix=param.name
                )
        return errors

    def check_query(
        self, op: SpecOperation, raw: Mapping[str, str]
    ) -> tuple[dict[str, Any], list[str]]:
        """Coerce query strings to their declared types and check them.

        Unknown parameters are ignored, as Immich's whitelisting validation pipe strips them.
        """
        values: dict[str, Any] = {}
        errors: list[str] = []
        for param in op.query:
            if param.name not in raw:
                if param.required:
                    errors.append(f"{param.name} is required")
                continue
            value = coerce_text(raw[param.name], param.schema_type)
            values[param.name] = value
            errors += self._errors(param.schema_pointer, value, response=False, prefix=param.name)
        return values, errors

    def check_body(self, op: SpecOperation, content_type: str, body: Any) -> list[str]:
        """Errors in a request body (JSON, or multipart fields already coerced)."""
        if body is None:
            return ["body is required"] if op.body_required else []
        if content_type not in op.body_types:
            return [f"content type {content_type} is not accepted here"]
        pointer = f"{op.pointer}/requestBody/content/{_escape_pointer(content_type)}/schema"
        return self._errors(pointer, body, response=False)

    def body_property_types(self, op: SpecOperation, content_type: str) -> dict[str, str | None]:
        """Property name → declared type of a body schema (to coerce multipart fields)."""
        schema = self.document["paths"][op.template][op.method.lower()]["requestBody"]
        schema = schema["content"][content_type]["schema"]
        if "$ref" in schema:
            schema = self.resolve(schema["$ref"])
        types: dict[str, str | None] = {}
        for name, prop in schema.get("properties", {}).items():
            target = self.resolve(prop["$ref"]) if "$ref" in prop else prop
            if "allOf" in target:
                target = self.resolve(target["allOf"][0]["$ref"])
            types[name] = target.get("type")
        return types

    def check_response(
        self,
        op: SpecOperation,
        status: int,
        content_type: str | None,
        body: Any,
        sample: int | None = DEFAULT_RESPONSE_SAMPLE,
    ) -> list[str]:
        """Errors in a response the stand-in produced (bugs in the stand-in, not the client)."""
        if status >= FIRST_ERROR_STATUS:
            return []
        if status not in op.responses:
            return [f"{op.operation_id}: status {status} is not declared in the spec"]
        declared = op.responses[status]
        if not declared:
            return [] if body in (None, b"") else [f"{op.operation_id}: {status} must have no body"]
        if JSON_TYPE not in declared:
            return [] if isinstance(body, bytes) else [f"{op.operation_id}: expected a binary body"]
        pointer = f"{op.pointer}/responses/{status}/content/{_escape_pointer(JSON_TYPE)}/schema"
        found = self._errors(pointer, sample_lists(body, sample), response=True)
        return [f"{op.operation_id} {status}: {message}" for message in found]


def coerce_text(text: str, schema_type: str | None) -> Any:
    """Turn a query-string or form value into the type the schema declares, when it parses.

    A value that does not parse stays a string, so the schema check reports it.
    """
    if schema_type == "boolean":
        return {"true": True, "false": False}.get(text, text)
    if schema_type in ("number", "integer"):
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() else number
    return text


@cache
def load_spec() -> ImmichSpec | None:
    """The spec at :data:`SPEC_PATH` (parsed once per session), or None when it is missing
    (see :data:`SPEC_MISSING_REASON`).
    """
    if SPEC_MISSING_REASON is not None:
        return None
    return ImmichSpec.load(SPEC_PATH)
