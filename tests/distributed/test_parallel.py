"""``lm.parallel`` in one process: the per-block switches, the strategy names, bad input.

(The multi-process behaviour is in test_strategies.py, always in subprocesses.)
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.helpers import TINY


class _Module(torch.nn.Module):
    """What ``parallelize`` needs of a LightningModule: ``model`` and ``parallel``."""

    def __init__(self, model, **parallel):
        super().__init__()
        from lm.parallel import ParallelConfig

        self.model, self.parallel = model, ParallelConfig(**parallel)


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_parallel_config_validates():
    from lm.parallel import ParallelConfig

    assert ParallelConfig() == ParallelConfig(activation_checkpointing=False, compile=False,
                                              reshard_after_forward=True)
    with pytest.raises(ValueError, match="model.parallel.compile_mode"):
        ParallelConfig(compile_mode="fastest")
    with pytest.raises(ValueError, match="model.parallel.activation_checkpointing"):
        ParallelConfig(activation_checkpointing="yes")


def test_activation_checkpointing_is_exact_and_keeps_names(tiny_model):
    from lm.models.block import Block
    from lm.parallel import parallelize

    ref = tiny_model()
    model = copy.deepcopy(ref)
    parallelize(_Module(model, activation_checkpointing=True))
    parallelize(_Module(model, activation_checkpointing=True))  # idempotent (configure_model may run twice)
    assert all(isinstance(b, Block) and type(b).__name__ == "CheckpointedBlock" for b in model.blocks)
    assert list(model.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    (l_ref, g_ref), (l_ac, g_ac) = _loss_and_grads(ref.train(), ids), _loss_and_grads(model.train(), ids)
    assert torch.equal(l_ref, l_ac) and all(torch.equal(g_ref[n], g_ac[n]) for n in g_ref)
    twin = copy.deepcopy(model)  # a copy (e.g. for weight averaging) runs its own blocks' weights
    with torch.no_grad():
        for b in twin.blocks:
            b.mixer.o_proj.weight.zero_()
            b.ffn.down_proj.weight.zero_()
    assert not torch.allclose(twin(ids), model(ids))  # grad enabled: the checkpointed path
    with torch.no_grad():  # decoding with the KV cache takes the plain forward
        cache = model.init_cache(2)
        torch.testing.assert_close(model(ids[:, :4], cache=cache), ref(ids[:, :4]))


def test_compile_per_block_matches_eager(tiny_model, tmp_path, monkeypatch):
    from lm.parallel import parallelize

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ref = tiny_model()
    model = copy.deepcopy(ref)
    # aot_eager: dynamo capture + AOT autograd of the checkpointed block, without inductor's
    # C++ codegen (a minute on 2 loaded cores; the wiring under test is the same)
    parallelize(_Module(model, compile=True, compile_backend="aot_eager", activation_checkpointing=True))
    assert [type(b).__name__ for b in model.blocks] == ["CompiledCheckpointedBlock"] * 2
    assert list(model.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    (l_ref, g_ref), (l_c, g_c) = _loss_and_grads(ref.train(), ids), _loss_and_grads(model.train(), ids)
    torch.testing.assert_close(l_c, l_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g_c[n], g_ref[n], rtol=1e-4, atol=1e-5)


def test_mixed_precision_policy_follows_trainer_precision():
    from lm.parallel.fsdp import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("bf16-true").param_dtype == torch.bfloat16
    assert mixed_precision_policy("32-true") is None and mixed_precision_policy("16-mixed") is None


def test_strategy_names_are_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    from lm.parallel import LM_STRATEGIES, DeepSpeedStrategy, FSDP2Strategy

    assert set(LM_STRATEGIES) - {"auto"} <= set(StrategyRegistry)
    fsdp2 = StrategyRegistry.get("fsdp2")
    assert isinstance(fsdp2, FSDP2Strategy) and fsdp2._save_distributed_checkpoint
    for stage in (1, 2, 3):
        s = StrategyRegistry.get(f"deepspeed_stage_{stage}")
        assert isinstance(s, DeepSpeedStrategy) and s.config["zero_optimization"]["stage"] == stage
    assert StrategyRegistry.get("deepspeed_stage_3_offload").config["zero_optimization"]["offload_param"]


def test_check_strategy_names_the_key():
    from lm.parallel import check_strategy

    for ok in ("auto", "ddp", "fsdp2", "deepspeed_stage_2", "DDP", None):
        check_strategy(ok)
    expected = r"^trainer.strategy: unknown strategy 'fsdp3'; choose one of auto, ddp, fsdp2"
    with pytest.raises(ValueError, match=expected):
        check_strategy("fsdp3")


def test_unknown_strategy_through_lm_fit(tmp_path, capsys):
    from lm.cli import main

    rc = main(["fit", "-c", str(TINY), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
               "--trainer.strategy=fsdp3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) >= 1, err
    assert err[-1].startswith("lm: error: trainer.strategy: unknown strategy 'fsdp3'"), err[-3:]


def test_consolidate_rejects_other_folders(tmp_path):
    from lm.parallel.consolidate import checkpoint_kind, consolidate

    assert checkpoint_kind(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="neither a DCP"):
        consolidate(tmp_path)
