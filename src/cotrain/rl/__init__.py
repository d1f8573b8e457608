"""Asynchronous RL with untrusted inference workers (issue 12, in progress).

Built so far: ``sampling`` (seeded Gumbel-max sampling that a validator replays on its own
prefill) and ``env`` (tasks from seeds the orchestrator draws, reasoning-gym behind a small
``Env`` protocol, scoring, a gold-answer self-test, a curriculum).
"""
