"""Data pipeline: corpus, split, tokenizer cache, packing, and the resumable train loader."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lm.data.packing as packing
import lm.data.tokenizer as tokenizer_mod
from lm.data import (
    ResumableLoader, ResumableSampler, TextDataModule, build_corpus, split_documents, tokenize_stream,
)

WORDS = ("the quick brown fox jumps over lazy dog data model token batch epoch train loss step "
         "layer head value query key python lightning resume sample").split()


def write_corpus(root, n_docs=40, words=60, seed=0):
    """ASCII documents (so any token span decodes to an exact substring) in a nested folder."""
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + f". Document {i}.\n"
        (root / ("sub" if i % 2 else "") / f"doc{i:03d}.txt").write_text(text)
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture
def lm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_dm(src, **kw):
    kw = {"sources": [str(src)], "seq_len": 16, "batch_size": 4, "vocab_size": 300, "val_fraction": 0.2,
          "max_bytes": None, "num_proc": 1, **kw}
    return TextDataModule(**kw)


# -- corpus and split -------------------------------------------------------------------------------

def test_builtin_corpus_deterministic_and_budget():
    docs = build_corpus(["builtin:stdlib"], max_bytes=700_000)
    assert [(d.id, d.text) for d in docs] == [(d.id, d.text) for d in build_corpus(["builtin:stdlib"], 700_000)]
    assert sum(len(d.text.encode()) for d in docs) <= 700_000
    ids = [d.id for d in docs]
    n_topics = sum(i.startswith("builtin:stdlib/topics/") for i in ids)
    assert 10 < n_topics < len(ids)  # docs first, then sources
    assert all(i.startswith("builtin:stdlib/topics/") for i in ids[:n_topics])
    py = ids[n_topics:]
    assert py == sorted(py) and all(i.endswith(".py") for i in py)
    every = [d.id for d in build_corpus(["builtin:stdlib"], None)]
    for bad in ("site-packages/", "/test/", "idlelib/", "tkinter/", "lib2to3/", "ensurepip/"):
        assert not any(bad in i for i in every), bad
    assert sum(len(d.text.encode()) for d in build_corpus(["builtin:stdlib"], 12_345)) <= 12_345


def test_local_sources_jsonl_and_budget(tmp_path):
    src = write_corpus(tmp_path / "c", n_docs=6)
    (src / "more.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)) + "\n")
    docs = build_corpus([str(src)])
    assert len(docs) == 9 and "c/more.jsonl:2" in {d.id for d in docs}
    assert {d.id for d in docs} >= {"c/sub/doc001.txt", "c/doc000.txt"}
    # ids (and so the split) do not depend on where the folder sits or how its path is written
    moved = src.rename(tmp_path / "elsewhere")
    moved.parent.joinpath("x").mkdir()
    moved = moved.rename(tmp_path / "x" / "c")
    assert [d.id for d in build_corpus([str(moved) + "/"])] == [d.id for d in docs]
    assert [d.id for d in build_corpus([str(moved / "more.jsonl")])] == ["more.jsonl:1", "more.jsonl:2", "more.jsonl:3"]
    moved.rename(src)
    small = build_corpus([str(src)], max_bytes=500)
    assert sum(len(d.text.encode()) for d in small) <= 500 and len(small) < len(docs)


def test_split_deterministic_and_disjoint(tmp_path):
    docs = build_corpus([str(write_corpus(tmp_path / "c", n_docs=60))])
    train, val = split_documents(docs, 0.2)
    train2, val2 = split_documents(list(reversed(docs)), 0.2)
    assert {d.id for d in train} == {d.id for d in train2} and {d.id for d in val} == {d.id for d in val2}
    assert not {d.id for d in train} & {d.id for d in val}
    assert len(train) + len(val) == len(docs) and 3 <= len(val) <= 25
    # a document's side depends only on its id, not on the rest of the corpus
    train3, val3 = split_documents(docs[:30], 0.2)
    assert {d.id for d in val3} <= {d.id for d in val}
    assert all(len(s) >= 1 for s in split_documents(docs[:2], 0.01))  # each side gets one


# -- tokenizer and packing ---------------------------------------------------------------------------

def test_tokenizer_is_cached(tmp_path, lm_cache, monkeypatch):
    src = write_corpus(tmp_path / "c")
    dm = make_dm(src)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.eos_id == 0 and dm.tokenizer.id_to_token(0) == "<|endoftext|>" and dm.vocab_size <= 300
    (tok_file,) = lm_cache.glob("tokenizers/*/tokenizer.json")
    mtime = tok_file.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("tokenizer retrained despite a cache hit")

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", no_training)
    dm2 = make_dm(src)
    dm2.setup("fit")  # prepare_data not called on this "process": setup loads (or builds) itself
    assert tok_file.stat().st_mtime_ns == mtime
    assert dm2.tokenizer.to_str() == dm.tokenizer.to_str()
    assert np.array_equal(dm2.train_dataset.stream, dm.train_dataset.stream)
    with pytest.raises(AssertionError, match="retrained"):  # other vocab_size: other key
        make_dm(src, vocab_size=320).setup("fit")


def test_packing_layout_and_roundtrip(tmp_path, lm_cache):
    src = write_corpus(tmp_path / "c")
    dm = make_dm(src)
    dm.setup("fit")
    ds, T, eos = dm.train_dataset, 16, dm.eos_id
    stream = np.asarray(ds.stream)
    assert stream.dtype == np.uint16 and len(ds) == (len(stream) - 1) // T
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (T,)
        assert np.array_equal(s["input_ids"].numpy(), stream[i * T : i * T + T])
        assert np.array_equal(s["labels"].numpy(), stream[i * T + 1 : i * T + T + 1])
    # EOS after every document: decoding the stream piece by piece gives the train texts back
    train_docs, _ = split_documents(build_corpus([str(src)]), 0.2)
    assert stream[-1] == eos and (stream == eos).sum() == len(train_docs)
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    assert [dm.tokenizer.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in train_docs]
    joined = "".join(d.text for d in train_docs)
    for i in range(0, len(ds), 7):
        ids = ds[i]["input_ids"].tolist()
        if eos not in ids:
            assert dm.tokenizer.decode(ids) in joined


def test_num_proc_matches_single_process(tmp_path, lm_cache, monkeypatch):
    src = write_corpus(tmp_path / "c", n_docs=24)
    dm = make_dm(src)
    dm.setup("fit")
    (tok_file,) = lm_cache.glob("tokenizers/*/tokenizer.json")
    docs = build_corpus([str(src)])
    one = tokenize_stream(docs, tok_file, 0, 300, tmp_path / "w", num_proc=1)
    monkeypatch.setattr(packing, "_MIN_BYTES_PER_PROC", 1)  # force two worker processes
    two = tokenize_stream(docs, tok_file, 0, 300, tmp_path / "w", num_proc=2)
    assert np.array_equal(one, two) and list((tmp_path / "w").iterdir()) == []


def test_val_loader_deterministic(tmp_path, lm_cache):
    dm = make_dm(write_corpus(tmp_path / "c", n_docs=60), val_batches=2)
    dm.setup("fit")
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(a) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert torch.equal(a[0]["input_ids"][0], dm.val_dataset[0]["input_ids"])


# -- resumable loader ---------------------------------------------------------------------------------

class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i + 1])}


def take(loader, n):
    """Consume n batches the way Lightning does: one iter() per epoch, stop mid-epoch at will."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch["input_ids"].flatten().tolist())
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("k,workers", [(2, 0), (5, 0), (7, 0), (7, 2)])
def test_loader_resume_continues_exactly(k, workers):
    make = lambda: ResumableLoader(Toy(), 4, seed=3, num_workers=workers)  # noqa: E731
    assert len(make()) == 5  # 23 // 4: k=5 is an epoch boundary, k=7 is inside epoch 1
    reference = take(make(), k + 6)
    first = make()
    assert take(first, k) == reference[:k]
    state = first.state_dict()
    epoch = (k - 1) // 5  # a just-finished epoch stays current until the next iter()
    assert state == {"epoch": epoch, "batches_done": k - 5 * epoch, "seed": 3, "world_size": 1}
    resumed = make()
    resumed.load_state_dict(state)
    iter(resumed)  # Lightning probes with iter() and drops it: must not move the position
    assert take(resumed, 6) == reference[k:]


def test_loader_epochs_and_state():
    loader = ResumableLoader(Toy(), 4, seed=0)
    e0, e1 = take(loader, 5), take(loader, 5)
    assert loader.state_dict() == {"epoch": 1, "batches_done": 5, "seed": 0, "world_size": 1}
    for e in (e0, e1):  # each epoch: 5 full batches of distinct samples (3 of 23 dropped), reshuffled
        assert len(set(sum(e, []))) == 20 and set(sum(e, [])) <= set(range(23))
    assert e0 != e1
    with pytest.raises(ValueError, match="world_size"):
        ResumableLoader(Toy(), 4, rank=0, world_size=2).load_state_dict(loader.state_dict())


def test_sharding_disjoint_and_equal():
    for epoch in (0, 1):
        shards = [ResumableSampler(103, 4, seed=5, rank=r, world_size=2).indices(epoch) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 48  # 103 // 8 = 12 batches of 4 per rank
        assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) <= set(range(103))
    loaders = [ResumableLoader(Toy(), 4, rank=r, world_size=2) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 2


# -- a real Lightning resume ----------------------------------------------------------------------------

class Recorder(L.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.out = torch.nn.Linear(8, vocab_size)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        logits = self.out(self.emb(batch["input_ids"]))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_recorder(tmp_path, src, max_steps, ckpt_path=None, callbacks=(), root=None, **trainer_kw):
    dm = make_dm(src, batch_size=16)  # a fresh DataModule, as in a new process
    model = Recorder(300)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", enable_checkpointing=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root or tmp_path, callbacks=list(callbacks), **trainer_kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, dm, model.seen


def test_lightning_resume_matches_uninterrupted(tmp_path, lm_cache):
    src = write_corpus(tmp_path / "c", n_docs=16, words=30)
    every = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    _, dm, full = fit_recorder(tmp_path, src, 6, callbacks=[every])
    per_epoch = len(dm.train_dataloader())
    assert 2 <= per_epoch <= 5, per_epoch  # six steps cross at least one epoch boundary
    resumes = []
    for k in sorted({3, per_epoch}):
        # a run that stops after k steps; Lightning's default ModelCheckpoint saves at its "epoch end"
        trainer, _, first = fit_recorder(tmp_path, src, k, root=tmp_path / f"r{k}")
        assert all(torch.equal(a, b) for a, b in zip(first, full[:k])) and len(first) == k
        trainer.save_checkpoint(tmp_path / f"r{k}.ckpt")
        (default_ckpt,) = (tmp_path / f"r{k}").rglob("*.ckpt")
        resumes += [(k, tmp_path / f"r{k}.ckpt"), (k, default_ckpt)]
    ckpt = torch.load(tmp_path / "r3.ckpt", weights_only=True)
    epoch = (3 - 1) // per_epoch
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": epoch, "batches_done": 3 - per_epoch * epoch, "seed": 1234, "world_size": 1}
    ]
    # checkpoints written mid-run (on_train_batch_end), at and just after an epoch end
    resumes += [(k, tmp_path / "ck" / f"step={k}.ckpt") for k in (per_epoch, per_epoch + 1)]
    for k, path in resumes:
        _, _, rest = fit_recorder(tmp_path, src, 6, ckpt_path=str(path))
        assert len(rest) == 6 - k, (path.name, len(rest))
        assert all(torch.equal(a, b) for a, b in zip(rest, full[k:])), path.name


DDP_SCRIPT = """
import json, sys
import lightning as L, torch, torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lm.data import TextDataModule
from lm.parallel.worker import exit_worker, start_worker

start_worker()
src, out = sys.argv[1], sys.argv[2]

class Rec(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb, self.seen = torch.nn.Embedding(300, 4), []
    def training_step(self, batch, i):
        self.seen.append(batch["input_ids"].tolist())
        return self.emb(batch["input_ids"]).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

def fit(max_steps, ckpt=None, cbs=()):
    dm = TextDataModule([src], seq_len=16, batch_size=4, vocab_size=300, val_fraction=0.2, max_bytes=None,
                        num_proc=1)
    m = Rec()
    t = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, callbacks=list(cbs))
    t.fit(m, datamodule=dm, ckpt_path=ckpt)
    return t, m.seen, len(t.train_dataloader)

ck = ModelCheckpoint(dirpath=out + "/ck", filename="{step}", every_n_train_steps=1, save_top_k=-1)
t, full, n = fit(5, cbs=[ck])
_, rest, _ = fit(5, ckpt=out + "/ck/step=2.ckpt")
with open(f"{out}/rank{t.global_rank}.json", "w") as f:
    json.dump({"full": full, "rest": rest, "len": n}, f)
exit_worker(0)
"""


@pytest.mark.slow
def test_ddp_two_ranks_disjoint_and_resume(tmp_path, lm_cache):
    """Two gloo ranks under Lightning DDP: each rank gets its own shard (Lightning does not swap in a
    DistributedSampler), and a run resumed from a step-2 checkpoint continues exactly on both ranks."""
    src = write_corpus(tmp_path / "c", n_docs=16, words=30)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "ddp.py"), str(src), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["len"] == ranks[1]["len"] >= 2
    for r in ranks:
        assert len(r["full"]) == 5 and r["rest"] == r["full"][2:]
    for step in range(5):  # same step, different ranks: different samples
        rows = [{tuple(row) for row in r["full"][step]} for r in ranks]
        assert not rows[0] & rows[1]


# -- bad input --------------------------------------------------------------------------------------------

def test_bad_input_names_the_key(tmp_path, lm_cache):
    src = write_corpus(tmp_path / "c", n_docs=10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"1")
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    cases = [
        (dict(sources=[str(tmp_path / "nope.txt")]), r"data\.sources: '.*nope\.txt' does not exist"),
        (dict(sources=[str(tmp_path / "empty")]), r"data\.sources: '.*empty' contains no text"),
        (dict(sources=[str(tmp_path / "bad.jsonl")]), r"data\.sources: .*line 1"),
        (dict(val_fraction=0.0), r"data\.val_fraction"),
        (dict(val_fraction=1.0), r"data\.val_fraction"),
        (dict(seq_len=100_000), r"data\.seq_len"),
        (dict(vocab_size=100), r"data\.vocab_size"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make_dm(src, **kw).setup("fit")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        make_dm(tmp_path / "one.txt").setup("fit")
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        make_dm(src, batch_size=10_000).train_dataloader()
