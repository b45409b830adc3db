"""ListOps generator (lm.data.listops): the evaluator on hand-written expressions, seeding, lengths,
the causal-LM layout (answer at the final cue only) and one-line errors naming the key."""
from __future__ import annotations

import numpy as np
import pytest

from lm.data.listops import (CLOSE, DIGIT0, OP0, OPS, VOCAB, ListOps, apply_op, evaluate, evaluate_text, parse,
                             to_string, tokens)
from lm.data.synthetic import IGNORE_INDEX, MARKER, TASKS, SyntheticDataset, build_task
from lm.data.synthetic_module import SyntheticDataModule


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 1 5 ]", 1),
    ("[MED 3 1 5 ]", 3),
    ("[MED 1 2 3 8 ]", 2),  # even count: floor of the mean of the middle two (2 + 3) // 2
    ("[MED 4 7 ]", 5),  # (4 + 7) // 2
    ("[SM 9 8 7 ]", 4),  # 24 mod 10
    ("[SM 5 5 ]", 0),
    ("[MAX [MIN 9 [SM 6 7 ] ] [MED 0 0 1 ] ]", 3),  # MIN(9, 3) = 3, MED = 0
    ("[SM [MAX 1 2 ] [MAX 3 4 ] [MIN 9 [MED 8 6 [SM 1 1 ] ] ] ]", 2),  # 2 + 4 + MIN(9, 6) = 12
    ("7", 7),
])
def test_evaluator_on_hand_written_expressions(text, value):
    assert evaluate_text(text) == value


def test_median_matches_the_original_generator():
    # the original ListOps generator evaluates MED as int(np.median(args))
    rng = np.random.default_rng(0)
    for _ in range(200):
        args = list(rng.integers(0, 10, int(rng.integers(2, 11))))
        assert apply_op("MED", args) == int(np.median(args))


def test_tokens_round_trip_through_text():
    tree = parse("[MAX 2 9 [MIN 4 7 ] 0 ]")
    ids = tokens(tree)
    assert ids[0] == OP0 + OPS.index("MAX") and ids[-1] == CLOSE and ids[1] == DIGIT0 + 2
    assert to_string(ids) == "[MAX 2 9 [MIN 4 7 ] 0 ]"
    assert len(ids) == 9 and VOCAB == 17


@pytest.mark.parametrize("text", ["[MAX 2 9", "[FOO 1 2 ]", "[MAX ]", "[MIN 1 2 ] 3", "12"])
def test_parse_rejects_bad_expressions(text):
    with pytest.raises(ValueError, match="ListOps"):
        parse(text)


def test_samples_layout_and_answer():
    task = build_task("listops", 96, 17, {"max_depth": 4, "max_args": 5, "op_prob": 0.4, "min_length": 16})
    assert isinstance(task, ListOps) and "listops" in TASKS
    for i in range(100):
        ids, labels = task.sample(np.random.default_rng(i))
        assert ids.shape == labels.shape == (96,) and ids.dtype == labels.dtype == np.int64
        assert ids[-1] == MARKER and (labels[:-1] == IGNORE_INDEX).all()  # only the cue is scored
        body = ids[:-1][ids[:-1] != 0]
        n = len(body)
        assert 16 <= n <= 95 and (ids[:95 - n] == 0).all()  # right-aligned, left blank padding
        assert labels[-1] == DIGIT0 + evaluate_text(to_string(body))  # the label is the expression's value
        assert ids.max() < VOCAB


def test_depth_and_args_limits():
    task = build_task("listops", 512, 17, {"max_depth": 2, "max_args": 3, "op_prob": 1.0})
    for i in range(50):
        tree = task.draw(np.random.default_rng(i))
        op, children = tree
        assert op in OPS and 2 <= len(children) <= 3
        for c in children:  # depth 2 is the deepest operator: its children are digits
            if not isinstance(c, int):
                assert 2 <= len(c[1]) <= 3 and all(isinstance(g, int) for g in c[1])


def test_answers_cover_all_digits():
    task = build_task("listops", 128, 17, {"op_prob": 0.4, "min_length": 32})
    answers = np.array([task.sample(np.random.default_rng(i))[1][-1] - DIGIT0 for i in range(400)])
    counts = np.bincount(answers, minlength=10)
    assert (counts > 0).all() and counts.max() / len(answers) < 0.25  # near uniform: chance ~10%


def test_seeding_is_per_index_and_splits_differ():
    task = build_task("listops", 64, 17)
    a = SyntheticDataset(task, 8, seed=3, split="train")
    b = SyntheticDataset(task, 8, seed=3, split="train")
    for i in range(8):
        assert (a[i]["input_ids"] == b[i]["input_ids"]).all()
    c = SyntheticDataset(task, 8, seed=4, split="train")
    v = SyntheticDataset(task, 8, seed=3, split="val")
    assert any((a[i]["input_ids"] != c[i]["input_ids"]).any() for i in range(8))
    assert any((a[i]["input_ids"] != v[i]["input_ids"]).any() for i in range(8))


def test_min_length_raises_the_lengths():
    short = build_task("listops", 128, 17, {"op_prob": 0.4})
    long = build_task("listops", 128, 17, {"op_prob": 0.4, "min_length": 64})
    n = lambda t: np.mean([(t.sample(np.random.default_rng(i))[0] != 0).sum() for i in range(100)])  # noqa: E731
    assert n(long) >= 65 > n(short)


@pytest.mark.parametrize("options, key", [
    ({"max_depth": 0}, "data.task_options.max_depth"),
    ({"max_args": 1}, "data.task_options.max_args"),
    ({"max_args": 2.5}, "data.task_options.max_args"),
    ({"op_prob": 1.5}, "data.task_options.op_prob"),
    ({"op_prob": "high"}, "data.task_options.op_prob"),
    ({"min_length": 200}, "data.task_options.min_length"),  # longer than seq_len - 1
    ({"min_length": 60, "op_prob": 0.0}, "data.task_options.min_length"),  # a bare operator of digits never gets there
    ({"depth": 3}, "data.task_options"),  # unknown option
])
def test_bad_options_raise_one_line_errors_naming_the_key(options, key):
    with pytest.raises(ValueError) as err:
        build_task("listops", 128, 17, options)
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_bad_sizes_name_the_data_key():
    with pytest.raises(ValueError, match=r"^data\.vocab_size"):
        build_task("listops", 128, 16)
    with pytest.raises(ValueError, match=r"^data\.seq_len"):
        build_task("listops", 4, 17)


def test_data_module_builds_listops_batches():
    dm = SyntheticDataModule(task="listops", task_options={"op_prob": 0.4}, seq_len=64, batch_size=4,
                             num_train=16, num_val=4, vocab_size=17)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and (batch["input_ids"][:, -1] == MARKER).all()
    assert ((batch["labels"][:, -1] >= DIGIT0) & (batch["labels"][:, -1] < DIGIT0 + 10)).all()


@pytest.mark.parametrize("options, lengths", [
    ({"op_prob": 0.0, "max_args": 2}, {4}),  # a root operator over two digits: "[OP d d ]"
    ({"max_depth": 1, "max_args": 4, "op_prob": 1.0}, {4, 5, 6}),  # only the root is an operator
    ({"max_depth": 2, "max_args": 2, "op_prob": 1.0}, {10}),  # full binary tree of depth 2
])
def test_tree_shapes_follow_the_options(options, lengths):
    task = build_task("listops", 64, 17, options)
    seen = {len(tokens(task.draw(np.random.default_rng(i)))) for i in range(60)}
    assert seen <= lengths and seen, seen


def test_to_string_drops_blanks_and_marks_the_cue():
    task = build_task("listops", 32, 17, {"op_prob": 0.0, "max_args": 2})
    ids, labels = task.sample(np.random.default_rng(5))
    text = to_string(ids)
    assert text.endswith(" =") and text.count("]") == 1 and len(text.split()) == 5
    assert evaluate(parse(text[:-2])) == labels[-1] - DIGIT0
