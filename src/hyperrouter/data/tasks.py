"""Text-classification datasets for fine-tuning: SST-2, SST-5, IMDB, BANKING77.

`load_task(task, path)` reads a task from a directory whose format is recognised from its files
(or from one file of that directory, which picks the format when a directory holds several):

- sst2: GLUE SST-2 (`train.tsv`, `dev.tsv`, header `sentence<TAB>label`; `test.tsv` has no labels
  and is not read), SST sentence files (`stsa.binary.{train,dev,test}`, `<label> <sentence>` per
  line) or SST PTB trees (`train.txt dev.txt test.txt`; the root label with neutral 2 dropped,
  0/1 -> negative, 3/4 -> positive; the text is the leaves joined by spaces).
- sst5: sentence files `stsa.fine.{train,dev,test}` or the trees with the five root labels.
- imdb: JSON Lines shards `{train,test}/*.jsonl` (one `{"text": ..., "label": 0|1}` per line; the
  folder tells train from test) or the original `aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`
  (path = the `aclImdb` folder or its parent).
- banking77: `train.csv` and `test.csv` (header `text,category`); the label order is that of
  `categories.json` when present, else of first appearance in `train.csv`.

Validation and test splits (the reported test split never chooses a checkpoint):

- SST sentence files and SST trees have a labelled dev and a labelled test file:
  valid = dev, test = test.
- GLUE SST-2 (test.tsv is unlabelled, so dev.tsv is the reported test split), IMDB and BANKING77
  (train and test only): valid is carved out of train, `valid_fraction` of every label drawn with
  `random.Random(seed)` and removed from train. Examples whose text also occurs in the test split
  or more than once in train are never drawn, so no valid text is a test or train text.

Labels are 0..C-1 in `TaskData.label_names` order; a dev or test label that never occurs in the
training data is an error naming its file and line. `max_examples` keeps a seeded random subset
of N examples of the train and valid splits (after the carve, in file order) for quick runs;
`max_test_examples` does the same for the reported test split with a fixed seed, so that runs
with different seeds are scored on the same test examples. Every reader validates its input and
names the file and line of a malformed record in a one-line `HyperRouterError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hyperrouter.errors import HyperRouterError

TASKS = ("sst2", "sst5", "imdb", "banking77")
TEST_SUBSET_SEED = 0  # max_test_examples draws the same test subset for every fine-tuning seed
SST2_LABELS = ["negative", "positive"]
SST5_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
IMDB_LABELS = ["negative", "positive"]


@dataclass
class ClassificationSplit:
    """Texts with integer labels; `origins[i]` says where example i came from (`file:line`)."""

    texts: list[str]
    labels: list[int]
    origins: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise HyperRouterError(
                f"a split needs one label per text, got {len(self.texts)} texts "
                f"and {len(self.labels)} labels"
            )
        if self.origins and len(self.origins) != len(self.texts):
            raise HyperRouterError(
                f"origins must be empty or one per text, got {len(self.origins)} "
                f"for {len(self.texts)} texts"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> ClassificationSplit:
        """The examples at `index`, in that order."""
        return ClassificationSplit(
            [self.texts[i] for i in index],
            [self.labels[i] for i in index],
            [self.origins[i] for i in index] if self.origins else [],
        )

    def origin(self, i: int) -> str:
        """Where example i came from, for error messages."""
        return self.origins[i] if self.origins else f"example {i + 1}"


@dataclass
class TaskData:
    """One classification task: label names and the train / valid / test splits."""

    task: str
    label_names: list[str]
    train: ClassificationSplit
    valid: ClassificationSplit  # checkpoint selection; never the reported split
    test: ClassificationSplit  # reported
    valid_source: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------- file helpers


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HyperRouterError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise HyperRouterError(f"{path}:{line}: not valid UTF-8 text") from None


def _lines(path: Path) -> list[str]:
    # only \n (and \r\n) end a line: texts contain U+2028 and the like, which
    # str.splitlines would also split on
    return [line.removesuffix("\r") for line in _read_text(path).split("\n")]


def _label(text: str, valid: range, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HyperRouterError(f"{where}: label {text!r} is not an integer") from None
    if value not in valid:
        raise HyperRouterError(
            f"{where}: label {value} is out of range [{valid.start}, {valid.stop - 1}]"
        )
    return value


def _nonempty(text: str, where: str) -> str:
    text = text.strip()
    if not text:
        raise HyperRouterError(f"{where}: empty text")
    return text


# --------------------------------------------------------------------------- readers


def read_glue_sst2_tsv(path: str | os.PathLike) -> ClassificationSplit:
    """GLUE SST-2 train.tsv / dev.tsv: header `sentence<TAB>label`, labels 0/1."""
    path = Path(path)
    lines = _lines(path)
    header = lines[0].split("\t")
    if header != ["sentence", "label"]:
        raise HyperRouterError(
            f"{path}:1: expected the header 'sentence<TAB>label', got {lines[0][:60]!r}"
            + (" (GLUE's test.tsv has no labels)" if header == ["index", "sentence"] else "")
        )
    split = ClassificationSplit([], [])
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        cols = line.split("\t")
        if len(cols) != 2:
            raise HyperRouterError(
                f"{where}: expected 2 tab-separated columns (sentence, label), got {len(cols)}"
            )
        split.texts.append(_nonempty(cols[0], where))
        split.labels.append(_label(cols[1].strip(), range(2), where))
        split.origins.append(where)
    return split


def read_sst_sentences(
    path: str | os.PathLike, num_classes: int | None = None
) -> ClassificationSplit:
    """SST sentence files (stsa.binary.* / stsa.fine.*): `<label> <sentence>` per line.

    num_classes defaults to 2 for a file named `*binary*` and 5 for `*fine*`.
    """
    path = Path(path)
    if num_classes is None:
        if "binary" in path.name:
            num_classes = 2
        elif "fine" in path.name:
            num_classes = 5
        else:
            raise HyperRouterError(
                f"cannot tell binary from fine labels by the name {path.name!r}; "
                "pass num_classes=2 or 5"
            )
    split = ClassificationSplit([], [])
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        parts = line.split(maxsplit=1)
        split.labels.append(_label(parts[0], range(num_classes), where))
        split.texts.append(_nonempty(parts[1] if len(parts) > 1 else "", where))
        split.origins.append(where)
    return split


# words split on ASCII blanks only: SST leaves hold no-break spaces, e.g. "2\u00a01\\/2"
_TREE_TOKEN = re.compile(r"\(|\)|[^ \t\r\n()]+")
_EMPTY, _LEAF, _INNER = 0, 1, 2  # what an open tree node holds so far


def parse_tree(line: str, where: str) -> tuple[int, str]:
    """Root label and leaf text of one SST PTB tree, e.g. `(3 (2 It) (4 (2 's) (3 fun)))`.

    Every node is `(label word)` or `(label subtree...)` with a label 0-4.
    """
    tokens = _TREE_TOKEN.findall(line)
    if not tokens or tokens[0] != "(":
        raise HyperRouterError(f"{where}: expected a tree '(label ...)', got {line.strip()[:30]!r}")
    open_nodes: list[int] = []
    words: list[str] = []
    root = -1
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "(":
            if root >= 0 and not open_nodes:
                raise HyperRouterError(f"{where}: text after the end of the tree")
            if i + 1 == len(tokens) or tokens[i + 1] in "()":
                raise HyperRouterError(f"{where}: every '(' must be followed by a label 0-4")
            label = _label(tokens[i + 1], range(5), where)
            if open_nodes:
                if open_nodes[-1] == _LEAF:
                    raise HyperRouterError(f"{where}: a node holds both a word and subtrees")
                open_nodes[-1] = _INNER
            else:
                root = label
            open_nodes.append(_EMPTY)
            i += 2
            continue
        if tok == ")":
            if not open_nodes:
                raise HyperRouterError(f"{where}: unbalanced parentheses (extra ')')")
            if open_nodes.pop() == _EMPTY:
                raise HyperRouterError(f"{where}: a node has neither a word nor subtrees")
        elif not open_nodes:
            raise HyperRouterError(f"{where}: text after the end of the tree")
        elif open_nodes[-1] == _INNER:
            raise HyperRouterError(f"{where}: a node holds both a word and subtrees")
        elif open_nodes[-1] == _LEAF:
            raise HyperRouterError(f"{where}: a leaf holds one word, {tok!r} is one too many")
        else:
            open_nodes[-1] = _LEAF
            words.append(tok)
        i += 1
    if open_nodes:
        raise HyperRouterError(f"{where}: unbalanced parentheses (missing ')')")
    return root, " ".join(words)


def read_sst_trees(path: str | os.PathLike, fine: bool) -> ClassificationSplit:
    """SST PTB trees, one per line, labelled by the root.

    fine: labels 0-4; binary: root 2 dropped, 0/1 -> 0 (negative), 3/4 -> 1 (positive).
    """
    path = Path(path)
    split = ClassificationSplit([], [])
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        root, text = parse_tree(line, where)
        if not fine and root == 2:
            continue
        split.labels.append(root if fine else int(root > 2))
        split.texts.append(text)
        split.origins.append(where)
    return split


_ACL_NAME = re.compile(r"(\d+)_(\d+)\.txt")


def _imdb_root(path: Path) -> Path:
    return path / "aclImdb" if (path / "aclImdb").is_dir() else path


def _read_acl_folder(folder: Path, label: int) -> ClassificationSplit:
    """aclImdb `pos/` or `neg/`: one review per `<id>_<rating>.txt`, in id order."""
    reviews = []
    for entry in os.scandir(folder):
        if not entry.name.endswith(".txt"):
            continue
        match = _ACL_NAME.fullmatch(entry.name)
        if match is None:
            raise HyperRouterError(f"{entry.path}: expected a file name <id>_<rating>.txt")
        rating = int(match[2])
        if not (7 <= rating <= 10 if label else 1 <= rating <= 4):
            raise HyperRouterError(
                f"{entry.path}: rating {rating} does not fit {folder.name}/ "
                f"(expected {'7-10' if label else '1-4'})"
            )
        reviews.append((int(match[1]), Path(entry.path)))
    split = ClassificationSplit([], [])
    for _, file in sorted(reviews):
        split.texts.append(_nonempty(_read_text(file), f"{file}:1"))
        split.labels.append(label)
        split.origins.append(f"{file}:1")
    return split


def _read_imdb_jsonl(shard: Path, split: ClassificationSplit) -> None:
    """Append one JSON Lines shard (`{"text": str, "label": 0|1, ...}` per line) to split."""
    expect = {"neg": 0, "pos": 1}.get(shard.name[:3])
    for n, line in enumerate(_lines(shard), 1):
        if not line.strip():
            continue
        where = f"{shard}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise HyperRouterError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise HyperRouterError(f"{where}: expected an object with 'text' and 'label'")
        text, label = record["text"], record["label"]
        if not isinstance(text, str):
            raise HyperRouterError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if type(label) is not int or label not in (0, 1):
            raise HyperRouterError(f"{where}: 'label' must be 0 or 1, got {label!r}")
        if expect is not None and label != expect:
            raise HyperRouterError(f"{where}: label {label} in a {shard.name[:3]}-* shard")
        split.texts.append(_nonempty(text, where))
        split.labels.append(label)
        split.origins.append(where)


def read_imdb(path: str | os.PathLike, split: str) -> ClassificationSplit:
    """One IMDB split ("train" or "test") from `<path>/<split>/*.jsonl` or the aclImdb layout
    (`path` = the `aclImdb` folder or its parent); labels 0 = negative, 1 = positive."""
    if split not in ("train", "test"):
        raise HyperRouterError(f"IMDB split must be 'train' or 'test', got {split!r}")
    folder = _imdb_root(Path(path)) / split
    if (folder / "pos").is_dir() and (folder / "neg").is_dir():
        data = _read_acl_folder(folder / "neg", 0)
        pos = _read_acl_folder(folder / "pos", 1)
        return ClassificationSplit(
            data.texts + pos.texts, data.labels + pos.labels, data.origins + pos.origins
        )
    shards = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not shards:
        raise HyperRouterError(
            f"{folder} holds neither *.jsonl shards nor aclImdb pos/ and neg/ review folders"
        )
    data = ClassificationSplit([], [])
    for shard in shards:
        _read_imdb_jsonl(shard, data)
    return data


def read_banking77_csv(
    path: str | os.PathLike, label_names: Sequence[str] | None = None
) -> tuple[ClassificationSplit, list[str]]:
    """A BANKING77 csv (header `text,category`) and its label names.

    With `label_names` a category outside it is an error; without, labels are numbered in order
    of first appearance. Error lines are those where a record starts.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    names = list(label_names) if label_names is not None else []
    index = {name: i for i, name in enumerate(names)}
    split = ClassificationSplit([], [])
    header = None
    while True:
        start = reader.line_num + 1
        where = f"{path}:{start}"
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise HyperRouterError(f"{where}: malformed CSV ({err})") from None
        if header is None:
            header = row
            if row != ["text", "category"]:
                raise HyperRouterError(f"{where}: expected the header 'text,category', got {row}")
            continue
        if not row:
            continue
        if len(row) != 2:
            raise HyperRouterError(f"{where}: expected 2 columns (text,category), got {len(row)}")
        category = row[1].strip()
        if not category:
            raise HyperRouterError(f"{where}: empty category")
        if category not in index:
            if label_names is not None:
                raise HyperRouterError(
                    f"{where}: unknown category {category!r} (not among the "
                    f"{len(names)} known categories)"
                )
            index[category] = len(names)
            names.append(category)
        split.texts.append(_nonempty(row[0], where))
        split.labels.append(index[category])
        split.origins.append(where)
    if header is None:
        raise HyperRouterError(f"{path}:1: empty file, expected the header 'text,category'")
    return split, names


def read_categories(path: str | os.PathLike) -> list[str]:
    """BANKING77 categories.json: a JSON list of distinct category names (the label order)."""
    path = Path(path)
    try:
        names = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise HyperRouterError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise HyperRouterError(f"{path}: expected a JSON list of category names")
    names = [n.strip() for n in names]
    if dupes := sorted(n for n, c in Counter(names).items() if c > 1):
        raise HyperRouterError(f"{path}: category {dupes[0]!r} is listed more than once")
    return names


# --------------------------------------------------------------------------- splits


def carve_valid(
    train: ClassificationSplit,
    fraction: float,
    seed: int,
    *,
    avoid_texts: Collection[str] = (),
) -> tuple[ClassificationSplit, ClassificationSplit]:
    """Move a seeded, stratified `fraction` of each label from train to a validation split.

    Returns (train, valid), both in file order. A label with n >= 2 examples gives
    max(1, round(n * fraction)) of them (leaving at least one in train). Texts in `avoid_texts`
    or occurring more than once in train are never drawn, so valid shares no text with either.
    """
    if not 0.0 < fraction < 1.0:
        raise HyperRouterError(f"valid_fraction must be in (0, 1), got {fraction}")
    counts = Counter(train.texts)
    avoid = set(avoid_texts)
    sizes = Counter(train.labels)
    candidates: dict[int, list[int]] = {label: [] for label in sizes}
    for i, (text, label) in enumerate(zip(train.texts, train.labels)):
        if counts[text] == 1 and text not in avoid:
            candidates[label].append(i)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(candidates):
        n = sizes[label]
        k = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
        pool = candidates[label]
        rng.shuffle(pool)
        chosen.update(pool[:k])
    keep = [i for i in range(len(train)) if i not in chosen]
    return train.subset(keep), train.subset(sorted(chosen))


def _cap(split: ClassificationSplit, n: int, seed: int) -> ClassificationSplit:
    """A seeded random subset of n examples in file order (all of them if there are fewer)."""
    if len(split) <= n:
        return split
    return split.subset(sorted(random.Random(seed).sample(range(len(split)), n)))


def _check_labels(
    split: ClassificationSplit, train: ClassificationSplit, train_file: Path, names: list[str]
) -> None:
    """Every label of a dev/test split must occur in the training data."""
    seen = set(train.labels)
    for i, label in enumerate(split.labels):
        if label not in seen:
            raise HyperRouterError(
                f"{split.origin(i)}: label {names[label]!r} ({label}) never occurs in the "
                f"training data {train_file}"
            )


# --------------------------------------------------------------------------- tasks

# what a task loader returns: label names, train, valid (None: carve it), test, train file, source
_Loaded = tuple[
    list[str], ClassificationSplit, ClassificationSplit | None, ClassificationSplit, Path, str
]

# (format, files it needs) per task
_FORMATS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "sst2": [
        ("GLUE SST-2", ("train.tsv", "dev.tsv")),
        ("SST sentence files", ("stsa.binary.train", "stsa.binary.dev", "stsa.binary.test")),
        ("SST trees", ("train.txt", "dev.txt", "test.txt")),
    ],
    "sst5": [
        ("SST sentence files", ("stsa.fine.train", "stsa.fine.dev", "stsa.fine.test")),
        ("SST trees", ("train.txt", "dev.txt", "test.txt")),
    ],
    "banking77": [("BANKING77", ("train.csv", "test.csv"))],
}


def _pick_format(task: str, root: Path, chosen_file: str | None) -> tuple[str, list[Path]]:
    """The format of `root` for `task` and its files; one-line errors when none or several fit."""
    formats = _FORMATS[task]
    if chosen_file is not None:
        formats = [(name, files) for name, files in formats if chosen_file in files]
        if not formats:
            known = sorted({f for _, files in _FORMATS[task] for f in files})
            raise HyperRouterError(
                f"{root / chosen_file} is not a {task} file; expected a directory or one of "
                + ", ".join(known)
            )
    found = [(name, [root / f for f in files]) for name, files in formats]
    found = [(name, paths) for name, paths in found if all(p.is_file() for p in paths)]
    if len(found) > 1:
        raise HyperRouterError(
            f"{root} holds {' and '.join(name for name, _ in found)} data for {task}; pass one "
            f"of the files (e.g. {found[0][1][0]}) to choose"
        )
    if not found:
        present = sorted({f for _, files in formats for f in files if (root / f).is_file()})
        if task == "banking77":
            missing = "no BANKING77 train.csv + test.csv (+ optional categories.json)"
        else:
            expected = "; or ".join(f"{' + '.join(files)} ({name})" for name, files in formats)
            missing = f"no {task} data; expected {expected}"
        raise HyperRouterError(
            f"{root} has {missing}" + (f"; found only {', '.join(present)}" if present else "")
        )
    return found[0]


def _distinct(*paths: Path) -> None:
    """Guard against valid/test being the same file (e.g. a symlink)."""
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise HyperRouterError(f"{paths[i]} is the same file as another split of the task")


def _load_sst(task: str, root: Path, chosen_file: str | None) -> _Loaded:
    fmt, files = _pick_format(task, root, chosen_file)
    _distinct(*files)
    names = SST2_LABELS if task == "sst2" else SST5_LABELS
    if fmt == "GLUE SST-2":
        train, test = read_glue_sst2_tsv(files[0]), read_glue_sst2_tsv(files[1])
        source = (
            f"GLUE SST-2 {root}/{{train,dev}}.tsv (dev.tsv is the reported test split; "
            "test.tsv has no labels)"
        )
        return names, train, None, test, files[0], source
    if fmt == "SST sentence files":
        train, valid, test = (read_sst_sentences(f, len(names)) for f in files)
        source = f"SST sentence files {root}/{files[0].name.rsplit('.', 1)[0]}.{{train,dev,test}}"
    else:
        train, valid, test = (read_sst_trees(f, fine=task == "sst5") for f in files)
        source = f"SST PTB trees {root}/{{train,dev,test}}.txt (root labels)"
    return names, train, valid, test, files[0], source


def _load_imdb(root: Path, chosen_file: str | None) -> _Loaded:
    if chosen_file is not None:
        raise HyperRouterError(
            f"imdb data must be a directory, got the file {root / chosen_file}; pass {root}"
        )
    base = _imdb_root(root)
    for split in ("train", "test"):
        folder = base / split
        acl = (folder / "pos").is_dir() and (folder / "neg").is_dir()
        if not acl and not (folder.is_dir() and any(folder.glob("*.jsonl"))):
            raise HyperRouterError(
                f"{root} has no imdb {split} split: expected {{train,test}}/*.jsonl shards or "
                "aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt"
            )
    train, test = read_imdb(root, "train"), read_imdb(root, "test")
    layout = "aclImdb" if (base / "train" / "pos").is_dir() else "JSON Lines shards"
    return IMDB_LABELS, train, None, test, base / "train", f"IMDB {layout} in {base}"


def _load_banking77(root: Path, chosen_file: str | None) -> _Loaded:
    _, files = _pick_format("banking77", root, chosen_file)
    _distinct(*files)
    categories = root / "categories.json"
    names = read_categories(categories) if categories.is_file() else None
    train, names = read_banking77_csv(files[0], names)
    test, _ = read_banking77_csv(files[1], names)
    order = "categories.json" if categories.is_file() else "first appearance in train.csv"
    source = f"BANKING77 {root}/{{train,test}}.csv, label order from {order}"
    return names, train, None, test, files[0], source


def load_task(
    task: str,
    path: str | os.PathLike,
    *,
    valid_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
    max_test_examples: int | None = None,
) -> TaskData:
    """Load a classification task from a directory, or one file of it (layouts and the
    validation policy are in the module docstring).

    valid_fraction and seed shape the validation split carved from train where the task has no
    separate labelled dev split; max_examples caps train and valid to a seeded random subset,
    max_test_examples caps test to a random subset that does not depend on the seed.
    """
    if task not in TASKS:
        raise HyperRouterError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if not 0.0 < valid_fraction < 1.0:
        raise HyperRouterError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    for name, cap in (("max_examples", max_examples), ("max_test_examples", max_test_examples)):
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise HyperRouterError(f"{name} must be a positive integer, got {cap!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise HyperRouterError(f"task data path {root} does not exist")
    chosen_file = None
    if not root.is_dir():
        root, chosen_file = root.parent, root.name
    if task in ("sst2", "sst5"):
        loaded = _load_sst(task, root, chosen_file)
    elif task == "imdb":
        loaded = _load_imdb(root, chosen_file)
    else:
        loaded = _load_banking77(root, chosen_file)
    names, train, valid, test, train_file, source = loaded
    if len(train) == 0:
        raise HyperRouterError(f"the training data {train_file} of {task} has no examples")
    for split in (valid, test):
        if split is not None:
            _check_labels(split, train, train_file, names)
    if valid is None:
        train, valid = carve_valid(train, valid_fraction, seed, avoid_texts=set(test.texts))
        valid_source = (
            f"carved {valid_fraction * 100:g}% of train, stratified by label (seed {seed})"
        )
    else:
        valid_source = "dev file"
    if max_examples is not None:
        train, valid = (_cap(s, max_examples, seed) for s in (train, valid))
    if max_test_examples is not None:
        test = _cap(test, max_test_examples, TEST_SUBSET_SEED)
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        if len(split) == 0:
            raise HyperRouterError(f"the {name} split of {task} in {root} is empty")
    return TaskData(task, list(names), train, valid, test, valid_source, source)
