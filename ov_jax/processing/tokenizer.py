"""Text tokenizer on the `tokenizers` library, configured from a checkpoint's tokenizer files (no transformers).

Reads ``tokenizer.json`` (the backend pipeline) and ``tokenizer_config.json`` (named special tokens, padding
side, BOS/EOS flags), and reproduces what transformers' fast tokenizer does for LLaVA-OneVision's Qwen2 BPE:
no BOS, special tokens never split, padding done here (left by default for the processor's batches).
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, processors

from ov_jax.hub import checkpoint_file
from ov_jax.processing.files import TOKENIZER_CONFIG_FILE, read_json, read_text

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens exposed to chat templates.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


class UnknownTokenError(ValueError):
    """A token (e.g. a configured image token) that the tokenizer's vocabulary does not hold."""


class TextTokenizer:
    """Encode / decode text with a checkpoint's BPE tokenizer and pad batches to numpy arrays."""

    def __init__(self, backend: Tokenizer, config: Mapping[str, Any] | None = None):
        config = dict(config or {})
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.config = config
        self.special_tokens: dict[str, str] = {
            name: text for name in NAMED_SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None
        }
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):  # named extras, e.g. {"image_token": "<image>"}
            self.special_tokens.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
        self._ensure_added_tokens(config)
        self.padding_side: str = config.get("padding_side") or "right"
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if "add_bos_token" in config or "add_eos_token" in config:
            self._set_bos_eos(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))

    @classmethod
    def from_directory(cls, directory: str | pathlib.Path, config: Mapping[str, Any] | None = None) -> "TextTokenizer":
        """Load ``tokenizer.json`` and (unless ``config`` is given) ``tokenizer_config.json`` from a directory.

        A file that is not UTF-8, not JSON or not a tokenizer, or a config entry that cannot be read, is a
        ``ValueError`` naming the file."""
        directory = pathlib.Path(directory)
        tokenizer_file = checkpoint_file(directory, "tokenizer.json")
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no tokenizer.json; ov_jax reads the fast-tokenizer file only "
                "(re-save the tokenizer with a recent transformers to create it)"
            )
        if config is None:
            config = read_json(directory, TOKENIZER_CONFIG_FILE) or {}
        text = read_text(tokenizer_file)
        try:
            backend = Tokenizer.from_str(text)
        except Exception as err:  # the tokenizers library raises a bare Exception for unreadable files
            raise ValueError(f"{tokenizer_file} is not a tokenizer file the tokenizers library can read: "
                             f"{err}") from None
        try:
            return cls(backend, config)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{directory / TOKENIZER_CONFIG_FILE}: {err}") from None

    def _ensure_added_tokens(self, config: Mapping[str, Any]) -> None:
        """Register special tokens named in the config that tokenizer.json lacks (as transformers does)."""
        wanted: list[AddedToken] = []
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise ValueError(f"added_tokens_decoder must be an object, got "
                             f"{type(decoder).__name__}")
        for entry in decoder.values():
            if (isinstance(entry, Mapping) and isinstance(entry.get("content"), str)
                    and self.backend.token_to_id(entry["content"]) is None):
                wanted.append(AddedToken(entry["content"], special=entry.get("special", True),
                                         lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                         normalized=entry.get("normalized", False),
                                         single_word=entry.get("single_word", False)))
        named = list(self.special_tokens.values())
        extra = config.get("additional_special_tokens") or []
        if isinstance(config.get("extra_special_tokens"), list):
            extra = list(extra) + list(config["extra_special_tokens"])
        for text in named + [_token_text(t) for t in extra]:
            if text and self.backend.token_to_id(text) is None and text not in {t.content for t in wanted}:
                wanted.append(AddedToken(text, special=True, normalized=False))
        if wanted:
            self.backend.add_special_tokens(wanted)

    def _set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        """Rebuild the post-processor from explicit add_bos_token / add_eos_token flags (transformers does)."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, self.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # ------------------------------------------------------------------------------------------- lookups

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise UnknownTokenError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def id_of(self, name: str) -> int | None:
        """Id of a named special token (``"pad_token"``, ``"eos_token"`` ...), or None if the config has none."""
        text = self.special_tokens.get(name)
        return None if text is None else self.token_to_id(text)

    @property
    def pad_token_id(self) -> int | None:
        return self.id_of("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.id_of("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def vocab_size(self) -> int:
        """Size including added tokens (the number of distinct ids the tokenizer can produce)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------ encode / decode

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def pad(
        self,
        batch_ids: Sequence[Sequence[int]],
        *,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` as int64 ``[batch, length]`` arrays.

        ``padding``: True / "longest" pads to the longest row, "max_length" to ``max_length``, False /
        "do_not_pad" requires equal lengths. The pad id comes from the config's ``pad_token``.
        """
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        lengths = [len(ids) for ids in batch_ids]
        if padding in (True, "longest"):
            target = max(lengths, default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            if max(lengths, default=0) > max_length:
                raise ValueError(f"a sequence of {max(lengths)} tokens is longer than max_length={max_length}")
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError(
                    f"sequences have different lengths {lengths}; pass padding=True to pad them into one array"
                )
            target = max(lengths, default=0)
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if pad_to_multiple_of and padding not in (False, None, "do_not_pad"):
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.pad_token_id
        if pad_id is None and any(n < target for n in lengths):
            raise ValueError("cannot pad: tokenizer_config.json defines no pad_token")
        input_ids = np.full((len(batch_ids), target), pad_id if pad_id is not None else 0, dtype=np.int64)
        attention_mask = np.zeros((len(batch_ids), target), dtype=np.int64)
        for row, ids in enumerate(batch_ids):
            span = slice(target - len(ids), target) if side == "left" else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    def decode(self, token_ids: Iterable[int] | np.ndarray | int, skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, (int, np.integer)):
            ids = [int(token_ids)]
        else:
            ids = [int(i) for i in np.asarray(list(token_ids) if not hasattr(token_ids, "shape") else token_ids).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips the WordPiece-era clean-up for BPE models (it would corrupt BPE output).
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences: Iterable[Iterable[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]
