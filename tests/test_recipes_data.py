"""Data modules: deterministic splits, caching, identical batch order per seed, clear bad-path errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes import text_data
from recipes.errors import RecipeInputError
from recipes.image_data import ImageDataModule
from recipes.splits import split_by_name
from recipes.text_data import (
    TextDataModule,
    resolve_text_source,
    split_by_file,
    stdlib_files,
)

TEXT_FOLDER = Path(json.__file__).parent


def text_module(tmp_path, source=str(TEXT_FOLDER), **kwargs) -> TextDataModule:
    module = TextDataModule(source=source, context_length=16, batch_size=4, cache_dir=str(tmp_path / "cache"), **kwargs)
    module.setup()
    return module


# ----------------------------------------------------------------------------- text
def test_stdlib_default_lists_standard_library_sources_only():
    root, files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(path.suffix == ".py" and "site-packages" not in path.parts for path in files)
    assert root / "json" / "decoder.py" in files


def test_file_split_is_deterministic_and_disjoint():
    source = resolve_text_source(str(TEXT_FOLDER))
    train, val = split_by_file(source.files, source.root, 0.2)
    assert (train, val) == split_by_file(source.files, source.root, 0.2)
    assert len(val) == 1 and not set(train) & set(val) and set(train) | set(val) == set(source.files)
    # an item keeps its side when another item is added
    names = [f"f{i}.py" for i in range(50)]
    _, val_before = split_by_name(names, 0.1)
    _, val_after = split_by_name(names + ["new.py"], 0.1)
    assert {names[i] for i in val_before} <= {(names + ["new.py"])[i] for i in val_after} | {"new.py"}
    assert len(set(val_before) & set(val_after)) >= len(val_before) - 1


def test_text_tokens_are_the_files_bytes_split_by_file(tmp_path):
    module = text_module(tmp_path, val_fraction=0.2)
    train, val = split_by_file(module.source.files, module.source.root, 0.2)
    assert bytes(module.val_tokens) == val[0].read_bytes()
    assert len(module.train_tokens) == sum(p.stat().st_size for p in train) + 2 * (len(train) - 1)


def test_single_file_gives_its_tail_to_validation(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(256)) * 8)
    module = text_module(tmp_path, source=str(path), val_fraction=0.25)
    assert len(module.val_tokens) == 512 and bytes(module.val_tokens) == path.read_bytes()[-512:]


def test_tokens_are_cached_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(4):
        (corpus / f"part{index}.txt").write_text(f"document {index} " * 100)
    first = text_module(tmp_path, source=str(corpus))
    calls = []
    original = text_data.encode_files
    monkeypatch.setattr(text_data, "encode_files", lambda *a: calls.append(1) or original(*a))
    again = text_module(tmp_path, source=str(corpus))
    assert not calls and np.array_equal(first.train_tokens, again.train_tokens)
    (corpus / "part0.txt").write_text("changed " * 100)
    changed = text_module(tmp_path, source=str(corpus))
    assert calls == [1] and b"changed" in bytes(changed.train_tokens) + bytes(changed.val_tokens)


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    def first_batches(seed):
        loader = text_module(tmp_path, seed=seed).train_dataloader()
        return [batch for batch, _ in zip(loader, range(3))]

    torch.manual_seed(123)  # the global RNG must not matter
    a = first_batches(0)
    torch.manual_seed(456)
    assert all(torch.equal(x, y) for x, y in zip(a, first_batches(0)))
    assert not all(torch.equal(x, y) for x, y in zip(a, first_batches(1)))
    assert a[0].shape == (4, 17) and torch.equal(a[0][:, 1:], a[0][:, 1:])


def test_validation_windows_are_fixed_and_spread(tmp_path):
    module = text_module(tmp_path, val_windows=5)
    batches = list(module.val_dataloader())
    assert sum(len(b) for b in batches) == 5
    assert torch.equal(torch.cat(batches), torch.cat(list(module.val_dataloader())))


def bad_path(root: Path, kind: str) -> str:
    """A path of the named unusable kind under ``root``."""
    target = root / kind
    if kind == "empty_file.txt":
        target.write_text("")
    elif kind in ("empty_folder", "images_only", "no_classes"):
        target.mkdir()
        if kind == "images_only":
            (target / "a.png").write_bytes(b"not text")
    elif kind == "text.txt":
        target.write_text("hello")
    elif kind == "bad.npz":
        np.savez(target, pixels=np.zeros((2, 2, 2)))
    return str(target)


@pytest.mark.parametrize("kind, message", [
    ("missing.txt", "does not exist"),
    ("empty_file.txt", "is empty"),
    ("empty_folder", "holds no non-empty text files"),
    ("images_only", "holds no non-empty text files"),
])
def test_text_source_rejects_bad_paths_before_training(tmp_path, kind, message):
    with pytest.raises(RecipeInputError, match=message):
        TextDataModule(source=bad_path(tmp_path, kind), cache_dir=str(tmp_path / "cache"))


def test_text_too_short_for_one_batch_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("x" * 40)
    module = TextDataModule(source=str(tmp_path / "tiny.txt"), context_length=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    with pytest.raises(RecipeInputError, match="fewer than one batch"):
        module.setup()


def test_hugging_face_folder_without_datasets_package_is_explained(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    module = TextDataModule(source=str(folder), cache_dir=str(tmp_path / "cache"))
    assert module.source.kind == "hf"
    with pytest.raises(RecipeInputError, match="'datasets' package is not installed"):
        module.setup()


class FakeDatasetDict(dict):
    """What ``datasets.load_from_disk`` returns for a saved ``DatasetDict`` (the package is optional)."""


class FakeSplit:
    def __init__(self, texts: list[str]) -> None:
        self.texts, self.column_names = texts, ["text"]

    def __getitem__(self, column: str) -> list[str]:
        return self.texts


def hf_folder_with(tmp_path, monkeypatch, splits: dict[str, list[str]]) -> str:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("{}")
    fake = type(sys)("datasets")
    fake.DatasetDict, fake.load_from_disk = FakeDatasetDict, lambda path: FakeDatasetDict(
        {name: FakeSplit(texts) for name, texts in splits.items()})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return str(folder)


@pytest.mark.parametrize("splits, train_text, val_text", [
    ({"test": ["alpha " * 200]}, None, None),  # one split: its tail validates, as for a single file
    ({"validation": ["gamma " * 200], "test": ["delta " * 200]}, "gamma", "delta"),
    ({"test": ["delta " * 200], "extra": ["omega " * 200]}, "omega", "delta"),
])
def test_a_hugging_face_dataset_never_validates_on_its_training_split(splits, train_text, val_text, tmp_path, monkeypatch):
    """Without a "train" split the first split trained, and "test" (or "validation") validated,
    even when it was that same split: validation loss was training loss."""
    module = text_module(tmp_path, source=hf_folder_with(tmp_path, monkeypatch, splits), val_fraction=0.1)
    train, val = bytes(module.train_tokens), bytes(module.val_tokens)
    if train_text is None:
        whole = text_data._join([text.encode() for text in next(iter(splits.values()))])
        assert train + val == bytes(whole) and len(val) == int(len(whole) * 0.1)
    else:
        assert train.startswith(train_text.encode()) and val.startswith(val_text.encode())


# ----------------------------------------------------------------------------- images
def write_image_folder(root: Path, per_class: int = 6) -> Path:
    from PIL import Image

    for label, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (10 + index, 12), colour).save(folder / f"{index}.png")
    (root / "notes").mkdir()  # a folder without images is not a class
    (root / "notes" / "readme.txt").write_text("not an image")
    return root


def test_digits_default_split_is_deterministic():
    first, second = ImageDataModule(image_size=12), ImageDataModule(image_size=12, seed=5)
    first.setup(), second.setup()
    assert (first.num_classes, first.channels) == (10, 1)
    assert len(first.train_set) + len(first.val_set) == 1797 and len(first.val_set) == 360
    assert torch.equal(first.val_set.tensors[1], second.val_set.tensors[1])
    assert first.train_set.tensors[0].shape[1:] == (1, 12, 12)
    assert abs(float(first.train_set.tensors[0].mean())) < 1e-4  # standardised on the training set


def test_image_folder_classes_channels_and_split(tmp_path):
    root = write_image_folder(tmp_path / "images")
    module = ImageDataModule(source=str(root), image_size=8, batch_size=4, val_fraction=0.25)
    assert module.class_names == ["class_0", "class_1", "class_2"] and module.channels == 3
    module.setup()
    assert len(module.train_set) == 13 and len(module.val_set) == 5
    images, labels = module.train_set.tensors
    assert images.shape[1:] == (3, 8, 8) and set(labels.tolist()) <= {0, 1, 2}
    grey = ImageDataModule(source=str(root), image_size=8, batch_size=4, grayscale=True)
    assert grey.channels == 1


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 6, 6, 3), dtype=np.uint8)
    arrays = {"nhw": images[..., 0], "nhwc": images, "nchw": images.transpose(0, 3, 1, 2)}[layout]
    np.savez(tmp_path / "data.npz", x=arrays, y=np.arange(40) % 4)
    module = ImageDataModule(source=str(tmp_path / "data.npz"), image_size=6, batch_size=8)
    assert module.num_classes == 4 and module.channels == (1 if layout == "nhw" else 3)
    module.setup()
    assert len(module.train_set) == 32 and module.train_set.tensors[0].shape[1:] == (module.channels, 6, 6)


def tiny_rgb_npz(path: Path, **extra) -> tuple[str, np.ndarray]:
    """40 RGB images of 4x4 pixels, channels last: shape (40, 4, 4, 3), where dim 1 could be channels too."""
    images = np.random.default_rng(0).integers(0, 255, size=(40, 4, 4, 3), dtype=np.uint8)
    np.savez(path, x=images, y=np.arange(40) % 4, **extra)
    return str(path), images


def test_npz_images_whose_layout_the_shape_cannot_tell_are_refused_or_read_as_the_file_says(tmp_path):
    """(40, 4, 4, 3) used to be read as 4-channel 4x3 images, its pixels scrambled, without a word."""
    ambiguous, _ = tiny_rgb_npz(tmp_path / "ambiguous.npz")
    with pytest.raises(RecipeInputError, match=r"shape \(40, 4, 4, 3\) could be \[N,C,H,W\] or \[N,H,W,C\]; "
                                               r"say which in the file, e.g. .*layout='NHWC'"):
        ImageDataModule(source=ambiguous)
    said, images = tiny_rgb_npz(tmp_path / "said.npz", layout="NHWC")
    module = ImageDataModule(source=said, image_size=4, batch_size=8)
    assert module.channels == 3
    read = module._npz[0]
    assert read.shape == (40, 3, 4, 4) and torch.equal(read, torch.as_tensor(images).permute(0, 3, 1, 2) / 255.0)
    channels_first, _ = tiny_rgb_npz(tmp_path / "first.npz", layout="NCHW")
    assert ImageDataModule(source=channels_first, image_size=4).channels == 4
    with pytest.raises(RecipeInputError, match="layout must be one of NHWC, NCHW, got 'HWC'"):
        ImageDataModule(source=tiny_rgb_npz(tmp_path / "typo.npz", layout="HWC")[0])


def test_an_unreadable_image_in_a_folder_is_named(tmp_path):
    """PIL's UnidentifiedImageError (an OSError) used to escape the CLI's one-line errors as a traceback."""
    root = write_image_folder(tmp_path / "images")
    (root / "class_1" / "broken.png").write_bytes(b"not a png")
    module = ImageDataModule(source=str(root), image_size=8, batch_size=4)
    with pytest.raises(RecipeInputError, match=r"class_1/broken.png: not a readable image \(cannot identify image file"):
        module.setup()


def test_npz_with_own_validation_split(tmp_path):
    np.savez(tmp_path / "data.npz", images=np.zeros((20, 4, 4)), labels=np.zeros(20), x_val=np.ones((5, 4, 4)), y_val=np.ones(5))
    module = ImageDataModule(source=str(tmp_path / "data.npz"), image_size=4, batch_size=4)
    module.setup()
    assert (len(module.train_set), len(module.val_set), module.num_classes) == (20, 5, 2)


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("no_classes", "holds no images"),
    ("text.txt", "neither a folder"),
    ("bad.npz", "no image array"),
])
def test_image_source_rejects_bad_paths_before_training(tmp_path, kind, message):
    with pytest.raises(RecipeInputError, match=message):
        ImageDataModule(source=bad_path(tmp_path, kind))
