"""BERT WordPiece text tokenizer: loaded from a local vocab.txt, or trained on the captions and cached."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pixelbert.data.errors import DataError
from pixelbert.fileio import write_atomic

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILE = "vocab.txt"
FINGERPRINT_FILE = "vocab.fingerprint"
# Hugging Face's name: BertTokenizer(Fast).from_pretrained takes its do_lower_case (default true).
SETTINGS_FILE = "tokenizer_config.json"
RUN_FOLDER_FILES = (VOCAB_FILE, FINGERPRINT_FILE, SETTINGS_FILE)  # what a run's tokenizer/ folder holds
TRAINER_VERSION = 1  # part of the fingerprint: bump when training settings change


def read_vocab(path: str | Path) -> dict[str, int]:
    """vocab.txt -> {token: line number}, read the way Hugging Face's BertTokenizer reads it."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    return vocab


class TextTokenizer:
    """BERT's normaliser, pre-tokeniser and WordPiece model over a fixed vocabulary."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise DataError(f"the vocabulary lacks the special token(s) {missing}")
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(list(SPECIAL_TOKENS))  # "[MASK]" in text stays one token, as in BERT
        self._tok = tok
        self.vocab_size = max(vocab.values()) + 1
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids: frozenset[int] = frozenset(vocab[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_vocab_file(cls, path: str | Path, lowercase: bool = True) -> "TextTokenizer":
        return cls(read_vocab(path), lowercase)

    def encode(self, text: str, max_len: int) -> list[int]:
        """`[CLS] tokens [SEP]`, tokens cut so the whole is at most `max_len` long."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        ids = self._tok.encode(text, add_special_tokens=False).ids[:max_len - 2]
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens (padding included) left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The vocabulary's word piece of `token_id` ("##" marks one that continues a word)."""
        return self._tok.id_to_token(int(token_id))

    def tokenize(self, text: str) -> list[str]:
        """WordPiece strings of `text`, without [CLS]/[SEP] (for inspection)."""
        return self._tok.encode(text, add_special_tokens=False).tokens


def build_tokenizer(data_cfg, captions: Iterable[str], cache_dir: str | Path, vocab_size: int,
                    shared_cache: str | Path | None = None) -> TextTokenizer:
    """The tokenizer named by `data_cfg.tokenizer`, else one trained on `captions` (cached).

    `data_cfg.tokenizer` may name a folder holding vocab.txt (bert-base-uncased layout) or a
    vocab.txt file (`vocab_size` is not applied to it). Otherwise a WordPiece vocabulary of at
    most `vocab_size` tokens is kept in `cache_dir/vocab.txt` (a run's own copy, which resume
    relies on), reused while the captions and settings hash the same. Training it is not
    deterministic (the `tokenizers` trainer breaks ties differently from run to run), so a new
    vocabulary is first looked up in `shared_cache/<fingerprint>/`, where every run on the same
    captions finds the same one, and trained only when absent there.
    """
    if data_cfg.tokenizer:
        return TextTokenizer.from_vocab_file(_local_vocab(Path(data_cfg.tokenizer)), data_cfg.lowercase)
    captions = list(captions)
    fingerprint = _fingerprint(captions, vocab_size, data_cfg.lowercase)
    cache_dir = Path(cache_dir)
    if not _holds(cache_dir, fingerprint):
        shared = Path(shared_cache).expanduser() / fingerprint[:32] if shared_cache else None
        if shared is not None and _holds(shared, fingerprint):
            vocab = (shared / VOCAB_FILE).read_text().splitlines()
        else:
            vocab = train_vocab(captions, vocab_size, data_cfg.lowercase)
            if shared is not None:
                _store(shared, vocab, fingerprint, data_cfg.lowercase)
        _store(cache_dir, vocab, fingerprint, data_cfg.lowercase)
    return TextTokenizer.from_vocab_file(cache_dir / VOCAB_FILE, data_cfg.lowercase)


def _holds(folder: Path, fingerprint: str) -> bool:
    marker = folder / FINGERPRINT_FILE
    return (folder / VOCAB_FILE).is_file() and marker.is_file() and marker.read_text() == fingerprint


def _store(folder: Path, vocab: list[str], fingerprint: str, lowercase: bool) -> None:
    (folder / FINGERPRINT_FILE).unlink(missing_ok=True)  # a crash below leaves no valid-looking cache
    write_atomic(folder / VOCAB_FILE, "".join(token + "\n" for token in vocab))
    # Its casing, for this engine and for Hugging Face's tokenizers loading the folder.
    write_atomic(folder / SETTINGS_FILE, json.dumps({"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"}))
    write_atomic(folder / FINGERPRINT_FILE, fingerprint)


def train_vocab(captions: list[str], vocab_size: int, lowercase: bool) -> list[str]:
    """Train a WordPiece vocabulary; returns the tokens in id order, specials first."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def _local_vocab(path: Path) -> Path:
    vocab = path / VOCAB_FILE if path.is_dir() else path
    if not vocab.is_file():
        raise FileNotFoundError(f"data.tokenizer: no vocabulary at {vocab} (expected a folder "
                                f"holding {VOCAB_FILE}, or a {VOCAB_FILE} file); leave "
                                f"data.tokenizer null to train one on the captions")
    return vocab


def _fingerprint(captions: list[str], vocab_size: int, lowercase: bool) -> str:
    h = hashlib.sha256(json.dumps({"version": TRAINER_VERSION, "vocab_size": vocab_size,
                                   "lowercase": lowercase, "specials": SPECIAL_TOKENS}).encode())
    for caption in captions:
        data = caption.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: caption boundaries count
        h.update(data)
    return h.hexdigest()


def run_tokenizer(data_cfg, run_dir: str | Path) -> TextTokenizer:
    """The tokenizer a training run used: `data.tokenizer` when set, else the vocabulary the run
    kept in `run_dir/tokenizer/` (fine-tuning, evaluation and visualisation must reuse its ids)."""
    if data_cfg.tokenizer:
        return TextTokenizer.from_vocab_file(_local_vocab(Path(data_cfg.tokenizer)), data_cfg.lowercase)
    vocab = Path(run_dir) / "tokenizer" / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} not found: give the run folder of a training run "
                                "(train.output_dir), or set data.tokenizer")
    made_lowercase = read_casing(vocab.parent)
    if made_lowercase is not None and made_lowercase != data_cfg.lowercase:
        raise DataError(f"data.lowercase={str(data_cfg.lowercase).lower()} but the run's vocabulary {vocab} was "
                        f"made with do_lower_case={str(made_lowercase).lower()}: its ids only fit text cased "
                        f"alike; set data.lowercase={str(made_lowercase).lower()}")
    return TextTokenizer.from_vocab_file(vocab, data_cfg.lowercase)


def read_casing(folder: str | Path) -> bool | None:
    """`do_lower_case` of the folder's tokenizer_config.json; None without one (or without the key)."""
    settings = Path(folder) / SETTINGS_FILE
    if not settings.is_file():
        return None
    lower = json.loads(settings.read_text()).get("do_lower_case")
    return None if lower is None else bool(lower)
