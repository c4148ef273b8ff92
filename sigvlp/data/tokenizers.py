"""Tokenizers: text -> token ids for the text tower.

``ByteTokenizer`` (UTF-8 bytes, no vocabulary file), ``WordTokenizer`` (a fixed word list, the
``tokenizers`` library's WordLevel model), ``HFTokenizer`` (a local Hugging Face tokenizer
folder) and ``load_tokenizer`` (the one a SigVLPConfig's ``tokenizer`` / ``vocab`` name). Each
has ``encode(text, max_tokens) -> [BOS, ..., EOS]`` ids (truncated to max_tokens including BOS
and EOS), ``decode(ids)`` and ``vocab_size``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "WordTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text. ids 0..2 are PAD, BOS, EOS."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET

    def encode(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        if max_tokens is not None:
            ids = ids[: max(max_tokens - 2, 0)]
        return [self.BOS, *ids, self.EOS]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never downloads).

    A folder with a ``tokenizer.json`` is read with the ``tokenizers`` library (no transformers):
    ids as its post-processor makes them (its special tokens), truncated to max_tokens, never
    padded (any padding saved in the file is turned off). The text is lower-cased first when the
    folder declares it (``lowercase``): ``do_lower_case: true`` in tokenizer_config.json, a
    lower-casing tokenizer class there (SiglipTokenizer, Siglip2Tokenizer), or a SigLIP model
    folder (config.json model_type "siglip"/"siglip2") with Gemma's tokenizer: SigLIP-2, whose
    paper lower-cases every text (its published folders name the plain GemmaTokenizer class).
    A folder without tokenizer.json (a SentencePiece-only slow tokenizer) needs transformers'
    AutoTokenizer. Missing folder: FileNotFoundError."""

    LOWERCASE_CLASSES = ("SiglipTokenizer", "Siglip2Tokenizer")

    def __init__(self, path):
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: no such tokenizer folder")
        self.lowercase = self.declares_lowercase(folder)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer  # imported on use: its import cost is paid only by HF folders

            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.tok.no_padding()
            self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
            self._fast, self._truncation = True, -1  # truncation unknown: set on the first encode
            return
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(f"{path}: no tokenizer.json; reading this tokenizer folder needs the 'transformers' "
                              "package (the byte and word tokenizers do not)") from e
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.tok)
        self._fast = False

    @classmethod
    def declares_lowercase(cls, folder) -> bool:
        """Whether the tokenizer folder's files ask for lower-cased text (see the class docstring)."""
        def read(name):
            try:
                d = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                return {}
            return d if isinstance(d, dict) else {}

        tok_cfg, model_cfg = read("tokenizer_config.json"), read("config.json")
        cls_name = str(tok_cfg.get("tokenizer_class") or "").removesuffix("Fast")
        siglip2 = model_cfg.get("model_type") in ("siglip", "siglip2") and cls_name == "GemmaTokenizer"
        return tok_cfg.get("do_lower_case") is True or cls_name in cls.LOWERCASE_CLASSES or siglip2

    def encode(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if self.lowercase:
            text = text.lower()
        if self._fast:  # a tokenizers.Tokenizer
            if max_tokens != self._truncation:
                if max_tokens is None:
                    self.tok.no_truncation()
                else:
                    self.tok.enable_truncation(max_tokens)
                self._truncation = max_tokens
            return list(self.tok.encode(text).ids)
        return list(self.tok(text, truncation=max_tokens is not None, max_length=max_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class WordTokenizer:
    """Words as tokens: a fixed vocabulary of lowercased words and punctuation marks (the Hugging
    Face ``tokenizers`` library's WordLevel model: NFKC, lowercase, split on ``\\w+|[^\\w\\s]+``).

    ids 0..3 are PAD, BOS, EOS, UNK (a word outside the vocabulary); ``vocab[i]`` has id i + 4.
    A report of a few hundred characters is a few dozen tokens instead of as many bytes, and each
    finding's name is its own token(s) from the start. Build the word list from a corpus with
    ``WordTokenizer.build_vocab`` (``sigvlp train`` does, for ``SigVLPConfig(tokenizer="word")``,
    from the training reports and the prompt statements; the list is stored in the model config).
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")

    def __init__(self, vocab: Sequence[str]):
        if not isinstance(vocab, (list, tuple)) or not all(isinstance(w, str) and w for w in vocab):
            raise TypeError(f"vocab: expected a list or tuple of non-empty strings, got {type(vocab).__name__}")
        words = list(vocab)
        if not words or len(set(words)) != len(words) or set(words) & set(self.SPECIALS):
            raise ValueError("vocab: expected a non-empty list of distinct words, none of them a special token "
                             + str(self.SPECIALS))
        self.vocab = tuple(words)
        self.vocab_size = len(words) + len(self.SPECIALS)
        self._tok = self._make(dict((w, i) for i, w in enumerate((*self.SPECIALS, *words))))
        # every entry must be a token the splitter can produce, or it would never match
        odd = [w for w in words if [t for t, _ in self._tok.pre_tokenizer.pre_tokenize_str(
            self._tok.normalizer.normalize_str(w))] != [w]]
        if odd:
            raise ValueError(f"vocab: entries must be single lowercased NFKC words or punctuation runs (what the "
                             f"tokenizer splits text into); these never match: {odd[:5]}")

    @classmethod
    def _make(cls, vocab: Optional[dict]):
        try:  # optional dependency: only the word tokenizer needs the tokenizers package
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        except ImportError as e:
            raise ImportError("the word tokenizer needs the 'tokenizers' package (pip install tokenizers); "
                              "the byte tokenizer does not") from e
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return tok

    @classmethod
    def build_vocab(cls, texts, min_frequency: int = 1) -> tuple[str, ...]:
        """The word list of a corpus (iterable of str; other items are skipped): every token seen at
        least min_frequency times, most frequent first (ties in lexical order, so the list depends
        only on the corpus)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts: expected an iterable of strings, got a single string")
        if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
            raise ValueError(f"min_frequency: expected an integer >= 1, got {min_frequency!r}")
        from tokenizers import trainers  # optional dependency (checked by _make above)

        tok = cls._make(None)
        trainer = trainers.WordLevelTrainer(special_tokens=list(cls.SPECIALS), min_frequency=min_frequency,
                                            show_progress=False)
        tok.train_from_iterator((t for t in texts if isinstance(t, str)), trainer)
        ids = tok.get_vocab()
        return tuple(w for w, _ in sorted(ids.items(), key=lambda kv: kv[1]) if w not in cls.SPECIALS)

    def encode(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if max_tokens is not None:
            ids = ids[: max(max_tokens - 2, 0)]
        return [self.BOS, *ids, self.EOS]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i - 4] if 4 <= i < self.vocab_size else "[UNK]" for i in ids
                        if i >= self.UNK)


def load_tokenizer(spec=None, vocab: Optional[Sequence[str]] = None):
    """None or "byte": ByteTokenizer; "word": WordTokenizer(vocab); a folder path: HFTokenizer."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if spec == "word":
        if not vocab:
            raise ValueError("vocab: the 'word' tokenizer needs its word list (SigVLPConfig.vocab; sigvlp train "
                             "builds it from the training texts)")
        return WordTokenizer(vocab)
    return HFTokenizer(spec)
