"""Byte tokenizer for exported bytelm models: ids 0-255 are the UTF-8 bytes themselves, PAD=256, BOS=257,
EOS=258.

Two tokenizers with identical ids are saved with every export:

- ``tokenizer.json`` (a ``tokenizers`` byte-level model, built by :func:`build_fast_tokenizer`): what
  ``AutoTokenizer.from_pretrained(folder)`` loads, no remote code needed. Text is encoded as its UTF-8 bytes;
  decoding an invalid UTF-8 sequence gives U+FFFD.
- :class:`ByteTokenizer` (this file, pure Python, shipped as remote code): what
  ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` loads. Same ids, plus exact round trips
  of *invalid* UTF-8: strings may carry raw bytes as lone surrogates (Python's ``surrogateescape``), so
  ``tok.decode(tok.encode(raw.decode("utf-8", "surrogateescape")), errors="surrogateescape")`` gives back
  the same string for any ``raw: bytes``; ``encode_bytes`` / ``decode_bytes`` work on ``bytes`` directly.
  ``decode`` defaults to ``errors="replace"`` (U+FFFD), like ``bytelm.data.bytes.decode``.

Neither adds BOS/EOS by default (``add_bos_token=False``), matching ``bytelm.data.bytes.encode`` and bytelm's
generator; literal text such as ``"<s>"`` is encoded as its bytes, never as a special id.
"""

from __future__ import annotations

from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
N_BYTES = 256


def _special(tok: str) -> AddedToken:
    return AddedToken(tok, special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)


class ByteTokenizer(PreTrainedTokenizer):
    """Raw UTF-8 bytes as ids 0-255; specials PAD/BOS/EOS at 256/257/258."""

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(
        self,
        pad_token: str | AddedToken = PAD_TOKEN,
        bos_token: str | AddedToken = BOS_TOKEN,
        eos_token: str | AddedToken = EOS_TOKEN,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        toks = [_special(t) if isinstance(t, str) else t for t in (pad_token, bos_token, eos_token)]
        self._added_tokens_decoder = {PAD_ID + i: t for i, t in enumerate(toks)}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("split_special_tokens", True)  # "<s>" typed in text stays 3 bytes
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("padding_side", "left")
        kwargs.pop("unk_token", None)
        super().__init__(
            pad_token=toks[0],
            bos_token=toks[1],
            eos_token=toks[2],
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )

    # -- vocabulary ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return N_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(N_BYTES)}
        vocab.update({str(t): i for i, t in self._added_tokens_decoder.items()})
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # one token per byte; lone surrogates (from surrogateescape) become the raw bytes they stand for
        return [chr(b) for b in text.encode("utf-8", errors="surrogateescape")]

    def _convert_token_to_id(self, token: str) -> int | None:
        return ord(token) if len(token) == 1 and ord(token) < N_BYTES else None

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index) if 0 <= index < N_BYTES else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._bytes_to_text(bytes(ord(t) for t in tokens if len(t) == 1 and ord(t) < N_BYTES))

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [BOS_ID] if self.add_bos_token else []
        eos = [EOS_ID] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return [1 if i >= N_BYTES else 0 for i in token_ids_0 + (token_ids_1 or [])]
        ids = self.build_inputs_with_special_tokens(
            [0] * len(token_ids_0), None if token_ids_1 is None else [0] * len(token_ids_1)
        )
        return [1 if i >= N_BYTES else 0 for i in ids]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to save

    # -- bytes in, bytes out ---------------------------------------------------------------------------

    def encode_bytes(self, data: bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Raw bytes (any, valid UTF-8 or not) to ids."""
        return ([BOS_ID] if bos else []) + list(bytes(data)) + ([EOS_ID] if eos else [])

    @staticmethod
    def decode_bytes(ids: Any) -> bytes:
        """Ids to raw bytes; specials and padded-vocabulary ids are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < N_BYTES)

    def _bytes_to_text(self, data: bytes, errors: str | None = None) -> str:
        return data.decode("utf-8", errors=errors or "replace")

    def _decode(  # type: ignore[override]
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str = "replace",
        **kwargs: Any,
    ) -> str:
        """Bytes are decoded together (a character split across ids comes out whole); invalid UTF-8 becomes
        U+FFFD (``errors='replace'``), or the raw bytes as lone surrogates with
        ``errors='surrogateescape'``."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < N_BYTES:
                run.append(i)
                continue
            if not skip_special_tokens and i in self._added_tokens_decoder:
                out.append(self._bytes_to_text(bytes(run), errors))
                run.clear()
                out.append(str(self._added_tokens_decoder[i]))
        out.append(self._bytes_to_text(bytes(run), errors))
        return "".join(out)


def build_fast_tokenizer(model_max_length: int = 1024) -> Any:
    """The same tokenizer as a ``tokenizers`` byte-level model (no remote code needed to load it).

    GPT-2's byte-to-unicode table maps each byte to a printable character; a BPE model with those 256
    characters as its vocabulary (byte ``b`` -> id ``b``) and no merges emits one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(N_BYTES)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([_special_tk(PAD_TOKEN), _special_tk(BOS_TOKEN), _special_tk(EOS_TOKEN)])
    tk.encode_special_tokens = True  # literal "<s>" in text is bytes, not BOS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
    return fast


def _special_tk(tok: str) -> Any:
    from tokenizers import AddedToken as TkAddedToken

    return TkAddedToken(tok, special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (the ``ByteLevel`` alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(N_BYTES):
        if b not in bs:
            bs.append(b)
            cs.append(N_BYTES + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))
