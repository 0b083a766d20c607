"""The client's models parse what Immich 2.7.5 (from its spec) and 3.x actually send."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from immich_client.models import (
    Album,
    ApiKeyInfo,
    Asset,
    AssetEdits,
    AssetSummary,
    BulkIdResult,
    MetadataItem,
    SearchPage,
    ServerVersion,
    Tag,
    TagAssetsResult,
    UploadResult,
    User,
)
from tests.immich_spec import SPEC_MISSING_REASON, SPEC_PATH

# Which spec schema each model reads.
MODEL_SCHEMAS: dict[type[BaseModel], str] = {
    Asset: "AssetResponseDto",
    AssetSummary: "AssetResponseDto",
    SearchPage: "SearchAssetResponseDto",
    ApiKeyInfo: "APIKeyResponseDto",
    User: "UserAdminResponseDto",
    ServerVersion: "ServerVersionResponseDto",
    AssetEdits: "AssetEditsResponseDto",
    MetadataItem: "AssetMetadataResponseDto",
    Tag: "TagResponseDto",
    Album: "AlbumResponseDto",
    BulkIdResult: "BulkIdResponseDto",
    UploadResult: "AssetMediaResponseDto",
    TagAssetsResult: "TagBulkAssetsResponseDto",
}
SAMPLE_STRINGS = {
    "uuid": "6f1c2b9e-8d1a-4c3b-9e2f-1a2b3c4d5e6f",
    "date-time": "2026-11-02T10:20:30.123Z",
}
MAX_DEPTH = 3  # nested objects beyond this are left out when optional


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if SPEC_MISSING_REASON:
        pytest.skip(SPEC_MISSING_REASON)
    return json.loads(SPEC_PATH.read_text(encoding="utf-8"))


def example(spec: dict[str, Any], schema: dict[str, Any], *, full: bool, depth: int = 0) -> Any:
    """An instance of ``schema``: every property when ``full``, else the required ones."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return example(spec, spec["components"]["schemas"][name], full=full, depth=depth)
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in schema:
            return example(spec, schema[combinator][0], full=full, depth=depth)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        required = set(schema.get("required", []))
        properties = schema.get("properties", {})
        return {
            name: example(spec, prop, full=full, depth=depth + 1)
            for name, prop in properties.items()
            if name in required or (full and depth < MAX_DEPTH)
        }
    if kind == "array":
        if depth >= MAX_DEPTH:
            return []
        return [example(spec, schema["items"], full=full, depth=depth + 1)]
    if kind in ("number", "integer"):
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return True
    return SAMPLE_STRINGS.get(schema.get("format", ""), "text")


@pytest.mark.parametrize("full", [False, True], ids=["required-only", "every-field"])
@pytest.mark.parametrize("model", list(MODEL_SCHEMAS), ids=lambda m: m.__name__)
def test_models_parse_spec_shapes(spec: dict[str, Any], model: type[BaseModel], full: bool) -> None:
    schema = spec["components"]["schemas"][MODEL_SCHEMAS[model]]
    payload = example(spec, schema, full=full)
    parsed = model.model_validate(payload)
    assert parsed is not None


def test_asset_reads_description_and_rating_from_exif(spec: dict[str, Any]) -> None:
    payload = example(spec, spec["components"]["schemas"]["AssetResponseDto"], full=True)
    payload["exifInfo"] = {"description": "a cat", "rating": 4, "orientation": "6"}
    asset = Asset.model_validate(payload)
    assert (asset.description, asset.rating) == ("a cat", 4)
    payload.pop("exifInfo")
    asset = Asset.model_validate(payload)
    assert (asset.description, asset.rating) == (None, None)


def test_v3_search_page_with_cursor_and_new_fields(spec: dict[str, Any]) -> None:
    page = example(spec, spec["components"]["schemas"]["SearchAssetResponseDto"], full=True)
    page["nextCursor"] = "opaque-cursor"
    page["nextPage"] = None
    # Immich 3 changed `duration` to a number and added fields: both must be tolerated.
    page["items"][0]["duration"] = None
    page["items"][0]["somethingNewInV4"] = {"x": 1}
    parsed = SearchPage.model_validate(page)
    assert parsed.next_cursor == "opaque-cursor"
    assert parsed.next_page is None
    assert len(parsed.items) == 1
