"""Classification loaders on small generated files of every format (and the real data if any)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperrouter.data.tasks import (
    carve_valid,
    load_task,
    parse_tree,
    read_banking77_csv,
    read_glue_sst2_tsv,
    read_imdb,
    read_sst_sentences,
    read_sst_trees,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def sst_sentence_dir(root: Path, prefix: str = "stsa.binary", classes: int = 2) -> Path:
    for split, n in (("train", 20), ("dev", 6), ("test", 6)):
        lines = [f"{i % classes} sentence number {i} of {split}" for i in range(n)]
        write(root / f"{prefix}.{split}", "\n".join(lines) + "\n")
    return root


def test_glue_sst2(tmp_path) -> None:
    path = write(tmp_path / "train.tsv", "sentence\tlabel\ngood movie \t1\nbad one\t0\n")
    split = read_glue_sst2_tsv(path)
    assert split.texts == ["good movie", "bad one"] and split.labels == [1, 0]
    bad = write(tmp_path / "bad.tsv", "sentence\tlabel\nok\t1\nbroken row\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: expected 2 tab-separated columns, got 1"):
        read_glue_sst2_tsv(bad)
    bad = write(tmp_path / "bad2.tsv", "sentence\tlabel\nok\t7\n")
    with pytest.raises(ValueError, match=r"bad2.tsv:2: label 7 is out of range \[0, 1\]"):
        read_glue_sst2_tsv(bad)
    with pytest.raises(ValueError, match="expected the header"):
        read_glue_sst2_tsv(write(tmp_path / "h.tsv", "text\tlabel\nx\t1\n"))


def test_sst_sentence_files(tmp_path) -> None:
    split = read_sst_sentences(write(tmp_path / "f", "4 great fun\n0 awful\n"), 5)
    assert split.texts == ["great fun", "awful"] and split.labels == [4, 0]
    with pytest.raises(ValueError, match=r"f2:2: label 'x' is not an integer"):
        read_sst_sentences(write(tmp_path / "f2", "1 fine\nx oops\n"), 2)
    with pytest.raises(ValueError, match=r"f3:1: empty text"):
        read_sst_sentences(write(tmp_path / "f3", "1 \n"), 2)


def test_sst_trees_root_labels_and_leaves(tmp_path) -> None:
    assert parse_tree("(3 (2 It) (4 (2 's) (3 fun)))", "x") == (3, "It 's fun")
    text = "(3 (2 It) (4 (2 's) (3 fun)))\n(2 (2 so) (2 so))\n(0 (1 bad) (0 film))\n"
    path = write(tmp_path / "t.txt", text)
    fine = read_sst_trees(path, fine=True)
    assert fine.labels == [3, 2, 0] and fine.texts[2] == "bad film"
    binary = read_sst_trees(path, fine=False)
    assert binary.labels == [1, 0] and binary.texts == ["It 's fun", "bad film"]
    for bad, message in (
        ("(3 (2 It) (4 fun)", "missing '\\)'"),
        ("(3 (2 It)))", "text after the end of the tree"),
        ("(x (2 It))", "followed by a label"),
        ("3 It", "must start with"),
    ):
        with pytest.raises(ValueError, match=rf"b.txt:1: .*{message}"):
            read_sst_trees(write(tmp_path / "b.txt", bad + "\n"), fine=True)


def test_imdb_both_layouts(tmp_path) -> None:
    acl = tmp_path / "acl" / "aclImdb"
    for split in ("train", "test"):
        write(acl / split / "pos" / "0_9.txt", "Loved it.<br />Great.")
        write(acl / split / "pos" / "10_8.txt", "Fine film.")
        write(acl / split / "neg" / "3_1.txt", "Terrible.")
    split = read_imdb(tmp_path / "acl", "train")
    assert split.labels == [0, 1, 1] and split.texts[1] == "Loved it.<br />Great."
    jsonl = tmp_path / "jsonl"
    rows = [{"id": i, "label": i % 2, "text": f"review {i}"} for i in range(6)]
    for split_name in ("train", "test"):
        write(jsonl / split_name / "all-00.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_imdb(jsonl, "test").labels == [0, 1, 0, 1, 0, 1]
    write(jsonl / "train" / "bad-01.jsonl", '{"text": "x", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match=r"bad-01.jsonl:2: expected an object with 'text' and"):
        read_imdb(jsonl, "train")
    write(jsonl / "train" / "bad-01.jsonl", '{"text": "x", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad-01.jsonl:2: not valid JSON"):
        read_imdb(jsonl, "train")


def test_banking77_label_order(tmp_path) -> None:
    path = write(
        tmp_path / "train.csv",
        'text,category\n"Hi, where is my card?",card_arrival\n'
        "top up failed,top_up_failed\nwhere card,card_arrival\n",
    )
    split, names = read_banking77_csv(path)
    assert names == ["card_arrival", "top_up_failed"] and split.labels == [0, 1, 0]
    assert split.texts[0] == "Hi, where is my card?"
    split, names = read_banking77_csv(path, ["top_up_failed", "card_arrival"])
    assert split.labels == [1, 0, 1]
    with pytest.raises(ValueError, match=r"train.csv:3: unknown category 'top_up_failed'"):
        read_banking77_csv(path, ["card_arrival"])
    bad = write(tmp_path / "bad.csv", "text,category\nonly one column\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 2 columns"):
        read_banking77_csv(bad)


def test_carved_validation_is_stratified_disjoint_and_deterministic() -> None:
    from hyperrouter.data.tasks import ClassificationSplit

    train = ClassificationSplit([f"t{i}" for i in range(100)], [i % 4 for i in range(100)])
    rest, valid = carve_valid(train, 0.2, seed=3)
    again_rest, again_valid = carve_valid(train, 0.2, seed=3)
    assert valid.texts == again_valid.texts and rest.texts == again_rest.texts
    assert len(valid) == 20 and len(rest) == 80
    assert sorted(valid.labels) == sorted([0, 1, 2, 3] * 5)  # 20% of every label
    assert not set(valid.texts) & set(rest.texts)
    assert carve_valid(train, 0.2, seed=4)[1].texts != valid.texts


def test_load_task_split_policies(tmp_path) -> None:
    sst = load_task("sst2", sst_sentence_dir(tmp_path / "sst"))
    assert sst.valid_source == "dev file" and len(sst.valid) == 6 and len(sst.test) == 6
    glue = tmp_path / "glue"
    write(glue / "train.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(40)))
    write(glue / "dev.tsv", "sentence\tlabel\nd0\t0\nd1\t1\n")
    task = load_task("sst2", glue, valid_fraction=0.25, seed=1)
    assert task.test.texts == ["d0", "d1"]  # dev.tsv is the reported split ...
    assert len(task.valid) == 10 and "carved" in task.valid_source  # ... so valid comes from train
    assert not set(task.valid.texts) & set(task.test.texts)
    sst5 = load_task("sst5", sst_sentence_dir(tmp_path / "sst5", "stsa.fine", 5))
    assert sst5.num_classes == 5
    capped = load_task("sst2", glue, max_examples=5)
    assert len(capped.train) == 5 and len(capped.test) == 2


def test_load_task_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        load_task("sst3", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_task("sst2", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no sst2 files; expected stsa.binary"):
        load_task("sst2", tmp_path / "empty")
    with pytest.raises(ValueError, match="no BANKING77 train.csv"):
        load_task("banking77", tmp_path / "empty")
    root = sst_sentence_dir(tmp_path / "mismatch")
    write(root / "stsa.binary.train", "0 only negatives\n0 again\n")
    with pytest.raises(ValueError, match="label 1 of example .* never occurs in the training"):
        load_task("sst2", root)
    bank = tmp_path / "bank"
    write(bank / "train.csv", "text,category\nhello,a\nbye,b\nhi,a\nyo,b\n")
    write(bank / "test.csv", "text,category\nnew,c\n")
    with pytest.raises(ValueError, match=r"test.csv:2: unknown category 'c'"):
        load_task("banking77", bank)
    write(bank / "train.csv", "text,category\nhello,a\n")
    write(bank / "test.csv", "text,category\nbye,a\n")
    write(bank / "categories.json", '{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_task("banking77", bank)


@pytest.mark.integration
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_task_data() -> None:
    glue = load_task("sst2", SHARED / "sst2_glue")
    assert len(glue.train) + len(glue.valid) == 67_349 and len(glue.test) == 872
    binary = load_task("sst2", SHARED / "sst_sentences")
    assert (len(binary.train), len(binary.valid), len(binary.test)) == (6_920, 872, 1_821)
    fine = load_task("sst5", SHARED / "sst_sentences")
    assert (len(fine.train), len(fine.valid), len(fine.test)) == (8_544, 1_101, 2_210)
    trees = load_task("sst5", SHARED / "sst_trees")
    assert (len(trees.train), len(trees.valid), len(trees.test)) == (8_544, 1_101, 2_210)
    imdb = load_task("imdb", SHARED / "imdb")
    assert len(imdb.train) + len(imdb.valid) == 25_000 and len(imdb.test) == 25_000
    bank = load_task("banking77", SHARED / "banking77")
    assert bank.num_classes == 77 and len(bank.train) + len(bank.valid) == 10_003
    assert len(bank.test) == 3_080
