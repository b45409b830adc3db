"""Sequence parallelism (lm.parallel.sequence / ring) in one process: config and bad-input errors,
the token split, the class swaps (plain behaviour without a plan, names unchanged), the data shard.

The 2-process parity and training runs are in tests/distributed/test_sequence_parallel.py (this
file has another basename: pytest cannot collect two test modules of one name without packages).
"""
from __future__ import annotations

import copy

import pytest
import torch

import lm.mixers.attention_variants  # noqa: F401  (registers attention_abs / attention_nope)
from lm.parallel.sequence import (
    SequenceParallelPlan,
    _swap_strategy_class,
    apply_sequence_parallel,
    check_sequence_parallel,
    supports_sequence_parallel,
)

KEY = "model.parallel.sequence_parallel_size"


def test_config_keys_validate():
    from lm.parallel import ParallelConfig

    cfg = ParallelConfig()
    assert (cfg.sequence_parallel_size, cfg.sequence_parallel_mode) == (1, "ulysses")
    assert ParallelConfig(sequence_parallel_size=4, sequence_parallel_mode="ring").sequence_parallel_size == 4
    for bad in (0, -2, True, "2", 1.5):
        with pytest.raises(ValueError, match=rf"^{KEY}: must be an integer >= 1, got"):
            ParallelConfig(sequence_parallel_size=bad)
    with pytest.raises(ValueError, match=r"^model.parallel.sequence_parallel_mode: 'zigzag' is not one of ulysses, ring"):
        ParallelConfig(sequence_parallel_mode="zigzag")


@pytest.mark.parametrize("mixer", ["attention", "sliding_window", "attention_nope", "attention_abs"])
def test_softmax_attention_mixers_can_run_sequence_parallel(tiny_model, mixer):
    model = tiny_model(mixer=mixer)
    assert all(supports_sequence_parallel(b.mixer) for b in model.blocks)
    check_sequence_parallel(model, 2, 4, seq_len=32)  # no error


@pytest.mark.parametrize("mixer", ["mamba", "rwkv", "hyena", "knn_memory", "longformer", "performer"])
def test_other_mixers_are_refused_naming_the_layer(tiny_model, mixer):
    """Recurrent mixers, and attention variants with their own forward or kernel (memory, block-sparse
    per-head layouts, linear attention) cannot be split by heads over the full sequence as they are."""
    model = tiny_model(layer_pattern=[{"mixer": "attention"}, {"mixer": mixer}])
    with pytest.raises(ValueError, match=rf"^model.config.layer\[1\].mixer: '{mixer}' cannot run sequence-parallel "
                                         rf"\({KEY}=2\)"):
        check_sequence_parallel(model, 2, 2)


def test_sizes_that_do_not_divide_fail_naming_the_key(tiny_model):
    model = tiny_model(num_heads=4, num_kv_heads=2)  # dim 32, 4 heads of 8
    with pytest.raises(ValueError, match=rf"^{KEY}: 3 does not divide the world size 4 \(trainer.devices x "):
        check_sequence_parallel(model, 3, 4)
    with pytest.raises(ValueError, match=rf"^model.config.num_kv_heads: 2 is not divisible by {KEY}=4"):
        check_sequence_parallel(model, 4, 4)
    with pytest.raises(ValueError, match=rf"^model.config.num_heads: 4 is not divisible by {KEY}=8"):
        check_sequence_parallel(tiny_model(num_heads=4), 8, 8)
    with pytest.raises(ValueError, match=rf"^model.config.num_kv_heads: 1 is not divisible by {KEY}=2"):
        check_sequence_parallel(tiny_model(num_kv_heads=1), 2, 2)  # MQA: one kv head cannot be split
    with pytest.raises(ValueError, match=rf"^data.seq_len: 30 is not divisible by {KEY}=4"):
        check_sequence_parallel(tiny_model(), 4, 4, seq_len=30)
    check_sequence_parallel(model, 4, 8, seq_len=32, mode="ring")  # ring splits only the sequence


def test_ring_mode_is_refused_off_cuda():
    from lm.parallel.ring import check_ring_device

    with pytest.raises(ValueError, match=r"^model.parallel.sequence_parallel_mode: ring runs on CUDA GPUs only .*"
                                         r"use ulysses on cpu"):
        check_ring_device("cpu")


def test_ring_mode_needs_plain_causal_attention_on_cuda(tiny_model):
    from lm.parallel.ring import ring_attend

    model = tiny_model(mixer="sliding_window", mixer_options={"window": 8})
    check_sequence_parallel(model, 2, 2, seq_len=8, mode="ring")  # window covers the sequence: plain causal
    with pytest.raises(ValueError, match=r"^model.config.layer\[0\].mixer: masks more than causal attention at "
                                         r"data.seq_len=16 .*sequence_parallel_mode=ring cannot run: use ulysses"):
        check_sequence_parallel(model, 2, 2, seq_len=16, mode="ring")
    plan = SequenceParallelPlan(2, 0, group=None, mode="ring")
    q, kv = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)  # 8 local tokens: 16 in all
    with pytest.raises(ValueError, match=r"ring attention runs plain causal attention only"):
        ring_attend(model.blocks[0].mixer, plan, q, kv, kv)
    with pytest.raises(ValueError, match=r"ring runs on CUDA GPUs only, got cpu tensors"):
        ring_attend(tiny_model().blocks[0].mixer, plan, q, kv, kv)


def test_deepspeed_is_refused(tiny_cfg):
    from lm.parallel import DeepSpeedStrategy, ParallelConfig
    from lm.parallel.sequence import sequence_parallel
    from lm.training.module import LanguageModel

    module = LanguageModel(config=tiny_cfg(), parallel={"sequence_parallel_size": 2})
    strategy = DeepSpeedStrategy(stage=2, parallel_devices=[torch.device("cpu")] * 2)
    with pytest.raises(ValueError, match=rf"^{KEY}: 2 needs trainer.strategy=ddp or fsdp2 .*got DeepSpeedStrategy"):
        sequence_parallel(module, ParallelConfig(sequence_parallel_size=2), strategy)


def test_parallelize_without_a_distributed_trainer_fails(tiny_cfg):
    from lm.parallel import parallelize
    from lm.training.module import LanguageModel

    module = LanguageModel(config=tiny_cfg(), parallel={"sequence_parallel_size": 2})
    with pytest.raises(ValueError, match=rf"^{KEY}: 2 needs trainer.strategy=ddp or fsdp2 over 2\+ processes "
                                         r"\(got no trainer"):
        parallelize(module)


def test_each_rank_keeps_its_contiguous_tokens():
    x = torch.arange(24).view(2, 12)
    parts = [SequenceParallelPlan(3, r, group=None).local(x) for r in range(3)]
    assert torch.equal(torch.cat(parts, dim=1), x)
    assert torch.equal(parts[1], x[:, 4:8])
    with pytest.raises(ValueError, match=rf"^data.seq_len: 13 is not divisible by {KEY}=3"):
        SequenceParallelPlan(3, 0, group=None).local(torch.zeros(1, 13))


def test_swapped_model_is_the_plain_model_without_a_plan(tiny_cfg):
    """The swaps add no module or parameter, and without ``sequence_parallel=plan`` in the forward
    (generation, exports, callbacks calling the model) the mixers are the single-device ones."""
    from lm.training.module import LanguageModel

    ref = LanguageModel(config=tiny_cfg(num_kv_heads=2, mixer="sliding_window", mixer_options={"window": 5}))
    module = copy.deepcopy(ref)
    plan = SequenceParallelPlan(2, 1, group=object())
    apply_sequence_parallel(module, plan)
    apply_sequence_parallel(module, plan)  # idempotent
    assert type(module).__name__ == "SequenceParallelLossLanguageModel"
    assert [type(b.mixer).__name__ for b in module.model.blocks] == ["SequenceParallelAttentionSlidingWindowAttention"] * 2
    assert list(module.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module.model(ids), ref.model(ids), rtol=0, atol=0)
    with torch.no_grad():  # KV-cache decoding, even with a plan in the context, is the plain path
        cache = module.model.init_cache(2)
        torch.testing.assert_close(module.model(ids[:, :7], cache=cache, sequence_parallel=plan),
                                   ref.model(ids[:, :7]), rtol=0, atol=1e-6)
    twin = copy.deepcopy(module)  # process groups are shared, never copied
    assert twin._lm_sequence_parallel is plan


def test_strategy_reports_the_data_parallel_shard():
    """Ranks of one SP group share a data shard: rank 3 of 4 with p=2 is shard 1 of 2, for the data
    modules (``_rank_world``) and Lightning's evaluation samplers alike."""
    from lightning.pytorch.strategies import DDPStrategy

    from lm.data.text import TextDataModule

    class _Placed(DDPStrategy):  # a DDP strategy at global rank 3 of 4
        @property
        def distributed_sampler_kwargs(self):
            return {"num_replicas": 4, "rank": 3}

    strategy = _Placed()
    _swap_strategy_class(strategy, 2)
    _swap_strategy_class(strategy, 2)  # idempotent
    assert isinstance(strategy, DDPStrategy) and type(strategy).__name__ == "SequenceParallel_Placed"
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 1}

    class _Trainer:
        global_rank, world_size = 3, 4

    _Trainer.strategy = strategy
    dm = TextDataModule(seq_len=16, batch_size=2)
    dm.trainer = _Trainer()
    assert dm._rank_world() == (1, 2)
    _Trainer.strategy = _Placed()
    assert dm._rank_world() == (3, 4)
