"""Load bytelm models from checkpoints without Lightning's machinery, and find the newest valid one.

A Lightning checkpoint from bytelm carries ``bytelm_config`` (the full typed config) and a ``state_dict``
whose keys start with ``model.``. A corrupt file (truncated write, wrong format) raises
``CorruptCheckpointError`` naming the file, so callers can report it and fall back to an older one.

Three kinds of checkpoint load here (``load_model``):
- a single file ``*.ckpt`` (single device, DDP);
- a sharded folder ``*.ckpt/``: DeepSpeed ZeRO (``latest`` + ``checkpoint/*.pt``) or FSDP2 distributed
  checkpoint (``.metadata`` + ``*.distcp`` + ``meta.pt``), consolidated on the fly to one fp32 state dict;
- a consolidated ``*.safetensors`` (``bytelm-consolidate``), with the config in its metadata and in the JSON
  file beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bytelm.config import Config, config_from_dict
from bytelm.errors import UserError
from bytelm.models import build_model

log = logging.getLogger(__name__)


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or is not a bytelm checkpoint; the message names the path."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a sharded (DeepSpeed/FSDP2) checkpoint folder: use load_model or "
            "consolidated_state_dict, or bytelm-consolidate"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no state_dict: not a bytelm checkpoint")
    return ckpt


def config_of(ckpt: dict[str, Any], where: str = "checkpoint") -> Config:
    """The checkpoint's ``Config``; ``CorruptCheckpointError`` (its message starts with ``where``) when it has
    none or this version of bytelm cannot read it."""
    raw = ckpt.get("bytelm_config") or ckpt.get("hyper_parameters", {}).get("cfg")
    if raw is None:
        raise CorruptCheckpointError(f"{where} has no bytelm_config: was it written by bytelm?")
    return _config(raw, where)


def _config(raw: Any, where: str) -> Config:
    """The stored config as a ``Config``; one that this version of bytelm cannot read is a corrupt
    checkpoint (``where`` names it in the message)."""
    try:
        return config_from_dict(raw)
    except Exception as e:  # OmegaConf key/type errors, validation ValueErrors
        msg = " ".join(str(e).split())
        raise CorruptCheckpointError(
            f"{where}: its bytelm config cannot be read ({type(e).__name__}: {msg})"
        ) from e


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = ckpt["state_dict"]
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Model (eval mode) and config from a bytelm checkpoint: a Lightning ``.ckpt`` file, a sharded
    DeepSpeed / FSDP2 checkpoint folder (consolidated on the fly) or a consolidated ``.safetensors``."""
    path = Path(path)
    sd, cfg = consolidated_state_dict(path)
    model = build_model(cfg.model, init=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not cfg.model.tie_embeddings]
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} does not match its model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), cfg


def _step_of(p: Path) -> int:
    m = re.search(r"step(\d+)", p.name)
    return int(m.group(1)) if m else -1


def latest_valid_checkpoint(folder: str | Path) -> Path | None:
    """Newest checkpoint (file or sharded folder) in ``folder`` that is complete; corrupt ones are reported
    and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    cands = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, _step_of(p)), reverse=True)
    for p in cands:
        try:
            validate_checkpoint(p)
            return p
        except CorruptCheckpointError as e:
            log.warning("skipping corrupt checkpoint: %s", e)
    return None


# ------------------------------------------------------------------------------------------- sharded folders


def sharded_kind(path: Path) -> str | None:
    """'deepspeed', 'dcp' (torch distributed checkpoint, FSDP2) or None for a folder of neither kind."""
    if (path / "latest").is_file() or any(path.glob("*/*model_states.pt")):
        return "deepspeed"
    if (path / ".metadata").is_file():
        return "dcp"
    return None


def _torch_load(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise CorruptCheckpointError(
            f"checkpoint file {str(p)!r} cannot be read ({type(e).__name__}: {e})"
        ) from e


def _deepspeed_tag_dir(path: Path) -> Path:
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    d = path / tag
    if not d.is_dir():
        raise CorruptCheckpointError(f"DeepSpeed checkpoint {str(path)!r} has no folder {tag!r}")
    return d


def _deepspeed_meta(path: Path) -> dict[str, Any]:
    d = _deepspeed_tag_dir(path)
    files = sorted(d.glob("*model_states.pt"))
    if not files:
        raise CorruptCheckpointError(f"DeepSpeed checkpoint {str(path)!r} has no model states")
    meta = _torch_load(files[0])
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"DeepSpeed checkpoint {str(path)!r}: model states are not a dict")
    return meta


def _dcp_meta(path: Path) -> dict[str, Any]:
    meta = _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"distributed checkpoint {str(path)!r} has no readable meta.pt")
    return meta


def validate_checkpoint(path: str | Path) -> None:
    """Raise ``CorruptCheckpointError`` unless ``path`` is a complete bytelm checkpoint (file or folder).
    Folders: every shard present and readable (DeepSpeed: one optimizer shard per data-parallel rank; DCP:
    every byte range the metadata names exists)."""
    path = Path(path)
    if not path.exists():
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        read_checkpoint(path)
        return
    kind = sharded_kind(path)
    if kind == "deepspeed":
        meta = _deepspeed_meta(path)
        d = _deepspeed_tag_dir(path)
        world = int(meta.get("dp_world_size", 1))
        optim = sorted(d.glob("*optim_states.pt"))
        if len(optim) < world:
            raise CorruptCheckpointError(
                f"DeepSpeed checkpoint {str(path)!r} has {len(optim)} optimizer shards for {world} ranks"
            )
        for f in [*d.glob("*model_states.pt"), *optim]:
            _torch_load(f)
    elif kind == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        _dcp_meta(path)
        try:
            md = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise CorruptCheckpointError(f"distributed checkpoint {str(path)!r}: bad .metadata ({e})") from e
        need: dict[str, int] = {}
        for info in md.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for rel, size in need.items():
            f = path / rel
            if not f.is_file() or f.stat().st_size < size:
                raise CorruptCheckpointError(
                    f"distributed checkpoint {str(path)!r}: shard {rel} missing or short"
                )
    else:
        raise CorruptCheckpointError(
            f"{str(path)!r} is a folder but not a DeepSpeed or distributed checkpoint"
        )


def _strip_model_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def _fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _consolidate_deepspeed(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = _deepspeed_meta(path)
    cfg = config_of(meta, f"DeepSpeed checkpoint {str(path)!r}")
    tag = _deepspeed_tag_dir(path).name
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    return _strip_model_prefix(dict(sd)), cfg


def _consolidate_dcp(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    cfg = config_of(_dcp_meta(path), f"distributed checkpoint {str(path)!r}")
    full: dict[str, Any] = {}
    _load_state_dict(  # single process, no process group: reads every shard of the model weights
        full,
        storage_reader=FileSystemReader(str(path)),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    return _strip_model_prefix(dict(full["state_dict"])), cfg


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors' own error type for a truncated or foreign file
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})"
        ) from e
    raw = meta.get("bytelm_config")
    side = path.with_suffix(".json")
    if raw is None and side.is_file():
        raw = side.read_text()
    if raw is None:
        raise CorruptCheckpointError(f"{str(path)!r} has no bytelm config (metadata or {side.name})")
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{str(path)!r}: its bytelm config is not valid JSON ({e})") from e
    return sd, _config(conf, f"checkpoint {str(path)!r}")


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """fp32 model state dict (keys without ``model.``) and config from any kind of bytelm checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        validate_checkpoint(path)
        kind = sharded_kind(path)
        sd, cfg = _consolidate_deepspeed(path) if kind == "deepspeed" else _consolidate_dcp(path)
        return _fp32(sd), cfg
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    ckpt = read_checkpoint(path)
    return model_state_dict(ckpt), config_of(ckpt, f"checkpoint {str(path)!r}")


def consolidate(ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write one fp32 safetensors state dict (config in its metadata) and the config JSON beside it."""
    from safetensors.torch import save_file

    from bytelm.config import config_to_dict

    sd, cfg = consolidated_state_dict(ckpt)
    if cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as embed.weight; load_model re-ties it
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(_fp32(sd), str(tmp), metadata={"bytelm_config": cfg_json, "format": "pt"})
    os.replace(tmp, out)
    side = out.with_suffix(".json")
    side.write_text(cfg_json + "\n")
    return out, side
