"""Configs of ``cotrain toploc generate`` and ``cotrain toploc verify``. ``VerifyJob`` *is* a
``ValidatorConfig`` with the command's inputs added, so a validator's TOML file is also the
command's."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from cotrain.core.config import ConfigModel
from cotrain.toploc.config import ValidatorConfig

MAX_FILE_MB = 1024
"""Default of ``verify --max_file_mb``."""
MAX_RECORDS = 1_000_000
"""Default of ``verify --max_records`` (a row of the verdict table is a few hundred bytes)."""


class GenerateJob(ConfigModel):
    """``cotrain toploc generate --out FILE --prompt TEXT [--prompt TEXT ...]``."""

    out: Path
    """JSONL file to write the rollouts to."""
    model: str = "smollm2-135m-instruct"
    """Model spec: smollm2-135m-instruct, gpt-debug-seed0, or a local Hugging Face directory."""
    prompts: list[str] = Field(default_factory=list)
    """User messages, one rollout each (``--prompt TEXT`` adds one)."""
    prompts_file: Path | None = None
    """Text file, one user message a line (added after ``prompts``)."""
    max_new_tokens: int = 64
    """Output tokens per rollout at most."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 8
    """Prompts generated together."""


class VerifyJob(ValidatorConfig):
    """``cotrain toploc verify ROLLOUTS.jsonl --model SPEC``."""

    file: Path
    """JSONL rollout file to verify (untrusted: whatever is in it ends as a verdict)."""
    model: str
    """The model to recompute with (its spec)."""
    json_out: Path | None = None
    """Also write the verdicts as JSON here (``--json FILE``)."""
    max_file_mb: int = MAX_FILE_MB
    """Reject rollout files larger than this."""
    max_records: int = MAX_RECORDS
    """Reject files with more records than this."""
