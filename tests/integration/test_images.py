"""Image inputs through real Ray Serve and a real vLLM vision engine (the tiny Idefics3 of
tests/integration/conftest.py, woken by the first request), driven by the official ``openai``
and ``anthropic`` SDKs: image tokens counted and billed, remote URLs only from allowed hosts
(and no connection at all to any other), the count bound."""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import openai
import pytest
from PIL import Image

from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration
VISION = "model-tiny-vision"


def png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, format="PNG")
    return buf.getvalue()


PNG_URL = "data:image/png;base64," + base64.b64encode(png()).decode()


class Listener:
    """A loopback HTTP server that counts the connections made to it and answers each
    request with a PNG."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        body = png((30, 30, 200))
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    conn.recv(65536)
                    conn.sendall(head.encode() + body)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def ask(*parts: dict[str, object]) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, *parts]}]


def image(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_an_image_wakes_the_model_and_its_tokens_are_counted_and_billed(deployment: Deployment) -> None:
    client = deployment.client(timeout=600)
    with_image = client.chat.completions.create(
        model="vision", messages=ask(image(PNG_URL)), max_tokens=4, temperature=0
    )  # type: ignore[arg-type]
    assert deployment.running_replicas(VISION) == 1
    text_only = client.chat.completions.create(model="vision", messages=ask(), max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert with_image.usage is not None and text_only.usage is not None
    # The tiny Idefics3 makes 4 image tokens of an image, between its marker tokens.
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4
    record = deployment.record(with_image.id)
    assert record["model"] == "tiny-vision" and record["prompt_tokens"] == with_image.usage.prompt_tokens
    cost = (Decimal(record["prompt_tokens"]) * 1 + Decimal(record["completion_tokens"]) * 2) / 1_000_000
    assert Decimal(str(record["cost"])) == cost == Decimal(str(with_image.usage.model_extra["cost"]))  # type: ignore[index]


def test_a_remote_image_is_fetched_only_from_an_allowed_host(deployment: Deployment, listener: Listener) -> None:
    client = deployment.client(timeout=600)
    # `localhost` names the same listener, but only 127.0.0.1 is allowed: nothing connects.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="vision", messages=ask(image(f"http://localhost:{listener.port}/cat.png")), max_tokens=2
        )  # type: ignore[arg-type]
    assert refused.value.code == "image_url_not_allowed"
    for url in ("file:///etc/hostname", f"ftp://127.0.0.1:{listener.port}/cat.png"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="vision", messages=ask(image(url)), max_tokens=2)  # type: ignore[arg-type]
        assert refused.value.code == "image_url_not_allowed"
    assert listener.connections == 0
    # The allowed host is fetched, by the engine, and the answer counts the image.
    fetched = client.chat.completions.create(
        model="vision", messages=ask(image(f"http://127.0.0.1:{listener.port}/cat.png")), max_tokens=2
    )  # type: ignore[arg-type]
    assert listener.connections >= 1
    assert fetched.choices[0].message is not None and fetched.usage is not None


def test_too_many_or_malformed_images_are_refused(deployment: Deployment) -> None:
    client = deployment.client(timeout=600)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="vision", messages=ask(*[image(PNG_URL)] * 3), max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.code == "image_limit_exceeded" and "at most 2 images" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="vision", messages=ask(image("data:image/png;base64,bm90IGFuIGltYWdl")), max_tokens=2
        )  # type: ignore[arg-type]
    assert refused.value.code == "invalid_image"
    # A text model refuses images whatever they are.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-a", messages=ask(image(PNG_URL)), max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.code == "capability_not_supported"


def test_anthropic_and_responses_images_reach_the_model(deployment: Deployment) -> None:
    data = base64.b64encode(png()).decode()
    claude = anthropic.Anthropic(api_key=deployment.api_key, base_url=deployment.base_url, max_retries=0, timeout=600)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    message = claude.messages.create(
        model="vision",
        max_tokens=2,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, block]}],  # type: ignore[list-item]
    )
    plain = claude.messages.create(
        model="vision", max_tokens=2, messages=[{"role": "user", "content": "What is in the picture?"}]
    )
    assert message.usage.input_tokens >= plain.usage.input_tokens + 4
    client = deployment.client(timeout=600)
    response = client.responses.create(
        model="vision",
        max_output_tokens=2,
        store=False,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in the picture?"},
                    {"type": "input_image", "image_url": PNG_URL, "detail": "auto"},
                ],
            }
        ],
    )
    assert response.usage is not None and response.usage.input_tokens >= plain.usage.input_tokens + 4
