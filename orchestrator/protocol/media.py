"""The media parts of a request's messages, read the way vLLM's chat parser reads them.

vLLM loads whatever URL a media part names (a ``data:`` URL, or a download); the router
reads the same parts first (orchestrator/api/images.py checks them), so every part vLLM
would load is one the router has seen. A part is media by its ``type`` as vLLM's parser
knows it, or, without a ``type`` (or with a ``uuid``), by the first media key it holds, in
vLLM's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# vLLM's part types, by what they carry. Images come as URLs; the other media a model of
# this catalog cannot take (no capability names them), so the router refuses them.
_TYPES = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image objects",
    "image_embeds": "embedding inputs",
    "audio_embeds": "embedding inputs",
    "video_embeds": "embedding inputs",
    "prompt_embeds": "embedding inputs",
    "audio_url": "audio",
    "input_audio": "audio",
    "video_url": "video",
}
# The keys vLLM looks for in a part without a type, in its order.
_UNTYPED = ("image_url", "image_pil", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds")
_UNTYPED_LATE = ("audio_url", "input_audio", "video_url")


@dataclass(frozen=True)
class MediaPart:
    """One media part of a request.

    Attributes:
        kind: ``image``, or what else it is (``audio``, ``video``, ``embedding inputs``,
            ``image objects``), which no catalog model takes.
        url: the image's URL as the engine would load it (None if the part names none).
        param: where it is in the request, e.g. ``messages[0].content[1]``.
        uuid: the part carries vLLM's ``uuid`` (a reference to an earlier request's media).
    """

    kind: str
    url: str | None
    param: str
    uuid: bool = False


def _kind(part: dict[str, Any]) -> str | None:
    part_type = part.get("type")
    if isinstance(part_type, str) and part_type in _TYPES and part.get("uuid") is None:
        return part_type
    if part_type is None or part.get("uuid") is not None:
        return next((key for key in (*_UNTYPED, *_UNTYPED_LATE) if key in part), None)
    return None


def _url(part: dict[str, Any]) -> str | None:
    value = part.get("image_url")  # both image types keep it there: {"url": ...} or the URL itself
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def part_media(part: Any, param: str) -> MediaPart | None:
    """Returns the media ``part`` (a chat content part) holds, or None for text and others."""
    if not isinstance(part, dict):
        return None
    part_type = _kind(part)
    if part_type is None:
        return None
    kind = _TYPES[part_type]
    url = _url(part) if kind == "image" else None
    return MediaPart(kind, url, param, uuid=part.get("uuid") is not None)


def chat_media(messages: Iterable[dict[str, Any]]) -> Iterator[MediaPart]:
    """Yields the media parts of OpenAI chat ``messages`` (every role's content)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            media = part_media(part, f"messages[{i}].content[{j}]")
            if media is not None:
                yield media


def anthropic_image_url(source: Any) -> str | None:
    """The URL vLLM's Anthropic translation makes of an image block's ``source``: its
    ``url``, or a ``data:`` URL of its base64 ``data`` (the default kind)."""
    if not isinstance(source, dict):
        return None
    if source.get("type") == "url":
        url = source.get("url")
        return url if isinstance(url, str) else None
    data = source.get("data")
    if not isinstance(data, str):
        return None
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{data}"


def media_capabilities(parts: Iterable[MediaPart]) -> set[str]:
    """What the parts ask of a model: ``vision`` for images, the kind of anything else (a
    name no catalog capability has, so the capability check refuses it)."""
    return {"vision" if part.kind == "image" else part.kind for part in parts}
