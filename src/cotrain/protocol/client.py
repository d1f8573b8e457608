"""A client of the coordinator: signed writes, public reads (aiohttp, like every cotrain service).

    async with Client("http://127.0.0.1:8740", identity) as c:
        await c.register(["node"], "my-box")
        await c.write("/v1/tasks/t3/join", {"invite": invite_id})
        await c.heartbeat("t3")

Every call has a deadline; an answer with an error status raises the ``ProtocolError`` subclass
of that status, with the coordinator's message.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import aiohttp

from cotrain.core import jsonsafe
from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import auth
from cotrain.protocol.errors import (
    AuthError,
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    RequestError,
    Unavailable,
)

_BY_STATUS: dict[int, type[ProtocolError]] = {
    400: RequestError,
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: RequestError,
    429: RateLimited,
    503: Unavailable,
}


class Client:
    def __init__(
        self, url: str, identity: Identity | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def write(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sign and send a write; the coordinator's answer (with the entry's ``seq``)."""
        if self.identity is None:
            raise ValueError("writes need a key: Client(url, identity)")
        req = auth.sign(self.identity, "POST", path, body or {})
        return await self.send(req)

    async def send(self, req: auth.SignedRequest) -> dict[str, Any]:
        """Send an already signed request."""
        async with self.session.post(
            self.url + req.path, data=canonical(req.body), headers=auth.headers(req)
        ) as resp:
            return await _answer(resp)

    async def get(self, path: str, **params: Any) -> Any:
        async with self.session.get(self.url + path, params=params or None) as resp:
            return await _answer(resp)

    async def get_bytes(self, path: str, **params: Any) -> bytes:
        async with self.session.get(self.url + path, params=params or None) as resp:
            if resp.status != 200:
                await _answer(resp)
            return await resp.read()

    # ---- conveniences ------------------------------------------------------------------------

    async def register(
        self, roles: list[str], name: str, specs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self.write(
            "/v1/identities", {"roles": roles, "name": name, "specs": specs or {}}
        )

    async def heartbeat(self, task: str) -> dict[str, Any]:
        return await self.write(f"/v1/tasks/{task}/heartbeat", {})

    async def checkpoint(self, size: int | None = None) -> str:
        params = {} if size is None else {"size": size}
        return (await self.get_bytes("/v1/log/checkpoint", **params)).decode()

    async def entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) as their exact bytes, in as many reads as it takes."""
        out: list[bytes] = []
        while start + len(out) < end:
            raw = await self.get_bytes("/v1/log/entries", start=start + len(out), end=end)
            got = [line for line in raw.split(b"\n") if line]
            if not got:
                raise NotFound(f"the coordinator has no entries from {start + len(out)}")
            out.extend(got)
        return out[: end - start]


async def _answer(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        body = jsonsafe.loads(raw, max_bytes=64 << 20) if raw else {}
    except jsonsafe.MalformedJSON:
        body = {"error": raw[:200].decode(errors="replace")}
    if resp.status == 200:
        return body
    message = body.get("error") if isinstance(body, dict) else None
    kind = _BY_STATUS.get(resp.status, ProtocolError)
    err = kind(f"{resp.method} {resp.url.path}: {resp.status}: {message or resp.reason}")
    err.reason = str(message or resp.reason or "")
    raise err
