"""Small OpenAI-API-shaped upstreams for the router tests in the main venv, where vLLM is not installed.
They stand in for vLLM servers only here (``tests/integrations/test_vllm_router.py`` runs real vLLM).

One uvicorn server on a thread of the test process serves several named upstreams under
``/u/<name>``: a backend URL is ``http://127.0.0.1:<port>/u/<name>``. Each answers
``/v1/completions`` and ``/v1/chat/completions`` with text naming itself (streamed as one SSE event
per token when ``stream`` is true; a whole answer sets a cookie ``session=<name>-<n>``, as a
session-keeping API would), records every request's body and headers, and counts streams that ended early
(the client went away). A stream can be gated: it sends event ``i`` only once the test has allowed
``i + 1`` events, so tests can check chunk-by-chunk passthrough causally, without clocks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Upstream:
    name: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    sent_events: int = 0
    active: int = 0
    cancelled: int = 0
    completed: int = 0
    allowed: int | None = None  # None: not gated

    def allow(self, n: int = 1) -> None:
        self.allowed = (self.allowed or 0) + n


def _prompt_len(body: dict[str, Any]) -> int:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return len(prompt)
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(prompt).split())


def build_app(upstreams: dict[str, Upstream]) -> FastAPI:
    app = FastAPI()

    async def answer(name: str, request: Request, chat: bool) -> Any:
        up = upstreams[name]
        body = await request.json()
        up.bodies.append(body)
        up.headers.append(dict(request.headers))
        n = int(body.get("max_tokens", 4))
        obj = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": _prompt_len(body), "completion_tokens": n}
        if not body.get("stream"):
            text = " ".join(f"{name}:{i}" for i in range(n))
            choice = {"index": 0, "finish_reason": "length",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return JSONResponse({"id": "x", "object": obj, "model": body.get("model"), "choices": [choice],
                                 "usage": usage}, headers={"set-cookie": f"session={name}-{len(up.bodies)}; Path=/"})

        async def events() -> AsyncIterator[bytes]:
            up.active += 1
            done = False
            try:
                for i in range(n):
                    while up.allowed is not None and up.sent_events >= up.allowed:
                        await asyncio.sleep(0.005)
                    text = f"{name}:{i} "
                    delta = {"delta": {"content": text}} if chat else {"text": text}
                    chunk = {"id": "x", "object": f"{obj}.chunk", "choices": [{"index": 0, **delta}]}
                    up.sent_events += 1
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                up.active -= 1
                if done:
                    up.completed += 1
                else:
                    up.cancelled += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/u/{name}/v1/completions")
    async def completions(name: str, request: Request) -> Any:
        return await answer(name, request, chat=False)

    @app.post("/u/{name}/v1/chat/completions")
    async def chat(name: str, request: Request) -> Any:
        return await answer(name, request, chat=True)

    @app.get("/u/{name}/v1/models")
    async def models(name: str) -> Any:
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": name}]}

    return app


class FakeFleet:
    """Upstreams ``names`` on one loopback server (started on a daemon thread)."""

    def __init__(self, names: list[str]) -> None:
        from kvtier.net import bind

        self.upstreams = {n: Upstream(n) for n in names}
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.upstreams), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstreams did not start")
            time.sleep(0.01)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/u/{name}"

    def __getitem__(self, name: str) -> Upstream:
        return self.upstreams[name]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
