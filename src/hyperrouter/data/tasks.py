"""Text-classification datasets for fine-tuning: SST-2, SST-5, IMDB, BANKING77.

Accepted layouts (a directory; the format is recognised from its files):

- sst2: GLUE SST-2 (`train.tsv`, `dev.tsv`, header `sentence<TAB>label`), SST sentence files
  (`stsa.binary.{train,dev,test}`, `<label> <sentence>` per line) or SST PTB trees
  (`train.txt dev.txt test.txt`, root label; binary drops neutral 2, 0/1 -> 0, 3/4 -> 1).
- sst5: sentence files `stsa.fine.*` or the trees with the five root labels.
- imdb: the original `aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt` (the `aclImdb` folder or
  its parent) or JSON Lines shards `{train,test}/*.jsonl` with `text` and `label` fields.
- banking77: `train.csv` and `test.csv` (header `text,category`); label order from
  `categories.json` when present, else first appearance in the training file.

Validation and test (the reported split is never used to choose a checkpoint):
- SST sentence files and trees have labelled dev and test: valid = dev, test = test.
- GLUE SST-2's test.tsv is unlabelled, so its dev.tsv is the reported test split; IMDB and
  BANKING77 only have train and test. For these, valid is carved out of train: a seeded,
  stratified `valid_fraction` of each label, removed from train.

Every reader validates its input and names the file and line of a malformed record.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from hyperrouter.errors import HyperRouterError

TASKS = ("sst2", "sst5", "imdb", "banking77")
SST2_LABELS = ["negative", "positive"]
SST5_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]


@dataclass
class ClassificationSplit:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    task: str
    label_names: list[str]
    train: ClassificationSplit
    valid: ClassificationSplit
    test: ClassificationSplit
    valid_source: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------- readers


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
        # only \n (and \r\n) end a line: reviews contain U+2028 and the like, which
        # str.splitlines would also split on
        return [line.removesuffix("\r") for line in text.split("\n")]
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise HyperRouterError(f"{path}:{line}: not valid UTF-8 text") from None
    except OSError as err:
        raise HyperRouterError(f"cannot read {path}: {err.strerror}") from None


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


def read_glue_sst2_tsv(path: str | os.PathLike) -> ClassificationSplit:
    """GLUE SST-2 train.tsv / dev.tsv: header `sentence<TAB>label`, labels 0/1."""
    path = Path(path)
    lines = _lines(path)
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        raise HyperRouterError(f"{path}:1: expected the header 'sentence<TAB>label'")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        where = f"{path}:{n}"
        if len(cols) != 2:
            raise HyperRouterError(f"{where}: expected 2 tab-separated columns, got {len(cols)}")
        texts.append(_nonempty(cols[0], where))
        labels.append(_label(cols[1].strip(), range(2), where))
    return ClassificationSplit(texts, labels)


def read_sst_sentences(path: str | os.PathLike, num_classes: int) -> ClassificationSplit:
    """stsa.binary.* / stsa.fine.*: `<label> <sentence>` per line."""
    path = Path(path)
    texts, labels = [], []
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        label, _, text = line.partition(" ")
        labels.append(_label(label, range(num_classes), where))
        texts.append(_nonempty(text, where))
    return ClassificationSplit(texts, labels)


_TREE_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def parse_tree(line: str, where: str) -> tuple[int, str]:
    """Root label and leaf text of one SST PTB tree, e.g. `(3 (2 It) (4 (2 's) (3 fun)))`."""
    tokens = _TREE_TOKEN.findall(line)
    if not tokens or tokens[0] != "(":
        raise HyperRouterError(f"{where}: a tree must start with '('")
    depth, words = 0, []
    for i, tok in enumerate(tokens):
        if tok == "(":
            depth += 1
            if i + 1 >= len(tokens) or not tokens[i + 1].isdigit():
                raise HyperRouterError(f"{where}: every '(' must be followed by a label 0-4")
        elif tok == ")":
            depth -= 1
            if depth < 0:
                raise HyperRouterError(f"{where}: unbalanced parentheses (extra ')')")
            if depth == 0 and i != len(tokens) - 1:
                raise HyperRouterError(f"{where}: text after the end of the tree")
        elif tokens[i - 1] != "(":  # a leaf word, not a label
            words.append(tok)
    if depth != 0:
        raise HyperRouterError(f"{where}: unbalanced parentheses (missing ')')")
    root = _label(tokens[1], range(5), where)
    if not words:
        raise HyperRouterError(f"{where}: tree has no words")
    return root, " ".join(words)


def read_sst_trees(path: str | os.PathLike, fine: bool) -> ClassificationSplit:
    """SST PTB trees: root label (fine: 0-4; binary: neutral dropped, 0/1 -> 0, 3/4 -> 1)."""
    path = Path(path)
    texts, labels = [], []
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        root, text = parse_tree(line, f"{path}:{n}")
        if fine:
            labels.append(root)
        elif root == 2:
            continue
        else:
            labels.append(0 if root < 2 else 1)
        texts.append(text)
    return ClassificationSplit(texts, labels)


def read_imdb(path: str | os.PathLike, split: str) -> ClassificationSplit:
    """IMDB split from the aclImdb folder layout or from JSON Lines shards `<split>/*.jsonl`."""
    root = Path(path)
    if (root / "aclImdb").is_dir():
        root = root / "aclImdb"
    folder = root / split
    texts, labels = [], []
    if (folder / "pos").is_dir() and (folder / "neg").is_dir():
        for label, name in ((0, "neg"), (1, "pos")):
            files = sorted((folder / name).glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
            for f in files:
                if not re.fullmatch(r"\d+_\d+", f.stem):
                    raise HyperRouterError(f"{f}: expected a file name <id>_<rating>.txt")
                texts.append(_nonempty(" ".join(_lines(f)), f"{f}:1"))
                labels.append(label)
        return ClassificationSplit(texts, labels)
    shards = sorted(folder.glob("*.jsonl"))
    if not shards:
        raise HyperRouterError(
            f"{folder} holds neither pos/ and neg/ review folders nor *.jsonl shards"
        )
    for shard in shards:
        for n, line in enumerate(_lines(shard), 1):
            if not line.strip():
                continue
            where = f"{shard}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise HyperRouterError(f"{where}: not valid JSON") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise HyperRouterError(f"{where}: expected an object with 'text' and 'label'")
            texts.append(_nonempty(str(record["text"]), where))
            labels.append(_label(str(record["label"]), range(2), where))
    return ClassificationSplit(texts, labels)


def read_banking77_csv(
    path: str | os.PathLike, label_names: list[str] | None = None
) -> tuple[ClassificationSplit, list[str]]:
    """BANKING77 csv (`text,category`); unknown categories are an error when `label_names` is
    given, else the label order is that of first appearance. Returns (split, label_names)."""
    path = Path(path)
    lines = _lines(path)
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise HyperRouterError(
            f"{path}:1: empty file, expected the header 'text,category'"
        ) from None
    if header != ["text", "category"]:
        raise HyperRouterError(f"{path}:1: expected the header 'text,category', got {header}")
    names = list(label_names) if label_names is not None else []
    index = {name: i for i, name in enumerate(names)}
    texts, labels = [], []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:
            continue
        if len(row) != 2:
            raise HyperRouterError(f"{where}: expected 2 columns (text,category), got {len(row)}")
        category = row[1].strip()
        if category not in index:
            if label_names is not None:
                raise HyperRouterError(f"{where}: unknown category {category!r}")
            index[category] = len(names)
            names.append(category)
        texts.append(_nonempty(row[0], where))
        labels.append(index[category])
    return ClassificationSplit(texts, labels), names


# --------------------------------------------------------------------------- tasks


def carve_valid(
    train: ClassificationSplit, fraction: float, seed: int
) -> tuple[ClassificationSplit, ClassificationSplit]:
    """A seeded, stratified `fraction` of each label moved from train to a validation split."""
    if not 0.0 < fraction < 1.0:
        raise HyperRouterError(f"valid_fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_label.setdefault(label, []).append(i)
    chosen: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        chosen.update(idx[: max(1, round(len(idx) * fraction))] if len(idx) > 1 else [])
    keep = [i for i in range(len(train)) if i not in chosen]
    picked = sorted(chosen)
    return (
        ClassificationSplit([train.texts[i] for i in keep], [train.labels[i] for i in keep]),
        ClassificationSplit([train.texts[i] for i in picked], [train.labels[i] for i in picked]),
    )


def _find(root: Path, *names: str) -> list[Path] | None:
    paths = [root / n for n in names]
    return paths if all(p.is_file() for p in paths) else None


def _check_labels(
    task: str,
    train: ClassificationSplit,
    others: dict[str, ClassificationSplit],
    files: dict[str, Path],
) -> None:
    seen = set(train.labels)
    for split, data in others.items():
        for i, label in enumerate(data.labels):
            if label not in seen:
                raise HyperRouterError(
                    f"{files[split]}: label {label} of example {i + 1} never occurs in the "
                    f"training split of {task}"
                )


def load_task(
    task: str,
    path: str | os.PathLike,
    *,
    valid_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
) -> TaskData:
    """Load a classification task from `path` (see the module docstring for layouts and splits).

    max_examples caps every split to a seeded random subset of N examples (after the carve),
    for quick runs.
    """
    if task not in TASKS:
        raise HyperRouterError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise HyperRouterError(f"task data path {root} does not exist")
    if not root.is_dir():
        raise HyperRouterError(f"task data path {root} must be a directory (see --help)")
    carve = False
    if task in ("sst2", "sst5"):
        prefix = "stsa.binary" if task == "sst2" else "stsa.fine"
        classes = 2 if task == "sst2" else 5
        names = SST2_LABELS if task == "sst2" else SST5_LABELS
        if files := _find(root, f"{prefix}.train", f"{prefix}.dev", f"{prefix}.test"):
            train, valid, test = (read_sst_sentences(f, classes) for f in files)
            source = f"SST sentence files {prefix}.* in {root}"
        elif files := _find(root, "train.txt", "dev.txt", "test.txt"):
            train, valid, test = (read_sst_trees(f, fine=task == "sst5") for f in files)
            source = f"SST PTB trees in {root}"
        elif task == "sst2" and (files := _find(root, "train.tsv", "dev.tsv")):
            train, test = read_glue_sst2_tsv(files[0]), read_glue_sst2_tsv(files[1])
            files = [files[0], files[1], files[1]]
            valid, carve = None, True
            source = f"GLUE SST-2 in {root} (dev.tsv reported as test; test.tsv has no labels)"
        else:
            expected = f"{prefix}.{{train,dev,test}} or SST trees train.txt/dev.txt/test.txt"
            if task == "sst2":
                expected += " or GLUE train.tsv/dev.tsv"
            raise HyperRouterError(f"{root} has no {task} files; expected {expected}")
    elif task == "imdb":
        train, test = read_imdb(root, "train"), read_imdb(root, "test")
        names, valid, carve = ["negative", "positive"], None, True
        files = [root / "train", root / "train", root / "test"]
        source = f"IMDB in {root}"
    else:
        files = _find(root, "train.csv", "test.csv")
        if files is None:
            raise HyperRouterError(f"{root} has no BANKING77 train.csv and test.csv")
        categories = root / "categories.json"
        names = None
        if categories.is_file():
            try:
                names = json.loads(categories.read_text())
            except json.JSONDecodeError:
                raise HyperRouterError(f"{categories}: not valid JSON") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise HyperRouterError(f"{categories}: expected a JSON list of category names")
        train, names = read_banking77_csv(files[0], names)
        test, _ = read_banking77_csv(files[1], names)
        files = [files[0], files[0], files[1]]
        valid, carve = None, True
        source = f"BANKING77 in {root}"
    split_files = {"train": files[0], "valid": files[1], "test": files[2]}
    if carve:
        _check_labels(task, train, {"test": test}, split_files)
        train, valid = carve_valid(train, valid_fraction, seed)
        valid_source = f"carved {valid_fraction:.0%} of train, stratified (seed {seed})"
    else:
        _check_labels(task, train, {"valid": valid, "test": test}, split_files)
        valid_source = "dev file"
    if max_examples is not None:
        train, valid, test = (_cap(s, max_examples, seed) for s in (train, valid, test))
    for split, data in (("train", train), ("valid", valid), ("test", test)):
        if len(data) == 0:
            raise HyperRouterError(f"the {split} split of {task} in {root} is empty")
    return TaskData(task, list(names), train, valid, test, valid_source, source)


def _cap(split: ClassificationSplit, n: int, seed: int) -> ClassificationSplit:
    """A seeded random subset of n examples (all of them if there are fewer)."""
    if len(split) <= n:
        return split
    idx = sorted(random.Random(seed).sample(range(len(split)), n))
    return ClassificationSplit([split.texts[i] for i in idx], [split.labels[i] for i in idx])
