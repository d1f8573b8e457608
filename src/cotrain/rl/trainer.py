"""The trainer role (``cotrain rl trainer CONFIG.toml``): trains the policy on the batches the
orchestrator forms and publishes every version through its own shardcast origin.

::

    load the policy and the trainer key; start the origin over out_dir/versions
    resume: the checkpoint (if any) and the origin's versions made to agree (v1 = the base)
    POST /v1/version  for the latest version (the origin's URL may be new)
    for n in step+1 .. total_steps:
        GET /v1/batch?step=n&wait_s=W      long-poll until ready (pending: ask again)
        Learner.step (in a thread: the origin keeps serving)
        publish v(n+1), POST /v1/version
        checkpoint (every checkpoint_every steps) and held-out accuracy (every eval_every
        steps) in threads, while the batch of step n + 1 is already being awaited

Versions: v1 is the base model; step n trains version n and publishes version n + 1, so the
origin's latest version is always ``steps + 1``. Versions are never rewritten: workers, the
orchestrator and validators know a version by its number and its manifest's hash.

Crash safety. Step n's weights are published first (the workers wait for them; a checkpoint
with AdamW's moments is three times their size, 1.6 GB for SmolLM2), then the checkpoint of
step n (its weights are the published file, hard-linked: its ``file_sha256`` is the version's)
is written while the next batch is awaited, and step n + 1 starts only once it is complete. On
a restart, with s the checkpoint's step (0: none) and L the origin's latest version:

* L = s + 1: consistent (the version's hash is checked against the checkpoint's weights).
* L > s + 1: killed after publishing and before the checkpoint was complete, or
  ``checkpoint_every`` > 1: the weights of v(L) are loaded from the origin's own copy (hash
  checked) and training goes on at step L, with AdamW's moments of step s (the only state no
  version holds: the one case where the resumed run is not bit-identical to an unbroken one).
* L = s: a checkpoint whose version is missing (an older trainer's order): its weights are
  published as v(s + 1).
* none, or another key's or run's versions: ``ResumeError`` saying what to delete.

A SIGINT or SIGTERM stops the wait for a batch at once; a step already running is finished,
published and checkpointed first (the second signal ends the process at once; the checkpoint
stays valid: a save is complete only once ``latest`` names it).

Memory. The weights are written once per step, straight from the tensors into a file under
``out_dir/trainer/staging`` (never as bytes in memory), which the origin and the checkpoint
hard-link (``PublishConfig.file_mode = "link"``; copied where links fail); the staged file is
removed once both have it. The checkpoint writes AdamW's moments one tensor at a time. See
``learner`` for the step itself: for SmolLM2 with micro-batches of 8, the trainer's peak is
about 2.9 GB (4.3 GB before these measures).

Metrics: one JSON line per step on stdout and in ``out_dir/trainer.jsonl`` (and an ``eval``
line for the base model as step 0). ``wall_s`` counts from the start of the first step's wait
and leaves out the held-out evaluation; ``wait_s`` is the time the trainer did nothing but wait
for the batch (after the previous step's checkpoint and evaluation); ``idle_fraction`` is the
cumulated ``wait_s`` over ``wall_s``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from cotrain.core.errors import TimeoutExpired, UsageError
from cotrain.core.files import sha256_file
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import wire
from cotrain.rl.config import RLConfig
from cotrain.rl.errors import OrchestratorUnreachable, RLError, RunAbortedError
from cotrain.rl.evaluate import heldout_accuracy
from cotrain.rl.learner import Learner, StepStats
from cotrain.rl.weights import write_weights

T = TypeVar("T")

MAX_POLL_S = 30.0
"""Longest long-poll asked of the orchestrator (it caps ``wait_s`` at 30 s too)."""
CALL_TIMEOUT_S = 30.0
"""Every other HTTP call's timeout (beyond the long-poll window)."""
CONNECT_TIMEOUT_S = 5.0


class TrainerError(RLError):
    """The trainer cannot go on (a batch out of order, a version out of sequence)."""


class BatchTimeout(TrainerError, TimeoutExpired):
    """No batch for a step within ``trainer.batch_timeout_s``."""


class OrchestratorRefused(TrainerError):
    """The orchestrator answered 4xx: the message is its reason."""


class ResumeError(UsageError):
    """The checkpoint and the origin's versions in ``out_dir`` do not belong together."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- directories and publishing --------------------------------------------------------------


def versions_dir(cfg: RLConfig) -> Path:
    return cfg.run.out_dir / "versions"


def checkpoint_dir(cfg: RLConfig) -> Path:
    return cfg.run.out_dir / "trainer" / "checkpoint"


def staging_dir(cfg: RLConfig) -> Path:
    """Where each version's weights file is written before the origin and the checkpoint
    hard-link it (beside both: the same filesystem)."""
    return cfg.run.out_dir / "trainer" / "staging"


def publish_config(cfg: RLConfig) -> Any:
    from cotrain.shardcast.config import PublishConfig

    return PublishConfig(keep_versions=cfg.keep_versions, channel=cfg.run.id, file_mode="link")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage_weights(model: Any, cfg: RLConfig) -> Path:
    """Write the model's weights (``weights_bytes``'s bytes) to a new file in the staging
    directory; the caller removes it. Files left by a process that no longer runs go first."""
    root = staging_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob("weights-*"):
        try:
            pid = int(p.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            p.unlink(missing_ok=True)
    path = root / f"weights-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
    try:
        write_weights(model, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Resumed:
    """Where a (re)started trainer stands once checkpoint and versions agree."""

    step: int
    """Trainer steps done; the next is ``step + 1``."""
    version: int
    """The latest published version (``step + 1``)."""
    file_sha256: str
    """Its manifest's ``file_sha256``."""
    level: int
    """The curriculum level of the last batch trained on (``env.start_level`` at first)."""
    action: str
    """What resuming did: ``published base``, ``continued``, ``published checkpoint``,
    ``loaded version``."""


def resume(learner: Learner, cfg: RLConfig, identity: Identity, *, log: Any = _stderr) -> Resumed:
    """Load the checkpoint (if any) into ``learner`` and make the origin's versions agree with
    it, publishing what is missing (see the module's docstring for each case). Synchronous:
    call ``Origin.rescan`` afterwards if an origin serves the directory."""
    from cotrain.shardcast.errors import ShardcastError
    from cotrain.shardcast.manifest import SignedManifest, TrustPolicy
    from cotrain.shardcast.publisher import publish
    from cotrain.shardcast.store import VersionStore

    ckpt = checkpoint_dir(cfg)
    saved = learner.load(ckpt)
    step = saved.step if saved is not None else 0
    level = int(saved.extra.get("level", cfg.env.start_level)) if saved else cfg.env.start_level
    store = VersionStore(versions_dir(cfg))
    for v in store.discard_partial():  # a publish the last trainer was killed in
        log(f"trainer: removed v{v}, a version left half-published")
    latest = store.latest()
    where = f"{store.root} and {ckpt}"
    fix = f"delete {cfg.run.out_dir} (or use another run.out_dir) to start over"

    def published(action: str) -> Resumed:
        path = stage_weights(learner.model, cfg)
        try:
            result = publish(path, dir=store.root, identity=identity, config=publish_config(cfg))
        finally:
            path.unlink(missing_ok=True)
        if result.version != step + 1:
            raise ResumeError(
                f"published v{result.version} where v{step + 1} was due ({where}): {fix}"
            )
        log(f"trainer: {action}: v{result.version} (after step {step})")
        return Resumed(step, result.version, result.manifest.file_sha256, level, action)

    if latest is None:
        if step > 0:
            raise ResumeError(
                f"the checkpoint is at step {step} but {store.root} holds no version: restore "
                f"the versions or {fix}"
            )
        return published("published base")

    raw = store.read_manifest(latest)
    try:
        assert raw is not None  # latest() lists versions whose manifest exists
        manifest = TrustPolicy(publisher_key=identity.public_hex, channel=cfg.run.id).check(
            SignedManifest.parse(raw), expected_version=latest
        )
    except ShardcastError as e:
        raise ResumeError(
            f"{store.root} holds versions of another trainer or run ({e}): {fix}"
        ) from None

    if latest == step:  # killed after the checkpoint, before publishing its weights
        return published("published checkpoint")
    if latest == step + 1:
        # the checkpoint's model file (hash checked, loaded) is the version's file, or else
        # the weights now in the model are serialised again
        got = saved.model_sha256 if saved is not None else ""
        if got != manifest.file_sha256:
            path = stage_weights(learner.model, cfg)
            try:
                got = sha256_file(path)
            finally:
                path.unlink(missing_ok=True)
        if got != manifest.file_sha256:
            raise ResumeError(
                f"v{latest} on the origin is not the weights of the checkpoint of step {step} "
                f"({where}): {fix}"
            )
        log(f"trainer: continued: v{latest} (after step {step})")
        return Resumed(step, latest, manifest.file_sha256, level, "continued")
    if latest > step + 1:  # published after the last checkpoint: take the newest weights
        from safetensors.torch import load_model

        path = store.data_path(latest)
        if sha256_file(path) != manifest.file_sha256:
            raise ResumeError(f"{path} does not match its manifest's hash: {fix}")
        load_model(learner.model, path, strict=True)
        learner.steps = latest - 1
        log(
            f"trainer: loaded version: v{latest} from {path} (checkpoint at step {step}; "
            f"AdamW's moments are those of step {step})"
        )
        return Resumed(latest - 1, latest, manifest.file_sha256, level, "loaded version")
    raise ResumeError(
        f"the checkpoint is at step {step} but the newest version is v{latest} ({where}): {fix}"
    )


# ---- the orchestrator over HTTP --------------------------------------------------------------


class OrchestratorLink:
    """The trainer's two calls to the orchestrator, each with a timeout; connection errors and
    5xx answers are retried with backoff until the call's deadline."""

    def __init__(self, url: str, session: aiohttp.ClientSession, *, log: Any = _stderr) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.log = log

    async def _call(
        self,
        method: str,
        path: str,
        *,
        deadline: float,
        wait_s: float = 0.0,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:
        delay = 0.2
        while True:
            timeout = aiohttp.ClientTimeout(
                total=wait_s + CALL_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S
            )
            try:
                async with self.session.request(
                    method, self.url + path, params=params, json=body, timeout=timeout
                ) as resp:
                    if 400 <= resp.status < 500:
                        raise OrchestratorRefused(
                            f"orchestrator refused {method} {path} ({resp.status}): "
                            f"{await _reason(resp)}"
                        )
                    if resp.status >= 500:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=resp.reason or ""
                        )
                    got = await resp.json(content_type=None)
                    if not isinstance(got, dict):
                        raise aiohttp.ClientPayloadError("expected a JSON object")
                    return got
            except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OrchestratorUnreachable(
                        f"no answer from the orchestrator at {self.url} ({type(e).__name__}: {e})"
                    ) from None
                self.log(f"trainer: {method} {path}: {type(e).__name__}: {e}; retrying")
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    async def announce(self, envelope: Envelope, *, timeout_s: float) -> None:
        """``POST /v1/version`` with the signed notice; 200 ``{"ok": true}``."""
        deadline = time.monotonic() + timeout_s
        got = await self._call("POST", "/v1/version", deadline=deadline, body=envelope.to_json())
        if got.get("ok") is not True:
            raise TrainerError(f"orchestrator did not accept the version notice: {got}")

    async def batch(self, step: int, *, timeout_s: float) -> wire.Batch | None:
        """Long-poll ``GET /v1/batch?step=N&wait_s=W`` until the batch is ready (None: the
        orchestrator says the run is done)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BatchTimeout(
                    f"no batch for step {step} within trainer.batch_timeout_s={timeout_s:g} s "
                    f"(is any worker or validator running? see {self.url}/v1/status)"
                )
            wait = min(MAX_POLL_S, left)
            got = await self._call(
                "GET",
                "/v1/batch",
                deadline=deadline,
                wait_s=wait,
                params={"step": str(step), "wait_s": f"{wait:.3f}"},
            )
            status = got.get("status")
            if status == "ready":
                batch = wire.Batch.from_json(got.get("batch"))
                if batch.step != step:
                    raise TrainerError(f"asked for the batch of step {step}, got {batch.step}")
                return batch
            if status == "aborted":
                raise RunAbortedError(
                    f"the orchestrator aborted the run at step {step}: {got.get('reason')}"
                )
            if status == "done":
                return None
            if status != "pending":
                raise TrainerError(f"unexpected answer to GET /v1/batch: {str(got)[:200]}")


async def _reason(resp: aiohttp.ClientResponse) -> str:
    try:
        got = await resp.json(content_type=None)
        return str(got.get("error", resp.reason))[:300] if isinstance(got, dict) else str(got)
    except (aiohttp.ClientError, ValueError):
        return str(resp.reason)


# ---- the role --------------------------------------------------------------------------------


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while waiting."""


@dataclass
class _Pending:
    """A step's metrics line, written once its checkpoint and held-out evaluation (each when
    due) are done; both run in threads while the next batch is awaited."""

    record: dict[str, Any]
    eval_task: asyncio.Future[tuple[float, float]] | None = None
    ckpt_task: asyncio.Future[float] | None = None


class Trainer:
    """The trainer's loop around a ``Learner``, its origin and the orchestrator."""

    def __init__(
        self,
        cfg: RLConfig,
        model: Any,
        tokenizer: Any,
        identity: Identity,
        *,
        env: Any = None,
        log: Callable[[str], None] = _stderr,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.learner = Learner(model, cfg.trainer)
        self.tokenizer = tokenizer
        self.identity = identity
        self.env = env
        """Held-out tasks' environment (None: no evaluation)."""
        self.log = log
        self.emit_line = emit or _stdout
        self.metrics_path = cfg.run.out_dir / "trainer.jsonl"
        self.origin: Any = None
        self.origin_url = ""
        self.step = 0
        self.version = 0
        self.file_sha256 = ""
        self.wait_total = 0.0
        self.eval_total = 0.0
        self.started = 0.0
        self._waiting_since: float | None = None
        self._stop: asyncio.Future[None] | None = None
        self.recorder: Any = None
        """Reports each step to the coordinator (``trainer.coordinator``), when set."""

    # ---- metrics -----------------------------------------------------------------------------

    def emit(self, record: dict[str, Any]) -> None:
        """One JSON line on stdout and appended to ``out_dir/trainer.jsonl``."""
        line = json.dumps(_finite(record))
        self.emit_line(line)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
        if self.recorder is not None and record.get("event") in ("step", "eval"):
            self._report(record)

    def _report(self, record: dict[str, Any]) -> None:
        """The step's figures as a ``task.report`` for the coordinator's dashboard."""
        metrics = {"version": float(record["version"])}
        for name in ("mean_reward", "heldout_accuracy", "level", "samples", "idle_fraction"):
            x = record.get(name)
            if isinstance(x, int | float) and math.isfinite(x):
                metrics[name] = float(x)
        sha = self.file_sha256 if record["version"] == self.version else ""
        note = f"policy v{record['version']}" + (f", manifest file sha256 {sha}" if sha else "")
        self.recorder.report(int(record["step"]), metrics, note)

    def summary(self) -> str:
        return f"{self.step} steps, v{self.version} published, idle {self._idle():.1%}"

    def _wall(self) -> float:
        if not self.started:
            return 0.0
        return max(0.0, time.monotonic() - self.started - self.eval_total)

    def _idle(self) -> float:
        wall = self._wall()
        waiting = self.wait_total
        if self._waiting_since is not None:  # a wait in progress (a stop's summary)
            waiting += time.monotonic() - self._waiting_since
        return waiting / wall if wall > 0 else 0.0

    # ---- evaluation --------------------------------------------------------------------------

    @property
    def evaluating(self) -> bool:
        c = self.cfg
        return self.env is not None and c.trainer.eval_every > 0 and c.env.heldout_items > 0

    def _evaluate(self) -> tuple[float, float]:
        from cotrain.rl.seeds import heldout_seeds

        t0 = time.monotonic()
        acc = heldout_accuracy(
            self.learner.model,
            self.tokenizer,
            self.env,
            heldout_seeds(self.cfg.env.heldout_items),
            level=self.cfg.env.start_level,
            max_new_tokens=self.cfg.sampling.max_new_tokens,
        )
        return acc, time.monotonic() - t0

    async def _flush(self, pending: _Pending | None) -> None:
        """Wait for the pending checkpoint and evaluation (if any) and write the line."""
        if pending is None:
            return
        if pending.ckpt_task is not None:  # shielded: a stop must not orphan a checkpoint
            pending.record["checkpoint_s"] = await asyncio.shield(pending.ckpt_task)
        if pending.eval_task is not None:
            acc, eval_s = await pending.eval_task
            self.eval_total += eval_s
            pending.record.update(heldout_accuracy=acc, eval_s=eval_s)
        self.emit(pending.record)

    # ---- versions ----------------------------------------------------------------------------

    def notice(self) -> Envelope:
        body = wire.VersionNotice(
            self.cfg.run.id,
            self.version,
            self.file_sha256,
            self.version - 1,
            time.time(),
            [self.origin_url],
        ).to_body()
        return Envelope.seal(self.identity, wire.VERSION, body)

    async def announce(self, link: OrchestratorLink) -> None:
        await self._until_stop(
            link.announce(self.notice(), timeout_s=self.cfg.trainer.batch_timeout_s)
        )

    def _train(self, batch: wire.Batch) -> tuple[StepStats, Path, float]:
        """The step, then the weights to publish written to a staged file (in a thread)."""
        t0 = time.monotonic()
        stats = self.learner.step(batch)
        train_s = time.monotonic() - t0
        return stats, stage_weights(self.learner.model, self.cfg), train_s

    def _checkpoint(self, n: int, weights: Path, digest: str, level: int) -> float:
        """Save step ``n`` (in a thread, while nothing changes the model or AdamW), its model
        file a link of the staged ``weights`` (removed here)."""
        t0 = time.monotonic()
        extra = {"version": n + 1, "file_sha256": digest, "level": level}
        try:
            self.learner.save(
                checkpoint_dir(self.cfg), n, extra, weights=weights, weights_sha256=digest
            )
        finally:
            weights.unlink(missing_ok=True)
        return time.monotonic() - t0

    # ---- the loop ----------------------------------------------------------------------------

    async def _until_stop(self, aw: Awaitable[T]) -> T:
        task = asyncio.ensure_future(aw)
        if self._stop is None:
            return await task
        both: list[asyncio.Future[Any]] = [task, self._stop]
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise _Stopped

    async def run(self, svc: Any) -> None:
        """Serve the origin, resume, and train until ``total_steps`` (or a stop)."""
        from cotrain.shardcast.config import OriginConfig, ServeConfig
        from cotrain.shardcast.origin import Origin

        cfg = self.cfg
        t = cfg.trainer
        self.origin = Origin(
            OriginConfig(dir=versions_dir(cfg), serve=ServeConfig(host=t.host, port=t.port))
        )
        try:
            try:
                self.origin_url = await self.origin.start()
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UsageError(
                        f"port {t.port} on {t.host} is in use: pick another with "
                        "--trainer.port (0: any free port)"
                    ) from None
                raise UsageError(f"cannot listen on {t.host}:{t.port}: {e.strerror or e}") from None
            got = await asyncio.to_thread(resume, self.learner, cfg, self.identity, log=self.log)
            self.origin.rescan()
            self.step, self.version, self.file_sha256 = got.step, got.version, got.file_sha256
            port = int(self.origin_url.rsplit(":", 1)[1])
            svc.ready(
                url=self.origin_url,
                host=t.host,
                port=port,
                key=self.identity.public_hex,
                step=self.step,
                version=self.version,
                resumed=got.action,
            )
            self._stop = asyncio.ensure_future(svc.stopped())
            if t.coordinator:
                from cotrain.protocol.recorder import Recorder

                if not t.coordinator_task:
                    raise UsageError("trainer.coordinator needs trainer.coordinator_task")
                self.recorder = Recorder(t.coordinator, self.identity, t.coordinator_task)
                self.recorder.start()
            async with aiohttp.ClientSession() as session:
                link = OrchestratorLink(cfg.orchestrator_url, session, log=self.log)
                try:
                    await self._loop(link, got.step)
                except _Stopped:
                    pass
        finally:
            if self._stop is not None:
                self._stop.cancel()
            await self.origin.close()
            if self.recorder is not None:
                if not await self.recorder.flush(10.0):
                    self.log(f"trainer: {self.recorder.pending} report(s) not recorded")
                await self.recorder.close()

    async def _loop(self, link: OrchestratorLink, resumed: int) -> None:
        cfg = self.cfg
        await self.announce(link)
        self.started = time.monotonic()
        pending: _Pending | None = None
        if resumed == 0 and self.evaluating:
            base = {"event": "eval", "step": 0, "version": 1}
            pending = _Pending(base, asyncio.ensure_future(asyncio.to_thread(self._evaluate)))
        try:
            for n in range(resumed + 1, cfg.run.total_steps + 1):
                # ask for the batch at once; the last step's evaluation runs meanwhile
                fetch = asyncio.ensure_future(link.batch(n, timeout_s=cfg.trainer.batch_timeout_s))
                try:
                    await self._until_stop(self._flush(pending))
                    pending = None
                    t_wait = self._waiting_since = time.monotonic()
                    batch = await self._until_stop(fetch)
                    self._waiting_since = None
                finally:
                    if not fetch.done():
                        fetch.cancel()
                wait_s = time.monotonic() - t_wait
                self.wait_total += wait_s
                if batch is None:
                    self.log(f"trainer: the orchestrator says the run is done before step {n}")
                    break
                pending = await self._one_step(link, n, batch, wait_s)
            await self._until_stop(self._flush(pending))
            pending = None
        finally:
            if pending is not None:  # stopped or failed: the line without its evaluation
                if pending.ckpt_task is not None:
                    pending.record["checkpoint_s"] = await pending.ckpt_task
                self.emit(pending.record)

    async def _one_step(
        self, link: OrchestratorLink, n: int, batch: wire.Batch, wait_s: float
    ) -> _Pending:
        """Train on step ``n``'s batch, publish and announce ``v(n+1)``; its metrics line (and
        evaluation, when due) are left pending."""
        cfg = self.cfg
        lo = n - cfg.run.async_level
        kept = [s for s in batch.samples if lo <= s.version <= n]
        left_out = len(batch.samples) - len(kept)
        if left_out:
            self.log(f"trainer: step {n}: {left_out} samples outside versions {lo}..{n} left out")
            batch = wire.Batch(
                batch.step, kept, batch.groups, batch.dropped_groups, batch.mean_reward, batch.level
            )
        # not cancelled by a stop: what is published and saved is whole steps
        stats, weights, train_s = await asyncio.to_thread(self._train, batch)
        save = n % cfg.trainer.checkpoint_every == 0 or n == cfg.run.total_steps
        try:
            t0 = time.monotonic()
            result = await self.origin.publish(
                weights, identity=self.identity, config=publish_config(cfg)
            )
            if result.version != n + 1:
                raise TrainerError(
                    f"published v{result.version} after step {n} (expected v{n + 1}): another "
                    f"process publishes into {versions_dir(cfg)}"
                )
        except BaseException:
            weights.unlink(missing_ok=True)
            raise
        if not save:
            weights.unlink(missing_ok=True)  # the origin's link is the version's file
        digest = result.manifest.file_sha256  # of the file placed: the staged one, linked
        self.step, self.version, self.file_sha256 = n, result.version, digest
        stopped = False
        try:
            await self.announce(link)
        except _Stopped:
            stopped = True  # the restarted trainer announces it
        except BaseException:
            weights.unlink(missing_ok=True)
            raise
        publish_s = time.monotonic() - t0
        ckpt_task = None
        if save:
            ckpt_task = asyncio.ensure_future(
                asyncio.to_thread(self._checkpoint, n, weights, digest, batch.level)
            )
        record = {
            "event": "step",
            "step": n,
            "version": self.version,
            "wall_s": self._wall(),
            "wait_s": wait_s,
            "train_s": train_s,
            "checkpoint_s": 0.0,
            "publish_s": publish_s,
            "eval_s": 0.0,
            "idle_fraction": self._idle(),
            "mean_reward": batch.mean_reward,
            "level": batch.level,
            "groups": batch.groups,
            "dropped_groups": batch.dropped_groups,
            "left_out": left_out,
            **stats.to_json(),
        }
        due = cfg.trainer.eval_every and (
            n % cfg.trainer.eval_every == 0 or n == cfg.run.total_steps
        )
        task = None
        if self.evaluating and due and not stopped:
            task = asyncio.ensure_future(asyncio.to_thread(self._evaluate))
        pending = _Pending(record, task, ckpt_task)
        if stopped:
            await self._flush(pending)
            raise _Stopped
        return pending


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: no other thread's line lands inside it
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: such floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_trainer(cfg: RLConfig, *, log: Callable[[str], None] = _stderr) -> int:
    """``cotrain rl trainer``: the whole role; its exit code (errors propagate to the CLI:
    ``UsageError`` exit 2, any other ``CotrainError`` such as ``RunAbortedError`` or
    ``BatchTimeout`` exit 1, one line)."""
    from cotrain.core.service import Service
    from cotrain.rl import policy

    policy.check_memory("trainer", cfg.model, log=log)
    identity = Identity.load_or_create(cfg.path(cfg.trainer.key))
    pol = policy.load_policy(cfg.model)
    env = None
    if cfg.trainer.eval_every > 0 and cfg.env.heldout_items > 0:
        from cotrain.rl.env import make_env

        env = make_env(cfg.env.name)
    trainer = Trainer(cfg, pol.model, pol.tokenizer, identity, env=env, log=log)
    log(
        f"trainer: {pol.model_id}, key {identity.public_hex[:16]}..., orchestrator "
        f"{cfg.orchestrator_url}, {cfg.run.total_steps} steps"
    )
    with Service("rl trainer") as svc:
        svc.summary = trainer.summary
        asyncio.run(trainer.run(svc))
    return svc.exit_code
