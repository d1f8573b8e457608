"""Asynchronous RL with untrusted inference workers (issue 12, in progress).

Built so far: ``sampling`` (seeded Gumbel-max sampling that a validator replays on its own
prefill).
"""
