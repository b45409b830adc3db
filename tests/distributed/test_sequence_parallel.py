"""Sequence parallelism (DeepSpeed-Ulysses; ring attention on GPU) on 2 processes against one process.

Parity (scripts/sp_parity.py, one torchrun launch; and one of 4 processes, 2 SP groups of 2,
data parallel): the SP model's gathered logits, its loss and
its DDP-averaged gradients equal the single-process model's, for MHA, GQA, a sliding window that
crosses the shard boundary, absolute/no position encodings and activation checkpointing, with
labels masked so the two ranks hold different numbers of scored tokens. Seen on gloo: logits and
losses bit-equal, gradients within 3e-8 (float summation order of the all-reduce); tolerances
``ATOL`` (1e-6) on everything. A negative control (the shards through the plain attention) must
*not* match, so the comparison can fail.

Training (the real ``lm fit`` CLI): with ``sequence_parallel_size=2`` on 2 ranks (ddp, and fsdp2)
the data-parallel size is 1, so both ranks must read exactly the single process's batch each step
(recorded rows), log its loss trajectory and validation loss (atol ``LOSS_ATOL`` as in
test_strategies.py: ~1e-6 summation-order differences, grown by AdamW over the steps) and end on
its weights (``WEIGHT_ATOL``). Bad sizes fail in ``configure_model`` with one line naming the key.
"""
from __future__ import annotations

import csv
import sys

import pytest
import torch

from tests.distributed.helpers import ROOT, fit_many, lm_fit, recorded, run, write_recipe

SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "sp_parity.py"
CASES = ["mha", "gqa", "sliding", "abs_nope", "checkpointed"]
ATOL = 1e-6  # seen: 0 (logits, losses), 3e-8 (gradients)
B, STEPS = 4, 6
LOSS_ATOL = 1e-5  # seen: see the module docstring
WEIGHT_ATOL = 1e-5
SP = ["--model.parallel.sequence_parallel_size=2", "--trainer.devices=2"]

pytestmark = pytest.mark.slow


def _parity(tmp, *extra, nproc: int = 2) -> dict[int, dict]:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT, tmp,
         *extra], tmp)
    return {r: torch.load(tmp / f"rank{r}.pt") for r in range(nproc)}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    return _parity(tmp_path_factory.mktemp("sp_parity"), "--size", "2")


def _check_parity(out: dict[int, dict], cases, atol: float, rtol: float = 0.0) -> None:
    for rank, per_case in out.items():
        for case in cases:
            got = per_case[case]
            where = f"rank {rank}, {case}"
            torch.testing.assert_close(got["loss"][0], got["loss"][1], rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(got["logits"][0], got["logits"][1], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{where} logits: {m}")
            torch.testing.assert_close(got["eval"][0], got["eval"][1], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{where} eval loss/acc: {m}")
            assert got["grads"], where
            for name, (g_sp, g_ref) in got["grads"].items():
                assert g_ref.abs().max() > 0, f"{where}: {name} has no gradient"
                torch.testing.assert_close(g_sp, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"{where} grad {name}: {m}")
            # the comparison can fail: plain attention on each shard is another function
            assert not torch.allclose(got["plain_logits"], got["logits"][1], atol=1e-3), where


def test_forward_and_gradients_match_single_process(parity):
    _check_parity(parity, CASES, ATOL)


def test_ranks_of_a_group_agree_on_the_loss(parity):
    for case in CASES:
        assert torch.equal(parity[0][case]["loss"][0], parity[1][case]["loss"][0]), case


def test_data_parallel_across_sequence_parallel_groups(tmp_path):
    """4 processes: 2 SP groups of 2 ranks, data parallel. Each group reads its own batch; the
    world-averaged gradient is the mean of the two groups' single-process gradients."""
    out = _parity(tmp_path, "--size", "2", "--cases", "gqa,sliding", nproc=4)
    _check_parity(out, ["gqa", "sliding"], ATOL)
    assert not torch.equal(out[0]["gqa"]["loss"][1], out[2]["gqa"]["loss"][1])  # two different batches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="ring attention (PyTorch context parallel) runs on 2+ CUDA GPUs only: no CPU kernel")
def test_ring_attention_matches_single_process(tmp_path):
    out = _parity(tmp_path, "--size", "2", "--mode", "ring", "--backend", "nccl")
    # fp32 on GPU: the ring merges partial softmaxes by log-sum-exp and the kernels reorder sums
    _check_parity(out, ["mha", "gqa", "checkpointed"], atol=2e-5, rtol=1e-4)


# -- training through lm fit ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """A single-process run (batch B) and, in one torchrun launch, SP runs under ddp and fsdp2
    (batch B on each rank: one data-parallel group), then the runs that must fail."""
    tmp = tmp_path_factory.mktemp("sp_fit")
    recipe = write_recipe(tmp / "recipe.yaml", STEPS, STEPS)
    val = ["--trainer.limit_val_batches=2", "--trainer.val_check_interval=3"]
    lm_fit(["-c", recipe, f"--data.batch_size={B}", *val, f"--trainer.default_root_dir={tmp / 'single'}"], tmp)
    jobs = [{"args": ["-c", recipe, *SP, f"--trainer.strategy={s}", f"--data.batch_size={B}", *val,
                      f"--trainer.default_root_dir={tmp / s}"], "rc": 0} for s in ("ddp", "fsdp2")]
    bad = {"world": ["--model.parallel.sequence_parallel_size=3"],
           "kv_heads": ["--model.parallel.sequence_parallel_size=2", "--model.config.num_kv_heads=1"]}
    for name, args in bad.items():
        jobs.append({"args": ["-c", recipe, "--trainer.devices=2", "--trainer.strategy=ddp", *args,
                              f"--trainer.default_root_dir={tmp / name}"], "rc": 2, "log": tmp / f"{name}.stderr"})
    fit_many(jobs, tmp)
    return tmp


def _val_losses(root) -> dict[int, float]:
    out = {}
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        for r in csv.DictReader(f.open()):
            if r.get("val/loss"):
                out[int(r["step"])] = float(r["val/loss"])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_training_matches_single_process(fits, strategy):
    single, multi = recorded(fits / "single")[0], recorded(fits / strategy)
    assert sorted(multi) == [0, 1] and sorted(single) == list(range(STEPS))
    for step in range(STEPS):  # the whole group reads the single process's batch
        assert multi[0][step]["rows"] == multi[1][step]["rows"] == single[step]["rows"], f"step {step}"
    ref = torch.tensor([single[s]["loss"] for s in range(STEPS)])
    for rank in (0, 1):
        got = torch.tensor([multi[rank][s]["loss"] for s in range(STEPS)])
        torch.testing.assert_close(got, ref, rtol=0, atol=LOSS_ATOL, msg=lambda m: f"rank {rank}: {m}")
    assert ref[-1] < ref[0] - 0.1  # it trained
    val, val_ref = _val_losses(fits / strategy), _val_losses(fits / "single")
    assert sorted(val) == sorted(val_ref) == [2, 5]
    torch.testing.assert_close(torch.tensor(list(val.values())), torch.tensor(list(val_ref.values())),
                               rtol=0, atol=LOSS_ATOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_final_weights_match_single_process(fits, strategy):
    from lm import load_model

    ref = load_model(fits / "single").state_dict()
    got = load_model(fits / strategy).state_dict()  # the plain model's names: no wrapper modules
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name, expected", [
    ("world", "lm: error: model.parallel.sequence_parallel_size: 3 does not divide the world size 2"),
    ("kv_heads", "lm: error: model.config.num_kv_heads: 1 is not divisible by "
                 "model.parallel.sequence_parallel_size=2"),
])
def test_bad_sizes_fail_with_one_line(fits, name, expected):
    for rank in (0, 1):
        err = (fits / f"{name}.stderr.rank{rank}").read_text().strip().splitlines()
        assert err and err[-1].startswith(expected), err[-3:]
