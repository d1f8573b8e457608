"""How a restarted master rebuilds its state from the peers' ``resume`` reports.

A restarted master knows nothing: each returning peer reports the view it last had (epoch, ring,
shared-state revision) and the collective it last reported done. The view is elected by the
ring's members, never taken from whoever arrives first: a peer dropped before the restart (it
was stopped, or cut off) still reports the old epoch and ring, and adopting it would restore an
old revision (every later sync then fails) or a ring of peers that moved on.

* ``elect``: the (epoch, ring) that a strict majority of that ring's members report; once the
  collection window is over, the one reported most (ties: the higher epoch). The revision is the
  one a strict majority of its reporters hold, else None (the next sync's majority is accepted).
* ``outcomes``: members that were waiting for a collective's commit when the old master died
  learn it now. If any member of the elected view reports the commit, every waiting member
  commits (the old master committed it: every member had reported done); if none does once
  every member reported or was dropped, every waiting member rolls back (no survivor kept it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from cotrain.comm import messages as m


@dataclass(frozen=True)
class View:
    epoch: int
    ring: tuple[str, ...]
    revision: int | None
    reporters: frozenset[str]
    """Members of ``ring`` that reported exactly this view."""


def _matches(r: m.Resume, epoch: int, ring: tuple[str, ...]) -> bool:
    return r.epoch == epoch and tuple(r.ring) == ring


def elect(resumes: Mapping[str, m.Resume], *, final: bool) -> View | None:
    """The view to adopt from ``resumes`` (peer id -> its report), or None to wait for more."""
    support: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for pid, r in resumes.items():
        if pid in r.ring:  # a report counts for the view it names, from a member of that view
            support[(r.epoch, tuple(r.ring))] += 1
    if not support:
        return None
    (epoch, ring), votes = max(support.items(), key=lambda kv: (kv[1], kv[0][0]))
    if not final and 2 * votes <= len(ring):
        return None
    reporters = frozenset(p for p, r in resumes.items() if p in ring and _matches(r, epoch, ring))
    revisions = Counter(resumes[p].revision for p in reporters)
    revision, held = revisions.most_common(1)[0]
    return View(epoch, ring, revision if 2 * held > len(reporters) else None, reporters)


def outcomes(
    view: View, resumes: Mapping[str, m.Resume], *, all_reported: bool
) -> dict[str, tuple[int, int, bool]]:
    """Peer id -> (epoch, seq, commit?) for the peers waiting for a commit that can be decided
    now; waiting peers absent from the result wait for more reports."""
    committed = {
        r.done_seq
        for p, r in resumes.items()
        if p in view.ring and r.epoch == view.epoch and r.committed
    }
    out: dict[str, tuple[int, int, bool]] = {}
    for pid, r in resumes.items():
        if r.done_seq is None or r.committed:
            continue
        if r.epoch != view.epoch or pid not in view.ring:
            # not a member of the elected view: it cannot have taken part in a commit of it
            out[pid] = (r.epoch, r.done_seq, False)
        elif r.done_seq in committed:
            out[pid] = (r.epoch, r.done_seq, True)
        elif all_reported:
            out[pid] = (r.epoch, r.done_seq, False)
    return out
