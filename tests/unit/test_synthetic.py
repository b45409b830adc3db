"""Synthetic tasks: the answers are where the labels say, samples are deterministic per index,
bad options fail naming the key; the data module's loaders (resumable train, one val loader per length)."""
import numpy as np
import pytest
import torch

from lm.data.loader import ResumableLoader
from lm.data.synthetic import (
    BLANK, IGNORE_INDEX, MARKER, TASKS, SyntheticDataset, build_task,
)
from lm.data.synthetic_module import SyntheticDataModule

ALL_TASKS = {
    "associative_recall": {},
    "mqar": {"num_pairs": 4},
    "induction_heads": {},
    "selective_copying": {"num_tokens": 4},
    "copy_at_distance": {"num_tokens": 4},
}


def samples(name, seq_len=33, vocab=16, n=20, **opts):
    task = build_task(name, seq_len, vocab, opts or ALL_TASKS[name])
    for i in range(n):
        ids, labels = task.sample(np.random.default_rng([7, i]))
        assert ids.shape == labels.shape == (seq_len,) and ids.dtype == labels.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < vocab
        yield task, ids, labels


def test_registry_lists_every_task():
    assert set(ALL_TASKS) <= set(TASKS.names())


@pytest.mark.parametrize("seq_len", [32, 33])
def test_associative_recall_answer_is_the_querys_value(seq_len):
    for task, ids, labels in samples("associative_recall", seq_len):
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert scored.tolist() == [seq_len - 1]
        start = (seq_len - 1) % 2
        keys, vals = ids[start:seq_len - 1:2], ids[start + 1:seq_len - 1:2]
        assert (ids[:start] == BLANK).all()
        assert ((keys >= 2) & (keys < 2 + task.num_keys)).all() and (vals >= 2 + task.num_keys).all()
        mapping = {}
        for k, v in zip(keys, vals):  # one value per key within a sequence
            assert mapping.setdefault(int(k), int(v)) == v
        assert labels[-1] == mapping[int(ids[-1])]


def test_mqar_answers_follow_their_queries():
    for task, ids, labels in samples("mqar", 40, 20, num_pairs=5):
        P = task.num_pairs
        kv = dict(zip(ids[0:2 * P:2].tolist(), ids[1:2 * P:2].tolist()))
        assert len(kv) == P  # distinct keys
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(scored) == P and scored.min() >= 2 * P
        assert sorted(ids[scored].tolist()) == sorted(kv)  # every key queried once
        for q in scored:
            assert labels[q] == kv[int(ids[q])] == ids[q + 1]
        rest = np.setdiff1d(np.arange(2 * P, 40), np.concatenate([scored, scored + 1]))
        assert (ids[rest] == BLANK).all()


@pytest.mark.parametrize("num_queries", [1, 4])
def test_induction_heads_answer_follows_the_first_trigger(num_queries):
    for task, ids, labels in samples("induction_heads", 33, num_queries=num_queries):
        trig = np.flatnonzero(ids == MARKER)
        assert len(trig) == num_queries + 1 and trig[-1] == 32
        answer = ids[trig[0] + 1]
        assert answer >= 2 and (ids[trig[:-1] + 1] == answer).all()
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert scored.tolist() == trig[1:].tolist() and (labels[scored] == answer).all()


def test_selective_copying_outputs_the_content_in_order():
    for task, ids, labels in samples("selective_copying", 24, num_tokens=5):
        ctx = 24 - 5
        content = ids[:ctx][ids[:ctx] != BLANK]
        assert len(content) == 5 and (content >= 2).all()
        assert (ids[ctx:] == MARKER).all() and (labels[:ctx] == IGNORE_INDEX).all()
        assert labels[ctx:].tolist() == content.tolist()


@pytest.mark.parametrize("distance", [None, 3])
def test_copy_at_distance_reproduces_the_string(distance):
    for task, ids, labels in samples("copy_at_distance", 20, num_tokens=4, distance=distance):
        sep = int(np.flatnonzero(ids == MARKER)[0])
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        assert scored.tolist() == list(range(sep, 20))
        content = labels[scored]
        start = 20 - 8 - task.distance
        assert ids[start:start + 4].tolist() == content.tolist()
        assert sep - (start + 4) == task.distance and (ids[start + 4:sep] == BLANK).all()
        assert ids[sep + 1:].tolist() == content[:-1].tolist()  # teacher forcing


@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_dataset_is_deterministic_per_index(name):
    task = build_task(name, 32, 16, ALL_TASKS[name])
    a, b = SyntheticDataset(task, 50, seed=3), SyntheticDataset(task, 50, seed=3)
    for i in (0, 7, 49):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])
    rows = {tuple(a[i]["input_ids"].tolist()) for i in range(50)}
    assert len(rows) > 40  # indices draw different samples
    other_seed = SyntheticDataset(task, 50, seed=4)
    val = SyntheticDataset(task, 50, seed=3, split="val")
    assert not torch.equal(a[0]["input_ids"], other_seed[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], val[0]["input_ids"])
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("name, seq_len, vocab, opts, key", [
    ("mqar", 16, 32, {"num_pairs": 5}, "data.task_options.num_pairs"),  # 4 * 5 > 16
    ("mqar", 64, 12, {"num_pairs": 6}, "data.task_options.num_pairs"),  # 6 distinct keys, 5 in vocab
    ("mqar", 64, 32, {"num_pairs": 0}, "data.task_options.num_pairs"),
    ("mqar", 64, 32, {"num_pair": 4}, "data.task_options.num_pair"),  # unknown option
    ("associative_recall", 32, 16, {"num_keys": 10, "num_values": 10}, "data.task_options.num_keys"),
    ("selective_copying", 16, 16, {"num_tokens": 9}, "data.task_options.num_tokens"),
    ("copy_at_distance", 16, 16, {"num_tokens": 4, "distance": 9}, "data.task_options.distance"),
    ("induction_heads", 8, 16, {"num_queries": 4}, "data.task_options.num_queries"),
    ("induction_heads", 8, 3, {}, "data.vocab_size"),
    ("no_such_task", 8, 16, {}, "data.task"),
])
def test_bad_options_name_the_key(name, seq_len, vocab, opts, key):
    with pytest.raises(ValueError, match=rf"^{key}: "):
        build_task(name, seq_len, vocab, opts)


def test_module_builds_checks_at_init():
    with pytest.raises(ValueError, match=r"^data.task_options.num_pairs: "):
        SyntheticDataModule("mqar", {"num_pairs": 8}, seq_len=64, eval_seq_lens=[16, 64], vocab_size=32)
    with pytest.raises(ValueError, match=r"^data.eval_task_options.num_queries: "):
        SyntheticDataModule("induction_heads", {}, seq_len=64, eval_task_options={"num_queries": 40}, vocab_size=16)
    with pytest.raises(ValueError, match=r"^data.eval_seq_lens: "):
        SyntheticDataModule("mqar", seq_len=64, eval_seq_lens=[], vocab_size=32)
    with pytest.raises(ValueError, match=r"^data.batch_size: "):
        SyntheticDataModule("mqar", seq_len=64, batch_size=0, vocab_size=32)


def test_module_loaders_names_and_resume():
    dm = SyntheticDataModule("induction_heads", {"num_queries": 2}, seq_len=16, eval_seq_lens=[16, 64],
                             batch_size=4, num_train=40, num_val=6, seed=5, vocab_size=12,
                             eval_task_options={"num_queries": 1})
    assert dm.val_names == ["L16", "L64"] and dm.vocab_size == 12
    vals = dm.val_dataloader()
    assert [next(iter(v))["input_ids"].shape[1] for v in vals] == [16, 64]
    assert [sum(b["input_ids"].shape[0] for b in v) for v in vals] == [6, 6]
    for v in vals:  # evaluation: one scored answer per sequence (eval_task_options)
        b = next(iter(v))
        assert ((b["labels"] != IGNORE_INDEX).sum(1) == 1).all()
    b0, b1 = (next(iter(v)) for v in dm.val_dataloader())  # deterministic
    assert torch.equal(b0["input_ids"], next(iter(vals[0]))["input_ids"])
    assert not torch.equal(dm.test_dataloader()[0].dataset[0]["input_ids"], vals[0].dataset[0]["input_ids"])

    train = dm.train_dataloader()
    assert isinstance(train, ResumableLoader) and len(train) == 10
    it = iter(train)
    [next(it) for _ in range(3)]
    state = train.state_dict()
    expected = next(it)
    again = dm.train_dataloader()
    again.load_state_dict(state)
    got = next(iter(again))
    assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
    assert ((expected["labels"] != IGNORE_INDEX).sum(1) == 2).all()  # training: num_queries=2


def test_model_vocab_smaller_than_task_vocab_fails(tmp_path):
    import lightning as L

    from lm.models import DecoderConfig
    from lm.training.module import LanguageModel

    dm = SyntheticDataModule("associative_recall", seq_len=16, batch_size=4, num_train=8, num_val=4, vocab_size=32)
    module = LanguageModel(DecoderConfig(vocab_size=16, dim=16, num_layers=1, num_heads=2, max_seq_len=16))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^model.config.vocab_size: 16 is smaller"):
        trainer.fit(module, datamodule=dm)


def test_fit_logs_accuracy_per_length(tmp_path):
    import lightning as L

    from lm.models import DecoderConfig
    from lm.training.module import LanguageModel

    torch.set_num_threads(1)
    dm = SyntheticDataModule("mqar", {"num_pairs": 2}, seq_len=16, eval_seq_lens=[16, 32], batch_size=4,
                             num_train=16, num_val=4, vocab_size=12)
    module = LanguageModel(DecoderConfig(vocab_size=12, dim=16, num_layers=1, num_heads=2, max_seq_len=32))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    for k in ("val/acc_L16", "val/acc_L32", "val/loss_L16", "val/loss_L32"):
        assert k in m and torch.isfinite(m[k])
    assert 0.0 <= float(m["val/acc_L16"]) <= 1.0
