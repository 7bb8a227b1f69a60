"""Export a bytelm checkpoint to a self-contained Hugging Face folder, push it, and generate from it.

``export_checkpoint(ckpt, out)`` writes:

- ``config.json`` (``BytelmConfig`` with ``auto_map``) and ``generation_config.json`` (PAD/BOS/EOS ids,
  PAD and BOS suppressed);
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index above ``max_shard_size``);
- the modelling code: ``modeling_bytelm.py``, ``configuration_bytelm.py``, ``tokenization_bytelm.py`` and the
  pure-torch bytelm files they import (``flat.py``, ``layers.py``, ``words.py``, ...), copied with every
  ``from bytelm.<pkg>.<mod> import`` rewritten to ``from .<mod> import`` (:func:`write_model_code`), so the
  folder loads with ``trust_remote_code=True`` where bytelm is not installed;
- a byte tokenizer (``tokenizer.json`` for plain ``AutoTokenizer``; ``ByteTokenizer`` as remote code);
- ``README.md``: a model card with the training config and the metrics found in the checkpoint.

``generate_from_folder`` uses nothing but transformers (what a user of the exported model would run).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bytelm
from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.errors import UserError
from bytelm.hf.configuration_bytelm import BytelmConfig
from bytelm.models.config import ModelConfig
from bytelm.models.registry import get_spec

log = logging.getLogger(__name__)

PKG_ROOT = Path(bytelm.__file__).resolve().parent
HF_DIR = Path(__file__).resolve().parent
ENTRY_FILES = ("modeling_bytelm.py", "configuration_bytelm.py", "tokenization_bytelm.py")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# third-party packages the shipped code may import at module level (transformers needs all of them anyway);
# any other non-stdlib import (flash_attn, ...) is wrapped in try/except so transformers' import check allows
# it
_REQUIRED = {"torch", "numpy", "regex", "transformers", "tokenizers", "safetensors", "huggingface_hub"}
_BYTELM_IMPORT = re.compile(r"from\s+bytelm((?:\.\w+)+)\s+import")


class ExportError(UserError, RuntimeError):
    """A clear, user-facing export / upload failure (the CLI prints its message alone on one line)."""


# ---------------------------------------------------------------------------------------------- model code


def _bytelm_imports(tree: ast.AST, src: Path) -> list[Path]:
    """Files of the ``bytelm`` modules ``tree`` imports (``from bytelm.<package>.<module> import ...``
    only)."""
    deps = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bytelm" for a in node.names):
            raise ExportError(f"{src}: 'import bytelm...' cannot be shipped; use 'from bytelm.x.y import z'")
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "bytelm" or node.module.startswith("bytelm."))
        ):
            path = PKG_ROOT.joinpath(*node.module.split(".")[1:]).with_suffix(".py")
            if not path.is_file():
                raise ExportError(
                    f"{src}:{node.lineno} imports {node.module!r}, which is not a single bytelm module file; "
                    "shipped code must import from module files (bytelm.models.flat), not packages"
                )
            deps.append(path)
    return deps


def _wrap_optional_imports(text: str, tree: ast.AST) -> str:
    """Put imports of optional third-party packages (e.g. ``flash_attn``) in ``try/except ImportError:
    raise`` so transformers' remote-code import check (which skips ``try`` blocks) does not demand them.
    Behaviour is unchanged: the ImportError is re-raised where the import runs."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    stdlib = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = {node.module.split(".")[0]}
        else:
            continue
        if not tops - stdlib - _REQUIRED - {"bytelm"}:
            continue
        p = parents.get(node)
        if isinstance(p, ast.Try):
            continue
        spans.append((node.lineno, node.end_lineno or node.lineno))
    lines = text.splitlines(keepends=True)
    for start, end in sorted(spans, reverse=True):
        first = lines[start - 1]
        indent = first[: len(first) - len(first.lstrip())]
        body = ["    " + ln if ln.strip() else ln for ln in lines[start - 1 : end]]
        lines[start - 1 : end] = [
            f"{indent}try:\n",
            *body,
            f"{indent}except ImportError:\n",
            f"{indent}    raise\n",
        ]
    return "".join(lines)


def _ship_source(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    text = _wrap_optional_imports(text, tree)
    text = _BYTELM_IMPORT.sub(lambda m: f"from .{m.group(1).rsplit('.', 1)[-1]} import", text)
    rel = path.relative_to(PKG_ROOT.parent).as_posix() if path.is_relative_to(PKG_ROOT.parent) else path.name
    return f"# {rel} of bytelm, copied by bytelm-export (its bytelm imports made relative).\n" + text


def _kind_module(arch: str | None) -> Path | None:
    """The module file of a registered kind that is not built in (shipped with the folder), else None."""
    spec = get_spec(arch) if arch else None
    if spec is None or spec.builtin:
        return None
    src = inspect.getsourcefile(spec.model_class())
    if src is None:
        raise ExportError(f"model.arch={arch!r}: the source file of its model class cannot be found")
    return Path(src).resolve()


def _kind_registration(arch: str, module: Path) -> str:
    """Source that registers ``arch`` in the exported folder's copy of the registry: its class and the spec's
    plain fields (the HF side reads only those; the training hooks stay behind)."""
    spec = get_spec(arch)
    plain = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("arch", "model") and isinstance(getattr(spec, f.name), (bool, str, tuple))
    }
    args = "".join(f", {k}={v!r}" for k, v in plain.items())
    cls = spec.model_class().__name__
    return (
        f"\n\n# added by bytelm-export: this folder's model kind {arch!r} (registered outside bytelm)\n"
        f"from .{module.stem} import {cls} as _ExportedKind  # noqa: E402\n\n"
        f"register_model(ModelSpec(arch={arch!r}, model=_ExportedKind{args}), replace=True)\n"
    )


def model_code_files(arch: str | None = None) -> dict[str, Path]:
    """Every file the exported folder needs: the three entry files and all bytelm modules they import,
    transitively, keyed by the name it gets in the folder (names must not collide). A registered kind that
    is not built in (``arch``) adds its model class's module file and what that imports."""
    todo = [HF_DIR / f for f in ENTRY_FILES]
    kind = _kind_module(arch)
    if kind is not None:
        todo.append(kind)
    files: dict[str, Path] = {}
    while todo:
        path = todo.pop()
        if path.name in files:
            if files[path.name] != path:
                raise ExportError(
                    f"two shipped modules share the name {path.name}: {files[path.name]} and {path}"
                )
            continue
        files[path.name] = path
        todo.extend(_bytelm_imports(ast.parse(path.read_text(encoding="utf-8")), path))
    return files


def write_model_code(out: str | Path, arch: str | None = None) -> list[str]:
    """Write the self-contained modelling code into ``out``; returns the file names written. For a kind
    registered outside bytelm (``arch``), its module ships too and the folder's registry registers it."""
    out = Path(out)
    names = []
    kind = _kind_module(arch)
    for name, path in sorted(model_code_files(arch).items()):
        text = _ship_source(path)
        if kind is not None and arch and name == "registry.py":
            text += _kind_registration(arch, kind)
        if _BYTELM_IMPORT.search(text) or re.search(r"^\s*import\s+bytelm\b", text, re.M):
            raise ExportError(f"{path}: a bytelm import is left after rewriting")
        (out / name).write_text(text, encoding="utf-8")
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- tokenizer


def save_tokenizer(out: str | Path, model_max_length: int = 1024) -> None:
    """``tokenizer.json`` (plain ``AutoTokenizer``) + ``tokenizer_config.json`` whose ``auto_map`` names the
    Python ``ByteTokenizer`` (``trust_remote_code=True``). Same ids either way."""
    from bytelm.hf.tokenization_bytelm import build_fast_tokenizer

    out = Path(out)
    build_fast_tokenizer(model_max_length).save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=False, add_eos_token=False)
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_bytelm.ByteTokenizer", None]}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- checkpoint


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, (int, float, str, bool)):
        return v
    return None


def checkpoint_metadata(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics and progress found in a Lightning checkpoint dict: ``bytelm_metrics`` (e.g. ``val/bpb``),
    ModelCheckpoint scores, ``global_step`` and ``epoch``."""
    meta: dict[str, Any] = {}
    metrics = {}
    for k, v in (ckpt.get("bytelm_metrics") or {}).items():
        s = _scalar(v)
        if s is not None:
            metrics[str(k)] = s
    for name, state in (ckpt.get("callbacks") or {}).items():
        if not isinstance(state, Mapping) or not str(name).startswith("ModelCheckpoint"):
            continue
        monitor = state.get("monitor")
        for key in ("best_model_score", "current_score"):
            s = _scalar(state.get(key))
            if s is not None and monitor and monitor != "step":
                metrics.setdefault(f"{monitor} ({key.replace('_', ' ')})", s)
    if metrics:
        meta["metrics"] = metrics
    for key in ("global_step", "epoch"):
        if isinstance(ckpt.get(key), int):
            meta[key] = ckpt[key]
    return meta


def _read_metadata(path: Path) -> dict[str, Any]:
    """Non-tensor content of a checkpoint: a ``.ckpt`` file is read again memory-mapped (tensors are not
    loaded twice); a sharded DeepSpeed / FSDP2 folder through ``bytelm.checkpoint``'s metadata readers."""
    try:
        if path.is_dir():
            from bytelm import checkpoint as ck

            kind = ck.sharded_kind(path) if hasattr(ck, "sharded_kind") else None
            reader = getattr(
                ck, {"deepspeed": "_deepspeed_meta", "dcp": "_dcp_meta"}.get(kind or "", ""), None
            )
            ckpt = reader(path) if reader is not None else {}
        elif path.suffix == ".ckpt" or path.suffix == "":
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:  # e.g. a consolidated .safetensors: weights and config only
            ckpt = {}
    except Exception as e:  # noqa: BLE001 - metadata is optional; the model itself loaded fine
        log.warning("could not read metadata from %s (%s)", path, e)
        return {}
    if not isinstance(ckpt, Mapping):
        return {}
    meta = checkpoint_metadata(ckpt)
    if "bytelm_config" in ckpt:
        meta["bytelm_config"] = ckpt["bytelm_config"]
    return meta


# ---------------------------------------------------------------------------------------------- export


def _hf_class(arch: str) -> type:
    from bytelm.hf import modeling_bytelm

    return getattr(modeling_bytelm, get_spec(arch).hf_class)  # type: ignore[no-any-return]


def hf_config(model_cfg: ModelConfig) -> BytelmConfig:
    config = BytelmConfig.from_model_config(model_cfg)
    config.activation_checkpointing = False
    cls = _hf_class(model_cfg.arch)
    config.auto_map = {
        "AutoConfig": "configuration_bytelm.BytelmConfig",
        get_spec(model_cfg.arch).auto_class: f"modeling_bytelm.{cls.__name__}",
    }
    config.architectures = [cls.__name__]
    return config


def generation_config(model_cfg: ModelConfig) -> Any:
    """PAD/BOS/EOS ids; PAD and BOS are never generated (ids >= 259 are not even offered: ``vocab_only``)."""
    from transformers import GenerationConfig

    gen: dict[str, Any] = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "suppress_tokens": [PAD_ID, BOS_ID],
    }
    if get_spec(model_cfg.arch).seq2seq:
        gen["decoder_start_token_id"] = BOS_ID
    return GenerationConfig(**gen)


def wrap_model(model: nn.Module, model_cfg: ModelConfig, **extra: Any) -> Any:
    """A bytelm module inside its Hugging Face class (no copy of the weights), ready to ``generate``.
    ``extra`` attributes go into ``config.json`` (e.g. ``train_seq_len``)."""
    config = hf_config(model_cfg)
    for k, v in extra.items():
        setattr(config, k, v)
    with torch.device("meta"):
        hf = _hf_class(model_cfg.arch)(config)
    hf.model = model
    hf.generation_config = generation_config(model_cfg)
    return hf.eval()


def export_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    out: str | Path,
    *,
    dtype: str = "fp32",
    max_shard_size: str | int = "2GB",
    train_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    source: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model`` (a bytelm module) as a self-contained Hugging Face folder ``out``; ``repo_id`` (the Hub
    repo it will be pushed to) only goes into the model card's usage example."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of bf16, fp32 (got {dtype!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):  # a re-export must not leave stale shards behind
        old.unlink()
    extra: dict[str, Any] = {}
    data = (train_config or {}).get("data") or {}
    if isinstance(data.get("seq_len"), int):
        extra["train_seq_len"] = data["seq_len"]  # the row length the model was trained (and validated) on
    if isinstance(data.get("invalid_utf8"), str):
        extra["train_invalid_utf8"] = data["invalid_utf8"]  # bytelm.eval scores the folder as its checkpoint
    hf = wrap_model(model.to("cpu"), model_cfg, **extra).to(DTYPES[dtype])
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    hf.generation_config.save_pretrained(out)
    save_tokenizer(out, model_max_length=model_cfg.max_seq_len)
    write_model_code(out, model_cfg.arch)
    n_params = sum(p.numel() for p in model.parameters())
    card = model_card(
        model_cfg,
        n_params=n_params,
        dtype=dtype,
        train_config=train_config,
        metadata=metadata or {},
        source=source,
        repo_id=repo_id,
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    *,
    max_shard_size: str | int = "2GB",
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> Path:
    """Export a bytelm checkpoint (Lightning ``.ckpt``, or whatever ``bytelm.checkpoint.load_model`` accepts,
    e.g. DeepSpeed / FSDP2 folders once consolidation is supported there) to ``out``; optionally upload."""
    from bytelm.checkpoint import load_model
    from bytelm.config import config_to_dict

    path = Path(ckpt)
    model, cfg = load_model(path)
    meta = _read_metadata(path)
    meta.pop("bytelm_config", None)
    out_path = export_model(
        model,
        cfg.model,
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        train_config=config_to_dict(cfg),
        metadata=meta,
        source=path.name,
        repo_id=push_to_hub,
    )
    if push_to_hub:
        push_folder(out_path, push_to_hub, private=private, token=token)
    return out_path


# ---------------------------------------------------------------------------------------------- model card


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(
    model_cfg: ModelConfig,
    *,
    n_params: int,
    dtype: str,
    train_config: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    source: str | None = None,
    repo_id: str | None = None,
) -> str:
    import yaml

    arch = model_cfg.arch
    spec = get_spec(arch)
    seq2seq, auto = spec.seq2seq, spec.auto_class
    name = (train_config or {}).get("name", "bytelm model")
    where = repo_id or "path/to/this/folder"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text2text-generation' if seq2seq else 'text-generation'}",
        "tags:",
        "- bytelm",
        "- byte-level",
        f"- {arch}",
        "- custom_code",
        "---",
        "",
        f"# {name}",
        "",
        f"A bytelm model: {spec.description or arch}. {n_params / 1e6:.2f}M parameters, weights in {dtype}.",
        f"The vocabulary is raw bytes: ids 0-255 are the UTF-8 bytes, PAD={PAD_ID}, BOS={BOS_ID}, "
        f"EOS={EOS_ID} (the embedding table has {model_cfg.vocab_size} rows; ids above {EOS_ID} are never "
        "generated). No tokenizer training, no out-of-vocabulary text.",
        "",
    ]
    if source:
        lines += [f"Exported by `bytelm-export` from `{source}`.", ""]
    lines += [
        "## Usage",
        "",
        "The modelling code ships with the weights (`trust_remote_code=True`); it needs torch, numpy and "
        "transformers, not bytelm.",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f'tok = AutoTokenizer.from_pretrained("{where}", trust_remote_code=True)',
        f'model = {auto}.from_pretrained("{where}", trust_remote_code=True)',
        'ids = tok("To be, or not to be", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=100, do_sample=False)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "The tokenizer maps text to its UTF-8 bytes and back; `AutoTokenizer.from_pretrained(path)` without "
        "`trust_remote_code` loads the same vocabulary from `tokenizer.json` (transformers may first ask "
        "whether to run the model's custom code for the config; the answer does not matter for the "
        "tokenizer).",
        "",
        "Generation keeps bytelm's own KV cache"
        + spec.card_generation
        + "; greedy and seeded sampling give the same bytes as bytelm's generator.",
        "",
    ]
    for section in spec.card_sections:
        lines += [section, ""]
    metrics = dict(metadata.get("metrics") or {})
    progress = {k: metadata[k] for k in ("global_step", "epoch") if k in metadata}
    if metrics or progress:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in {**metrics, **progress}.items()]
        lines += [""]
        if any("bpb" in k for k in metrics):
            lines += ["bpb = bits per byte on held-out text (lower is better).", ""]
    else:
        lines += ["## Metrics", "", "No evaluation metrics were stored in the checkpoint.", ""]
    lines += [
        "## Model configuration",
        "",
        "```yaml",
        yaml.safe_dump(_plain(model_cfg), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    if train_config:
        lines += [
            "## Training configuration",
            "",
            "```yaml",
            yaml.safe_dump(dict(train_config), sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def _plain(cfg: ModelConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


# ---------------------------------------------------------------------------------------------- hub


def hub_token(token: str | None = None) -> str:
    """The token to push with (argument, HF_TOKEN or the saved login); ``ExportError`` when there is none or
    the Hub is switched off (HF_HUB_OFFLINE). Cheap: the CLI checks it before exporting."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ExportError("HF_HUB_OFFLINE is set: unset it to push to the Hugging Face Hub")
    token = token or get_token()
    if not token:
        raise ExportError(
            "no Hugging Face token found: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN, "
            "then push again (the exported folder is complete without it)"
        )
    return token


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face Hub; returns the repo URL. Raises ``ExportError`` with a
    clear message when there is no token or the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub_token(token))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload bytelm model")
    except HfHubHTTPError as e:
        raise ExportError(f"the Hugging Face Hub refused the upload to {repo_id!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - network errors come from several libraries (httpx, requests, OSError)
        raise ExportError(
            f"could not reach the Hugging Face Hub to push {repo_id!r} ({type(e).__name__}: {e}); check the "
            "network connection (and HF_ENDPOINT) and push again"
        ) from e
    return str(url)


# ---------------------------------------------------------------------------------------------- generation


def generate_from_folder(
    folder: str | Path,
    prompt: str | bytes,
    max_new_tokens: int = 100,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    bos: bool = False,
    device: str = "cpu",
) -> str:
    """Continue ``prompt`` with an exported model using transformers only (as any user would).

    Same settings as bytelm's generator: ``temperature=0`` is greedy, ``top_k=0`` / ``top_p=1`` are off,
    ``bos`` prepends BOS (an empty prompt always gets one), ``seed`` makes sampling repeatable (global torch
    RNG, restored afterwards). Returns the new text (invalid UTF-8 shown as U+FFFD)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)  # ByteTokenizer: no prompt
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model: Any = auto.from_pretrained(str(folder), trust_remote_code=True)
    model = model.to(device).eval()
    ids = list(prompt) if isinstance(prompt, bytes) else tok(prompt, add_special_tokens=False)["input_ids"]
    if bos or not ids:
        ids = [tok.bos_token_id, *ids]
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kw.update(temperature=temperature, top_k=top_k, top_p=top_p)
    x = torch.tensor([ids], device=device)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
    new = out[0, 1:] if config.is_encoder_decoder else out[0, len(ids) :]
    return str(tok.decode(new.tolist(), skip_special_tokens=True))


__all__ = [
    "ExportError",
    "checkpoint_metadata",
    "export_checkpoint",
    "export_model",
    "generate_from_folder",
    "generation_config",
    "hf_config",
    "hub_token",
    "model_card",
    "model_code_files",
    "push_folder",
    "save_tokenizer",
    "wrap_model",
    "write_model_code",
]
