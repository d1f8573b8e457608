"""`cotrain coordinator` (the protocol's HTTP service) and `cotrain audit` (check its ledger)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cotrain.cli.role import Alias, Role, add_role, binding, usage, user_inputs


def _coordinator_model() -> Any:
    from cotrain.protocol.config import CoordinatorConfig

    return CoordinatorConfig


def _run_coordinator(cfg: Any) -> int:
    import asyncio
    import gc

    from cotrain.core.service import Service
    from cotrain.protocol.coordinator import serve

    box: dict[str, Any] = {}

    def summary() -> str:
        coord = box.get("coordinator")
        if coord is None:
            return "no entries written"
        return f"{coord.state.size} entries, {coord.commits} commits"

    def ready(**fields: Any) -> None:
        # What is alive now (modules, the state loaded from the database) lives as long as the
        # process: out of the collector's sight, a full collection under load scans only what
        # came after, in milliseconds instead of a ~100 ms pause of every write
        gc.collect()
        gc.freeze()
        svc.ready(**fields)

    async def main(svc: Service) -> None:
        with binding(cfg.host, cfg.port, flag="--port"), user_inputs("the database"):
            await serve(cfg, ready=ready, stopped=svc.stopped, box=box)

    with Service("coordinator") as svc:
        svc.summary = summary
        asyncio.run(main(svc))
    return svc.exit_code


COORDINATOR = Role(
    name="coordinator",
    help="""Run the protocol's coordinator: tasks, nodes, work, verdicts, rewards, the ledger.

    Writes are signed requests (cotrain.protocol.client); reads are public. The database is a
    SQLite file (--db coordinator.db) or a PostgreSQL URL; its key (--key, created if missing)
    signs the ledger's checkpoints. Prints {"event": "ready", "role": "coordinator", "url": ...,
    "key": ...} on stdout when it serves.""",
    model=_coordinator_model,
    run=_run_coordinator,
)


def _audit_model() -> Any:
    from cotrain.protocol.config import AuditConfig

    return AuditConfig


def _run_audit(cfg: Any) -> int:
    import asyncio
    import hashlib

    from cotrain.protocol import audit
    from cotrain.protocol.errors import AuditError

    if not cfg.source:
        raise usage("audit what? give a coordinator URL or a ledger directory")
    if cfg.key and (len(cfg.key) != 64 or cfg.key.strip("0123456789abcdef")):
        raise usage("--key must be the coordinator's ed25519 public key (64 lowercase hex)")
    remote = cfg.source.startswith(("http://", "https://"))
    if remote:
        print(f"fetching the ledger from {cfg.source} ...", file=sys.stderr, flush=True)
        ledger = asyncio.run(audit.fetch(cfg.source, timeout_s=cfg.timeout_s))
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_dir():
            raise usage(f"{cfg.source} is neither a URL (http://...) nor a ledger directory")
        ledger = audit.load(path)
    if cfg.save:
        audit.save(ledger, Path(cfg.save).expanduser())
    seen = None
    if cfg.cache and ledger.entries:
        # one file per coordinator key (--key, else the one its genesis names), not per genesis:
        # a coordinator that rewrote its log from a new genesis still meets what was seen of it
        owner = cfg.key or _genesis_key(ledger.entries[0])
        ident = hashlib.sha256(owner.encode()).hexdigest()[:32]
        seen = audit.SeenCheckpoints(Path(cfg.cache).expanduser() / f"{ident}.json")
    print(
        f"replaying {len(ledger.entries)} entries, {len(ledger.checkpoints)} checkpoints",
        file=sys.stderr,
        flush=True,
    )

    def progress(n: int) -> None:
        print(f"  {n} entries checked", file=sys.stderr, flush=True)

    try:
        report = audit.audit(
            ledger,
            key=cfg.key or None,
            seen=seen,
            on_progress=progress,
            workers=min(4, (os.cpu_count() or 1) - 1),
        )
    except AuditError as e:
        print(f"AUDIT FAILED: {e}", flush=True)
        if cfg.json_out:
            Path(cfg.json_out).write_text(
                json.dumps({"ok": False, "error": str(e), "seq": e.seq}, indent=1)
            )
        return 1
    accounts = report.state["accounts"]
    print(
        f"audit ok: {report.size} entries, root {report.root[:16]}..., state "
        f"{report.state_root[:16]}..., {report.checkpoints} checkpoints "
        f"({report.cosignatures} witness signatures), coordinator {report.coordinator[:16]}..., "
        f"{len(report.state['tasks'])} tasks, {len(accounts)} accounts, "
        f"{report.seconds:.1f} s",
        flush=True,
    )
    if cfg.json_out:
        out = {
            "ok": True,
            "size": report.size,
            "root": report.root,
            "state_root": report.state_root,
            "coordinator": report.coordinator,
            "checkpoints": report.checkpoints,
            "cosignatures": report.cosignatures,
            "kinds": report.kinds,
            "seconds": report.seconds,
            "state": report.state,
        }
        Path(cfg.json_out).write_text(json.dumps(out, indent=1))
    return 0


def _genesis_key(data: bytes) -> str:
    """The key that signed a ledger's first entry (its bytes' hash if it is no entry: the audit
    names that)."""
    import hashlib

    from cotrain.protocol.errors import ProtocolError
    from cotrain.protocol.ledger import Entry

    try:
        return Entry.decode(data).req.key
    except ProtocolError:
        return hashlib.sha256(data).hexdigest()


AUDIT = Role(
    name="audit",
    help="""Check a coordinator's ledger from public data and replay every balance and share.

    SOURCE is a coordinator URL or a directory saved with --save. Checks every entry's
    signature and chain, the Merkle tree against every signed checkpoint, consistency with
    the checkpoints this machine saw before (equivocation, rewritten history), and the
    coordinator's published state against the replay. Exit 0 when all holds; 1 with the
    entry or checkpoint at fault named.""",
    model=_audit_model,
    run=_run_audit,
    positionals=(("source", "SOURCE"),),
    aliases=(Alias("--json", "json_out"),),
)


shares_app = typer.Typer(
    help="A task's ownership shares: export the signed file, prove one share, check a proof.",
    no_args_is_help=True,
)


def _read_json(path: Path, what: str) -> Any:
    from cotrain.core import jsonsafe

    try:
        return jsonsafe.loads(path.read_bytes(), max_bytes=256 << 20)
    except OSError as e:
        raise usage(f"cannot read {what} {path}: {e.strerror or e}") from None
    except jsonsafe.MalformedJSON as e:
        raise usage(f"{path} is not {what}: {e}") from None


def _coordinator_key(key: str) -> str:
    if len(key) != 64 or key.strip("0123456789abcdef"):
        raise usage("--key must be the coordinator's ed25519 public key (64 lowercase hex)")
    return key


@shares_app.command("export")
def shares_export(
    url: Annotated[str, typer.Argument(help="the coordinator, http://host:port")],
    task: Annotated[str, typer.Argument(help="a finalized task, e.g. t12")],
    out: Annotated[Path, typer.Option(help="where to write the signed shares file")],
    key: Annotated[str, typer.Option(help="the coordinator key you trust (64 hex)")] = "",
) -> None:
    """Fetch a finalized task's shares as a signed file with a Merkle root, and check it."""
    import asyncio

    from cotrain.protocol import shares
    from cotrain.protocol.client import Client

    async def fetch() -> tuple[Any, str]:
        async with Client(url) as c:
            doc = await c.get(f"/v1/tasks/{task}/shares/export")
            status = await c.get("/v1/status")
        return doc, status["coordinator"]

    doc, published = asyncio.run(fetch())
    trusted = _coordinator_key(key) if key else published
    body = shares.check(doc, trusted)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"{task}: {body['count']} contributors, total weight {body['total']}, root "
        f"{body['root'][:16]}..., signed by {trusted[:16]}...; written to {out}"
    )


@shares_app.command("prove")
def shares_prove(
    file: Annotated[Path, typer.Argument(help="a shares file from `cotrain shares export`")],
    node: Annotated[str, typer.Option(help="the contributor's public key (64 hex)")],
    out: Annotated[Path, typer.Option(help="where to write the proof")],
) -> None:
    """Cut one contributor's proof out of a shares file (all it needs to show its share)."""
    from cotrain.protocol import shares

    proof = shares.proof_for(_read_json(file, "a shares file"), node.lower())
    out.write_text(json.dumps(proof, indent=1) + "\n")
    print(f"{node[:16]}...: weight {proof['leaf']['weight']}; proof written to {out}")


@shares_app.command("verify")
def shares_verify(
    proof: Annotated[Path, typer.Argument(help="a proof from `cotrain shares prove`")],
    key: Annotated[str, typer.Option(help="the coordinator key you trust (64 hex)")],
) -> None:
    """Check a contributor's share offline: the coordinator's signature and the Merkle path."""
    from cotrain.protocol import shares

    doc = _read_json(proof, "a share proof")
    weight, total = shares.verify_proof(doc, _coordinator_key(key))
    leaf = doc["leaf"]
    print(
        f"ok: {leaf['node'][:16]}... holds {weight} of {total} "
        f"({100 * weight / total:.2f}%) of {leaf['task']}"
    )


def _node_model() -> Any:
    from cotrain.protocol.node import NodeConfig

    return NodeConfig


def _run_node(cfg: Any) -> int:
    from cotrain.comm.errors import AuthError, KickedError, MasterUnreachableError
    from cotrain.core.service import Service
    from cotrain.protocol import node

    with Service("node") as svc:
        svc.ready(coordinator=cfg.coordinator)
        try:
            summary = node.run(cfg)
        except (node.NodeEjected, KickedError) as e:
            print(f"cotrain node: out of the task: {e}", file=sys.stderr, flush=True)
            return 1
        except (MasterUnreachableError, AuthError) as e:
            raise usage(f"cannot reach the task's run (the address in its spec): {e}") from None
        print(json.dumps({"event": "node_done", **summary}), flush=True)
    return svc.exit_code


NODE = Role(
    name="node",
    help="""Contribute this machine to a task: register, join, train, submit work, earn.

    Registers --key (created if missing) with the coordinator, joins --task (or the first open
    diloco task that admits anyone; --invite for one that admits by invite), enters the task's
    DiLoCo run with the admission token the coordinator issues, and records each
    pseudo-gradient it contributes as signed work. Exits 1 if its validators eject it.""",
    model=_node_model,
    run=_run_node,
)


def _validator_model() -> Any:
    from cotrain.protocol.validator import ValidatorConfig

    return ValidatorConfig


def _run_validator(cfg: Any) -> int:
    from cotrain.core.service import Service
    from cotrain.protocol import validator

    with Service("validator") as svc:
        svc.ready(coordinator=cfg.coordinator, task=cfg.task)
        summary = validator.run(cfg)
        print(json.dumps({"event": "validator_done", **summary}), flush=True)
    return svc.exit_code


VALIDATOR = Role(
    name="validator",
    help="""Judge a DiLoCo task's work and vote (accept or hard reject) through the coordinator.

    Rebuilds the run's consensus state from the task's spec, checks each pseudo-gradient in the
    task's store (its hash, a copy of another's, its effect on the validation loss) and signs a
    verdict. Runs until the task is finalized or cancelled (--idle_exit_s to stop earlier).""",
    model=_validator_model,
    run=_run_validator,
)


def _witness_model() -> Any:
    from cotrain.protocol.witness import WitnessConfig

    return WitnessConfig


def _run_witness(cfg: Any) -> int:
    from cotrain.core.service import Service
    from cotrain.protocol import witness

    with Service("witness") as svc:
        svc.ready(coordinator=cfg.coordinator)
        summary = witness.run(cfg)
        print(json.dumps({"event": "witness_done", **summary}), flush=True)
    return svc.exit_code


WITNESS = Role(
    name="witness",
    help="""Co-sign a coordinator's checkpoints once each is shown to extend the last one signed.

    Registers --key as a witness, then every --poll_s fetches the newest signed checkpoint,
    verifies the coordinator's signature (--coordinator_key, pinned), checks the RFC 9162
    consistency proof from the size it last co-signed (kept in --state), and posts its
    signature line. A checkpoint that does not verify, a log that shrank or forked: exit 1
    with the evidence, nothing signed after.""",
    model=_witness_model,
    run=_run_witness,
)


task_app = typer.Typer(
    help="An initiator's tasks: publish one from a JSON file, invite nodes, finalize, cancel.",
    no_args_is_help=True,
)
_COORD = typer.Option("--coordinator", help="the coordinator, http://host:port")
_KEY = typer.Option("--key", help="the initiator's key (created if missing)")


def _initiator(url: str, key: Path, call: Any) -> Any:
    """Run ``call(client)`` signed with ``key``, registered as an initiator first if needed;
    an unreachable coordinator is one line."""
    import asyncio

    import aiohttp

    from cotrain.core.identity import Identity
    from cotrain.protocol.client import Client
    from cotrain.protocol.errors import NotFound, RequestError

    with user_inputs(f"{key}"):
        ident = Identity.load_or_create(key)

    async def run() -> Any:
        async with Client(url, ident) as c:
            try:
                rec = await c.get(f"/v1/identities/{ident.public_hex}")
                roles = (
                    None if "initiator" in rec["roles"] else sorted({*rec["roles"], "initiator"})
                )
                name = rec["name"]
            except NotFound:
                roles, name = ["initiator"], "initiator"
            if roles is not None:
                await c.register(roles, name)
            return await call(c)

    try:
        return asyncio.run(run())
    except RequestError as e:  # the coordinator's 400: what was sent does not fit
        raise usage(str(e)) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise usage(f"cannot reach the coordinator at {url}: {e}") from None


@task_app.command("publish")
def task_publish(
    file: Annotated[Path, typer.Argument(help="the task as JSON: name, kind, spec, budget, ...")],
    coordinator: Annotated[str, _COORD] = "http://127.0.0.1:8740",
    key: Annotated[Path, _KEY] = Path("initiator.pem"),
    open_: Annotated[bool, typer.Option("--open/--no-open", help="open it at once")] = True,
) -> None:
    """Publish a task (the body of POST /v1/tasks) and open it; prints its id."""
    body = _read_json(file, "a task (JSON object)")
    if not isinstance(body, dict):
        raise usage(f"{file} must hold a JSON object (the task)")

    async def call(c: Any) -> dict[str, Any]:
        got: dict[str, Any] = await c.write("/v1/tasks", body)
        if open_:
            await c.write(f"/v1/tasks/{got['task']}/open", {})
        return got

    got = _initiator(coordinator, key, call)
    state = "open" if open_ else "published"
    print(
        f"{got['task']} {state}: {body.get('name')}, budget {body.get('budget')}", file=sys.stderr
    )
    print(got["task"])


@task_app.command("invite")
def task_invite(
    task: Annotated[str, typer.Argument(help="the task, e.g. t12")],
    coordinator: Annotated[str, _COORD] = "http://127.0.0.1:8740",
    key: Annotated[Path, _KEY] = Path("initiator.pem"),
    node: Annotated[str, typer.Option(help="only this node key may use it")] = "",
    count: Annotated[int, typer.Option(min=1, max=1000, help="how many")] = 1,
    ttl_s: Annotated[int, typer.Option(min=1, max=86400, help="valid this long")] = 1000,
) -> None:
    """Single-use invites to a task that admits by invite; prints one id a line."""
    body: dict[str, Any] = {"ttl_s": ttl_s, **({"node": node.lower()} if node else {})}

    async def call(c: Any) -> list[str]:
        return [(await c.write(f"/v1/tasks/{task}/invites", body))["invite"] for _ in range(count)]

    for invite in _initiator(coordinator, key, call):
        print(invite)


def _transition(task: str, coordinator: str, key: Path, what: str) -> None:
    async def call(c: Any) -> dict[str, Any]:
        got: dict[str, Any] = await c.write(f"/v1/tasks/{task}/{what}", {})
        return got

    got = _initiator(coordinator, key, call)
    print(json.dumps(got))


def _transition_command(what: str, doc: str) -> None:
    def command(
        task: Annotated[str, typer.Argument(help="the task, e.g. t12")],
        coordinator: Annotated[str, _COORD] = "http://127.0.0.1:8740",
        key: Annotated[Path, _KEY] = Path("initiator.pem"),
    ) -> None:
        _transition(task, coordinator, key, what)

    command.__doc__ = doc
    task_app.command(what)(command)


for _what, _doc in (
    ("pause", "Pause a task (no joins, no new work); `open` resumes it."),
    ("open", "Open (or reopen) a task."),
    ("finalize", "Finalize: shares freeze (`cotrain shares export`), the rest is refunded."),
    ("cancel", "Cancel: the unspent budget is refunded."),
):
    _transition_command(_what, _doc)


def register(app: typer.Typer) -> None:
    add_role(app, COORDINATOR)
    add_role(app, AUDIT)
    add_role(app, NODE)
    add_role(app, VALIDATOR)
    add_role(app, WITNESS)
    app.add_typer(shares_app, name="shares")
    app.add_typer(task_app, name="task")
