"""recipes/long_context/: every recipe runs shortened (2 steps, tiny batches) in-process and its
header carries the measured result; the recipes' own arithmetic (reach of the sliding-window stack,
global token at the ListOps cue, memory size vs distances) is checked; and the segment-wise kNN
data side (lm.data.segments) writes earlier segments to a freshly cleared memory."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import torch
import yaml

from shortened import SHORT, SHORT_SYNTHETIC  # tests/recipes/shortened.py

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "recipes" / "long_context"
RECIPES = sorted(Path(p).stem for p in glob.glob(str(DIR / "*.yaml")) if not p.endswith(".gpu.yaml"))
LISTOPS = ["listops_attention", "listops_sliding_window", "listops_longformer", "listops_bigbird",
           "listops_performer"]
SYNTHETIC = [*LISTOPS, "copy_at_distance_inside", "copy_at_distance_beyond"]
SEGMENTS = ["knn_memory_recall"]
TEXT = ["long_document_lm"]
STREAMS = ["memorizing_lm", "memorizing_lm_local"]  # text read as per-row document streams
SHORT_DATA = {
    "synthetic": SHORT_SYNTHETIC,
    "segments": ["--data.init_args.batch_size=4", "--data.init_args.num_val=2", "--data.init_args.num_train=8"],
    "text": ["--data.init_args.max_bytes=150000", "--data.init_args.vocab_size=320",
             "--model.init_args.config.vocab_size=320", "--data.init_args.seq_len=512",
             "--data.init_args.batch_size=1", "--data.init_args.val_batches=1", "--data.init_args.num_proc=1"],
    "streams": ["--data.init_args.max_bytes=150000", "--data.init_args.vocab_size=320",
                "--model.init_args.config.vocab_size=320", "--data.init_args.batch_size=2",
                "--data.init_args.val_batches=2", "--data.init_args.num_proc=1"],
}


def kind(name: str) -> str:
    return ("synthetic" if name in SYNTHETIC else "segments" if name in SEGMENTS else
            "streams" if name in STREAMS else "text")


def load(name: str) -> dict:
    return yaml.safe_load((DIR / f"{name}.yaml").read_text())


def test_every_long_context_recipe_is_covered():
    assert RECIPES and set(RECIPES) <= set(SYNTHETIC) | set(SEGMENTS) | set(TEXT) | set(STREAMS), RECIPES  # each has a kind
    for name in RECIPES:  # each CPU recipe has its multi-GPU-node size beside it
        assert (DIR / f"{name}.gpu.yaml").exists(), name


@pytest.mark.parametrize("name", RECIPES)
def test_header_names_the_paper_and_the_measurement(name):
    header = "\n".join(ln for ln in (DIR / f"{name}.yaml").read_text().splitlines() if ln.startswith("#"))
    assert "Reproduces" in header and "Expected CPU result" in header and "Run:" in header, name
    assert re.search(r"Table \d", header), f"{name}: paper table missing"
    assert "EXPECTED_" not in header, f"{name}: measured result not filled in"
    assert re.search(r"\d+(\.\d+)? (s|min)\b", header), f"{name}: run time missing"
    assert "measured on 2 shared cores" in header, name


def test_listops_recipes_share_data_budget_and_seed():
    """Only the mixer differs: the LRA comparison is meaningful only on the same data and budget."""
    base = load("listops_attention")
    for name in (n for n in LISTOPS if n in RECIPES):
        r = load(name)
        assert r["data"] == base["data"] and r["trainer"] == base["trainer"], name
        assert r["seed_everything"] == base["seed_everything"] and r["model"]["init_args"]["optim"] == \
            base["model"]["init_args"]["optim"], name
        cfg = {k: v for k, v in r["model"]["init_args"]["config"].items() if k not in ("mixer", "mixer_options")}
        ref = {k: v for k, v in base["model"]["init_args"]["config"].items() if k not in ("mixer", "mixer_options")}
        assert cfg == ref, name


def test_listops_sparse_layouts_match_the_readout():
    data = load("listops_attention")["data"]["init_args"]
    T = data["seq_len"]
    for name in (n for n in ("listops_longformer", "listops_bigbird") if n in RECIPES):  # the cue is the global ([CLS]-like) token
        assert load(name)["model"]["init_args"]["config"]["mixer_options"]["global_tokens"] == [T - 1], name
    sw = load("listops_sliding_window")["model"]["init_args"]["config"]
    reach = sw["num_layers"] * (sw["mixer_options"]["window"] - 1)
    assert reach < data["task_options"]["min_length"]  # the local stack never sees a whole expression


@pytest.mark.skipif(not {"copy_at_distance_inside", "copy_at_distance_beyond"} <= set(RECIPES), reason="pair")
def test_copy_recipes_bracket_the_sliding_window_reach():
    gaps = {}
    for v in ("inside", "beyond"):
        r = load(f"copy_at_distance_{v}")
        cfg, opts = r["model"]["init_args"]["config"], r["data"]["init_args"]["task_options"]
        reach = cfg["num_layers"] * (cfg["mixer_options"]["window"] - 1)
        gaps[v] = opts["num_tokens"] + opts["distance"]  # every copy position looks this far back
        assert cfg["mixer"] == "sliding_window_blocksparse"
    assert gaps["inside"] <= reach < gaps["beyond"], (gaps, reach)


@pytest.mark.skipif("knn_memory_recall" not in RECIPES, reason="recipe")
def test_knn_recipe_evaluates_inside_and_beyond_the_memory():
    r = load("knn_memory_recall")
    data = r["data"]["init_args"]
    mem = r["model"]["init_args"]["config"]["layer_pattern"][1]["mixer_options"]["memory_size"]
    dists = [g * data["segment_len"] for g in data["eval_gaps"]]
    assert any(d <= mem for d in dists) and any(d > mem for d in dists), (dists, mem)
    assert max(data["train_gaps"]) * data["segment_len"] <= mem  # trained only where recall is possible


@pytest.mark.skipif(not set(STREAMS) <= set(RECIPES), reason="pair")
def test_memorizing_pair_differs_only_in_the_memory_layer():
    """The kNN layer is the only difference, so val/loss compares memory against none."""
    mem, local = load("memorizing_lm"), load("memorizing_lm_local")
    pattern = mem["model"]["init_args"]["config"]["layer_pattern"]
    (i,) = [j for j, spec in enumerate(pattern) if spec["mixer"] == "knn_memory"]
    assert local["model"]["init_args"]["config"]["layer_pattern"] == [
        {"mixer": "attention"} if j == i else spec for j, spec in enumerate(pattern)]
    strip = lambda r: {**r, "model": {**r["model"], "init_args": {**r["model"]["init_args"], "config": {  # noqa: E731
        k: v for k, v in r["model"]["init_args"]["config"].items() if k != "layer_pattern"}}}}
    assert strip(mem) == strip(local)
    opts = pattern[i]["mixer_options"]
    assert opts["memory_size"] > mem["data"]["init_args"]["seq_len"]  # reaches beyond the segment


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_shortened(name, tmp_path, monkeypatch):
    from lm.training.recipe import build_recipe

    monkeypatch.chdir(ROOT)
    cli = build_recipe(f"recipes/long_context/{name}.yaml",
                       [*SHORT, *SHORT_DATA[kind(name)], f"--trainer.default_root_dir={tmp_path}"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    if kind(name) in ("text", "streams"):
        assert torch.isfinite(metrics["val/loss"])
        return
    for n in cli.datamodule.val_names:
        acc = metrics[f"val/acc_{n}"]
        assert torch.isfinite(acc) and 0.0 <= float(acc) <= 1.0, (n, acc)


# -- the segment-wise kNN data side ------------------------------------------------------------

def _module(**kw):
    from lm.data.segments import SegmentRecallDataModule

    args = dict(segment_len=16, num_pairs=4, num_keys=8, num_values=8, vocab_size=24, train_gaps=[1, 2],
                eval_gaps=[1, 3], batch_size=3, num_train=4, num_val=2)
    return SegmentRecallDataModule(**{**args, **kw})


def test_documents_put_facts_first_and_queries_last():
    dm = _module()
    ds = dm._documents(4, [1, 2], "train")
    for i, g in ((0, 1), (1, 2)):
        b = ds[i]
        ids, labels, ctx = b["input_ids"], b["labels"], b["context_ids"]
        assert ids.shape == labels.shape == (3, 16) and ctx.shape == (3, 16 * g)
        for r in range(3):
            facts = dict(zip(ctx[r, 0:8:2].tolist(), ctx[r, 1:8:2].tolist()))
            assert len(facts) == 4 and all(2 <= k < 10 and 10 <= v < 18 for k, v in facts.items())
            for p in range(0, 8, 2):  # each query key's label is its fact's value
                assert labels[r, p] == facts[int(ids[r, p])] == ids[r, p + 1]
            assert (labels[r, 8:] == -100).all() and (labels[r, 1:8:2] == -100).all()
            assert (ctx[r, 8:] >= 18).all() and (ids[r, 8:] >= 18).all()  # distractors only
    assert dm.val_names == ["dist16", "dist48"]
    again = dm._documents(4, [1, 2], "train")[1]
    assert torch.equal(again["context_ids"], ds[1]["context_ids"])  # reproducible from the index
    assert not torch.equal(dm._documents(4, [1, 2], "val")[1]["context_ids"], ds[1]["context_ids"])


def test_gap_zero_is_local_recall_without_context():
    dm = _module(train_gaps=[0, 1], num_pairs=4)
    assert dm.eval_gaps == [1, 3]
    b = dm._documents(2, [0, 1], "train")[0]
    ids, labels = b["input_ids"], b["labels"]
    assert b["context_ids"].shape == (3, 0) and ids.shape == (3, 16)
    for r in range(3):
        facts = dict(zip(ids[r, 0:8:2].tolist(), ids[r, 1:8:2].tolist()))
        for p in range(8, 16, 2):  # the queries follow the facts in the same segment
            assert labels[r, p] == facts[int(ids[r, p])]
        assert (labels[r, :8] == -100).all()


def test_train_loader_resumes_mid_epoch_without_repeating_or_skipping():
    dm = _module(num_train=6)
    full = list(dm.train_dataloader())
    assert len(full) == 6 and [b["context_ids"].shape[1] for b in full] == [16, 32] * 3  # gaps in turn
    first = dm.train_dataloader()
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for a, b in zip(rest, full[4:]):
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("memory_size, kept", [(32, 32), (16, 16), (64, 32)])
def test_hook_clears_the_memory_and_writes_the_earlier_segments(memory_size, kept):
    from types import SimpleNamespace

    from lm.models import DecoderConfig, DecoderLM
    from lm.models.config import LayerSpec

    cfg = DecoderConfig(vocab_size=24, dim=32, num_layers=2, num_heads=2, max_seq_len=16, layer_pattern=[
        LayerSpec(mixer="attention"),
        LayerSpec(mixer="knn_memory", mixer_options={"memory_size": memory_size, "top_k": 4, "index": "exact"})])
    model = DecoderLM(cfg)
    layer = model.blocks[1].mixer
    layer.memory.add(torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16))  # a previous document's pairs
    dm = _module()
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=model))
    batch = dm._documents(4, [2], "train")[0]
    out = dm.on_after_batch_transfer(dict(batch), 0)
    assert set(out) == {"input_ids", "labels"}
    assert len(layer.memory) == kept and bool(layer.memory.valid_BM.all())  # old pairs gone, 2 segments in
    # the newest slots are the last context segment's pre-RoPE keys, computed afresh
    seen = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(batch["context_ids"][:, -16:])
    handle.remove()
    k_BKTD = layer.k_proj(seen[0]).view(3, 16, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    torch.testing.assert_close(layer.memory.keys_BKMD[:, :, -16:], k_BKTD.detach())


@pytest.mark.parametrize("kw, key", [
    ({"num_pairs": 9}, "data.num_pairs"),
    ({"num_pairs": 3, "num_keys": 2}, "data.num_pairs"),
    ({"vocab_size": 18}, "data.vocab_size"),
    ({"train_gaps": []}, "data.train_gaps"),
    ({"eval_gaps": [1, 0]}, "data.eval_gaps[1]"),
    ({"eval_gaps": [2, 2]}, "data.eval_gaps"),
    ({"segment_len": 1}, "data.segment_len"),
    ({"train_gaps": [0, 1], "num_pairs": 5}, "data.train_gaps"),  # 4 * 5 > segment_len 16
    ({"train_gaps": [-1]}, "data.train_gaps[0]"),
    ({"batch_size": 0}, "data.batch_size"),
])
def test_segment_module_bad_options_name_the_key(kw, key):
    with pytest.raises(ValueError) as err:
        _module(**kw)
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg, msg
