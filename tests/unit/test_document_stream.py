"""lm.data.document_stream: documents read segment by segment per row, memories cleared at document
starts, resumable, and a real Lightning fit of a knn_memory model over it."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from lm.data.document_stream import DocumentSegments, DocumentStreamDataModule, document_spans, layout_rows
from lm.data.synthetic import IGNORE_INDEX
from test_data import write_corpus  # tests/unit/test_data.py

EOS = 0


def toy_stream(lengths: list[int]) -> np.ndarray:
    """Documents of the given token counts (token values 1..), each followed by EOS."""
    out, v = [], 1
    for n in lengths:
        out += list(range(v, v + n)) + [EOS]
        v += n
    return np.array(out, dtype=np.uint16)


def test_spans_and_layout_keep_each_document_whole_and_in_order():
    stream = toy_stream([5, 1, 12, 3, 7, 9])
    spans = document_spans(np.concatenate([stream, [EOS]]).astype(np.uint16), EOS)  # a trailing empty doc
    assert spans == document_spans(stream, EOS) and len(spans) == 6
    assert all(stream[e - 1] == EOS and EOS not in stream[s:e - 1] for s, e in spans)
    S = 4
    rows = layout_rows(spans, S, 2, seed=3)
    assert rows.shape[0] == 2 and rows.shape[2] == 2
    for row in rows:  # a document's segments are consecutive, offsets 0, S, 2S, ...
        docs = row[:, 0]
        for d in np.unique(docs):
            at = np.flatnonzero(docs == d)
            assert (np.diff(at) == 1).all() and (row[at, 1] == S * np.arange(len(at))).all()
    seg_total = sum(-(-(e - s) // S) for s, e in spans)  # every document lands in exactly one row
    assert seg_total - 2 * rows.shape[1] < max(-(-(e - s) // S) for s, e in spans) * 2


def test_segments_reconstruct_every_document_with_a_start_token(tmp_path):
    stream = toy_stream([5, 1, 12, 3, 7, 9, 2, 6])
    path = tmp_path / "s.npy"
    np.save(path, stream)
    spans = document_spans(stream, EOS)
    S = 4
    rows = layout_rows(spans, S, 2, seed=0)
    ds = DocumentSegments(str(path), spans, rows, S, EOS)
    items = [ds[t] for t in range(len(ds))]
    for r in range(2):
        ids = torch.cat([it["input_ids"][r] for it in items]).numpy()
        labels = torch.cat([it["labels"][r] for it in items]).numpy()
        reset = np.array([bool(it["reset"][r]) for it in items])
        starts = np.flatnonzero(reset)
        assert starts[0] == 0
        for a, b in zip(starts, [*starts[1:], len(items)]):
            doc = int(rows[r, a, 0])
            s, e = spans[doc]
            seg_ids, seg_labels = ids[a * S:b * S], labels[a * S:b * S]
            scored = seg_labels != IGNORE_INDEX
            if b < len(items) or scored.sum() == e - s:  # whole (the row's last may be cut by the epoch)
                np.testing.assert_array_equal(seg_labels[scored], stream[s:e])  # tokens, then EOS
                assert seg_ids[0] == EOS and (seg_ids[1:e - s] == stream[s:e - 1]).all()
                assert (seg_ids[~scored] == EOS).all() and not scored[e - s:].any()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_module_resets_only_rows_that_start_a_document(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    src = write_corpus(tmp_path / "c", n_docs=24, words=40)
    dm = DocumentStreamDataModule([str(src)], seq_len=16, batch_size=3, vocab_size=300, val_fraction=0.2,
                                  max_bytes=None, num_proc=1, val_batches=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 4
    assert bool(batches[0]["reset"].all()) and not all(bool(b["reset"].all()) for b in batches[1:])
    assert all(b["input_ids"].shape == b["labels"].shape == (3, 16) for b in batches)
    val = list(dm.val_dataloader())
    assert len(val) == 2 and bool(val[0]["reset"].all())

    # resume mid-epoch: the next batch, nothing repeated or skipped
    fresh = dm.train_dataloader()
    it = iter(fresh)
    for _ in range(3):
        next(it)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(fresh.state_dict())
    rest = list(resumed)
    assert len(rest) == len(batches) - 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(rest, batches[3:]) for k in b)
    assert fresh.state_dict()["world_size"] == 1
    with pytest.raises(ValueError, match="world_size=2"):
        dm.train_dataloader().load_state_dict({**fresh.state_dict(), "world_size": 2})
    with pytest.raises(ValueError, match="data.seed"):
        dm.train_dataloader().load_state_dict({**fresh.state_dict(), "seed": 5})

    # the hook clears exactly the rows that start a document
    from lm.models import DecoderConfig, DecoderLM
    from lm.models.config import LayerSpec

    model = DecoderLM(DecoderConfig(vocab_size=300, dim=32, num_layers=1, num_heads=2, max_seq_len=16,
                                    layer_pattern=[LayerSpec(mixer="knn_memory",
                                                             mixer_options={"memory_size": 64, "top_k": 4})]))
    dm.trainer = SimpleNamespace(lightning_module=model)
    memory = model.blocks[0].mixer.memory
    t = next(i for i, b in enumerate(batches) if 0 < int(b["reset"].sum()) < 3)
    model(batches[t - 1]["input_ids"])  # the previous segments' pairs
    out = dm.on_after_batch_transfer(dict(batches[t]), 0)
    assert set(out) == {"input_ids", "labels"}
    torch.testing.assert_close(memory.valid_BM.all(dim=1), ~batches[t]["reset"])
    dm.on_after_batch_transfer(dict(batches[0]), 0)  # every row starts: all cleared
    assert len(memory) == 0


def test_lightning_fit_streams_documents_through_the_memory(tmp_path, monkeypatch):
    from lm.models import DecoderConfig
    from lm.models.config import LayerSpec
    from lm.training.module import LanguageModel
    from lm.training.optim import OptimConfig

    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    src = write_corpus(tmp_path / "c", n_docs=24, words=40)
    dm = DocumentStreamDataModule([str(src)], seq_len=16, batch_size=2, vocab_size=300, val_fraction=0.2,
                                  max_bytes=None, num_proc=1, val_batches=3)
    cfg = DecoderConfig(vocab_size=300, dim=32, num_layers=2, num_heads=2, max_seq_len=16, layer_pattern=[
        LayerSpec(mixer="attention"), LayerSpec(mixer="knn_memory", mixer_options={"memory_size": 32, "top_k": 4})])
    module = LanguageModel(config=cfg, optim=OptimConfig(lr=3e-3, warmup_steps=2))
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=6,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    layer = module.model.blocks[1].mixer
    assert trainer.global_step == 12 and bool(torch.isfinite(trainer.callback_metrics["val/loss"]))
    assert 0 < len(layer.memory) <= 32
    assert bool((layer.gate_H != 0).all())  # starts at 0: it moved, so gradients came through the memory


def test_lightning_resume_continues_with_the_next_segment(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_data import Recorder

    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    src = write_corpus(tmp_path / "c", n_docs=24, words=40)

    def fit(max_steps, ckpt_path=None, callbacks=()):
        dm = DocumentStreamDataModule([str(src)], seq_len=16, batch_size=3, vocab_size=300, val_fraction=0.2,
                                      max_bytes=None, num_proc=1)
        model = Recorder(300)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=list(callbacks))
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    every = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    full = fit(6, callbacks=[every])
    rest = fit(6, ckpt_path=str(tmp_path / "ck" / "step=3.ckpt"))
    assert len(full) == 6 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:]))


def test_ranks_read_disjoint_rows_for_the_same_number_of_steps(tmp_path, monkeypatch):
    """Data parallel: rank r reads rows r*B .. r*B+B-1 of one layout, so no document is read twice."""
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    src = write_corpus(tmp_path / "c", n_docs=30, words=40)
    docs, steps = [], set()
    for rank in (0, 1):
        dm = DocumentStreamDataModule([str(src)], seq_len=16, batch_size=3, vocab_size=300, val_fraction=0.2,
                                      max_bytes=None, num_proc=1)
        shard = {"rank": rank, "num_replicas": 2}  # what Lightning's DDP strategy reports
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=shard), global_rank=rank,
                                     world_size=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        steps.add(len(loader))
        docs.append({int(d) for d in loader.dataset.rows[:, :, 0].ravel()})
        assert loader.state_dict()["world_size"] == 2
    assert len(steps) == 1 and not docs[0] & docs[1]
