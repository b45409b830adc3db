"""Sharded checkpoints -> one Lightning-style checkpoint dict (``state_dict`` + ``lm`` + the rest).

Two folder formats come out of the strategies (both are named like files, e.g. ``last.ckpt/``):

* **DCP** (``fsdp2``, Lightning ``ModelParallelStrategy``): ``.metadata`` + ``__<rank>_0.distcp``
  shards hold ``state_dict`` and ``optimizer_<i>``; ``meta.pt`` (a ``torch.save`` of plain types)
  holds everything else Lightning saves, including ``checkpoint["lm"]`` (config, tokenizer).
* **DeepSpeed** (``deepspeed_stage_1|2|3``): ``latest`` names the tag folder (``checkpoint/``);
  ``mp_rank_00_model_states.pt`` holds the module (full for ZeRO 1/2, placeholders for ZeRO 3)
  and Lightning's client state (``lm``, loops, callbacks); ``*_optim_states.pt`` hold the fp32
  partitions, which ``deepspeed.utils.zero_to_fp32`` merges into full fp32 weights.

With expert parallelism (``lm.parallel.moe``) the DeepSpeed folder also holds one
``layer_<l>_expert_<g>_mp_rank_00_model_states.pt`` per expert (``g`` global), written by the
rank that held it, and the model states name DeepSpeed's MoE submodules; those checkpoints are
read from the module states -- the non-expert weights from ``mp_rank_00_model_states.pt``, every
expert from its file -- and renamed to the single-device layer (``deepspeed_moe.gate.wg`` ->
``router``, ``deepspeed_moe.experts.deepspeed_experts.<g>`` -> ``experts.<g>``). The module states
hold the compute-dtype copies (bf16 under bf16 DeepSpeed), so every weight is then replaced by its
fp32 master, merged from the ZeRO-1/2 optimizer partitions (``*_optim_states.pt``: each rank's
flat fp32 partition per param group and ``param_slice_mappings`` naming the fragment of every
parameter in it; expert groups are partitioned over the expert-data-parallel ranks and name local
experts, rank ``r`` holding expert-parallel rank ``r % ep_size``'s experts, DeepSpeed's layout).
DeepSpeed's ``zero_to_fp32`` cannot merge MoE checkpoints.

Only the model weights are read (never the optimizer states of DCP), and every ``torch.load``
here is ``weights_only=True`` except of DeepSpeed's optimizer partitions (its own pickles: loss
scaler, enums), in DeepSpeed's merge and in the expert-parallel one.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch

_DCP_META = ".metadata"          # torch.distributed.checkpoint's index of the shards
_LIGHTNING_META = "meta.pt"      # lightning.fabric.utilities.load._METADATA_FILENAME
_DS_LATEST = "latest"            # DeepSpeed: file naming the tag folder
_DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """``"dcp"``, ``"deepspeed"`` or None (not a sharded checkpoint folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / _DCP_META).is_file():
        return "dcp"
    if (path / _DS_LATEST).is_file():
        return "deepspeed"
    return None


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return checkpoint_kind(path) is not None


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` as one dict with a full (unsharded, CPU) ``state_dict``, as a
    single-file Lightning checkpoint has it; the optimizer states are left out."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "dcp":
        return _from_dcp(path)
    if kind == "deepspeed":
        return _from_deepspeed(path)
    raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder without last.ckpt and neither a DCP (fsdp2) "
                            f"checkpoint (no {_DCP_META}) nor a DeepSpeed one (no {_DS_LATEST!r} file)")


def save_consolidated(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the consolidated checkpoint of ``path`` to the single file ``out`` (``torch.save``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidate(path), out)
    return out


# -- DCP ------------------------------------------------------------------------------------------

def _dcp_load_keys(path: Path, keys: set[str]) -> dict[str, Any]:
    """Reads the entries ``keys`` of a DCP checkpoint in one process, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return sd


def _from_dcp(path: Path) -> dict[str, Any]:
    meta = path / _LIGHTNING_META
    ckpt: dict[str, Any] = torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
    ckpt["state_dict"] = dict(_dcp_load_keys(path, {"state_dict"}).get("state_dict", {}))
    return ckpt


def _dcp_shapes(path: Path) -> dict[str, torch.Size]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    out = {}
    for key, item in md.state_dict_metadata.items():
        where = (md.planner_data or {}).get(key)
        if isinstance(item, TensorStorageMetadata) and where and where[0] == "state_dict":
            out[".".join(map(str, where[1:]))] = torch.Size(item.size)
    return out


# -- DeepSpeed ------------------------------------------------------------------------------------

_DS_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt$")
_DS_EXPERTS, _DS_GATE = ".deepspeed_moe.experts.deepspeed_experts.", ".deepspeed_moe.gate.wg.weight"
_DS_ENGINE_KEYS = {"module", "num_experts", "ds_autoep_layers", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
                   "mp_world_size", "ds_config", "ds_version", "checkpoint_parallel_dimensions"}


def _ds_tag_dir(path: Path) -> Path:
    tag = (path / _DS_LATEST).read_text().strip()
    tag_dir = path / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {str(path)!r}: 'latest' names {tag!r}, which does not exist")
    return tag_dir


def _ds_model_states(path: Path) -> dict[str, Any]:
    tag_dir = _ds_tag_dir(path)
    for name in _DS_MODEL_STATES:
        if (tag_dir / name).is_file():
            return torch.load(tag_dir / name, map_location="cpu", weights_only=True, mmap=True)
    raise FileNotFoundError(f"DeepSpeed checkpoint {str(path)!r}: no model states file in {str(tag_dir)!r}")


def _strip(key: str) -> str:  # Lightning < 2.1 wrapped the module in _LightningModuleWrapperBase
    return key[len("_forward_module."):] if key.startswith("_forward_module.") else key


def lm_name(key: str) -> str:
    """A parameter name of an expert-parallel model (global expert index) -> the single-device one."""
    key = _strip(key)
    if key.endswith(_DS_GATE):
        return key[: -len(_DS_GATE)] + ".router.weight"
    return key.replace(_DS_EXPERTS, ".experts.")


def _ds_expert_files(path: Path) -> list[Path]:
    return sorted(f for f in _ds_tag_dir(path).iterdir() if _DS_EXPERT_FILE.match(f.name))


def _from_deepspeed_moe(path: Path, states: dict, files: list[Path], fp32_masters: bool = True) -> dict[str, torch.Tensor]:
    sd = {lm_name(k): v.clone() for k, v in states["module"].items()}
    per_layer: dict[int, set[int]] = {}
    for f in files:
        layer, expert = map(int, _DS_EXPERT_FILE.match(f.name).groups())
        per_layer.setdefault(layer, set()).add(expert)
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            sd[lm_name(k)] = v
    if fp32_masters:
        _fp32_masters(path, sd)
    want = states.get("num_experts") or []
    for layer, n in enumerate(want):
        if per_layer.get(layer, set()) != set(range(n)):
            missing = sorted(set(range(n)) - per_layer.get(layer, set()))
            raise FileNotFoundError(f"DeepSpeed checkpoint {str(path)!r}: MoE layer {layer} lacks the files of "
                                    f"experts {missing}")
    return sd


_DS_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _fp32_masters(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Replaces the weights of ``sd`` (lm names, global experts) by the fp32 masters of the
    ZeRO-1/2 optimizer partitions of an expert-parallel DeepSpeed checkpoint, in place."""
    files = {int(m.group(1)): f for f in _ds_tag_dir(path).iterdir() if (m := _DS_OPTIM_FILE.match(f.name))}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rank, f in sorted(files.items()):
        # DeepSpeed's own pickles (loss scaler, enums): weights_only=False, as zero_to_fp32 loads them
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        groups = osd["base_optimizer_state"]["param_groups"]
        for group, flat, mapping in zip(groups, osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
            ep = int(group["name"].rsplit("_", 1)[1]) if group.get("moe") else 1
            for name, frag in mapping.items():
                key = lm_name(name)
                if ep > 1:
                    head, _, tail = key.partition(".experts.")
                    local, rest = tail.split(".", 1)
                    n_local = _num_local(sd, head, ep)
                    key = f"{head}.experts.{(rank % ep) * n_local + int(local)}.{rest}"
                pieces.setdefault(key, []).append((rank, flat.narrow(0, frag.start, frag.numel)))
    for key, parts in pieces.items():
        full = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
        if key not in sd or full.numel() != sd[key].numel():
            raise ValueError(f"DeepSpeed checkpoint {str(path)!r}: the optimizer partitions of {key!r} do not "
                             "match the model states")
        sd[key] = full.detach().view(sd[key].shape).clone()


def _num_local(sd: dict[str, torch.Tensor], layer: str, ep: int) -> int:
    """Experts per expert-parallel rank of MoE layer ``layer`` (its global experts / ep)."""
    prefix = layer + ".experts."
    count = len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})
    return count // ep


def _from_deepspeed(path: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = _ds_model_states(path)
    ckpt = {k: v for k, v in states.items() if k not in _DS_ENGINE_KEYS}
    experts = _ds_expert_files(path)
    if experts:  # expert parallel: zero_to_fp32 cannot merge these
        ckpt["state_dict"] = _from_deepspeed_moe(path, states, experts)
        return ckpt
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        full = get_fp32_state_dict_from_zero_checkpoint(str(path))  # merges the fp32 partitions of every rank
    ckpt["state_dict"] = {_strip(k): v for k, v in full.items()}
    return ckpt


def _ds_shapes(path: Path) -> dict[str, torch.Size]:
    states = _ds_model_states(path)
    out: dict[str, torch.Size] = {}
    for group in states.get("param_shapes") or []:
        out.update({_strip(k): torch.Size(s) for k, s in group.items()})
    out.update({_strip(k): torch.Size(s) for k, s in (states.get("frozen_param_shapes") or {}).items()})
    module = states.get("module") or {}
    for name in states.get("buffer_names") or []:
        if name in module:
            out[_strip(name)] = module[name].shape
    for name, source in (states.get("shared_params") or {}).items():  # tied weights
        if _strip(source) in out:
            out[_strip(name)] = out[_strip(source)]
    return out


# -- shapes, for the architecture check before a resume ------------------------------------------

def checkpoint_shapes(path: str | os.PathLike) -> dict[str, torch.Size]:
    """``{state-dict key: shape}`` of the weights in a sharded checkpoint folder, read from its
    index (DCP ``.metadata``, DeepSpeed ``param_shapes``) without loading the weights."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "dcp":
        return _dcp_shapes(path)
    if kind == "deepspeed":
        return _ds_shapes(path)
    raise FileNotFoundError(f"checkpoint {str(path)!r} is not a DCP or DeepSpeed checkpoint folder")


def model_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """``{state-dict key: full shape}`` of a (possibly sharded) model: DTensors give their global
    shape, ZeRO-3 partitioned parameters their ``ds_shape``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        p = params.get(name, t)
        out[name] = torch.Size(getattr(p, "ds_shape", None) or t.shape)
    return out
