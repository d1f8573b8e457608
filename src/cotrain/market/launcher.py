"""Launch nodes for a task, watch their cost, stop them: what ``cotrain market launch`` does.

A launch fills ``count`` slots from a list of offers, best first. Each slot takes the next offer,
launches it (``LaunchSpec`` names the node), and waits until the node has joined the task on
the coordinator (a member whose registered name is the one we gave it, on a machine with the
GPUs the offer promised: a node registers what it runs on). An offer whose launch
fails, whose machine fails, or whose node has not joined within ``ready_timeout_s`` is given
up: its machine is terminated, the failure recorded, and the slot moves on to the next offer.
Slots fill at once, so three SSH hosts install in parallel.

Money: every node has a rate (USD per hour) and a start; spend is the sum of rate x time, up to
now for a running node, up to its end for one that stopped. With ``budget_usd`` and
``max_hours`` a launch whose nodes would cost more than what is left of the budget over
``max_hours`` is refused before anything starts. The watchdog (``watch``: ``cotrain market
watch``, which ``launch`` starts in the background) terminates every node of the task when the
spend would pass the budget before its next check and a stop (``stop_s``) are done, and each
node when its ``max_hours`` are up, and records why; once the budget has stopped a task, no
launch for it starts unless the budget is raised.

Everything is kept in ``state_dir/launches/<task>.json``, so ``status``, ``terminate``,
``cost`` and the watchdog work from any process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cotrain.core.errors import CotrainError, UsageError
from cotrain.core.files import write_atomic
from cotrain.core.pids import alive
from cotrain.market.offers import Offer
from cotrain.market.provider import Instance, LaunchSpec, Provider, ProviderError

Say = Callable[[str], None]
LIVE = ("starting", "running", "unknown")


class BudgetExceeded(CotrainError):
    """The launch would spend more than the task's budget (or the budget is spent)."""


class NodeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str
    instance_id: str
    offer_id: str
    name: str
    usd_per_hour: float
    started_at: float
    ended_at: float | None = None
    state: str = "starting"
    """starting (launched, not joined yet), joined, failed, terminated, exited."""
    node_key: str | None = None
    joined_at: float | None = None
    detail: str = ""
    measured: dict[str, Any] = Field(default_factory=dict)
    """What the provider measured on the machine before it counted (``Instance.measured``)."""

    def hours(self, now: float) -> float:
        return max(0.0, (self.ended_at or now) - self.started_at) / 3600

    def spent(self, now: float) -> float:
        return self.usd_per_hour * self.hours(now)

    @property
    def live(self) -> bool:
        return self.ended_at is None


class LaunchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    coordinator: str
    budget_usd: float | None = None
    max_hours: float | None = None
    nodes: list[NodeRecord] = Field(default_factory=list)
    failures: list[dict[str, str]] = Field(default_factory=list)
    stopped: str | None = None
    """Why the watchdog stopped every node (``budget``), if it did."""
    watchdog_pid: int | None = None
    launcher_pid: int | None = None
    """A ``cotrain market launch`` at work on this task (the watchdog stays on duty)."""

    def spent(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return sum(n.spent(now) for n in self.nodes)

    def rate(self) -> float:
        return sum(n.usd_per_hour for n in self.nodes if n.live)


class Ledger:
    """The launch records of one state directory, one JSON file per task, locked on update."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "launches"

    def path(self, task: str) -> Path:
        return self.dir / f"{task}.json"

    def get(self, task: str) -> LaunchRecord | None:
        try:
            return LaunchRecord.model_validate_json(self.path(task).read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise CotrainError(f"{self.path(task)} is damaged: {str(e).splitlines()[0]}") from None

    def tasks(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json"))

    @contextlib.contextmanager
    def update(self, task: str, coordinator: str = "") -> Iterator[LaunchRecord]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f".{task}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rec = self.get(task) or LaunchRecord(task=task, coordinator=coordinator)
            yield rec
            write_atomic(self.path(task), rec.model_dump_json(indent=1).encode())


async def _joined(
    coordinator: str, task: str, names: set[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Which of ``names`` are members of ``task`` now: name -> (node key, the machine the node
    says it runs on)."""
    from cotrain.protocol.client import Client

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    async with Client(coordinator, timeout_s=10) as c:
        view = await c.get(f"/v1/tasks/{task}")
        for m in view.get("members", []):
            if m.get("status") not in ("joined", "healthy"):
                continue
            ident = await c.get(f"/v1/identities/{m['node']}")
            if ident.get("name") in names:
                out[ident["name"]] = (m["node"], dict(ident.get("specs") or {}))
    return out


class Launcher:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        ledger: Ledger,
        *,
        say: Say | None = None,
        ready_timeout_s: float = 900.0,
        poll_s: float = 2.0,
        invites: list[str] | None = None,
        mint_invite: Callable[[], Awaitable[str]] | None = None,
        stop_s: float = 5.0,
    ) -> None:
        """``invites`` (single-use, one a node) or ``mint_invite`` (the initiator's key at
        hand) for a task that admits by invite; an invite whose node never joined is reused."""
        self.invites = list(invites or [])
        self.stop_s = stop_s
        self._pending = 0.0  # $/h of launches in flight in this process
        self._hours: float | None = None
        self._begun = False
        self.mint_invite = mint_invite
        self.providers = providers
        self.ledger = ledger
        self.say = say or (lambda line: None)
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = poll_s

    def _reusable(self, o: Offer) -> bool:
        p = self.providers.get(o.provider)
        return p is not None and not getattr(p, "one_per_offer", False)

    def check_budget(
        self, task: str, offers: list[Offer], count: int, budget: float | None, hours: float | None
    ) -> float | None:
        """Refuse (``BudgetExceeded``) a launch the budget cannot pay for; the budget that
        applies (the task's recorded one when none is given)."""
        rec = self.ledger.get(task)
        spent = rec.spent() if rec else 0.0
        recorded = rec.budget_usd if rec else None
        if budget is None:
            budget = recorded
        if budget is None:
            return None
        stopped = rec is not None and rec.stopped == "budget" and budget <= (recorded or 0)
        if spent >= budget or stopped:
            raise BudgetExceeded(
                f"task {task}: its budget is spent (${spent:.2f} of ${budget:.2f}; the watchdog "
                "stopped its nodes): a larger --budget-usd launches more"
            )
        if hours is None or not offers:
            return budget
        running = rec.rate() if rec else 0.0
        rates = []  # what `count` nodes cost at the least: a machine type counts `count` times
        for o in offers:
            rates += [o.usd_per_hour] * (count if self._reusable(o) else 1)
        cheapest = sorted(rates)[:count]
        cost = (running + sum(cheapest)) * hours
        if spent + cost > budget:
            raise BudgetExceeded(
                f"{count} node(s) at ${sum(cheapest):.2f}/h"
                + (f" (plus ${running:.2f}/h running)" if running else "")
                + f" for {hours:g} h cost ${cost:.2f}; with ${spent:.2f} spent that exceeds the"
                f" budget of ${budget:.2f}"
            )
        return budget

    def begin(
        self, spec: LaunchSpec, offers: list[Offer], *, count: int, budget_usd: float | None
    ) -> None:
        """Check the budget and record the launch (and that this process is launching, which
        keeps the watchdog on duty until it is done)."""
        budget = self.check_budget(spec.task, offers, count, budget_usd, spec.max_hours)
        with self.ledger.update(spec.task, spec.coordinator) as rec:
            if budget is not None and budget > (rec.budget_usd or 0):
                rec.stopped = None  # a larger budget: launching again is allowed
            rec.budget_usd = budget
            rec.max_hours = spec.max_hours if spec.max_hours is not None else rec.max_hours
            rec.launcher_pid = os.getpid()
        self._begun = True

    async def launch(
        self,
        spec: LaunchSpec,
        offers: list[Offer],
        *,
        count: int,
        budget_usd: float | None = None,
    ) -> LaunchRecord:
        """Fill ``count`` slots from ``offers`` (best first); the record once every slot has a
        joined node or the offers ran out (then ``ProviderError`` says how many joined). Each
        launch is checked against the budget again first (with what this launch has started
        so far), so falling over to a dearer offer cannot pass it."""
        if not getattr(self, "_begun", False):
            self.begin(spec, offers, count=count, budget_usd=budget_usd)
        self._hours = spec.max_hours
        queue = list(offers)
        try:
            results = await asyncio.gather(
                *(self._slot(i + 1, spec, queue) for i in range(count)), return_exceptions=True
            )
        finally:
            with self.ledger.update(spec.task) as rec:
                rec.launcher_pid = None
            self._begun = False
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ProviderError):
                raise r
        joined = sum(1 for r in results if isinstance(r, NodeRecord))
        final = self.ledger.get(spec.task)
        assert final is not None
        if joined < count:
            raise ProviderError(
                f"{joined} of {count} node(s) joined task {spec.task}; the offers ran out "
                f"({len(final.failures)} failed: see `cotrain market status --task {spec.task}`)"
            )
        return final

    def _affordable(self, task: str, offer: Offer) -> str | None:
        """Why ``offer`` cannot be launched now within the budget (None: it can)."""
        rec = self.ledger.get(task)
        if rec is None or rec.budget_usd is None:
            return None
        if rec.stopped == "budget":
            return "the budget is spent"
        spent, hours = rec.spent(), self._hours
        rate = rec.rate() + self._pending + offer.usd_per_hour
        if hours is None:  # no horizon: the watchdog stops it; refuse only a spent budget
            return None if spent < rec.budget_usd else "the budget is spent"
        if spent + rate * hours > rec.budget_usd:
            return (
                f"at ${offer.usd_per_hour:.2f}/h for {hours:g} h it would pass the budget "
                f"(${spent:.2f} spent, ${rate:.2f}/h with it, budget ${rec.budget_usd:.2f})"
            )
        return None

    async def _slot(self, slot: int, spec: LaunchSpec, queue: list[Offer]) -> NodeRecord:
        while queue:
            offer = queue.pop(0)
            provider = self.providers.get(offer.provider)
            if provider is None:
                continue
            # a cloud's offer is a machine type (and the local one this machine): the other
            # slots may launch it too, at once; one that fails is taken off for all of them
            reusable = not getattr(provider, "one_per_offer", False)
            if reusable:
                queue.insert(0, offer)
            over = self._affordable(spec.task, offer)
            if over is not None:
                self.say(f"slot {slot}: skipping {offer.provider}:{offer.offer_id}: {over}")
                if reusable and offer in queue:
                    queue.remove(offer)
                with self.ledger.update(spec.task) as rec:
                    rec.failures.append(
                        {"provider": offer.provider, "offer_id": offer.offer_id, "why": over}
                    )
                continue
            name = f"{offer.provider}-{secrets.token_hex(3)}"
            self.say(
                f"slot {slot}: launching {offer.provider}:{offer.offer_id} "
                f"({offer.gpu_count or ''}{'x' if offer.gpu_count else ''}{offer.gpu}, "
                f"${offer.usd_per_hour:.2f}/h) as {name}"
            )
            invite = spec.invite
            self._pending += offer.usd_per_hour
            try:
                if self.invites:
                    invite = self.invites.pop(0)
                elif self.mint_invite is not None:
                    invite = await self.mint_invite()
                one = spec.model_copy(update={"name": name, "invite": invite})
                node = await self._one(provider, offer, one)
            except ProviderError as e:
                if invite and invite != spec.invite:
                    self.invites.insert(0, invite)
                self.say(f"slot {slot}: {offer.provider}:{offer.offer_id} failed: {e}")
                if reusable and offer in queue:
                    queue.remove(offer)
                self._pending -= offer.usd_per_hour
                with self.ledger.update(spec.task) as rec:
                    rec.failures.append(
                        {"provider": offer.provider, "offer_id": offer.offer_id, "why": str(e)}
                    )
                continue
            self._pending -= offer.usd_per_hour  # in the ledger now, as a live node
            self.say(f"slot {slot}: {name} joined the task ({node.node_key})")
            return node
        raise ProviderError(f"slot {slot}: no offer left")

    async def _one(self, provider: Provider, offer: Offer, spec: LaunchSpec) -> NodeRecord:
        inst = await provider.launch(offer, spec)
        node = NodeRecord(
            provider=offer.provider,
            instance_id=inst.instance_id,
            offer_id=offer.offer_id,
            name=spec.name,
            usd_per_hour=inst.usd_per_hour or offer.usd_per_hour,
            started_at=inst.started_at or time.time(),
            detail=inst.detail,
            measured=inst.measured,
        )
        self._save(spec.task, node)
        try:
            key = await self._wait_joined(provider, offer, spec, node)
        except BaseException as e:
            why = str(e) if isinstance(e, ProviderError) else type(e).__name__
            try:
                await asyncio.shield(provider.terminate(node.instance_id))
                node.state, node.ended_at = "failed", time.time()
            except (ProviderError, OSError, asyncio.CancelledError) as stop:
                # still billed, maybe: kept live, so `terminate` and the watchdog try again
                node.state, why = "unknown", f"{why}; terminating it failed: {stop}"
            node.detail = why[:300]
            self._save(spec.task, node)
            raise
        node.state, node.node_key, node.joined_at = "joined", key, time.time()
        self._save(spec.task, node)
        return node

    async def _wait_joined(
        self, provider: Provider, offer: Offer, spec: LaunchSpec, node: NodeRecord
    ) -> str:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                got = await _joined(spec.coordinator, spec.task, {node.name})
            except Exception as e:  # the coordinator's hiccup is not the machine's fault
                got = {}
                self.say(f"{node.name}: coordinator: {type(e).__name__}: {e}")
            if node.name in got:
                key, machine = got[node.name]
                have = len(machine.get("gpus") or [])
                if machine and have < offer.gpu_count:
                    raise ProviderError(
                        f"{node.name}: the node reports {have} GPU(s), the offer promised "
                        f"{offer.gpu_count}: not what was paid for"
                    )
                return key
            inst: Instance = await provider.status(node.instance_id)
            if inst.state in ("failed", "exited", "terminated"):
                raise ProviderError(
                    f"{node.name}: the machine is {inst.state} before joining: {inst.detail}"
                )
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"{node.name}: not joined after {self.ready_timeout_s:g} s "
                    f"(the machine is {inst.state})"
                )
            await asyncio.sleep(self.poll_s)

    def _save(self, task: str, node: NodeRecord) -> None:
        with self.ledger.update(task) as rec:
            rec.nodes = [n for n in rec.nodes if n.instance_id != node.instance_id
                         or n.provider != node.provider] + [node]  # fmt: skip

    # ---- stop, watch -------------------------------------------------------------------------

    async def terminate(
        self, task: str, only: list[str] | None = None, *, why: str = "terminated"
    ) -> list[NodeRecord]:
        """Terminate the task's live nodes (or those of ``only``, by instance id or name); a
        node whose provider fails to stop it stays live (and is named in the error)."""
        rec = self.ledger.get(task)
        if rec is None:
            raise CotrainError(f"no launch for task {task} in {self.ledger.dir}")
        if only:
            known = {n.instance_id for n in rec.nodes} | {n.name for n in rec.nodes}
            unknown = [x for x in only if x not in known]
            if unknown:
                raise UsageError(f"task {task} has no node {unknown[0]!r} (see market status)")
        chosen = [
            n for n in rec.nodes
            if n.live and (not only or n.instance_id in only or n.name in only)
        ]  # fmt: skip
        errors: list[str] = []

        async def stop(n: NodeRecord) -> None:
            p = self.providers.get(n.provider)
            if p is None:
                errors.append(f"{n.name}: provider {n.provider} is not configured here")
                return
            try:
                await asyncio.wait_for(p.terminate(n.instance_id), 120)
            except (ProviderError, OSError, TimeoutError) as e:
                errors.append(f"{n.name}: {e or type(e).__name__}")
                return
            n.state, n.ended_at = why, time.time()
            self.say(f"{n.name}: {why}")

        await asyncio.gather(*(stop(n) for n in chosen))
        with self.ledger.update(task) as fresh:
            done = {(n.provider, n.instance_id): n for n in chosen if n.ended_at is not None}
            fresh.nodes = [done.get((n.provider, n.instance_id), n) for n in fresh.nodes]
        if errors:
            raise ProviderError("; ".join(errors))
        return chosen

    async def refresh(self, task: str) -> None:
        """Ask each live node's provider how its machine is (at once, 60 s at most each): one
        that stopped by itself is terminated at its provider (a stopped cloud machine may
        still bill for its disk) and stops costing."""
        rec = self.ledger.get(task)
        if rec is None:
            return
        live = [n for n in rec.nodes if n.live and n.provider in self.providers]

        async def check(n: NodeRecord) -> tuple[NodeRecord, str | None]:
            p = self.providers[n.provider]
            try:
                inst = await asyncio.wait_for(p.status(n.instance_id), 60)
                if inst.state not in ("exited", "failed", "terminated"):
                    return n, None
                if inst.state != "terminated":
                    await asyncio.wait_for(p.terminate(n.instance_id), 120)
                return n, inst.state
            except (ProviderError, OSError, TimeoutError):
                return n, None  # unknown now: still counted, asked again next round

        ended = [(n, st) for n, st in await asyncio.gather(*(check(n) for n in live)) if st]
        if ended:
            now = time.time()
            with self.ledger.update(task) as fresh:
                for n, st in ended:
                    for m in fresh.nodes:
                        if (m.provider, m.instance_id) == (n.provider, n.instance_id):
                            m.state, m.ended_at = st, now

    async def watch_once(self, task: str, *, every_s: float) -> bool:
        """One round of the watchdog; False once nothing of the task is left running and no
        launch for it is at work."""
        t0 = time.monotonic()
        await self.refresh(task)
        rec = self.ledger.get(task)
        if rec is None:
            return False
        now = time.time()
        live = [n for n in rec.nodes if n.live]
        launching = rec.launcher_pid is not None and alive(rec.launcher_pid)
        if not live:
            return launching
        if rec.budget_usd is not None:
            # what the next round would find (its wait and a round as long as this one), plus
            # the time a stop takes: stop before the cap, not after
            margin_s = every_s + (time.monotonic() - t0) + self.stop_s
            ahead = rec.spent(now) + rec.rate() * margin_s / 3600
            if ahead >= rec.budget_usd:
                self.say(
                    f"task {task}: ${rec.spent(now):.2f} spent of ${rec.budget_usd:.2f}: "
                    "the budget is reached, terminating every node"
                )
                with self.ledger.update(task) as fresh:
                    fresh.stopped = "budget"  # from now on no launch starts
                await self.terminate(task, why="terminated (budget)")
                after = self.ledger.get(task)
                return launching or (after is not None and any(n.live for n in after.nodes))
        if rec.max_hours is not None:
            over = [n.instance_id for n in live if n.hours(now) >= rec.max_hours]
            if over:
                await self.terminate(task, over, why="terminated (max hours)")
        return True
