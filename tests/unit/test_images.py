"""Image inputs: the router's checks (count, size, hosts, malformed data URLs) in every
dialect, the engine's own media bounds, and the tiny Idefics3 the tests serve."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from orchestrator.api import create_app
from orchestrator.api.dialect import CHAT, MESSAGES, RESPONSES, Dialect
from orchestrator.api.generation import parse
from orchestrator.api.images import check_images
from orchestrator.catalog import Catalog, CatalogError, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.protocol import ChatCompletionRequest
from orchestrator.protocol.anthropic import MessagesRequest
from orchestrator.protocol.media import MediaPart
from orchestrator.protocol.responses import ResponsesRequest
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN, TINY, write_catalog

VISION = {
    **TINY,
    "name": "tiny-v",
    "aliases": ["v"],
    "backend_id": "org/tiny-v",
    "source": {"kind": "tiny_random", "architecture": "idefics3", "seed": 0},
    "capabilities": {"vision": True},
    "images": {"max_per_request": 2, "max_bytes": 4096, "allowed_domains": ["images.example.org"]},
}


def png(side: int = 8, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


PNG_URL = data_url(png())


def chat_image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog([write_catalog(tmp_path, TINY, VISION)])


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "tiny-v": FakeEngine(words=["a", "red", "square"])}


@pytest.fixture
async def app_client(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> Any:  # an httpx.AsyncClient with a key's Authorization header
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    key = (await ledger.create_key(KeyLimits())).key
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        yield client


def refusal(parts: list[MediaPart], catalog: Catalog) -> OrchestratorError:
    with pytest.raises(OrchestratorError) as caught:
        check_images(parts, catalog.resolve("tiny-v"))
    return caught.value


def image(url: str | None, param: str = "messages[0].content[0]") -> MediaPart:
    return MediaPart("image", url, param)


# ----------------------------------------------------------------------------- the checks


def test_a_data_url_image_within_the_bounds_passes(catalog: Catalog) -> None:
    check_images([image(PNG_URL), image(data_url(png(), "image/PNG"))], catalog.resolve("v"))


def test_more_images_than_the_entry_allows_are_refused_naming_the_first_extra(catalog: Catalog) -> None:
    parts = [image(PNG_URL, f"messages[0].content[{i}]") for i in range(3)]
    error = refusal(parts, catalog)
    assert (error.code, error.param) == (ErrorCode.IMAGE_LIMIT_EXCEEDED, "messages[0].content[2]")
    assert "at most 2 images" in error.message


def test_an_image_larger_than_the_bound_is_refused_decoded_or_not(catalog: Catalog) -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buf = io.BytesIO()
    noisy.save(buf, format="PNG", compress_level=0)
    big = buf.getvalue()
    assert len(big) > 4096
    assert refusal([image(data_url(big))], catalog).code == ErrorCode.IMAGE_LIMIT_EXCEEDED
    # Just past the bound once decoded, though its base64 length alone would not tell.
    just_over = base64.b64encode(png() + b"\0" * (4097 - len(png()))).decode()
    assert refusal([image("data:image/png;base64," + just_over)], catalog).code == ErrorCode.IMAGE_LIMIT_EXCEEDED


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not base64!",
        "data:image/png;base64,AAAA",  # base64 of three zero bytes: not an image
        data_url(b"GIF89a but not really"),
        data_url(png()[:40]),  # a PNG cut short
        data_url(png(), "text/plain"),
        "data:image/png," + base64.b64encode(png()).decode(),  # not base64-encoded
        "data:image/png;BASE64," + base64.b64encode(png()).decode(),  # vLLM reads only `base64`
        "data:image/png;base64",
    ],
)
def test_malformed_data_urls_are_invalid_images(catalog: Catalog, url: str) -> None:
    error = refusal([image(url)], catalog)
    assert (error.code, error.status, error.param) == (ErrorCode.INVALID_IMAGE, 400, "messages[0].content[0]")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/cat.png",
        "https://evil.example.com/cat.png",
        "https://images.example.org.evil.example.com/cat.png",
        "https://sub.images.example.org/cat.png",
        "file:///etc/passwd",
        "ftp://images.example.org/cat.png",
        "images.example.org/cat.png",
    ],
)
def test_urls_off_the_allowed_hosts_or_schemes_are_not_allowed(catalog: Catalog, url: str) -> None:
    assert refusal([image(url)], catalog).code == ErrorCode.IMAGE_URL_NOT_ALLOWED


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.org@evil.example.com/cat.png",  # user info: the host is evil.example.com
        "https://evil.example.com\\@images.example.org/cat.png",  # parsers disagree about backslashes
        "https://images.example.org\n/cat.png",
        "https://[::1]/cat.png",
    ],
)
def test_urls_whose_host_parsers_could_read_differently_are_refused(catalog: Catalog, url: str) -> None:
    assert refusal([image(url)], catalog).code == ErrorCode.INVALID_IMAGE


def test_an_allowed_host_passes_with_any_case_and_port(catalog: Catalog) -> None:
    spec = catalog.resolve("v")
    check_images([image("https://IMAGES.example.org/cat.png"), image("http://images.example.org:8080/a.png")], spec)


def test_no_url_or_a_uuid_reference_is_an_invalid_image(catalog: Catalog) -> None:
    assert refusal([image(None)], catalog).code == ErrorCode.INVALID_IMAGE
    assert refusal([MediaPart("image", PNG_URL, "p", uuid=True)], catalog).code == ErrorCode.INVALID_IMAGE


def test_the_default_allows_no_remote_host(tmp_path: Path) -> None:
    entry = {**VISION, "images": {}}
    spec = load_catalog([write_catalog(tmp_path, entry)]).resolve("v")
    assert spec.images.allowed_domains == () and spec.images.max_per_request == 4
    assert spec.images.max_bytes == 10 * 2**20
    with pytest.raises(OrchestratorError) as caught:
        check_images([image("https://images.example.org/cat.png")], spec)
    assert caught.value.code == ErrorCode.IMAGE_URL_NOT_ALLOWED


def test_the_catalog_refuses_bad_hosts_and_engine_media_arguments(tmp_path: Path) -> None:
    for entry in (
        {**VISION, "images": {"allowed_domains": ["Images.Example.org"]}},
        {**VISION, "images": {"allowed_domains": ["a.example.org/path"]}},
        {**VISION, "images": {"max_per_request": 0}},
        {**VISION, "engine_args": {"allowed_media_domains": []}},
        {**VISION, "engine_args": {"allowed_local_media_path": "/"}},
    ):
        with pytest.raises(CatalogError):
            load_catalog([write_catalog(tmp_path, entry)])


# ----------------------------------------------------------------------------- the parts each dialect holds


def test_chat_parts_are_read_as_vllm_reads_them() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "v",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "hi"}]},
                {"role": "user", "content": [chat_image("u1"), {"image_url": "u2"}, {"image_url": {"url": "u3"}}]},
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "u4"}, {"type": "text", "text": "x"}],
                },
            ],
        }
    )
    media = request.media()
    assert [(m.kind, m.url, m.param) for m in media] == [
        ("image", "u1", "messages[1].content[0]"),
        ("image", "u2", "messages[1].content[1]"),
        ("image", "u3", "messages[1].content[2]"),
        ("image", "u4", "messages[2].content[0]"),
    ]
    assert request.capabilities_used() == {"vision"}


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}, "video"),
        ({"type": "audio_url", "audio_url": {"url": "http://x/a.wav"}}, "audio"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"video_url": "http://x/v.mp4"}, "video"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "embedding inputs"),
        ({"type": "text", "uuid": "u", "image_url": "http://x/i.png"}, "image"),
    ],
)
def test_other_media_ask_for_what_no_model_has(part: dict[str, Any], kind: str) -> None:
    request = ChatCompletionRequest.model_validate({"model": "v", "messages": [{"role": "user", "content": [part]}]})
    assert request.capabilities_used() == {"vision" if kind == "image" else kind}


def test_anthropic_image_blocks_become_the_urls_vllm_makes_of_them() -> None:
    raw = base64.b64encode(png()).decode()
    request = MessagesRequest.model_validate(
        {
            "model": "v",
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": raw}},
                        {"type": "image", "source": {"type": "url", "url": "https://images.example.org/a.png"}},
                        {"type": "text", "text": "what is it?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "x"}, {"type": "image", "source": {"type": "base64"}}],
                        }
                    ],
                },
            ],
        }
    )
    assert [(m.url, m.param) for m in request.media()] == [
        (f"data:image/png;base64,{raw}", "messages[0].content[0]"),
        ("https://images.example.org/a.png", "messages[0].content[1]"),
        (None, "messages[2].content[0].content[1]"),
    ]
    assert "vision" in request.capabilities_used()


def test_responses_input_images_are_read_and_forwarded_as_chat_image_parts() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": "v",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is it?"},
                        {"type": "input_image", "image_url": PNG_URL},
                        {"type": "input_image", "file_id": "file-1"},
                    ],
                }
            ],
        }
    )
    assert [(m.url, m.param) for m in request.media()] == [
        (PNG_URL, "input[0].content[1]"),
        (None, "input[0].content[2]"),
    ]
    content = request.forwarded()["messages"][0]["content"]
    assert content[:2] == [{"type": "text", "text": "what is it?"}, chat_image(PNG_URL)]


@pytest.mark.parametrize(
    ("dialect", "body"),
    [
        (CHAT, {"messages": [{"role": "user", "content": [chat_image(PNG_URL), chat_image(PNG_URL)]}]}),
        (
            MESSAGES,
            {
                "max_tokens": 4,
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": PNG_URL}}]}
                ],
            },
        ),
        (RESPONSES, {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": PNG_URL}]}]}),
    ],
)
def test_the_router_reads_a_requests_media_once_for_both_checks(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, dialect: Dialect, body: dict[str, Any]
) -> None:
    reads: list[int] = []
    media = dialect.schema.media  # type: ignore[attr-defined]

    def counted(request: Any) -> list[MediaPart]:
        reads.append(1)
        return media(request)

    monkeypatch.setattr(dialect.schema, "media", counted)
    parse(dialect, {**body, "model": "v"}, catalog)
    with pytest.raises(OrchestratorError) as text_model:  # the capability check saw the images
        parse(dialect, {**body, "model": "a"}, catalog)
    assert text_model.value.code is ErrorCode.CAPABILITY_NOT_SUPPORTED
    assert len(reads) == 2  # once a request


# ----------------------------------------------------------------------------- at the HTTP edge


async def test_chat_with_a_data_url_image_reaches_the_engine(app_client: Any, engines: dict[str, FakeEngine]) -> None:
    body = {
        "model": "v",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, chat_image(PNG_URL)]}],
    }
    resp = await app_client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert engines["tiny-v"].bodies[0]["messages"][0]["content"][1] == chat_image(PNG_URL)


@pytest.mark.parametrize(
    ("route", "body", "code"),
    [
        (
            "/v1/chat/completions",
            {"model": "v", "messages": [{"role": "user", "content": [chat_image("http://127.0.0.1:9/x.png")]}]},
            "image_url_not_allowed",
        ),
        (
            "/v1/chat/completions",
            {"model": "v", "messages": [{"role": "user", "content": [chat_image(PNG_URL)] * 3}]},
            "image_limit_exceeded",
        ),
        (
            "/v1/chat/completions",
            {"model": "v", "messages": [{"role": "user", "content": [chat_image("data:image/png;base64,@@@")]}]},
            "invalid_image",
        ),
        (
            "/v1/responses",
            {"model": "v", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "file:///x"}]}]},
            "image_url_not_allowed",
        ),
        (
            "/v1/responses",
            {"model": "v", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": PNG_URL}] * 3}]},
            "image_limit_exceeded",
        ),
        (
            "/v1/messages",
            {
                "model": "v",
                "max_tokens": 4,
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x.io/a"}}]}
                ],
            },
            "image_url_not_allowed",
        ),
        (
            "/v1/messages",
            {
                "model": "v",
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
                        ],
                    }
                ],
            },
            "invalid_image",
        ),
        (
            "/v1/messages/count_tokens",
            {
                "model": "v",
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x.io/a"}}]}
                ],
            },
            "image_url_not_allowed",
        ),
        (
            "/tokenize",
            {"model": "v", "messages": [{"role": "user", "content": [chat_image("http://127.0.0.1:9/x.png")]}]},
            "image_url_not_allowed",
        ),
        (
            "/tokenize",
            {"model": "a", "messages": [{"role": "user", "content": [chat_image(PNG_URL)]}]},
            "capability_not_supported",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "v",
                "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}],
            },
            "capability_not_supported",
        ),
    ],
)
async def test_refused_images_never_reach_the_engine(
    app_client: Any, engines: dict[str, FakeEngine], route: str, body: dict[str, Any], code: str
) -> None:
    resp = await app_client.post(route, json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert engines["tiny-v"].bodies == [] and engines["tiny-a"].bodies == []


async def test_tokenize_refuses_media_as_the_chat_route_does(app_client: Any) -> None:
    """/tokenize runs the generation routes' capability check, not a copy of it."""
    messages = [{"role": "user", "content": [chat_image(PNG_URL)]}]
    errors = [
        (resp.status_code, {k: v for k, v in resp.json()["error"].items() if k != "request_id"})
        for resp in [
            await app_client.post(path, json={"model": "a", "messages": messages})
            for path in ("/v1/chat/completions", "/tokenize")
        ]
    ]
    assert errors[0] == errors[1] and errors[0][0] == 400 and errors[0][1]["code"] == "capability_not_supported"


async def test_anthropic_and_responses_images_reach_the_engine(app_client: Any, engines: dict[str, FakeEngine]) -> None:
    raw = base64.b64encode(png()).decode()
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": raw}}
    body = {"model": "v", "max_tokens": 4, "messages": [{"role": "user", "content": [block]}]}
    resp = await app_client.post("/v1/messages", json=body)
    assert resp.status_code == 200, resp.text
    assert engines["tiny-v"].bodies[-1]["messages"][0]["content"][0]["source"]["data"] == raw
    part = {"type": "input_image", "image_url": PNG_URL}
    resp = await app_client.post("/v1/responses", json={"model": "v", "input": [{"role": "user", "content": [part]}]})
    assert resp.status_code == 200, resp.text
    assert engines["tiny-v"].bodies[-1]["messages"][0]["content"] == [chat_image(PNG_URL)]


# ----------------------------------------------------------------------------- the engine and the model


@pytest.mark.engine  # imports vLLM
def test_the_engine_is_told_the_same_hosts_and_bounds(catalog: Catalog, tmp_path: Path) -> None:
    from orchestrator.engine.vllm_engine import NO_REMOTE_MEDIA, engine_args_for, media_environment

    args = engine_args_for(catalog.resolve("v"), "/w")
    assert args["allowed_media_domains"] == ["images.example.org"]
    assert args["allowed_local_media_path"] == "" and args["limit_mm_per_prompt"] == {"image": 2}
    text = engine_args_for(catalog.resolve("a"), "/w")
    assert text["allowed_media_domains"] == [NO_REMOTE_MEDIA] and "limit_mm_per_prompt" not in text
    assert media_environment(catalog.resolve("v")) == {
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": "1",
    }


@pytest.mark.engine  # imports vLLM
def test_vllms_media_connector_fetches_from_no_host_with_the_default() -> None:
    from urllib3.util import parse_url
    from vllm.multimodal.media.connector import MediaConnector

    from orchestrator.engine.vllm_engine import NO_REMOTE_MEDIA

    connector = MediaConnector(allowed_media_domains=[NO_REMOTE_MEDIA])
    for url in ("http://127.0.0.1/x.png", "https://no-remote-media/x.png", "http:///x.png"):
        with pytest.raises(ValueError, match="allowed domains"):
            connector._assert_url_in_allowed_media_domains(parse_url(url))


@pytest.mark.engine  # imports vLLM
def test_vllms_anthropic_translation_makes_image_url_parts_of_image_blocks() -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    raw = base64.b64encode(png()).decode()
    request = AnthropicMessagesRequest.model_validate(
        {
            "model": "v",
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is it?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": raw}},
                    ],
                }
            ],
        }
    )
    chat = AnthropicServingMessages.to_chat_completion_request(request)
    parts = chat.model_dump(mode="json", exclude_none=True)["messages"][0]["content"]
    assert chat_image(f"data:image/png;base64,{raw}") in parts


@pytest.mark.engine  # needs transformers and torch
def test_the_tiny_vision_model_builds_with_a_processor_that_loads_offline(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    from orchestrator.engine.weights import TINY_IMAGE_TOKENS, build_tiny_idefics3

    folder = build_tiny_idefics3(tmp_path / "idefics3", seed=0)
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["Idefics3ForConditionalGeneration"]
    processor = AutoProcessor.from_pretrained(folder)
    out = processor(text="<image>what is it?", images=[[Image.open(io.BytesIO(png(100)))]])
    ids = list(out["input_ids"][0])
    assert ids.count(config.image_token_id) == TINY_IMAGE_TOKENS == 4
    assert sum(f.stat().st_size for f in folder.iterdir()) < 4 * 2**20
