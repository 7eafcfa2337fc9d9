"""The chaos harness's judge: every event of a run against what was trained, served and stored.

`Evidence` is what a run leaves behind, read from the real components once the stream stopped:
the interactions topic read back from the broker (the ground truth), the producer's acknowledged
offsets, the trainer group's committed offsets, the offsets the served version was trained
through, every manifest published during the run, and every user's history in Redis.
`check` turns it into per-phase figures:

- lost: an event the broker acknowledged but does not hold; an event whose offset the trainer
  committed but the served version's trained-through offsets do not cover; an event inside a
  version's offset span that the version did not train (nor record as refused by its gate);
  an event missing from its user's history;
- untrained: an event the served version does not cover once the run settled (hung, or behind);
- duplicated: events a version trained beyond its offset span (trained twice), and history
  entries beyond the user's events.

Pure functions over plain data: a test can corrupt a real run's evidence and see the loss.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """One interaction as the broker holds it."""

    partition: int
    offset: int
    seq: int  # the producer's sequence number (unique per produced event)
    user: str
    item: str


@dataclass
class Evidence:
    """Everything the checker reads (JSON-serialisable: written next to chaos.json)."""

    topic: str
    records: list[Record]
    acked: dict[int, tuple[int, int]]  # seq -> (partition, offset) the broker acknowledged
    committed: dict[int, int]  # trainer group's committed offset per partition
    served: dict[int, int]  # offsets (per partition) the served version was trained through
    manifests: list[dict[str, Any]]  # every version seen during the run (raw manifests)
    histories: dict[str, list[str]]  # user -> history in the features store
    popularity_total: float = 0.0  # sum of the features store's popularity counts

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Evidence:
        return cls(topic=d["topic"], records=[Record(**r) for r in d["records"]],
                   acked={int(k): (v[0], v[1]) for k, v in d["acked"].items()},
                   committed={int(k): v for k, v in d["committed"].items()},
                   served={int(k): v for k, v in d["served"].items()},
                   manifests=d["manifests"], histories=d["histories"],
                   popularity_total=d.get("popularity_total", 0.0))


@dataclass
class Phase:
    """A span of the run with one kind of fault: events with seq in [first_seq, end_seq),
    versions created in [t0, t1) (wall clock)."""

    name: str
    first_seq: int
    end_seq: int
    t0: float
    t1: float


@dataclass
class Figures:
    lost: int = 0
    duplicated: int = 0
    untrained: int = 0
    detail: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int, kind: str) -> None:
        if n:
            self.detail[what] = self.detail.get(what, 0) + n
            setattr(self, kind, getattr(self, kind) + n)


def partition_offsets(offsets: dict[str, int], topic: str) -> dict[int, int]:
    """A manifest's "topic:partition" -> offset map, for one topic, keyed by partition."""
    out = {}
    for key, off in offsets.items():
        t, _, p = key.rpartition(":")
        if t == topic:
            out[int(p)] = int(off)
    return out


def check(ev: Evidence, phases: Sequence[Phase]) -> dict[str, Figures]:
    """Per-phase figures (events outside every phase count under "between")."""
    figures = {p.name: Figures() for p in phases}
    figures["between"] = Figures()

    def phase_of_seq(seq: int) -> Figures:
        for p in phases:
            if p.first_seq <= seq < p.end_seq:
                return figures[p.name]
        return figures["between"]

    def phase_of_time(t: float) -> Figures:
        for p in phases:
            if p.t0 <= t < p.t1:
                return figures[p.name]
        return figures["between"]

    held = {r.seq for r in ev.records}
    for seq in ev.acked:
        if seq not in held:
            phase_of_seq(seq).add("acked_not_in_log", 1, "lost")
    for r in ev.records:
        covered = r.offset < ev.served.get(r.partition, 0)
        if not covered and r.offset < ev.committed.get(r.partition, 0):
            phase_of_seq(r.seq).add("committed_not_trained", 1, "lost")
        elif not covered:
            phase_of_seq(r.seq).add("not_trained_at_end", 1, "untrained")
    _check_versions(ev, phase_of_time)
    _check_histories(ev, phase_of_seq)
    excess = round(ev.popularity_total) - len(ev.records)
    if excess:  # popularity counts each applied event once; the whole-run figure goes "between"
        figures["between"].add("popularity_excess" if excess > 0 else "popularity_missing",
                               abs(excess), "duplicated" if excess > 0 else "lost")
    return figures


def _check_versions(ev: Evidence, phase_of_time: Any) -> None:
    """Each version trained exactly the events between its parent's offsets and its own,
    less those its gate refused. Versions whose parent is unknown (the first of an epoch,
    published after Redis lost the parent) are not checked: their span is unknown."""
    by_digest = {manifest_digest(m): m for m in ev.manifests}
    first = min(ev.manifests, key=lambda m: m.get("created_at", 0.0), default=None)
    for m in ev.manifests:
        parent = by_digest.get(m.get("parent_digest") or "")
        through = m.get("trained_through", {})
        mine = partition_offsets(through.get("offsets", {}), ev.topic)
        if parent is not None:
            before = partition_offsets(parent.get("trained_through", {}).get("offsets", {}),
                                       ev.topic)
        elif m is first and m.get("parent") is None:
            before = {}  # the run's first version: trained from the start of the log
        else:
            continue  # first of a new epoch, or its parent was pruned before it was read
        span = sum(off - before.get(p, 0) for p, off in mine.items())
        refused = sum(end - first for key, (first, end) in through.get("refused", {}).items()
                      if key.rpartition(":")[0] == ev.topic)
        trained = int(through.get("events", 0))
        at = phase_of_time(float(m.get("created_at", 0.0)))
        at.add("trained_twice", max(0, trained - (span - refused)), "duplicated")
        at.add("skipped_in_span", max(0, span - refused - trained), "lost")


def manifest_digest(m: dict[str, Any]) -> str:
    from protocol.weights import Manifest

    try:
        return Manifest(**m).digest()
    except TypeError:
        return ""


def _check_histories(ev: Evidence, phase_of_seq: Any) -> None:
    """Each user's history must be exactly the user's events in log order (one partition per
    user, so offset order is produce order): entries missing or repeated are found by a diff."""
    per_user: dict[str, list[Record]] = {}
    for r in sorted(ev.records, key=lambda r: (r.partition, r.offset)):
        per_user.setdefault(r.user, []).append(r)
    for user, events in per_user.items():
        expected = [r.item for r in events]
        actual = ev.histories.get(user, [])
        matcher = difflib.SequenceMatcher(a=expected, b=actual, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op in ("delete", "replace"):
                for r in events[i1:i2]:
                    phase_of_seq(r.seq).add("missing_from_history", 1, "lost")
            if op in ("insert", "replace"):
                near = events[min(i1, len(events) - 1)].seq
                phase_of_seq(near).add("extra_in_history", j2 - j1, "duplicated")
