"""Image classification data for the vision recipe, held in memory as float tensors.

Sources:

- ``None`` (default): scikit-learn's bundled handwritten digits (1,797 real 8x8 greyscale images,
  10 classes, no download), upsampled to ``image_size``;
- a folder in ImageFolder layout, ``root/<class name>/<image>`` (read with PIL; converted to RGB,
  or greyscale with ``grayscale=True``); split by a hash of each file's path;
- an ``.npz`` file with images under ``x`` (or ``images``) and integer labels under ``y`` (or
  ``labels``), laid out ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in 1, 3, 4 for
  channels-last; optional ``x_val`` and ``y_val`` give the validation set, otherwise a fixed-seed
  split is used. The layout is read from the shape; where both dim 1 and the last dim could be
  channels (``[N, 4, 4, 3]``: 4x4 RGB or 4-channel 4x3?) the file must say which, with a ``layout``
  entry of ``"NHWC"`` or ``"NCHW"`` (``np.savez(path, x=..., y=..., layout="NHWC")``).

Images are resized to ``image_size`` and standardised with the training set's per-channel mean and
standard deviation. No augmentation: the default runs are a few hundred steps, too short for it to
pay for its CPU time. Everything is loaded into memory, which suits small and medium datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from recipes.errors import OptionError, RecipeInputError, check_num_workers
from recipes.resumable_shuffle import ResumableTrainData, fingerprint
from recipes.splits import split_by_name, split_by_position

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NPZ_IMAGE_KEYS = ("x", "images", "X")
NPZ_LABEL_KEYS = ("y", "labels", "Y")
CHANNEL_COUNTS = (1, 3, 4)  # what a channels-last last dim may be (grey, RGB, RGBA)
NPZ_LAYOUTS = ("NHWC", "NCHW")


def image_folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders holding images) and ``(file, class index)`` pairs."""
    classes, items = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            items += [(path, len(classes)) for path in files]
            classes.append(folder.name)
    return classes, items


def _npz_array(arrays, keys: tuple[str, ...], path: Path, what: str) -> np.ndarray:
    for key in keys:
        if key in arrays:
            return arrays[key]
    raise RecipeInputError(f"{path} has no {what} array (expected one of {', '.join(keys)}; found {', '.join(arrays.files)})")


def _npz_layout(arrays, path: Path) -> Optional[str]:
    """The file's own ``layout`` entry ("NHWC" or "NCHW"), if it has one."""
    if "layout" not in arrays:
        return None
    layout = str(arrays["layout"]).upper()
    if layout not in NPZ_LAYOUTS:
        raise RecipeInputError(f"{path}: layout must be one of {', '.join(NPZ_LAYOUTS)}, got {str(arrays['layout'])!r}")
    return layout


def _channels_last(shape: tuple, path: Path, layout: Optional[str]) -> bool:
    """Whether 4-D images are ``[N, H, W, C]``: said by ``layout``, else read from the shape, and
    refused where both dim 1 and the last dim could be the channels (reading a 4x4 RGB image as a
    4-channel 4x3 one scrambles its pixels without an error)."""
    if layout is not None:
        return layout == "NHWC"
    last, first = shape[-1] in CHANNEL_COUNTS, shape[1] in CHANNEL_COUNTS
    if last and first:
        raise RecipeInputError(f"{path}: images of shape {tuple(shape)} could be [N,C,H,W] or [N,H,W,C]; say which "
                               "in the file, e.g. np.savez(path, x=..., y=..., layout='NHWC')")
    return last


def _as_nchw(images: np.ndarray, path: Path, layout: Optional[str] = None) -> torch.Tensor:
    """Float ``[N, C, H, W]`` in [0, 1] from the layouts the module docstring lists."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise RecipeInputError(f"{path}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {array.shape}")
    elif _channels_last(array.shape, path, layout):
        array = array.transpose(0, 3, 1, 2)
    tensor = torch.as_tensor(np.ascontiguousarray(array)).float()
    return tensor / 255.0 if array.dtype == np.uint8 else tensor


def _labels(values: np.ndarray, path: Path) -> torch.Tensor:
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):  # .long() would truncate 0.7 to class 0
        fractional = values[np.mod(values, 1) != 0]  # NaN counts as fractional
        if fractional.size:
            raise RecipeInputError(f"{path}: labels must be class indices (whole numbers), got {values.dtype} "
                                   f"values such as {np.round(fractional[:3], 4).tolist()}")
    elif not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise RecipeInputError(f"{path}: labels must be class indices (integers), got an array of {values.dtype}")
    labels = torch.as_tensor(values).long().flatten()
    if labels.numel() and labels.min() < 0:
        raise RecipeInputError(f"{path}: labels must be non-negative integers")
    return labels


class ImageDataModule(ResumableTrainData, L.LightningDataModule):
    """Images and labels for :class:`recipes.vision.ImageClassifier` (see the module docstring).

    ``num_classes`` and ``channels`` are known right after construction (the CLI links them to the
    model), so a bad path or an empty folder fails before any training starts.

    Args:
        source: ``None`` (scikit-learn digits), an ImageFolder-style folder, or an ``.npz`` file.
        image_size: side length the images are resized to.
        batch_size: examples per step.
        val_fraction: share held out for validation when the source has no validation split.
        grayscale: read folder images as one-channel greyscale instead of RGB.
        seed: seeds the training shuffle (identical batch order for every optimizer).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, source: Optional[str] = None, image_size: int = 32, batch_size: int = 64,
                 val_fraction: float = 0.2, grayscale: bool = False, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if image_size < 4:
            raise OptionError.refused("data.image_size", image_size, "an integer >= 4")
        if batch_size < 1:
            raise OptionError.refused("data.batch_size", batch_size, "a positive integer")
        if not 0.0 < val_fraction < 1.0:
            raise OptionError.refused("data.val_fraction", val_fraction, "a number strictly between 0 and 1")
        check_num_workers(num_workers)
        self.image_size, self.batch_size, self.val_fraction = image_size, batch_size, val_fraction
        self.grayscale, self.seed, self.num_workers = grayscale, seed, num_workers
        self.path = None if source is None else Path(source).expanduser()
        self._folder_items: list[tuple[Path, int]] = []
        self._npz: Optional[tuple] = None
        self.kind, self.class_names, self.channels = self._inspect(source)
        self.num_classes = len(self.class_names)
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.data_id: Optional[str] = None  # set by setup: a hash of the training set

    def _inspect(self, source: Optional[str]) -> tuple[str, list[str], int]:
        """Kind of source, class names and channel count; refuses unusable paths."""
        if self.path is None:
            return "digits", [str(digit) for digit in range(10)], 1
        if not self.path.exists():
            raise RecipeInputError(f"data path {source!r} does not exist")
        if self.path.is_dir():
            classes, items = image_folder_files(self.path)
            if not items:
                raise RecipeInputError(f"data folder {source!r} holds no images in class sub-folders "
                                       f"(expected <class>/<image>{IMAGE_SUFFIXES[0]} and similar)")
            self._folder_items = items
            return "folder", classes, 1 if self.grayscale else 3
        if self.path.suffix != ".npz":
            raise RecipeInputError(f"data path {source!r} is neither a folder of class sub-folders nor an .npz file")
        if self.path.stat().st_size == 0:
            raise RecipeInputError(f"data file {source!r} is empty")
        self._npz = self._read_npz()
        labels = torch.cat([self._npz[1], self._npz[3]]) if self._npz[3] is not None else self._npz[1]
        return "npz", [str(index) for index in range(int(labels.max()) + 1)], self._npz[0].shape[1]

    def _read_npz(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        with np.load(self.path) as arrays:
            layout = _npz_layout(arrays, self.path)
            images = _as_nchw(_npz_array(arrays, NPZ_IMAGE_KEYS, self.path, "image"), self.path, layout)
            labels = _labels(_npz_array(arrays, NPZ_LABEL_KEYS, self.path, "label"), self.path)
            val_images = _as_nchw(arrays["x_val"], self.path, layout) if "x_val" in arrays else None
            val_labels = _labels(arrays["y_val"], self.path) if "y_val" in arrays else None
        if len(images) != len(labels) or len(images) == 0:
            raise RecipeInputError(f"{self.path}: {len(images)} images but {len(labels)} labels")
        if (val_images is None) != (val_labels is None):
            raise RecipeInputError(f"{self.path}: x_val and y_val come together (one of them is missing)")
        if val_images is not None:
            if val_images.shape[1] != images.shape[1]:  # sizes may differ: both are resized to image_size
                raise RecipeInputError(f"{self.path}: x_val images have {val_images.shape[1]} channels, the "
                                       f"training images {images.shape[1]}")
            if len(val_images) != len(val_labels) or len(val_images) == 0:
                raise RecipeInputError(f"{self.path}: {len(val_images)} x_val images but {len(val_labels)} y_val labels")
        for name, array in (("images", images), ("x_val", val_images)):
            if array is not None and not torch.isfinite(array).all():
                raise RecipeInputError(f"{self.path}: {name} hold NaN or infinite pixel values")
        return images, labels, val_images, val_labels

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train images, train labels, validation images, validation labels (before resizing)."""
        if self.kind == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
            labels = torch.as_tensor(digits.target).long()
            train, val = split_by_position(len(labels), self.val_fraction)
            return images[train], labels[train], images[val], labels[val]
        if self.kind == "folder":
            names = [path.relative_to(self.path).as_posix() for path, _ in self._folder_items]
            images = torch.stack([self._read_image(path) for path, _ in self._folder_items])
            labels = torch.tensor([label for _, label in self._folder_items])
            train, val = split_by_name(names, self.val_fraction)
            return images[train], labels[train], images[val], labels[val]
        images, labels, val_images, val_labels = self._npz
        if val_images is not None and val_labels is not None:
            return images, labels, val_images, val_labels
        train, val = split_by_position(len(labels), self.val_fraction)
        return images[train], labels[train], images[val], labels[val]

    def _read_image(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:  # PIL raises an OSError (UnidentifiedImageError) for a corrupt file or a non-image one
            with Image.open(path) as image:
                image = image.convert("L" if self.grayscale else "RGB").resize((self.image_size, self.image_size))
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as error:
            raise RecipeInputError(f"{path}: not a readable image ({error})") from error
        return torch.as_tensor(array).reshape(self.image_size, self.image_size, -1).permute(2, 0, 1)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=images.shape[-1] > self.image_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, val_x, val_y = self._load()
        # hashed as loaded: resizing and normalising round differently on other CPUs
        self.data_id = fingerprint(train_x, train_y)
        train_x, val_x = self._resize(train_x), self._resize(val_x)
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        if len(train_y) < self.batch_size:
            raise RecipeInputError(f"{len(train_y)} training images, fewer than one batch of {self.batch_size}")
        self.train_set = TensorDataset((train_x - mean) / std, train_y)
        self.val_set = TensorDataset((val_x - mean) / std, val_y)

    def train_dataloader(self) -> DataLoader:
        return self.shuffled_loader(self.train_set, self.batch_size, self.seed, self.num_workers, data_id=self.data_id)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
