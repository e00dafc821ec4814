"""A response whose body bytes count on a traffic channel as the connection takes them.

aiohttp hands a `web.Response` body to the transport in one piece and the transport drops what it
still holds when the client leaves, so the body's length says nothing about an aborted download. This
response writes its body in slices and, after each, reads how much the transport has passed to the
socket: a client that leaves midway is charged what went out (to within one slice), not the whole body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

SLICE = 128 * 1024  # above aiohttp's 64 KiB drain threshold: every slice waits for the socket

OnDone = Callable[[int, bool], None]  # (body bytes sent, aborted)


class CountedBody(web.StreamResponse):
    def __init__(
        self,
        body: bytes,
        on_done: OnDone,
        *,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(headers=headers)
        self.content_type = content_type
        self.content_length = len(body)
        self._data = body
        self._on_done = on_done
        self.body_sent = 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        aborted = True
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD":
                await self._write_body(request)
            await self.write_eof()
            # Complete: what the transport still holds goes out unless the connection breaks now.
            self.body_sent = 0 if request.method == "HEAD" else len(self._data)
            aborted = False
            return writer
        finally:
            self._on_done(self.body_sent, aborted)

    async def _write_body(self, request: web.BaseRequest) -> None:
        view = memoryview(self._data)
        written = 0
        for off in range(0, len(view), SLICE):
            piece = view[off : off + SLICE]
            await self.write(piece)
            written += len(piece)
            transport = request.transport
            held = transport.get_write_buffer_size() if transport is not None else 0
            # What the transport still holds never reached the socket (it may include the headers).
            self.body_sent = max(self.body_sent, written - held)
