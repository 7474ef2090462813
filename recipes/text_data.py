"""Byte-level text data for the GPT recipe: where the text comes from, how it is split, and caching.

Tokens are raw UTF-8 bytes (vocabulary 256), so nothing is downloaded and any text works. Sources:

- ``None`` (default): the ``*.py`` files of the running Python's standard library (several MB of
  real text present on every machine with Python; ``site-packages`` excluded);
- a text file, or a folder searched recursively for text files (``TEXT_SUFFIXES``);
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (read with ``load_from_disk``).

The split is by file (a file's text never straddles train and validation) and deterministic
(:func:`recipes.splits.split_by_name` over relative paths). A
single file, or a dataset without a validation split, gives its last ``val_fraction`` to
validation. A dataset's training split is ``train`` (else its first split not named like a
validation split, else its first); its validation split is the first of ``validation``, ``valid``,
``test`` that is not the training split. The token arrays are written once to ``cache_dir`` under
a key hashing the file list (paths, sizes, modification times) and split, then memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from recipes.errors import OptionError, RecipeInputError, check_num_workers
from recipes.resumable_shuffle import ResumableTrainData, fingerprint
from recipes.splits import split_by_name

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs",
                 ".json", ".jsonl", ".csv", ".tsv", ".html", ".xml", ".tex", ".yaml", ".yml", ".toml")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HF_VALIDATION_SPLITS = ("validation", "valid", "test")
DOCUMENT_SEPARATOR = b"\n\n"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$LIGHTNING_KRON_CACHE`` or ``~/.cache/lightning_kron``."""
    return Path(os.environ.get("LIGHTNING_KRON_CACHE", Path.home() / ".cache" / "lightning_kron"))


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's root and its ``*.py`` files (sorted), without third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if "site-packages" not in path.parts and "dist-packages" not in path.parts)
    return root, files


@dataclass(frozen=True)
class TextSource:
    """A resolved data source: ``kind`` is "files" or "hf"; ``files`` relative to ``root``."""

    kind: str
    root: Path
    files: tuple[Path, ...]
    label: str


def resolve_text_source(source: Optional[str]) -> TextSource:
    """Check the user's ``source`` and list its files; raise :class:`RecipeInputError` if unusable."""
    if source is None:
        root, files = stdlib_files()
        if not files:
            raise RecipeInputError(f"no *.py files found under the standard library at {root}; name a data path")
        return TextSource("files", root, tuple(files), "python-stdlib")
    path = Path(source).expanduser()
    if not path.exists():
        raise RecipeInputError(f"data path {source!r} does not exist")
    if path.is_file():
        if path.stat().st_size == 0:
            raise RecipeInputError(f"data file {source!r} is empty")
        return TextSource("files", path.parent, (path,), path.name)
    if any((path / marker).is_file() for marker in HF_MARKERS):
        return TextSource("hf", path, tuple(sorted(p for p in path.rglob("*") if p.is_file())), path.name)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and p.stat().st_size)
    if not files:
        raise RecipeInputError(f"data folder {source!r} holds no non-empty text files ({', '.join(TEXT_SUFFIXES[:5])}, ...)")
    return TextSource("files", path, tuple(files), path.name)


def split_by_file(files: tuple[Path, ...], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Training and validation files, chosen by a hash of each file's path relative to ``root``."""
    train, val = split_by_name([path.relative_to(root).as_posix() for path in files], val_fraction)
    return [files[index] for index in train], [files[index] for index in val]


def _join(chunks) -> np.ndarray:
    data = DOCUMENT_SEPARATOR.join(chunks)
    return np.frombuffer(data, dtype=np.uint8).copy()


def _tail_split(data: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(data) - max(1, int(len(data) * val_fraction))
    return data[:cut], data[cut:]


def encode_files(source: TextSource, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation byte arrays of a "files" source."""
    if len(source.files) == 1:
        return _tail_split(_join([source.files[0].read_bytes()]), val_fraction)
    train, val = split_by_file(source.files, source.root, val_fraction)
    return _join(p.read_bytes() for p in train), _join(p.read_bytes() for p in val)


def hf_split_names(names: list[str]) -> tuple[str, Optional[str]]:
    """The training split and the validation split (None: the training split's tail validates) of
    a ``DatasetDict`` with these split names; never the same split for both, which would
    validate on the training text.

    >>> hf_split_names(["test"]), hf_split_names(["validation", "test"]), hf_split_names(["test", "extra"])
    (('test', None), ('validation', 'test'), ('extra', 'test'))
    """
    others = [name for name in names if name not in HF_VALIDATION_SPLITS]
    train = "train" if "train" in names else (others or names)[0]
    val = next((name for name in HF_VALIDATION_SPLITS if name in names and name != train), None)
    return train, val


def encode_hf_dataset(source: TextSource, val_fraction: float, text_field: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation byte arrays of a ``save_to_disk`` folder (``validation``/``test`` split if any)."""
    try:
        import datasets
    except ImportError as error:
        raise RecipeInputError(f"{source.root} is a Hugging Face dataset but the 'datasets' package is not "
                               "installed (pip install datasets)") from error
    loaded = datasets.load_from_disk(str(source.root))
    if isinstance(loaded, datasets.DatasetDict):
        train_name, val_name = hf_split_names(list(loaded))
        train_rows = loaded[train_name]
        val_rows = loaded[val_name] if val_name else None
    else:
        train_rows, val_rows = loaded, None
    if text_field not in train_rows.column_names:
        raise RecipeInputError(f"dataset {source.root} has no column {text_field!r}; columns: {train_rows.column_names}")

    def encode(rows) -> np.ndarray:
        return _join(text.encode("utf-8") for text in rows[text_field] if text)

    if val_rows is None:
        return _tail_split(encode(train_rows), val_fraction)
    return encode(train_rows), encode(val_rows)


def cache_key(source: TextSource, val_fraction: float, text_field: str) -> str:
    """Hash of everything the token arrays depend on; a changed file changes the key."""
    listing = [(p.relative_to(source.root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in source.files]
    payload = json.dumps([CACHE_FORMAT, source.kind, str(source.root), listing, val_fraction, text_field])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_arrays(cache_dir: Path, key: str, build: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Load ``{key}.train.npy``/``{key}.val.npy`` memory-mapped, building and writing them if absent."""
    paths = [cache_dir / f"text-{key}.{split}.npy" for split in ("train", "val")]
    if not all(path.is_file() for path in paths):
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, array in zip(paths, build()):
            partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(partial, array)
            os.replace(partial, path)  # atomic: a crash never leaves a truncated cache entry
    return tuple(np.load(path, mmap_mode="r") for path in paths)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context_length + 1`` bytes: input is ``[:-1]``, target ``[1:]``."""

    def __init__(self, tokens: np.ndarray, context_length: int) -> None:
        self.tokens = tokens
        self.context_length = context_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.context_length
        window = np.asarray(self.tokens[start: start + self.context_length + 1], dtype=np.int64)
        return torch.from_numpy(window)


class TextDataModule(ResumableTrainData, L.LightningDataModule):
    """Byte-level language-modelling data; see the module docstring for sources and splitting.

    Args:
        source: ``None`` (Python's standard library), a text file, a folder of text files, or a
            Hugging Face ``save_to_disk`` folder (needs the ``datasets`` package).
        context_length: tokens per training example (linked to the model's by the CLI).
        batch_size: examples per step.
        val_fraction: share of files (or of the tail of a single text) used for validation.
        val_windows: validation uses this many windows spread evenly over the validation text.
        text_field: the column holding text in a Hugging Face dataset.
        cache_dir: where token arrays are cached (default ``default_cache_dir()``).
        seed: seeds the training shuffle, so every optimizer sees the same batches in the same order.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, source: Optional[str] = None, context_length: int = 128, batch_size: int = 32,
                 val_fraction: float = 0.05, val_windows: int = 256, text_field: str = "text",
                 cache_dir: Optional[str] = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        for option, value in (("context_length", context_length), ("batch_size", batch_size),
                              ("val_windows", val_windows)):
            if value < 1:
                raise OptionError.refused(f"data.{option}", value, "a positive integer")
        if not 0.0 < val_fraction < 1.0:
            raise OptionError.refused("data.val_fraction", val_fraction, "a number strictly between 0 and 1")
        check_num_workers(num_workers)
        self.source = resolve_text_source(source)
        self.context_length, self.batch_size = context_length, batch_size
        self.val_fraction, self.val_windows, self.text_field = val_fraction, val_windows, text_field
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.seed, self.num_workers = seed, num_workers
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        self.data_id: Optional[str] = None  # set by setup: a hash of the training bytes

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        key = cache_key(self.source, self.val_fraction, self.text_field)
        if self.source.kind == "hf":
            build = partial(encode_hf_dataset, self.source, self.val_fraction, self.text_field)
        else:
            build = partial(encode_files, self.source, self.val_fraction)
        return cached_arrays(self.cache_dir, key, build)

    def prepare_data(self) -> None:
        self._arrays()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tokens is not None:
            return
        self.train_tokens, self.val_tokens = self._arrays()
        self.data_id = fingerprint(self.train_tokens)  # once: the loader may be rebuilt every epoch
        needed = self.batch_size * self.context_length + 1
        if len(self.train_tokens) < needed:
            raise RecipeInputError(f"{self.source.label}: {len(self.train_tokens)} training bytes, fewer than one batch "
                                   f"needs ({needed}); use more text or a smaller batch_size/context_length")
        if len(self.val_tokens) <= self.context_length:
            raise RecipeInputError(f"{self.source.label}: {len(self.val_tokens)} validation bytes, fewer than one "
                                   f"window of {self.context_length + 1}; raise val_fraction or add text")

    def train_dataloader(self) -> DataLoader:
        return self.shuffled_loader(ByteWindows(self.train_tokens, self.context_length), self.batch_size,
                                    self.seed, self.num_workers, data_id=self.data_id)

    def val_dataloader(self) -> DataLoader:
        windows = ByteWindows(self.val_tokens, self.context_length)
        chosen = np.unique(np.linspace(0, len(windows) - 1, min(len(windows), self.val_windows)).round().astype(int))
        return DataLoader(Subset(windows, chosen.tolist()), batch_size=self.batch_size, num_workers=self.num_workers)
