"""The router's checks of a request's images, before anything is reserved or forwarded.

A vision model's catalog entry bounds its images (``images``: count per request, decoded
size each) and names the hosts remote image URLs may point at (none by default). Every
image is checked here, in whichever dialect it came: a ``data:`` URL must be base64 of an
image within the size bound; an ``http``/``https`` URL must name an allowed host (the
router connects nowhere: the engine fetches it, and is itself told the same hosts,
orchestrator/engine/vllm_engine.py); any other scheme (``file:`` among them) is refused.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
from base64 import b64decode
from collections.abc import Sequence
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from orchestrator.catalog import ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol.media import MediaPart

# RFC 2397 as vLLM reads it: a media type, optional parameters, then `;base64,` and the data.
_DATA_URL = re.compile(r"^(?i:data):(?P<type>[^;,]*)(?:;[^;,]*)*;base64,(?P<data>.*)$", re.DOTALL)
# What a URL's authority may hold: a host name or IPv4 address, and a port. No user info
# (`user@host`), backslashes or spaces, which URL parsers read differently.
_AUTHORITY = re.compile(r"^(?P<host>[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


def check_images(parts: Sequence[MediaPart], spec: ModelSpec) -> None:
    """Checks the image parts of a request to ``spec`` (its other media parts are refused
    earlier, by the capability check).

    Raises:
        OrchestratorError: ``image_limit_exceeded`` (too many images, or one too large),
        ``image_url_not_allowed`` (a remote host the entry does not list, or a scheme other
        than ``data``, ``http`` and ``https``), ``invalid_image`` (no URL, a malformed
        ``data:`` URL, or data that is not an image); all 400, naming the part.
    """
    images = [part for part in parts if part.kind == "image"]
    bounds = spec.images
    if len(images) > bounds.max_per_request:
        raise OrchestratorError(
            ErrorCode.IMAGE_LIMIT_EXCEEDED,
            f"Model {spec.name} takes at most {bounds.max_per_request} images per request; this one has {len(images)}.",
            param=images[bounds.max_per_request].param,
        )
    for part in images:
        _check_image(part, spec)


def _check_image(part: MediaPart, spec: ModelSpec) -> None:
    if part.uuid:
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, "Media parts may not carry a `uuid`: send the image itself.", param=part.param
        )
    if not part.url:
        raise OrchestratorError(ErrorCode.INVALID_IMAGE, "An image part needs an image URL.", param=part.param)
    scheme = part.url.split(":", 1)[0].lower() if ":" in part.url else ""
    if scheme == "data":
        _check_data_url(part, spec.images.max_bytes)
    elif scheme in ("http", "https"):
        _check_remote_url(part, spec)
    else:
        raise OrchestratorError(
            ErrorCode.IMAGE_URL_NOT_ALLOWED,
            "An image URL must be a `data:` URL (base64), or an http(s) URL on a host the model allows.",
            param=part.param,
        )


def _check_remote_url(part: MediaPart, spec: ModelSpec) -> None:
    assert part.url is not None
    allowed = spec.images.allowed_domains
    if any(ch.isspace() or not ch.isprintable() for ch in part.url):
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, "The image URL holds spaces or control characters.", param=part.param
        )
    try:
        authority = urlsplit(part.url).netloc
    except ValueError:
        authority = ""
    match = _AUTHORITY.match(authority)
    if match is None:
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, "The image URL's host is not a plain host name.", param=part.param
        )
    host = match["host"].lower()
    if host not in allowed:
        where = f"only from {', '.join(allowed)}" if allowed else "none (send the image as a `data:` URL)"
        raise OrchestratorError(
            ErrorCode.IMAGE_URL_NOT_ALLOWED,
            f"Model {spec.name} does not fetch images from {host}: it fetches remote images {where}.",
            param=part.param,
        )


def _check_data_url(part: MediaPart, max_bytes: int) -> None:
    assert part.url is not None
    match = _DATA_URL.match(part.url)
    if match is None or not match["type"].lower().startswith("image/"):
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE,
            "An image data URL reads `data:image/<type>;base64,<data>`.",
            param=part.param,
        )
    data = match["data"]
    if len(data) > (max_bytes // 3 + 2) * 4:  # larger than the bound once decoded, whatever it holds
        raise _too_large(part, max_bytes)
    try:
        raw = b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, "The image data URL's data is not valid base64.", param=part.param
        ) from None
    if len(raw) > max_bytes:
        raise _too_large(part, max_bytes)
    _check_decodes(raw, part)


def _check_decodes(raw: bytes, part: MediaPart) -> None:
    """Refuses bytes Pillow does not read as an image (it reads the header and checks the
    file's structure; pixel data is decoded by the engine)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                image.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, f"The image data is not an image this server reads ({exc}).", param=part.param
        ) from None
    except Exception:  # Pillow raises many kinds (SyntaxError, OSError, struct.error) for broken files
        raise OrchestratorError(
            ErrorCode.INVALID_IMAGE, "The image data is not a readable image.", param=part.param
        ) from None


def _too_large(part: MediaPart, max_bytes: int) -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.IMAGE_LIMIT_EXCEEDED,
        f"An image may be at most {max_bytes} bytes (decoded); this one is larger.",
        param=part.param,
    )
