"""Server-sent events whose generation is cancelled the moment the client goes away.

Starlette's StreamingResponse only notices a vanished client when a write fails (ASGI spec >= 2.4),
and uvicorn may drop writes to a closed socket silently, so an abandoned stream could run to
max_tokens holding its KV blocks. EngineStream listens for `http.disconnect` itself and calls
`on_disconnect` (cancel the engine requests) at once; the engine then ends the handles with
finish_reason "cancelled" and the body iterator finishes.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse(obj) -> str:
    """One SSE event: `data: <json>` and a blank line (`data: [DONE]` for the string "[DONE]")."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def wait_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    """Wait for the client to leave (after the body was read) and call on_disconnect once."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EngineStream(StreamingResponse):
    """text/event-stream over an async iterator of SSE strings; on_disconnect runs if the client leaves."""

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(wait_disconnect(receive, self.on_disconnect))
        try:
            await self.stream_response(send)
        except OSError:            # the socket closed under a write: same as a disconnect
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()   # runs the generator's finally (cancels what is left)
