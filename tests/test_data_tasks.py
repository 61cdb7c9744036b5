"""Classification loaders on small generated files of every format (and the real data if any)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hyperrouter.data.tasks import (
    TASKS,
    ClassificationSplit,
    carve_valid,
    load_task,
    parse_tree,
    read_banking77_csv,
    read_categories,
    read_glue_sst2_tsv,
    read_imdb,
    read_sst_sentences,
    read_sst_trees,
)
from hyperrouter.errors import HyperRouterError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def sst_sentence_dir(root: Path, prefix: str = "stsa.binary", classes: int = 2) -> Path:
    for split, n in (("train", 20), ("dev", 6), ("test", 6)):
        lines = [f"{i % classes} sentence number {i} of {split}" for i in range(n)]
        write(root / f"{prefix}.{split}", "\n".join(lines) + "\n")
    return root


def glue_dir(root: Path, n: int = 40) -> Path:
    write(root / "train.tsv", "sentence\tlabel\n" + "".join(f"s{i} \t{i % 2}\n" for i in range(n)))
    write(root / "dev.tsv", "sentence\tlabel\nd0 \t0\nd1 \t1\n")
    write(root / "test.tsv", "index\tsentence\n0\tunlabelled\n")
    return root


TREES = [
    "(3 (2 It) (4 (2 's) (3 fun)))",
    "(2 (2 so) (2 so))",
    "(0 (1 bad) (0 film))",
    "(4 (4 great) (2 2\u00a01\\/2))",  # SST leaves can hold a no-break space
    "(1 (1 dull) (2 plot))",
]


def trees_dir(root: Path) -> Path:
    for split in ("train", "dev", "test"):
        write(root / f"{split}.txt", "\n".join(TREES) + "\n")
    return root


def imdb_jsonl_dir(root: Path, n: int = 10) -> Path:
    for split in ("train", "test"):
        for label, name in ((0, "neg"), (1, "pos")):
            rows = [
                {
                    "id": i,
                    "rating": 8 if label else 2,
                    "label": label,
                    "text": f"{split} {name} {i}",
                }
                for i in range(n)
            ]
            write(root / split / f"{name}-00.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return root


def acl_dir(root: Path, n: int = 10) -> Path:
    for split in ("train", "test"):
        for label, name in ((0, "neg"), (1, "pos")):
            for i in range(n):
                write(root / split / name / f"{i}_{8 if label else 2}.txt", f"{split} {name} {i}")
    write(root / "train" / "urls_pos.txt", "not a review\n")  # as in the original layout
    return root


def banking_dir(root: Path, categories: list[str] | None = None) -> Path:
    rows = [(f"text {i}, with a comma", f"intent_{'abc'[i % 3]}") for i in range(30)]
    body = "".join(f'"{t}",{c}\n' for t, c in rows)
    write(root / "train.csv", "text,category\n" + body)
    write(root / "test.csv", 'text,category\n"where\nis it",intent_b\nagain,intent_c\n')
    if categories is not None:
        write(root / "categories.json", json.dumps(categories))
    return root


def raises(match: str):
    return pytest.raises(HyperRouterError, match=match)


# --------------------------------------------------------------------------- readers


def test_glue_sst2(tmp_path) -> None:
    split = read_glue_sst2_tsv(glue_dir(tmp_path) / "dev.tsv")
    assert split.texts == ["d0", "d1"] and split.labels == [0, 1]
    assert split.origins == [f"{tmp_path / 'dev.tsv'}:2", f"{tmp_path / 'dev.tsv'}:3"]
    for body, message in (
        ("ok\t1\nbroken row\n", r"bad.tsv:3: expected 2 tab-separated columns .*got 1"),
        ("ok\t1\na\tb\t1\n", r"bad.tsv:3: expected 2 tab-separated columns .*got 3"),
        ("ok\t7\n", r"bad.tsv:2: label 7 is out of range \[0, 1\]"),
        ("ok\tpos\n", r"bad.tsv:2: label 'pos' is not an integer"),
        (" \t1\n", r"bad.tsv:2: empty text"),
    ):
        with raises(message):
            read_glue_sst2_tsv(write(tmp_path / "bad.tsv", "sentence\tlabel\n" + body))
    with raises(r"h.tsv:1: expected the header 'sentence<TAB>label'"):
        read_glue_sst2_tsv(write(tmp_path / "h.tsv", "text\tlabel\nx\t1\n"))
    with raises("test.tsv has no labels"):
        read_glue_sst2_tsv(tmp_path / "test.tsv")


def test_sst_sentence_files(tmp_path) -> None:
    split = read_sst_sentences(write(tmp_path / "f", "4 great fun\n\n0 awful\n"), 5)
    assert split.texts == ["great fun", "awful"] and split.labels == [4, 0]
    assert split.origins[1].endswith("f:3")
    assert read_sst_sentences(write(tmp_path / "stsa.fine.dev", "4 wow\n")).labels == [4]
    with raises(r"stsa.binary.dev:1: label 4 is out of range \[0, 1\]"):
        read_sst_sentences(write(tmp_path / "stsa.binary.dev", "4 wow\n"))
    with raises("pass num_classes"):
        read_sst_sentences(tmp_path / "f")
    with raises(r"f2:2: label 'x' is not an integer"):
        read_sst_sentences(write(tmp_path / "f2", "1 fine\nx oops\n"), 2)
    with raises(r"f3:1: empty text"):
        read_sst_sentences(write(tmp_path / "f3", "1 \n"), 2)
    (tmp_path / "latin1").write_bytes("1 fine\n0 caf\u00e9\n".encode("latin-1"))
    with raises(r"latin1:2: not valid UTF-8"):
        read_sst_sentences(tmp_path / "latin1", 2)
    with raises("cannot read"):
        read_sst_sentences(tmp_path / "missing", 2)


def test_sst_trees_root_labels_and_leaves(tmp_path) -> None:
    assert parse_tree("(3 (2 It) (4 (2 's) (3 fun)))", "x") == (3, "It 's fun")
    path = write(tmp_path / "t.txt", "\n".join(TREES) + "\n")
    fine = read_sst_trees(path, fine=True)
    assert fine.labels == [3, 2, 0, 4, 1]
    assert fine.texts == ["It 's fun", "so so", "bad film", "great 2\u00a01\\/2", "dull plot"]
    binary = read_sst_trees(path, fine=False)  # neutral root dropped, 0/1 -> 0, 3/4 -> 1
    assert binary.labels == [1, 0, 1, 0]
    assert binary.texts == ["It 's fun", "bad film", "great 2\u00a01\\/2", "dull plot"]
    assert binary.origins[1].endswith("t.txt:3")
    for bad, message in (
        ("(3 (2 It) (4 fun)", r"unbalanced parentheses \(missing '\)'\)"),
        ("(3 (2 It)))", r"unbalanced parentheses \(extra '\)'\)"),
        ("(3 (2 It)) (2 more)", "text after the end of the tree"),
        ("(x (2 It))", "label 'x' is not an integer"),
        ("(3 (7 It))", r"label 7 is out of range \[0, 4\]"),
        ("(3 (2 It) word)", "a node holds both a word and subtrees"),
        ("(3 (2 two words))", "a leaf holds one word"),
        ("(3 (2 It) (2))", "a node has neither a word nor subtrees"),
        ("( (2 It))", r"every '\(' must be followed by a label"),
        ("3 It", "expected a tree"),
    ):
        with raises(rf"b.txt:2: {message}"):
            read_sst_trees(write(tmp_path / "b.txt", f"{TREES[0]}\n{bad}\n"), fine=True)


def test_imdb_both_layouts_agree(tmp_path) -> None:
    jsonl = read_imdb(imdb_jsonl_dir(tmp_path / "jsonl"), "train")
    acl = read_imdb(acl_dir(tmp_path / "parent" / "aclImdb"), "train")
    assert jsonl.labels == [0] * 10 + [1] * 10
    assert jsonl.texts[0] == "train neg 0" and jsonl.texts[-1] == "train pos 9"
    assert acl.texts == jsonl.texts and acl.labels == jsonl.labels  # numeric id order: 2 < 10
    assert acl.texts == read_imdb(tmp_path / "parent", "train").texts
    assert acl.origins[0].endswith("0_2.txt:1") and jsonl.origins[0].endswith("neg-00.jsonl:1")
    assert read_imdb(tmp_path / "jsonl", "test").texts[0] == "test neg 0"
    with raises("must be 'train' or 'test'"):
        read_imdb(tmp_path / "jsonl", "unsup")
    with raises("holds neither"):
        read_imdb(tmp_path, "train")


def test_imdb_malformed(tmp_path) -> None:
    shard = tmp_path / "j" / "train" / "pos-01.jsonl"
    good = '{"text": "x", "label": 1}\n'
    for line, message in (
        ("not json", "not valid JSON"),
        ('{"text": "no label"}', "expected an object with 'text' and 'label'"),
        ('["text", "label"]', "expected an object with 'text' and 'label'"),
        ('{"text": 3, "label": 1}', "'text' must be a string"),
        ('{"text": "x", "label": "1"}', "'label' must be 0 or 1"),
        ('{"text": "x", "label": 2}', "'label' must be 0 or 1"),
        ('{"text": "x", "label": 0}', "label 0 in a pos-\\* shard"),
        ('{"text": "  ", "label": 1}', "empty text"),
    ):
        write(shard, good + line + "\n")
        with raises(rf"pos-01.jsonl:2: {message}"):
            read_imdb(tmp_path / "j", "train")
    acl = acl_dir(tmp_path / "a" / "aclImdb", n=2)
    write(acl / "train" / "neg" / "9_8.txt", "rated 8 but in neg")
    with raises(r"9_8.txt: rating 8 does not fit neg/ \(expected 1-4\)"):
        read_imdb(tmp_path / "a", "train")
    (acl / "train" / "neg" / "9_8.txt").rename(acl / "train" / "neg" / "review.txt")
    with raises(r"review.txt: expected a file name <id>_<rating>.txt"):
        read_imdb(tmp_path / "a", "train")


def test_banking77_csv_and_label_order(tmp_path) -> None:
    path = write(
        tmp_path / "train.csv",
        'text,category\n"Hi, where is my card?",card_arrival\n'
        '"two\nlines",top_up_failed\nwhere card,card_arrival\n',
    )
    split, names = read_banking77_csv(path)
    assert names == ["card_arrival", "top_up_failed"] and split.labels == [0, 1, 0]
    assert split.texts == ["Hi, where is my card?", "two\nlines", "where card"]
    assert [o.rsplit(":", 1)[1] for o in split.origins] == ["2", "3", "5"]  # record start lines
    split, names = read_banking77_csv(path, ["top_up_failed", "card_arrival"])
    assert names == ["top_up_failed", "card_arrival"] and split.labels == [1, 0, 1]
    with raises(r"train.csv:3: unknown category 'top_up_failed'"):
        read_banking77_csv(path, ["card_arrival"])
    for body, message in (
        ("text,category\nonly one column\n", r"bad.csv:2: expected 2 columns .*got 1"),
        ("text,category\na,b,c\n", r"bad.csv:2: expected 2 columns .*got 3"),
        ("sentence,label\na,b\n", r"bad.csv:1: expected the header 'text,category'"),
        ('text,category\nok,x\n"unclosed,x\nmore,y\n', r"bad.csv:3: malformed CSV"),
        ("text,category\n,x\n", r"bad.csv:2: empty text"),
        ("", r"bad.csv:1: empty file"),
    ):
        with raises(message):
            read_banking77_csv(write(tmp_path / "bad.csv", body))
    assert read_categories(write(tmp_path / "c.json", '["b", "a"]')) == ["b", "a"]
    for body, message in (
        ('{"not": "a list"}', "expected a JSON list"),
        ('["a", "a"]', "'a' is listed more than once"),
        ('["a",', "not valid JSON"),
    ):
        with raises(message):
            read_categories(write(tmp_path / "c.json", body))


# --------------------------------------------------------------------------- splits


def test_carved_validation_is_stratified_disjoint_and_deterministic() -> None:
    texts = [f"t{i}" for i in range(100)]
    train = ClassificationSplit(texts, [i % 4 for i in range(100)], [f"f:{i}" for i in range(100)])
    rest, valid = carve_valid(train, 0.2, seed=3)
    again_rest, again_valid = carve_valid(train, 0.2, seed=3)
    assert valid == again_valid and rest == again_rest
    assert len(valid) == 20 and len(rest) == 80
    assert Counter(valid.labels) == {0: 5, 1: 5, 2: 5, 3: 5}  # 20% of every label
    assert not set(valid.texts) & set(rest.texts)
    assert sorted(valid.origins + rest.origins, key=lambda o: int(o[2:])) == train.origins
    assert carve_valid(train, 0.2, seed=4)[1].texts != valid.texts
    # texts in the test split or repeated in train are never drawn
    test_texts = {f"t{i}" for i in range(50)}
    dup = ClassificationSplit(texts + ["t1"], train.labels + [1])
    rest, valid = carve_valid(dup, 0.2, seed=3, avoid_texts=test_texts)
    assert len(valid) == 20 and not set(valid.texts) & (test_texts | {"t1"})
    rare = ClassificationSplit(["a", "b", "c"], [0, 1, 1])  # a label seen once stays in train
    assert carve_valid(rare, 0.1, seed=0)[1].labels == [1]
    with raises(r"valid_fraction must be in \(0, 1\)"):
        carve_valid(train, 1.0, seed=0)


def test_load_task_split_policies(tmp_path) -> None:
    sst = load_task("sst2", sst_sentence_dir(tmp_path / "sst"))
    assert sst.valid_source == "dev file" and sst.label_names == ["negative", "positive"]
    assert sst.valid.texts[0] == "sentence number 0 of dev"
    assert sst.test.texts[0] == "sentence number 0 of test"
    assert len(sst.train) == 20 and len(sst.valid) == 6 and len(sst.test) == 6
    sst5 = load_task("sst5", sst_sentence_dir(tmp_path / "sst5", "stsa.fine", 5))
    assert sst5.num_classes == 5 and sst5.label_names[0] == "very negative"

    trees = trees_dir(tmp_path / "trees")
    assert load_task("sst5", trees).train.labels == [3, 2, 0, 4, 1]
    binary = load_task("sst2", trees)
    assert binary.valid_source == "dev file" and binary.test.labels == [1, 0, 1, 0]

    glue = load_task("sst2", glue_dir(tmp_path / "glue"), valid_fraction=0.25, seed=1)
    assert glue.test.texts == ["d0", "d1"]  # dev.tsv is the reported split ...
    assert "carved 25% of train" in glue.valid_source and len(glue.valid) == 10  # ... valid: train
    assert Counter(glue.valid.labels) == {0: 5, 1: 5} and len(glue.train) == 30
    assert not set(glue.valid.texts) & (set(glue.test.texts) | set(glue.train.texts))
    assert load_task("sst2", tmp_path / "glue", valid_fraction=0.25, seed=1) == glue

    for root in (imdb_jsonl_dir(tmp_path / "jsonl"), acl_dir(tmp_path / "acl" / "aclImdb")):
        imdb = load_task("imdb", root)
        assert (len(imdb.train), len(imdb.valid), len(imdb.test)) == (18, 2, 20)
        assert imdb.valid.labels == [0, 1] and "carved" in imdb.valid_source
        assert all(t.startswith("train") for t in imdb.valid.texts)
    assert load_task("imdb", tmp_path / "acl").source.startswith("IMDB aclImdb")

    bank = load_task("banking77", banking_dir(tmp_path / "bank"), valid_fraction=0.2)
    assert bank.label_names == ["intent_a", "intent_b", "intent_c"]
    assert Counter(bank.valid.labels) == {0: 2, 1: 2, 2: 2} and len(bank.train) == 24
    assert bank.test.labels == [1, 2] and bank.test.texts[0] == "where\nis it"
    ordered = load_task(
        "banking77", banking_dir(tmp_path / "bank2", ["intent_c", "intent_b", "intent_a"])
    )
    assert ordered.label_names == ["intent_c", "intent_b", "intent_a"]
    assert ordered.test.labels == [1, 0] and "categories.json" in ordered.source


def test_load_task_max_examples_and_file_paths(tmp_path) -> None:
    glue = glue_dir(tmp_path / "glue", n=200)
    capped = load_task("sst2", glue, max_examples=5, seed=2)
    assert (len(capped.train), len(capped.valid), len(capped.test)) == (5, 5, 2)
    assert capped == load_task("sst2", glue, max_examples=5, seed=2)
    full = load_task("sst2", glue, seed=2)
    assert set(capped.train.texts) <= set(full.train.texts)
    assert set(capped.valid.texts) <= set(full.valid.texts)
    with raises("max_examples must be a positive integer"):
        load_task("sst2", glue, max_examples=0)
    with raises("max_test_examples must be a positive integer"):
        load_task("sst2", glue, max_test_examples=-1)


def test_max_test_examples_is_the_same_subset_for_every_seed(tmp_path) -> None:
    root = imdb_jsonl_dir(tmp_path / "imdb", n=10)  # 20 test reviews
    a = load_task("imdb", root, seed=1, max_examples=6, max_test_examples=7)
    b = load_task("imdb", root, seed=2, max_examples=6, max_test_examples=7)
    assert len(a.test) == 7 and a.test == b.test  # the reported split does not move with the seed
    assert len(a.train) == 6 and a.train != b.train  # the training subset does
    full = load_task("imdb", root, seed=1)
    assert set(a.test.texts) <= set(full.test.texts) and len(full.test) == 20

    # a directory with several sst2 formats needs one of its files to choose
    both = sst_sentence_dir(glue_dir(tmp_path / "both"))
    with raises("holds GLUE SST-2 and SST sentence files data for sst2; pass one of the files"):
        load_task("sst2", both)
    assert load_task("sst2", both / "dev.tsv").test.texts == ["d0", "d1"]
    assert load_task("sst2", both / "stsa.binary.train").valid_source == "dev file"
    with raises(r"test.tsv is not a sst2 file; expected a directory or one of"):
        load_task("sst2", both / "test.tsv")
    with raises("imdb data must be a directory"):
        load_task("imdb", imdb_jsonl_dir(tmp_path / "j") / "train" / "neg-00.jsonl")


def test_load_task_errors(tmp_path) -> None:
    with raises(r"unknown task 'sst3'; valid: sst2, sst5, imdb, banking77"):
        load_task("sst3", tmp_path)
    assert TASKS == ("sst2", "sst5", "imdb", "banking77")
    with raises("does not exist"):
        load_task("sst2", tmp_path / "nope")
    with raises(r"valid_fraction must be in \(0, 1\)"):
        load_task("sst2", tmp_path, valid_fraction=0.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with raises(r"has no sst2 data; expected train.tsv \+ dev.tsv \(GLUE SST-2\); or stsa.binary"):
        load_task("sst2", empty)
    with raises(r"has no sst5 data; expected stsa.fine.train .*; or train.txt"):
        load_task("sst5", empty)
    with raises("no BANKING77 train.csv"):
        load_task("banking77", empty)
    with raises(r"has no imdb train split: expected \{train,test\}/\*.jsonl shards or aclImdb"):
        load_task("imdb", empty)
    partial = sst_sentence_dir(tmp_path / "partial")
    (partial / "stsa.binary.test").unlink()
    with raises("found only stsa.binary.dev, stsa.binary.train"):
        load_task("sst2", partial)
    only_train = imdb_jsonl_dir(tmp_path / "imdb")
    for shard in (only_train / "test").iterdir():
        shard.unlink()
    with raises("has no imdb test split"):
        load_task("imdb", only_train)
    # malformed records surface through load_task with file and line
    bad = sst_sentence_dir(tmp_path / "bad")
    write(bad / "stsa.binary.dev", "1 fine\noops not a label\n")
    with raises(r"stsa.binary.dev:2: label 'oops' is not an integer"):
        load_task("sst2", bad)


def test_label_sets_must_agree(tmp_path) -> None:
    root = sst_sentence_dir(tmp_path / "sst")
    write(root / "stsa.binary.train", "0 only negatives\n0 again\n")
    with raises(r"stsa.binary.dev:2: label 'positive' \(1\) never occurs in the training data"):
        load_task("sst2", root)
    trees = trees_dir(tmp_path / "trees")
    write(trees / "train.txt", "(0 (0 bad))\n(1 (1 meh))\n(2 (2 ok))\n(3 (3 good))\n")
    with raises(r"dev.txt:4: label 'very positive' \(4\) never occurs"):
        load_task("sst5", trees)
    imdb = imdb_jsonl_dir(tmp_path / "imdb")
    (imdb / "train" / "pos-00.jsonl").unlink()
    with raises(r"test/pos-00.jsonl:1: label 'positive' \(1\) never occurs"):
        load_task("imdb", imdb)
    bank = banking_dir(tmp_path / "bank")
    write(bank / "test.csv", "text,category\nfine,intent_a\nnew,intent_z\n")
    with raises(r"test.csv:3: unknown category 'intent_z'"):
        load_task("banking77", bank)
    bank = banking_dir(tmp_path / "bank2", ["intent_a", "intent_b", "intent_c", "intent_d"])
    write(bank / "test.csv", "text,category\nfine,intent_a\nnew,intent_d\n")
    with raises(r"test.csv:3: label 'intent_d' \(3\) never occurs in the training data"):
        load_task("banking77", bank)
    write(bank / "categories.json", '["intent_a", "intent_b"]')
    with raises(r"train.csv:4: unknown category 'intent_c'"):
        load_task("banking77", bank)


# --------------------------------------------------------------------------- the real data


@pytest.mark.integration
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_task_data() -> None:
    def sizes(data) -> tuple[int, int, int]:
        return len(data.train), len(data.valid), len(data.test)

    glue = load_task("sst2", SHARED / "sst2_glue")
    assert len(glue.train) + len(glue.valid) == 67_349 and len(glue.test) == 872
    assert "carved" in glue.valid_source
    assert sizes(load_task("sst2", SHARED / "sst_sentences")) == (6_920, 872, 1_821)
    assert sizes(load_task("sst5", SHARED / "sst_sentences")) == (8_544, 1_101, 2_210)
    assert sizes(load_task("sst2", SHARED / "sst_trees")) == (6_920, 872, 1_821)
    trees = load_task("sst5", SHARED / "sst_trees")
    assert sizes(trees) == (8_544, 1_101, 2_210)
    assert Counter(trees.train.labels) == {0: 1092, 1: 2218, 2: 1624, 3: 2322, 4: 1288}
    assert trees.train.texts[0].startswith("The Rock is destined to be the 21st Century 's new")
    imdb = load_task("imdb", SHARED / "imdb")
    assert len(imdb.train) + len(imdb.valid) == 25_000 and len(imdb.test) == 25_000
    assert Counter(imdb.test.labels) == {0: 12_500, 1: 12_500}
    assert not set(imdb.valid.texts) & set(imdb.test.texts)
    bank = load_task("banking77", SHARED / "banking77")
    assert bank.num_classes == 77 and len(bank.train) + len(bank.valid) == 10_003
    assert len(bank.test) == 3_080 and set(Counter(bank.test.labels).values()) == {40}
    categories = json.loads((SHARED / "banking77" / "categories.json").read_text("utf-8"))
    assert bank.label_names == categories
