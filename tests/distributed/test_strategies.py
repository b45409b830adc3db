"""DDP, FSDP2 and ZeRO on 2 gloo processes: equivalence to one process, exact resume, export.

Equivalence. lm's ``ResumableSampler`` truncates the epoch's permutation to a multiple of
``world * b`` and gives rank r the positions ``r, r + world, ...``; so at step k rank r's batch is
the permutation's positions ``k*world*b + r + world*j`` (j < b), and the union over ranks is
exactly the positions ``k*world*b ... (k+1)*world*b - 1`` -- the batch of one process with batch
``world*b`` (test_same_samples_as_single_process checks this on the recorded batches; only the
order inside the batch differs). Every sample has the same number of labelled tokens (packed
text, no -100), so the mean over ranks of the per-rank mean loss is the single process's loss,
and the averaged gradients are its gradient. What differs is float summation order (batch of 8
vs 2 x 4 then an all-reduce/reduce-scatter), so trajectories agree to ~1e-6 and are compared with
``atol=LOSS_ATOL`` on the loss and ``WEIGHT_ATOL`` on the weights after all steps (AdamW
normalises the update, so tiny gradient differences move weights by up to ~lr * 1e-3).

Resume. Each strategy's run is resumed from its kept checkpoint at step ``CUT`` (a DCP folder
for fsdp2, a DeepSpeed folder for ZeRO) and must then log the same rank-0 losses as the
uninterrupted run (atol 1e-6), as tests/cli/test_resume.py requires of one process. The fsdp2
resume turns activation checkpointing on, which recomputes exactly and leaves the checkpoint
format unchanged.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import csv_losses, fit_many, lm_fit, recorded, write_recipe

B, STEPS, CUT = 4, 8, 4
LOSS_ATOL = 1e-5  # seen: 4.8e-7 for every strategy
WEIGHT_ATOL = 1e-5  # seen: 4.8e-7
STRATEGIES = ["ddp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3"]
OTHER_ARCH = ["--model.config.num_layers=3", "--model.config.dim=64"]

pytestmark = pytest.mark.slow


def _ckpt(root, step=None):
    return root / "checkpoints" / ("last.ckpt" if step is None else f"epoch=0-step={step}.ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process reference run (batch 2B) and, in one torchrun launch, for every strategy an
    uninterrupted run (batch B per rank) and a resume from its step-CUT checkpoint; plus an fsdp2
    bf16-mixed run."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(tmp / "recipe.yaml", STEPS, CUT)
    lm_fit(["-c", recipe, f"--data.batch_size={2 * B}", f"--trainer.default_root_dir={tmp / 'single'}"], tmp)
    jobs = []

    def base(s):
        return ["-c", recipe, "--trainer.devices=2", f"--trainer.strategy={s}", f"--data.batch_size={B}"]

    for s in STRATEGIES:
        jobs.append({"args": base(s) + [f"--trainer.default_root_dir={tmp / s / 'full'}"], "rc": 0})
        extra = ["--model.parallel.activation_checkpointing=true"] if s == "fsdp2" else []
        jobs.append({"args": base(s) + extra + [f"--trainer.default_root_dir={tmp / s / 'resume'}",
                                                f"--ckpt_path={_ckpt(tmp / s / 'full', CUT)}"], "rc": 0})
    jobs.append({"args": base("fsdp2") + ["--trainer.precision=bf16-mixed", "--trainer.max_steps=3",
                                          f"--trainer.default_root_dir={tmp / 'fsdp2_bf16'}"], "rc": 0})
    for s in ("fsdp2", "deepspeed_stage_3"):  # resuming a checkpoint of another architecture: exit status 2
        jobs.append({"args": base(s) + OTHER_ARCH + [f"--trainer.default_root_dir={tmp / s / 'other'}",
                                                     f"--ckpt_path={_ckpt(tmp / s / 'full')}"],
                     "rc": 2, "log": tmp / s / "other.stderr"})
    fit_many(jobs, tmp)
    return tmp


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_samples_as_single_process(runs, strategy):
    single, multi = recorded(runs / "single")[0], recorded(runs / strategy / "full")
    assert sorted(multi) == [0, 1] and sorted(single) == list(range(STEPS))
    for step in range(STEPS):
        union = multi[0][step]["rows"] + multi[1][step]["rows"]
        assert len(union) == 2 * B and sorted(union) == sorted(single[step]["rows"]), f"step {step}"
        assert multi[0][step]["rows"] != multi[1][step]["rows"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_trajectory_matches_single_process(runs, strategy):
    single, multi = recorded(runs / "single")[0], recorded(runs / strategy / "full")
    mean = torch.tensor([(multi[0][s]["loss"] + multi[1][s]["loss"]) / 2 for s in range(STEPS)])
    ref = torch.tensor([single[s]["loss"] for s in range(STEPS)])
    torch.testing.assert_close(mean, ref, rtol=0, atol=LOSS_ATOL)
    assert ref[-1] < ref[0] - 0.1  # it trained


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_final_weights_match_single_process(runs, strategy):
    from lm import load_model

    ref = load_model(_ckpt(runs / "single")).state_dict()
    got = load_model(_ckpt(runs / strategy / "full")).state_dict()  # consolidated DCP / ZeRO shards
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_is_exact(runs, strategy):
    full, resumed = csv_losses(runs / strategy / "full"), csv_losses(runs / strategy / "resume")
    assert sorted(full) == list(range(STEPS))
    assert sorted(resumed) == list(range(CUT, STEPS)), "the resumed run continues at the checkpoint's step"
    later = list(range(CUT, STEPS))
    torch.testing.assert_close(torch.tensor([resumed[s] for s in later]), torch.tensor([full[s] for s in later]),
                               rtol=0, atol=1e-6)
    from lm.checkpoint import read_checkpoint

    assert read_checkpoint(_ckpt(runs / strategy / "resume"))["global_step"] == STEPS


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_and_load_model(runs, strategy, tmp_path):
    from safetensors.torch import load_file

    from lm import load_model
    from lm.checkpoint import read_checkpoint
    from lm.cli import main

    ckpt = _ckpt(runs / strategy / "full")
    assert ckpt.is_dir() == (strategy != "ddp")  # DCP / DeepSpeed folders
    meta = read_checkpoint(ckpt)
    assert meta["lm"]["config"]["dim"] == 32 and meta["lm"]["tokenizer"], "the lm entry survives the save"
    model = load_model(ckpt)
    assert model.tokenizer_json == meta["lm"]["tokenizer"]
    ref = load_model(_ckpt(runs / "ddp" / "full"))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=1e-3)  # every strategy trained the same model

    assert main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    torch.testing.assert_close(tensors["model.embed_tokens.weight"], model.embed.weight, rtol=0, atol=0)
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    run_folder = load_model(runs / strategy / "full")  # a run folder finds checkpoints/last.ckpt(/)
    torch.testing.assert_close(run_folder.embed.weight, model.embed.weight, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_stage_3"])
def test_resume_from_other_architecture_fails_clearly(runs, strategy):
    """Checked from the checkpoint's index before loading, on every rank: one line, exit status 2."""
    for rank in (0, 1):
        err = (runs / strategy / f"other.stderr.rank{rank}").read_text().strip().splitlines()
        line = err[-1]
        assert line.startswith("lm: error: checkpoint does not match the model architecture"), err[-3:]
        assert "missing: model.blocks.2" in line and "shape mismatch: model." in line


def test_fsdp2_bf16_mixed(runs):
    """bf16 compute (FSDP2 policy: bf16 params, fp32 reduce) trains and keeps fp32 weights."""
    from lm.checkpoint import read_checkpoint

    losses, ref = csv_losses(runs / "fsdp2_bf16"), csv_losses(runs / "fsdp2" / "full")
    assert sorted(losses) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(list(losses.values())), torch.tensor([ref[s] for s in losses]),
                               rtol=0, atol=5e-2)  # bf16 rounding, not a different model
    sd = read_checkpoint(_ckpt(runs / "fsdp2_bf16"))["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_zero1_through_lightnings_launcher(runs, tmp_path):
    """``lm fit --trainer.devices=2`` as a user runs it (Lightning starts rank 1 itself), with
    DeepSpeed ZeRO-1 on the CPU accelerator; its losses match the DDP run's."""
    from lm import load_model

    root = tmp_path / "zero1"
    lm_fit(["-c", runs / "recipe.yaml", "--trainer.devices=2", "--trainer.strategy=deepspeed_stage_1",
            f"--data.batch_size={B}", "--trainer.max_steps=3", f"--trainer.default_root_dir={root}"], tmp_path)
    losses, ref = csv_losses(root), csv_losses(runs / "ddp" / "full")
    assert sorted(losses) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(list(losses.values())), torch.tensor([ref[s] for s in losses]),
                               rtol=0, atol=LOSS_ATOL)
    assert load_model(_ckpt(root)).embed.weight.shape == (320, 32)
