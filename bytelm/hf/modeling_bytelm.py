"""Hugging Face wrappers of bytelm's models: ``BytelmForCausalLM`` (flat, hierarchical and byteified) and
``BytelmForSeq2SeqLM`` (MrT5), both ``PreTrainedModel`` + ``GenerationMixin``.

The wrapped bytelm module lives at ``self.model`` (weights ``model.*``), so logits are bytelm's own, bit for
bit. This file is copied into every exported folder with its ``bytelm`` imports rewritten to relative ones
(``bytelm.hf.export.write_model_code``), which is what makes the folder load without bytelm installed.

Generation (``model.generate``) runs transformers' own loop (logits processors, sampling, stopping criteria,
streamers, pipelines) on top of **bytelm's own KV-cache objects**: ``BytelmCache`` sits in ``generate``'s
``cache`` slot and holds one bytelm cache per batch row (or one batched cache for the flat model when no row
is padded). The hierarchical model's cache (``HierCache``) decides word boundaries online exactly as bytelm's
generator does, so the word-level state is bytelm's, not a re-implementation. The byteified model's
(``ByteifiedCache``) is fed (byte, boundary-bit) symbols: the prompt's bits come from its segmenter except the
last byte's, which its fused head decides, and each sampled byte takes the bit the head prefers for it; the
sampled distribution is the head's with the bit summed out. Its boundary decisions are state, so it always
generates with its cache (``use_cache=False`` is ignored for it). Left padding (batched generation, pipelines)
is removed per row before the prompt goes in, so padded rows generate exactly what they would alone.

Plain ``forward(input_ids, attention_mask)`` (what lm-evaluation-harness calls for log-likelihoods) returns
``logits`` (B, T, V): right padding runs as one batch (every bytelm model is causal, so padding after a
position cannot change it); any other mask (left padding, holes) runs each row's unmasked ids on their own
and scatters the logits back to their positions (masked positions get zeros). A byteified model's plain
forward decides every boundary with its head (no lookahead), so those byte logits are an honest causal
distribution; ``segment=True`` / ``patch_end=`` give the fused (byte, bit) logits of the parallel path with
``boundary_bits`` for joint scoring (``BytelmCausalLMOutput``; docs/byteify.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass, replace
from dataclasses import fields as dc_fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput
from transformers.utils import ModelOutput

from bytelm.data.bytes import (  # VOCAB_SIZE: ids a model may emit (the table is padded)
    BOS_ID,
    PAD_ID,
    VOCAB_SIZE,
)
from bytelm.hf.configuration_bytelm import BytelmConfig
from bytelm.models.build import build_model
from bytelm.models.byteified import fused_marginal
from bytelm.models.registry import get_spec

IGNORE_INDEX = -100


@dataclass
class BytelmCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus, for a byteified model (fused (byte, boundary) head), the fused logits
    (B, T, 2V: ``[:V]`` the byte continues its patch, ``[V:]`` it ends it) and the boundary bits used (B,
    T)."""

    fused_logits: torch.Tensor | None = None
    boundary_bits: torch.Tensor | None = None


def _with_cache(cls: type, cache: Any, **kw: Any) -> Any:
    """Build a transformers output whose cache field is ``cache`` (transformers 5) or ``past_key_values``."""
    names = {f.name for f in dc_fields(cls)}
    key = "cache" if "cache" in names else "past_key_values"
    if cache is not None:
        kw[key] = cache
    return cls(**kw)


def _mask_rows(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(B, n) bool "real id" mask of the last ``n`` positions, or None when nothing is masked."""
    if attention_mask is None:
        return None
    m = attention_mask[:, -n:].bool()
    return None if bool(m.all()) else m


def _right_padded(m: torch.Tensor) -> bool:
    """True when every row is real ids followed by padding (no real id after a masked one)."""
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


class BytelmCache:
    """bytelm's decoding state for ``generate()``: one bytelm cache per row, or one batched cache (flat model,
    no padding). ``seen`` counts the ids of the (padded) batch already fed, so each step feeds only new
    ids."""

    is_compileable = False
    is_croppable = False
    is_linear = [False]

    def __init__(self) -> None:
        self.states: list[Any] = []
        self.batched = False
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues from row ``beam_idx[i]``."""
        idx = beam_idx.tolist()
        if idx == list(range(len(idx))) and (self.batched or len(self.states) == len(idx)):
            return  # identity (e.g. a single row): nothing moves (a byteified cache holds unbatched tensors)
        if self.batched:
            self.states = [_index_rows(self.states[0], beam_idx)]
            return
        used: set[int] = set()
        states = []
        for i in beam_idx.tolist():  # a row taken twice needs its own copy (bytelm caches grow in place)
            states.append(copy.deepcopy(self.states[i]) if i in used else self.states[i])
            used.add(i)
        self.states = states


def _index_rows(x: Any, idx: torch.Tensor) -> Any:
    """Select batch rows ``idx`` of every tensor in a (nested) bytelm cache object."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, idx.to(x.device)) if x.dim() > 0 else x
    if isinstance(x, list):
        return [_index_rows(v, idx) for v in x]
    if isinstance(x, tuple):
        return tuple(_index_rows(v, idx) for v in x)
    if is_dataclass(x) and not isinstance(x, type):
        y = copy.copy(x)
        for f in dc_fields(x):
            setattr(y, f.name, _index_rows(getattr(x, f.name), idx))
        return y
    return x


class BytelmPreTrainedModel(PreTrainedModel):
    config_class = BytelmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block", "DecoderBlock"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: BytelmConfig) -> None:
        super().__init__(config)
        self.model = build_model(config.to_model_config(), init=False)  # weights: the checkpoint's
        self.model.init_weights()  # type: ignore[operator]
        # parameters the bytelm module freezes at construction
        # (a byteified model's source embeddings and head)
        self._frozen_names = tuple(n for n, p in self.model.named_parameters() if not p.requires_grad)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from bytelm's ``init_weights`` (construction) or the checkpoint: nothing to do."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """transformers' ``from_pretrained``; parameters that the bytelm module freezes stay frozen
        (transformers' loader puts new, trainable parameters in their place)."""
        model = super().from_pretrained(*args, **kwargs)
        frozen = set(getattr(model, "_frozen_names", ()))
        for name, p in model.model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() keeps bytelm's own cache objects (BytelmCache), not a DynamicCache

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed  # type: ignore[return-value]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head  # type: ignore[return-value]

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``, with bytelm's sampling default: no top-k filter unless ``top_k`` is
        given (transformers' own default is 50), so ``do_sample=True`` samples as bytelm's generator does."""
        gc = kwargs.get("generation_config") or self.generation_config
        do_sample = kwargs.get("do_sample", gc.do_sample)
        if do_sample and "top_k" not in kwargs and gc.top_k is None:
            kwargs["top_k"] = 0
        return super().generate(*args, **kwargs)  # type: ignore[misc]

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
        if shift:  # causal LM: position t predicts labels[t + 1]
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1).to(logits.device),
            ignore_index=IGNORE_INDEX,
        )


class BytelmForCausalLM(BytelmPreTrainedModel, GenerationMixin):
    """Flat, hierarchical or byteified bytelm model as a causal LM (``AutoModelForCausalLM``)."""

    def __init__(self, config: BytelmConfig) -> None:
        if get_spec(config.arch).seq2seq:
            raise ValueError(
                f"{config.arch!r} is an encoder-decoder: load it with AutoModelForSeq2SeqLM "
                "(BytelmForSeq2SeqLM)"
            )
        super().__init__(config)

    # -- forward ---------------------------------------------------------------------------------------

    def _rowwise(self, input_ids: torch.Tensor, m: torch.Tensor, caches: list[Any] | None) -> torch.Tensor:
        """Run each row's real ids (``m``) alone; logits go back to their positions (zeros elsewhere)."""
        B, T = input_ids.shape
        out: torch.Tensor | None = None
        for b in range(B):
            ids = input_ids[b][m[b]]
            pos = torch.nonzero(m[b]).flatten()
            if ids.numel() == 0:  # nothing real in this row: start from BOS (as bytelm's generator does)
                ids = torch.tensor([BOS_ID], device=input_ids.device)
                pos = torch.tensor([T - 1], device=input_ids.device)
            kw = {"cache": caches[b]} if caches is not None else {}
            lg = self.model(ids.unsqueeze(0), **kw).logits[0]  # (n_b, V)
            if out is None:
                out = lg.new_zeros(B, T, lg.shape[-1])
            out[b, pos] = lg
        assert out is not None
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BytelmCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: BytelmCache | None = None,
        vocab_only: bool = False,
        patch_end: torch.Tensor | None = None,
        segment: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``logits`` (B, T, V) for ``input_ids`` (B, T); with ``cache`` only the ids not yet fed are passed
        (``prepare_inputs_for_generation`` slices them). ``labels`` give the usual shifted causal-LM loss.
        ``vocab_only`` (set by ``generate``) drops the padded vocabulary columns (ids >= 259), so sampling
        draws from the same 259 ids as bytelm's generator and, for the same seed, the same bytes."""
        if input_ids is None:
            raise ValueError("bytelm models take input_ids (byte ids); inputs_embeds is not supported")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache is True:
            cache = BytelmCache()
        if cache is not None and not isinstance(cache, BytelmCache):
            raise TypeError(f"bytelm models keep their own cache (BytelmCache), got {type(cache).__name__}")
        n = input_ids.shape[1]
        if self.fused and cache is None:
            return self._forward_fused(
                input_ids, attention_mask, labels, patch_end, segment, vocab_only, return_dict
            )
        if cache is not None:
            logits = self._forward_cached(input_ids, attention_mask, cache)
            if self.fused:  # generation samples a byte; its bit then follows from the head (ByteifiedCache)
                logits = fused_marginal(logits)
        else:
            m = _mask_rows(attention_mask, n)
            if m is None:
                logits = self.model(input_ids).logits
            elif _right_padded(m):  # padding after real ids cannot change them (causal): one batch
                logits = self.model(input_ids.masked_fill(~m, PAD_ID)).logits
            else:
                logits = self._rowwise(input_ids, m, None)
        loss = self._lm_loss(logits, labels, shift=True) if labels is not None else None
        if vocab_only:
            logits = logits[..., :VOCAB_SIZE]
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return _with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits)

    @property
    def fused(self) -> bool:
        """The wrapped model predicts (byte, ends-a-patch) symbols (the byteified model)."""
        return bool(getattr(self.model, "fused_head", False))

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: Any,
        patch_end: torch.Tensor | None,
        segment: bool,
        vocab_only: bool,
        return_dict: bool | None,
    ) -> Any:
        """A byteified model without a cache (docs/byteify.md, "Scoring through transformers").

        - ``segment=True`` or ``patch_end=`` (B, T) bool: one parallel forward with the model's segmenter's
          bits (or the given ones, e.g. the source tokenizer's token ends): ``logits`` are the fused (B, T,
          2V) symbols and ``boundary_bits`` the bits used; the joint cross-entropy of (byte, bit) is the
          honest score (``labels`` give it as ``loss``);
        - default: every byte's bit is the one the fused head prefers after the bytes before it (no
          lookahead), row by row through the cache, so ``logits`` (B, T, V), the bit summed out, form a causal
          next-byte distribution that any client (lm-evaluation-harness, a plain cross-entropy) may score as
          is."""
        B, T = input_ids.shape
        m = _mask_rows(attention_mask, T)
        if segment or patch_end is not None:
            if m is not None and not _right_padded(m):
                raise ValueError("segment=True / patch_end= take right-padded rows (or no attention_mask)")
            ids = input_ids if m is None else input_ids.masked_fill(~m, PAD_ID)
            targets = None
            if labels is not None:
                targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
                if m is not None:
                    targets = targets.masked_fill(
                        ~torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1), IGNORE_INDEX
                    )
            out = self.model(ids, patch_end=patch_end, targets=targets)
            logits, bits, loss = out.logits, out.hidden["closed"], out.loss
            fused = logits
        else:
            rows = m if m is not None else torch.ones_like(input_ids, dtype=torch.bool)
            fused = bits = None
            for b in range(B):
                pos = torch.nonzero(rows[b]).flatten()
                ids = input_ids[b, pos]
                if ids.numel() == 0:
                    continue
                c = self.model.new_cache()  # type: ignore[operator]
                lg = self.model(ids.unsqueeze(0), cache=c, causal_bits=True).logits[0]  # (n_b, 2V)
                if fused is None:
                    fused = lg.new_zeros(B, T, lg.shape[-1])
                    bits = torch.zeros(B, T, dtype=torch.bool, device=lg.device)
                assert bits is not None
                fused[b, pos] = lg
                bits[b, pos] = torch.tensor(c.bits, device=lg.device)
            assert fused is not None, "no real ids in the batch"
            logits = fused_marginal(fused)
            loss = self._lm_loss(logits, labels, shift=True) if labels is not None else None
        if vocab_only:
            logits = logits[..., :VOCAB_SIZE]
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return BytelmCausalLMOutput(loss=loss, logits=logits, fused_logits=fused, boundary_bits=bits)

    def _forward_cached(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: BytelmCache
    ) -> torch.Tensor:
        B, n = input_ids.shape
        if not cache.states:  # prefill: choose batched (flat, unpadded) or per-row state
            m = _mask_rows(attention_mask, n)
            if m is None and (get_spec(self.config.arch).batched_cache or B == 1):
                cache.batched = True
                cache.states = [self.model.new_cache()]  # type: ignore[operator]
            else:
                cache.states = [self.model.new_cache() for _ in range(B)]  # type: ignore[operator]
                cache.seen += n
                return self._rowwise(
                    input_ids,
                    m if m is not None else torch.ones_like(input_ids, dtype=torch.bool),
                    cache.states,
                )
        cache.seen += n
        if cache.batched:
            return self.model(input_ids, cache=cache.states[0]).logits
        if len(cache.states) != B:
            raise ValueError(f"cache holds {len(cache.states)} rows, input has {B}")
        rows = [self.model(input_ids[b : b + 1], cache=cache.states[b]).logits for b in range(B)]
        return torch.cat(rows, 0)

    # -- generation ------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: BytelmCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = True,
        past_key_values: BytelmCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cache = cache if cache is not None else past_key_values
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "vocab_only": True}
        if use_cache is False and not self.fused:  # a byteified model's boundary decisions live in its cache
            inputs.update(input_ids=input_ids, use_cache=False)
        else:
            cache = cache if cache is not None else BytelmCache()
            inputs.update(input_ids=input_ids[:, cache.seen :], cache=cache, use_cache=True)
        return inputs


@dataclass
class BytelmEncoderOutput(ModelOutput):
    """MrT5 encoder result for ``generate()``: ``last_hidden_state`` (B, S, D) normed encoder states (S < T
    after hard deletion) and ``bytelm``, bytelm's own ``EncoderOutput`` (masks, gate bias, positions) that the
    decoder takes as it is."""

    last_hidden_state: torch.Tensor | None = None
    bytelm: Any = None


def _expand_encoder_output(enc: Any, batch: int) -> Any:
    """Repeat each row of bytelm's ``EncoderOutput`` (``num_return_sequences`` / beams expand the batch)."""
    b0 = enc.memory.shape[0]
    if b0 == batch:
        return enc
    if batch % b0:
        raise ValueError(f"encoder batch {b0} does not divide decoder batch {batch}")
    k = batch // b0
    changes = {
        f.name: getattr(enc, f.name).repeat_interleave(k, dim=0)
        for f in dc_fields(enc)
        if isinstance(getattr(enc, f.name), torch.Tensor)
        and getattr(enc, f.name).dim() >= 2
        and getattr(enc, f.name).shape[0] == b0
    }
    return replace(enc, **changes)


class _MrT5EncoderView(nn.Module):
    """``get_encoder()`` for MrT5: runs the (shared, unregistered) MrT5's encoder and its delete gate."""

    def __init__(self, owner: BytelmForSeq2SeqLM) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: no duplicate weights in state_dict

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hard_delete: bool | None = True,
        return_dict: bool | None = True,
        **kwargs: Any,
    ) -> BytelmEncoderOutput:
        """Called by ``generate()``: hard deletion by default, as bytelm's ``MrT5.generate``."""
        mrt5: Any = self._owner.model  # type: ignore[attr-defined,union-attr]
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(~attention_mask.bool(), PAD_ID)
        enc = mrt5.encode(input_ids, hard_delete=hard_delete)
        return BytelmEncoderOutput(last_hidden_state=enc.memory, bytelm=enc)


class BytelmForSeq2SeqLM(BytelmPreTrainedModel, GenerationMixin):
    """MrT5 (byte encoder with a delete gate + byte decoder) as ``AutoModelForSeq2SeqLM``.

    ``input_ids`` are the encoder's bytes (the prefix), ``decoder_input_ids`` start with BOS (257, the decoder
    start id); ``logits`` predict the continuation, exactly as bytelm's prefix-LM forward. ``hard_delete``
    compacts the gated-out positions: ``forward`` defaults to None (soft deletion unless ``gate.hard_eval``,
    as bytelm's forward), ``generate`` to True (as bytelm's ``MrT5.generate``)."""

    def __init__(self, config: BytelmConfig) -> None:
        if not get_spec(config.arch).seq2seq:
            raise ValueError(f"{config.arch!r} is a causal LM: load it with AutoModelForCausalLM")
        super().__init__(config)
        object.__setattr__(self, "_encoder_view", _MrT5EncoderView(self))

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self._encoder_view  # type: ignore[return-value]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: Any = None,
        cache: BytelmCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        hard_delete: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: BytelmCache | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        vocab_only: bool = False,
        **kwargs: Any,
    ) -> Any:
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids (encoder bytes) or encoder_outputs")
            encoder_outputs = self.get_encoder()(input_ids, attention_mask, hard_delete=hard_delete)
        enc = encoder_outputs.get("bytelm") if isinstance(encoder_outputs, Mapping) else None
        if enc is None:
            raise ValueError("encoder_outputs must come from this model's encoder (model.get_encoder())")
        memory = encoder_outputs["last_hidden_state"]
        enc = _expand_encoder_output(enc, memory.shape[0])
        dec_ids: torch.Tensor
        if decoder_input_ids is not None:
            dec_ids = decoder_input_ids
        elif labels is not None:  # teacher forcing: BOS + labels shifted right
            start = torch.full_like(labels[:, :1], BOS_ID)
            dec_ids = torch.cat([start, labels[:, :-1].masked_fill(labels[:, :-1] < 0, PAD_ID)], 1)
        else:
            dec_ids = torch.full((memory.shape[0], 1), BOS_ID, dtype=torch.long, device=memory.device)
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache is True:
            cache = BytelmCache()
        state = None
        if cache is not None:
            if not cache.states:
                cache.states = [self.model.new_cache()]  # type: ignore[operator]
                cache.batched = True
            state = cache.states[0]
            cache.seen += dec_ids.shape[1]
        logits = self.model.decode(dec_ids, enc, state)  # type: ignore[operator]
        loss = self._lm_loss(logits, labels, shift=False) if labels is not None else None
        if vocab_only:
            logits = logits[..., :VOCAB_SIZE]
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return _with_cache(Seq2SeqLMOutput, cache, loss=loss, logits=logits, encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: BytelmCache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        use_cache: bool | None = True,
        past_key_values: BytelmCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cache = cache if cache is not None else past_key_values
        inputs: dict[str, Any] = {
            "attention_mask": attention_mask,
            "encoder_outputs": encoder_outputs,
            "vocab_only": True,
        }
        if use_cache is False:
            inputs.update(decoder_input_ids=input_ids, use_cache=False)
        else:
            cache = cache if cache is not None else BytelmCache()
            inputs.update(decoder_input_ids=input_ids[:, cache.seen :], cache=cache, use_cache=True)
        return inputs


__all__ = ["BytelmCache", "BytelmForCausalLM", "BytelmForSeq2SeqLM", "BytelmPreTrainedModel"]
