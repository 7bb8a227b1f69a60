"""Log-likelihoods of byte strings for every model bytelm evaluates, behind one small interface.

A *scorer* answers two questions:

- ``corpus_nll(texts)``: total negative log-likelihood (nats) of the texts' bytes, the number of bytes scored,
  the forward time, and the model's own metrics averaged over bytes (bytes per word, kept ratio): bits per
  byte is ``nll / (n_bytes * ln 2)``;
- ``continuation_logprobs(context, continuations)``: ``log p(continuation | context)`` (nats, summed over the
  continuation) for each candidate, for ranking answers.

``ByteScorer`` wraps a bytelm model (flat, hierarchical, MrT5) or an exported Hugging Face byte model; its
corpus evaluation packs the texts exactly as training validation does (``BOS doc EOS ...`` in tiles of
``seq_len`` ids, EOS not counted as a byte). MrT5 is a prefix-LM: in each tile only the continuation part is
scored (see ``bytelm.models.mrt5``), so its bpb covers fewer bytes, each with a longer context on average.

``TeacherScorer`` wraps a subword causal LM (``bytelm.distill.teacher.Teacher``, e.g. SmolLM2): its bpb is the
sum of the token NLLs over the number of bytes those tokens cover; texts are cut into chunks of at most
``chunk_bytes`` bytes at character boundaries and scored independently. Continuations are scored the way
lm-evaluation-harness does: context and continuation tokenized separately and concatenated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from bytelm.data.bytes import BOS_ID, PAD_ID, text_chunks
from bytelm.data.packed import IGNORE, DocumentRows, PackedCorpus, TiledWindows
from bytelm.data.shakespeare import Document
from bytelm.errors import OptionError
from bytelm.lit.metrics import bits_per_byte, byte_nll_sum
from bytelm.models.registry import find_spec, get_spec

log = logging.getLogger(__name__)

TEACHER_ALIASES = ("teacher", "smollm2")
_NOT_METRICS = ("nll_sum", "n_bytes", "prefix_len", "encoder_len", "target_logprobs")
SEGMENTERS = ("learned", "tokenizer")  # where a byteified model's patches end when it is scored
PACKINGS = ("tiles", "documents")  # how ByteScorer.corpus_nll cuts texts into rows


@dataclass
class CorpusResult:
    nll: float  # summed NLL in nats
    n_bytes: int  # bytes scored
    seconds: float  # forward time
    metrics: dict[str, float] = field(default_factory=dict)  # byte-weighted means of the model's metrics

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nll, self.n_bytes)

    @property
    def bytes_per_s(self) -> float:
        return self.n_bytes / max(self.seconds, 1e-9)


class Scorer(Protocol):
    name: str
    kind: str  # flat | hierarchical | mrt5 | hf-bytes | teacher

    def corpus_nll(self, texts: Sequence[bytes], *, progress: bool = False) -> CorpusResult: ...

    def continuation_logprobs(self, context: bytes, continuations: Sequence[bytes]) -> list[float]: ...

    def describe(self) -> dict[str, Any]: ...


def count_parameters(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ----------------------------------------------------------------------------------------------- byte models
class ByteScorer:
    """A bytelm model (``native``: forward(ids, targets=, doc_ids=, word_start=) -> ModelOutput) or an
    exported HF byte model (``forward(input_ids=) -> .logits``), in eval mode on ``device``."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        arch: str = "flat",
        seq_len: int = 1024,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        words: bool = False,
        max_word_bytes: int = 100,
        native: bool = True,
        invalid_utf8: str = "keep",
        name: str = "model",
        segmenter: Any = None,
        packing: str = "tiles",
    ) -> None:
        """``segmenter`` (models with a fused (byte, boundary) head only): None = the model's own (the learned
        boundary predictor), or ``f(ids, doc_ids) -> (B, T) bool`` patch ends (e.g. the source tokenizer's,
        ``tokenizer_segmenter``). Either way the score is the joint (byte, bit) cross-entropy.
        ``packing`` (``corpus_nll``): ``tiles`` packs the texts as training validation does and cuts rows
        every ``seq_len`` ids; ``documents`` starts rows at text starts (``DocumentRows``), as a subword
        model's chunks of each text do: the protocol to compare with ``TeacherScorer``."""
        if packing not in PACKINGS:
            raise OptionError(f"packing must be one of {list(PACKINGS)}, got {packing!r}")
        self.packing = packing
        self.model = model.eval()
        self.segmenter = segmenter
        self.arch, self.kind = arch, arch if native else "hf-bytes"
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.device = torch.device(device)
        self.words, self.max_word_bytes = words, max_word_bytes
        self.native, self.name, self.invalid_utf8 = native, name, invalid_utf8
        self.cfg: Any = None  # the bytelm Config when built from a checkpoint
        self.source = "checkpoint" if native else "hf"

    @property
    def seq2seq(self) -> bool:
        """A native encoder-decoder (prefix-LM): the encoder reads the context (``ModelSpec.seq2seq``)."""
        spec = find_spec(self.arch) if self.native else None
        return spec is not None and spec.seq2seq

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg: Any, **kw: Any) -> ByteScorer:
        """Scorer for a model built from a bytelm ``Config`` (row length = the training ``seq_len``)."""
        m = cfg.model
        kw.setdefault("seq_len", cfg.data.seq_len)
        kw.setdefault("name", getattr(cfg, "name", m.arch))
        kw.setdefault("invalid_utf8", cfg.data.invalid_utf8)
        scorer = cls(
            model,
            arch=m.arch,
            words=get_spec(m.arch).needs_words(m),
            max_word_bytes=m.max_word_bytes,
            **kw,
        )
        scorer.cfg = cfg
        return scorer

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": count_parameters(self.model),
            "seq_len": self.seq_len,
            "packing": self.packing,
            "source": self.source,
        }

    @property
    def fused(self) -> bool:
        """The model predicts (byte, ends-a-patch) symbols and scores them itself (the byteified model)."""
        return self.native and bool(getattr(self.model, "fused_head", False))

    def _forward(
        self, ids: torch.Tensor, targets: torch.Tensor, **kw: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(logits (B, L, V) predicting the last L targets, metrics). A fused model gets its patch ends from
        ``self.segmenter`` when one is set, and reports its joint log-probs (``target_logprobs``) in
        metrics."""
        if self.native:
            if self.fused and self.segmenter is not None and "patch_end" not in kw:
                kw["patch_end"] = self.segmenter(ids, kw.get("doc_ids"))
            out = self.model(ids, targets=targets, **kw)
            metrics = dict(out.metrics)
            if "target_logprobs" in out.hidden:
                metrics["target_logprobs"] = out.hidden["target_logprobs"]
            return out.logits, metrics
        return self.model(input_ids=ids).logits, {}

    @torch.no_grad()
    def corpus_nll(self, texts: Sequence[bytes], *, max_ids: int = 0, progress: bool = False) -> CorpusResult:
        """NLL of ``texts`` packed as training validation packs them (first ``max_ids`` ids; 0 = all)."""
        docs = [Document(f"text{i}", t) for i, t in enumerate(texts) if t]
        if not docs:
            return CorpusResult(0.0, 0, 0.0)
        kw: dict[str, Any] = dict(
            invalid_utf8=self.invalid_utf8,
            words=self.words and self.native,
            max_word_bytes=self.max_word_bytes,
        )
        if self.packing == "documents":
            if max_ids:
                raise OptionError("corpus_nll(max_ids=...) applies to packing='tiles' only")
            ds: Any = DocumentRows(docs, self.seq_len, **kw)
        else:
            ds = TiledWindows(PackedCorpus(docs, **kw), self.seq_len, max_ids)
        nll, n = 0.0, 0
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for batch in tqdm(
            DataLoader(ds, batch_size=self.batch_size), desc=f"eval {self.name}", disable=not progress
        ):
            b = {k: v.to(self.device) for k, v in batch.items()}
            kw = {"doc_ids": b["doc_ids"], "word_start": b.get("word_start")} if self.native else {}
            logits, metrics = self._forward(b["input_ids"], b["targets"], **kw)
            if "nll_sum" in metrics and "n_bytes" in metrics:  # models with their own objective (MrT5)
                s, c = float(metrics["nll_sum"]), int(metrics["n_bytes"])
            else:
                s_t, c_t = byte_nll_sum(logits, b["targets"][:, b["targets"].shape[1] - logits.shape[1] :])
                s, c = float(s_t), int(c_t)
            nll, n = nll + s, n + c
            for k, v in metrics.items():
                if k in _NOT_METRICS or (isinstance(v, torch.Tensor) and v.numel() != 1):
                    continue
                sums[k] = sums.get(k, 0.0) + float(v) * c
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        return CorpusResult(nll, n, dt, {k: v / max(n, 1) for k, v in sums.items()})

    @torch.no_grad()
    def continuation_logprobs(self, context: bytes, continuations: Sequence[bytes]) -> list[float]:
        """``log p(c | BOS context)`` in nats for each ``c`` (one padded batch; context cut from the left if
        a row would exceed ``seq_len``)."""
        if not continuations:
            return []
        longest = max(len(c) for c in continuations)
        if longest == 0:
            return [0.0] * len(continuations)
        keep = max(0, self.seq_len - longest)
        ctx = list(context[len(context) - keep :]) if len(context) > keep else list(context)
        T = len(ctx) + longest
        ids = torch.full((len(continuations), T), PAD_ID, dtype=torch.long)
        tgt = torch.full((len(continuations), T), IGNORE, dtype=torch.long)
        for i, c in enumerate(continuations):
            full = [BOS_ID, *ctx, *c]
            ids[i, : len(full) - 1] = torch.tensor(full[:-1])
            tgt[i, len(ctx) : len(full) - 1] = torch.tensor(list(c))  # only the continuation is scored
        ids, tgt = ids.to(self.device), tgt.to(self.device)
        kw: dict[str, Any] = {}
        if self.seq2seq:
            kw["prefix_len"] = 1 + len(ctx)  # encoder reads BOS + context, decoder scores the continuation
        if self.fused:
            kw["patch_end"] = self._continuation_bits(ids, 1 + len(ctx), continuations)
        logits, metrics = self._forward(ids, tgt, **kw)
        if "target_logprobs" in metrics:  # joint (byte, bit) log-probs of the continuation's symbols
            return [float(x) for x in metrics["target_logprobs"].double().sum(1)]
        tgt = tgt[:, T - logits.shape[1] :]
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
        mask = tgt != IGNORE
        lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (B, L)
        return [float(x) for x in lp.sum(1)]

    def _continuation_bits(
        self, ids: torch.Tensor, n_ctx: int, continuations: Sequence[bytes]
    ) -> torch.Tensor:
        """Patch ends of padded ``BOS context continuation[:-1]`` rows for a fused model. The context's bits
        never depend on the continuation: the segmenter's on the context alone, its last one chosen by the
        model's head (``prompt_bits``), or the tokenizer's on the context alone. The continuation's come from
        the segmenter over the whole row (the tokenizer's on the whole continuation alone) and are scored with
        its bytes; the last byte's bit is summed out (``joint_logprobs``), so a continuation is scored as a
        prefix of whatever follows it."""
        m: Any = self.model
        B, T = ids.shape
        full = torch.cat([ids, torch.full((B, 1), PAD_ID, dtype=ids.dtype, device=ids.device)], 1)
        for i, c in enumerate(continuations):  # the rows with their last byte, so the segmenter sees it
            full[i, n_ctx + len(c) - 1] = c[-1]
        if self.segmenter is None:
            ctx_bits = torch.tensor([m.prompt_bits(ids[0, :n_ctx].tolist())], device=ids.device)
            bits = m.segment(full)[0]
        else:
            ctx_bits = self.segmenter(ids[:1, :n_ctx], None)
            bits = torch.cat(
                [
                    torch.zeros(B, n_ctx, dtype=torch.bool, device=ids.device),
                    self.segmenter(full[:, n_ctx:], None),
                ],
                1,
            )
        bits = bits[:, :T].clone()
        bits[:, :n_ctx] = ctx_bits.expand(B, -1)
        return bits


def tokenizer_segmenter(tokenizer: Any) -> Any:
    """The ``tokenizer`` segmenter: a byteified model's patches end at the source tokenizer's token ends
    (exact for users who keep the tokenizer; ``bytelm.distill.token_ends``)."""
    from bytelm.distill.token_ends import batch_token_ends

    return lambda ids, doc_ids=None: batch_token_ends(tokenizer, ids, doc_ids)


# -------------------------------------------------------------------------------------------- subword teacher
class TeacherScorer:
    """A subword causal LM seen through ``bytelm.distill.teacher.Teacher`` (token NLL per byte)."""

    kind = "teacher"

    def __init__(
        self, teacher: Any, *, chunk_bytes: int = 1024, batch_size: int = 1, name: str = "teacher"
    ) -> None:
        self.teacher, self.chunk_bytes, self.batch_size, self.name = (
            teacher,
            int(chunk_bytes),
            batch_size,
            name,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": count_parameters(self.teacher.model),
            "seq_len": self.chunk_bytes,
        }

    def _chunks(self, texts: Sequence[bytes]) -> list[bytes]:
        return [c for t in texts for c in text_chunks(t, self.chunk_bytes)]

    @torch.no_grad()
    def corpus_nll(self, texts: Sequence[bytes], *, progress: bool = False) -> CorpusResult:
        chunks = self._chunks([t for t in texts if t])
        nll, n = 0.0, 0
        t0 = time.perf_counter()
        steps = range(0, len(chunks), self.batch_size)
        for i in tqdm(steps, desc=f"eval {self.name}", disable=not progress):
            out = self.teacher(chunks[i : i + self.batch_size])
            enc = out.encoding
            mask = (enc.content_mask & enc.attention_mask).to(out.token_logprobs.device)
            nll -= float((out.token_logprobs * mask).sum())
            n += int(enc.n_covered.sum())
        return CorpusResult(nll, n, time.perf_counter() - t0)

    def _tokens(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="replace")
        return list(self.teacher.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def continuation_logprobs(self, context: bytes, continuations: Sequence[bytes]) -> list[float]:
        if not continuations:
            return []
        ctx = [int(self.teacher.start_id), *self._tokens(context)]
        conts = [self._tokens(c) for c in continuations]
        T = len(ctx) + max(len(c) for c in conts)
        ids = torch.full((len(conts), T), int(self.teacher.pad_id), dtype=torch.long)
        attn = torch.zeros(len(conts), T, dtype=torch.long)
        for i, c in enumerate(conts):
            ids[i, : len(ctx) + len(c)] = torch.tensor(ctx + c)
            attn[i, : len(ctx) + len(c)] = 1
        dev = self.teacher.device
        logits = self.teacher.model(
            input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False
        ).logits
        logp = F.log_softmax(logits[..., : self.teacher.vocab_size].float(), dim=-1)  # (B, T, V)
        res = []
        for i, c in enumerate(conts):
            if not c:
                res.append(0.0)
                continue
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=logp.device)
            res.append(float(logp[i, pos].gather(-1, torch.tensor(c, device=logp.device)[:, None]).sum()))
        return res


# ------------------------------------------------------------------------------------------------- loading
def _hf_byte_config(folder: Path) -> dict[str, Any] | None:
    """config.json of an exported bytelm folder, or None when the folder holds some other HF model;
    ``CorruptCheckpointError`` when config.json is not valid JSON."""
    from bytelm.checkpoint import CorruptCheckpointError

    path = folder / "config.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{str(path)!r} is not a readable JSON config ({e})") from e
    text = json.dumps(conf).lower()
    return conf if "bytelm" in text else None


def _load_exported(
    path: Path, conf: dict[str, Any], *, device: str, batch_size: int, seq_len: int | None, name: str
) -> ByteScorer:
    """A ``bytelm-export`` folder through transformers (``trust_remote_code``), scored like its checkpoint:
    through the bytelm module the HF wrapper holds (the folder's own copy of the code), so packed rows carry
    document ids and never attend across documents, in rows of the training length (``_exported_data``), and
    the model's metrics (bytes per word, kept ratio) are reported."""
    import transformers

    arch = str(conf.get("arch") or "flat")
    spec = find_spec(arch)  # None: a kind this bytelm does not know (scored as a plain HF byte model)
    auto: Any = getattr(transformers, spec.auto_class if spec is not None else "AutoModelForCausalLM")
    from bytelm.checkpoint import CorruptCheckpointError

    try:
        hf: Any = auto.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    except OSError as e:  # transformers' error for missing or unreadable files in the folder
        raise CorruptCheckpointError(f"exported model {str(path)!r} cannot be loaded ({e})") from e
    hf = hf.to(device).eval()
    data = _exported_data(path, conf)
    rows = seq_len or data.get("seq_len")
    if not rows:
        rows = int(conf.get("max_seq_len") or 1024)
        log.warning("%s records no training row length; scoring in rows of max_seq_len=%d", path, rows)
    inner = getattr(hf, "model", None)
    native = (
        spec is not None
        and isinstance(inner, torch.nn.Module)
        and type(inner).__name__ == spec.model_class().__name__
    )
    if not native and spec is not None and spec.seq2seq:
        raise ValueError(f"{str(path)!r}: an encoder-decoder without its bytelm module cannot be scored")
    if not native:
        log.warning("%s: no bytelm module inside; packed rows are scored without document masks", path)
    words = native and spec is not None and spec.needs_words(hf.config)  # hf.config has ModelConfig's fields
    module: Any = inner if native else hf
    scorer = ByteScorer(
        module,
        arch=arch,
        seq_len=int(rows),
        batch_size=batch_size,
        device=device,
        native=native,
        words=words,
        max_word_bytes=int(conf.get("max_word_bytes") or 100),
        invalid_utf8=str(data.get("invalid_utf8") or "keep"),
        name=name,
    )
    scorer.kind, scorer.source = arch, "hf-export"
    return scorer


def _exported_data(path: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """The training data settings a checkpoint is scored with (``seq_len``, ``invalid_utf8``), for an exported
    folder: ``train_seq_len`` / ``train_invalid_utf8`` in config.json (``bytelm-export`` writes them), else
    the ``data`` section of the training configuration in the folder's model card (folders exported before
    config.json held them), else nothing."""
    keys = {"seq_len": conf.get("train_seq_len"), "invalid_utf8": conf.get("train_invalid_utf8")}
    if all(v is not None for v in keys.values()):
        return keys
    card = _card_training_data(path / "README.md")
    return {k: v if v is not None else card.get(k) for k, v in keys.items()}


def _card_training_data(readme: Path) -> dict[str, Any]:
    """``data`` of the "## Training configuration" YAML block of a bytelm model card ({} if there is none)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    block = text.split("## Training configuration", 1)[-1] if "## Training configuration" in text else ""
    if "```yaml" not in block:
        return {}
    try:
        train = yaml.safe_load(block.split("```yaml", 1)[1].split("```", 1)[0])
    except yaml.YAMLError:
        return {}
    data = train.get("data") if isinstance(train, dict) else None
    return dict(data) if isinstance(data, dict) else {}


def resolve_checkpoint(path: Path) -> Path:
    """A run folder (``<run>/checkpoints/last.ckpt`` or the newest valid one) or a checkpoints folder ->
    file."""
    from bytelm.checkpoint import latest_valid_checkpoint

    for cand in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if cand.is_file():
            return cand
    for folder in (path / "checkpoints", path):
        found = latest_valid_checkpoint(folder)
        if found is not None:
            return found
    raise FileNotFoundError(f"{str(path)!r} holds no checkpoint (*.ckpt), no exported model (config.json)")


def load_scorer(
    spec: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    seq_len: int | None = None,
    name: str | None = None,
    segmenter: str = "learned",
    tokenizer: str | None = None,
    packing: str = "tiles",
) -> Scorer:
    """Scorer for a checkpoint file, a run folder, an exported HF folder, a ``.gguf`` / HF subword model, or
    ``teacher`` / ``smollm2`` (the offline SmolLM2-135M teacher). ``segmenter`` (byteified models):
    ``learned`` (the model's boundary predictor) or ``tokenizer`` (the source tokenizer's token ends;
    ``tokenizer`` = its path, default the checkpoint's ``byteify.source`` or the offline SmolLM2).
    ``packing`` (byte models): ``tiles`` or ``documents`` (``ByteScorer``); a subword model always reads
    each text from its start."""
    if segmenter not in SEGMENTERS:
        raise OptionError(f"segmenter must be one of {list(SEGMENTERS)}, got {segmenter!r}")
    if packing not in PACKINGS:
        raise OptionError(f"packing must be one of {list(PACKINGS)}, got {packing!r}")
    scorer = _load_scorer(spec, device=device, batch_size=batch_size, seq_len=seq_len, name=name)
    if isinstance(scorer, ByteScorer):
        scorer.packing = packing
    if segmenter == "tokenizer":
        if not isinstance(scorer, ByteScorer) or not scorer.fused:
            raise OptionError(
                f"segmenter='tokenizer' applies to byteified models only; {str(spec)!r} is a "
                f"{scorer.kind} model"
            )
        from bytelm.distill.teacher import load_tokenizer, smollm2_gguf_path

        src = (
            tokenizer
            or (scorer.cfg.byteify.source if scorer.cfg is not None else None)
            or smollm2_gguf_path()
        )
        if not Path(src).exists():
            raise FileNotFoundError(
                f"tokenizer {str(src)!r} does not exist (pass the source model's folder or .gguf)"
            )
        scorer.segmenter = tokenizer_segmenter(load_tokenizer(src))
        scorer.name = f"{scorer.name} (tokenizer segmenter)"
    return scorer


def _load_scorer(
    spec: str | Path, *, device: str, batch_size: int, seq_len: int | None, name: str | None
) -> Scorer:
    s = str(spec)
    if s.lower() in TEACHER_ALIASES or s.endswith(".gguf"):
        from bytelm.distill.teacher import load_teacher

        teacher = load_teacher(
            None if s.lower() in TEACHER_ALIASES else s, device=device, dtype=torch.float32
        )
        default = "SmolLM2-135M (teacher)" if s.lower() in TEACHER_ALIASES else Path(s).name
        return TeacherScorer(teacher, chunk_bytes=seq_len or 1024, batch_size=1, name=name or default)
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(
            f"{s!r} does not exist (expected a .ckpt, a run folder, an exported folder, a .gguf or 'teacher')"
        )
    if path.is_dir() and (path / "config.json").is_file():
        conf = _hf_byte_config(path)
        if conf is None:  # a subword HF model: score it like the teacher
            from bytelm.distill.teacher import load_teacher

            teacher = load_teacher(path, device=device, dtype=torch.float32)
            return TeacherScorer(teacher, chunk_bytes=seq_len or 1024, name=name or path.name)
        return _load_exported(
            path, conf, device=device, batch_size=batch_size, seq_len=seq_len, name=name or path.name
        )
    from bytelm.checkpoint import load_model

    ckpt = resolve_checkpoint(path) if path.is_dir() else path
    model, cfg = load_model(ckpt, device)
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device, "name": name or cfg.name}
    if seq_len:
        kw["seq_len"] = seq_len
    return ByteScorer.from_config(model, cfg, **kw)
