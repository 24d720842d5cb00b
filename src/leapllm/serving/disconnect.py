"""Clients that go away: their work is cancelled, which aborts their engine requests.

For streams Starlette cancels the response body on a disconnect by itself; for every other
response until_disconnected races the work against the client's disconnect message. Either way
the cancellation reaches AsyncEngine.generate (or the encoder's batcher), whose exit aborts the
request and returns its KV blocks.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

STATUS_CLIENT_CLOSED = 499  # nginx's "client closed request"; only the access log ever sees it


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, coro):
    """Await coro; if the client disconnects first, cancel it (aborting its engine requests) and
    raise ClientDisconnected."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (e.g. at the end of a graceful shutdown)
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    await asyncio.gather(work, return_exceptions=True)  # let the cancellation (and so the abort) run
    raise ClientDisconnected()
