"""The API contract: answer models, documented request bodies and error answers, and the
HTTP status of an image problem."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REJECTED = "; null when the model's gate says the photo is not a cosmetic (model.gate)"


class ClassAnswer(BaseModel):
    """A single-label attribute's answer."""

    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(description="the top class" + REJECTED)
    score: float = Field(description="the top class's probability (kept when label is null)")
    top: list[tuple[str, float]] = Field(description="the top-k [class, score] pairs")


class TagsAnswer(BaseModel):
    """A multi-label (tags) attribute's answer."""

    model_config = ConfigDict(extra="forbid")
    labels: list[tuple[str, float]] | None = Field(
        description="[tag, score] pairs at or above the threshold, best first" + REJECTED
    )
    scores: dict[str, float] = Field(description="every tag's score")


class ShadeAnswer(BaseModel):
    """A shade's answer."""

    model_config = ConfigDict(extra="forbid")
    lab: tuple[float, float, float] | None = Field(description="CIELAB (D65)" + REJECTED)
    hex: str | None = Field(description="sRGB #rrggbb" + REJECTED)


class Result(BaseModel):
    """One image's answer, as ``beautytag predict`` prints it."""

    file: str
    attributes: dict[str, ClassAnswer | TagsAnswer | ShadeAnswer] | None = Field(
        description="per attribute: {label, score, top} | {labels, scores} | {lab, hex}; null "
        "when the image could not be used"
    )
    error: str | None = Field(description="why the image could not be used")


class Results(BaseModel):
    results: list[Result]


def status_for(problem: str) -> int:
    """The HTTP status for an image problem reported by :func:`load_image`."""
    if problem.startswith(("too many pixels", "absurd dimensions")):
        return 413
    if problem.startswith("not an image"):
        return 415
    return 422


def body_doc(max_files: int) -> dict[str, Any]:
    """The documented request body: 1 to ``max_files`` images as the repeatable multipart
    field ``file``, or one non-empty image as the raw body."""
    binary = {"type": "string", "format": "binary"}
    files = {"type": "array", "items": binary, "minItems": 1, "maxItems": max_files}
    return {
        "requestBody": {
            "required": True,
            "description": "Images as repeatable multipart field `file`, or one image as the body.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": files},
                        "required": ["file"],
                    }
                },
                "image/*": {"schema": binary | {"minLength": 1}},
                "application/octet-stream": {"schema": binary | {"minLength": 1}},
            },
        }
    }


def error_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "no file, a malformed form, or more images than one request may hold",
        401: "missing or wrong X-API-Key",
        413: "body too large, or an image with too many pixels",
        415: "not an image",
        422: "truncated or corrupt image, or an unknown attribute",
        501: "the engine has no torch model",
        503: "queue full (see Retry-After)",
        504: "timed out",
    }
    return {c: {"description": text[c]} for c in codes}
