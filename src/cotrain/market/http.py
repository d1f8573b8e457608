"""The one HTTP client every cloud adapter uses: JSON over aiohttp, the key in a header only.

    api = JsonApi("lambda", "https://cloud.lambda.ai", {"Authorization": f"Bearer {key}"},
                  secret=key)
    body = await api.call("GET", "/api/v1/instance-types")

- 401/403 is ``ProviderError("<name>: the API key was refused (401): ...")``;
- 429 is waited out (``Retry-After`` seconds, at most 30, ``retries_429`` times), then an error;
- any other status >= 400 is a ``ProviderError`` with the provider's own message, unless the
  adapter's ``on_error(status, body, method, path)`` raises something more precise first
  (``OutOfStock`` for a sold-out offer);
- a connection failure or timeout is a ``ProviderError`` naming the call, never the key;
- the secret is scrubbed from every message, and ``repr`` names only the address.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from cotrain.market.provider import ProviderError

ErrorHook = Callable[[int, Any, str, str], None]


def message_of(body: Any) -> str:
    """The human part of a provider's error body (``msg``, ``error``, ``message``, ``detail``,
    GraphQL ``errors[0].message``)."""
    if isinstance(body, dict):
        for k in ("msg", "message", "detail", "error"):
            v = body.get(k)
            if isinstance(v, dict):
                v = v.get("message") or v.get("msg") or json.dumps(v)
            if v:
                return str(v)
        errs = body.get("errors")
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            return str(errs[0].get("message") or errs[0])
    return "" if body is None else str(body)


class JsonApi:
    def __init__(
        self,
        name: str,
        url: str,
        headers: Mapping[str, str],
        *,
        secret: str,
        timeout_s: float = 20.0,
        retries_429: int = 3,
        on_error: ErrorHook | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._headers = {"Accept": "application/json", **headers}
        self._secret = secret
        self.timeout_s = timeout_s
        self.retries_429 = retries_429
        self.on_error = on_error

    def __repr__(self) -> str:  # never the key
        return f"JsonApi({self.name!r}, url={self.url!r})"

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "<key>") if self._secret else text

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """The decoded JSON body of a successful call ({} when empty)."""
        import aiohttp  # here: `cotrain market offers` from the cache asks no provider

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        for attempt in range(self.retries_429 + 1):
            try:
                async with (
                    aiohttp.ClientSession(timeout=timeout) as s,
                    s.request(method, self.url + path, headers=self._headers, **kw) as r,
                ):
                    text = await r.text()
                    if r.status == 429 and attempt < self.retries_429:
                        await asyncio.sleep(_retry_after(r.headers.get("Retry-After")))
                        continue
                    return self._answer(r.status, text, method, path)
            except aiohttp.ClientError as e:
                raise ProviderError(f"{self.name}: {method} {path}: {type(e).__name__}") from None
            except TimeoutError:
                raise ProviderError(f"{self.name}: {method} {path}: no answer in time") from None
        raise ProviderError(f"{self.name}: {method} {path}: still rate-limited")

    def _answer(self, status: int, text: str, method: str, path: str) -> Any:
        try:
            body = json.loads(text) if text else {}
        except ValueError:
            body = text[:200]
        if status < 400:
            if isinstance(body, str):
                raise ProviderError(f"{self.name}: {method} {path}: not JSON: {self.scrub(body)}")
            return body
        msg = self.scrub(message_of(body))[:200]
        if status in (401, 403):
            raise ProviderError(f"{self.name}: the API key was refused ({status}): {msg}")
        if self.on_error is not None:
            self.on_error(status, body, method, path)
        if status == 429:
            raise ProviderError(f"{self.name}: rate limited (429), try again later")
        raise ProviderError(f"{self.name}: {method} {path}: {status} {msg}")


def _retry_after(value: str | None) -> float:
    try:
        return min(30.0, max(0.0, float(value or 1)))
    except ValueError:
        return 1.0  # an HTTP date: wait a second and ask again
