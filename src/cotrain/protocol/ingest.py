"""Ingest processes: the coordinator's front on every core.

One process sequences the ledger (the event loop that applies writes and commits them); checking
each request's ed25519 signature, its canonical body and parsing its HTTP is most of a write's
cost, and needs no state. With ``ingest = N``, N processes accept on the coordinator's port (one
listening socket, inherited), check the signature and body of every signed write, and forward
everything to the sequencer over a Unix socket in a private directory, marking the writes they
checked. The sequencer serves nothing on TCP then, so only these processes can mark a write as
checked; a client's own marking header is dropped here.

    python -m cotrain.protocol.ingest --fd FD --upstream /path/to/seq.sock --max-body BYTES

prints ``{"event": "ready", "role": "ingest", "pid": ...}`` once it serves, and dies with the
sequencer (parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from typing import Any

import aiohttp
from aiohttp import web

from cotrain.protocol import auth
from cotrain.protocol.errors import ProtocolError

VERIFIED = "X-Cotrain-Verified"
"""Set by an ingest process on a write whose signature and body it checked."""
_FORWARD = {auth.H_KEY, auth.H_TIME, auth.H_NONCE, auth.H_SIG, "Content-Type"}


def make_app(upstream: str, max_body: int) -> web.Application:
    app = web.Application(client_max_size=max_body)
    state: dict[str, aiohttp.ClientSession] = {}

    async def start(_: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=upstream, limit=256),
            timeout=aiohttp.ClientTimeout(total=120),
            auto_decompress=False,
        )

    async def stop(_: web.Application) -> None:
        await state["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                {"error": f"request body is over the {max_body // 1024} KB limit"}, status=413
            )
        headers = {k: v for k, v in request.headers.items() if k in _FORWARD}
        if request.method == "POST" and auth.H_SIG in request.headers:
            try:  # the signature and the canonical body: the sequencer trusts this mark
                auth.read(request.method, request.path, request.headers, raw, max_body=max_body)
            except ProtocolError as e:
                return web.json_response({"error": str(e)[:500]}, status=e.status)
            headers[VERIFIED] = "1"
        try:
            async with state["session"].request(
                request.method, "http://coordinator" + request.path_qs, data=raw, headers=headers
            ) as resp:
                body = await resp.read()
                out = web.Response(body=body, status=resp.status)
                for h in ("Content-Type", "Allow"):
                    if h in resp.headers:
                        out.headers[h] = resp.headers[h]
                return out
        except (aiohttp.ClientError, OSError) as e:
            return web.json_response({"error": f"the coordinator is unavailable: {e}"}, status=503)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _serve(fd: int, upstream: str, max_body: int) -> None:
    sock = socket.socket(fileno=fd)
    runner = web.AppRunner(make_app(upstream, max_body), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", "role": "ingest", "pid": os.getpid()}), flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A coordinator's ingest process (started by it).")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--max-body", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(_serve(args.fd, args.upstream, args.max_body))
    return 0


def spawn(n: int, sock: socket.socket, upstream: str, max_body: int) -> list[Any]:
    """Start ``n`` ingest processes on ``sock``; they die with this process."""
    import subprocess

    from cotrain.launch.procs import child_setup

    procs = []
    for _ in range(n):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cotrain.protocol.ingest",
                    "--fd",
                    str(sock.fileno()),
                    "--upstream",
                    upstream,
                    "--max-body",
                    str(max_body),
                ],
                pass_fds=(sock.fileno(),),
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=child_setup(),
            )
        )
    return procs


if __name__ == "__main__":
    sys.exit(main())
