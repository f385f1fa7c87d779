"""Training data that runs here without downloads, behind one small loader interface.

A data source implements :class:`DataSource`: ``sample(n, generator) -> (x (n, C, H, W), y (n,) int64)``
(``y`` is all zeros for unconditional data) and ``shape``/``num_classes``; draws depend only on
the generator, so a resumed run sees the same batches. Implementations:

* :class:`Checkerboard`: 2-D points (``(n, 2, 1, 1)``) uniform on the black cells of a board,
  drawn fresh from the generator (infinite data).
* :class:`Digits`: scikit-learn's bundled 8x8 handwritten digits (``load_digits``, shipped inside the
  package), scaled to [-1, 1], class-conditional; a fixed seeded train/test split.
* :class:`TensorSource`: any in-memory ``(x, y)``; :func:`image_folder` (a ``class/xxx.png`` tree)
  and :func:`latent_cache` (a ``torch.save``d ``{"x", "y"}`` of VAE latents, for ImageNet) build one.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch


class DataSource(Protocol):
    shape: tuple[int, int, int]
    num_classes: int

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class Checkerboard:
    """Uniform density on the ``cells x cells`` board's black squares over ``[-half, half]^2``."""

    num_classes = 0
    shape = (2, 1, 1)

    def __init__(self, cells: int = 4, half: float = 2.0):
        if cells < 2 or cells % 2:
            raise ValueError(f"Checkerboard: cells must be even and >= 2, got {cells}")
        self.cells, self.half = cells, half

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cell = 2 * self.half / self.cells
        i = torch.randint(0, self.cells, (n,), generator=generator)
        j = 2 * torch.randint(0, self.cells // 2, (n,), generator=generator) + i % 2  # (i + j) even: black
        ij = torch.stack([i, j], dim=1)
        xy = (ij + torch.rand(n, 2, generator=generator)) * cell - self.half
        return xy.view(n, 2, 1, 1), torch.zeros(n, dtype=torch.long)


class TensorSource:
    """Batches drawn with replacement from fixed tensors ``x (N, C, H, W)`` and ``y (N,)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        if x.dim() != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"TensorSource: need x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y, self.num_classes = x.float(), y.long(), num_classes
        self.shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.x[idx], self.y[idx]


DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, ``split`` ``"train"`` (80%) or ``"test"`` (20%), a fixed seeded
    permutation. Returns ``x (N, 1, 8, 8)`` in [-1, 1] (pixel 0 -> -1, 16 -> 1) and ``y (N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    idx = {"test": perm[:n_test], "train": perm[n_test:]}.get(split)
    if idx is None:
        raise ValueError(f"load_digits_split: split must be 'train' or 'test', got {split!r}")
    return x[idx], y[idx]


class Digits(TensorSource):
    """Class-conditional 8x8 digits (train split), ``x (n, 1, 8, 8)`` in [-1, 1], 10 classes."""

    def __init__(self, split: str = "train"):
        super().__init__(*load_digits_split(split), num_classes=10)


def image_folder(root: str, size: int) -> TensorSource:
    """``root/<class>/<image>`` -> a :class:`TensorSource` of RGB images resized to ``size``,
    scaled to [-1, 1]; classes are the sorted sub-folder names."""
    from PIL import Image

    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            img = Image.open(os.path.join(root, cls, name)).convert("RGB").resize((size, size))
            xs.append(
                torch.tensor(list(img.getdata()), dtype=torch.float32).view(size, size, 3).permute(2, 0, 1) / 127.5 - 1
            )
            ys.append(label)
    if not xs:
        raise ValueError(f"image_folder: no images under {root!r}")
    return TensorSource(torch.stack(xs), torch.tensor(ys), num_classes=len(classes))


def latent_cache(path: str, num_classes: int = 1000) -> TensorSource:
    """A ``torch.save``d dict ``{"x": (N, C, H, W) latents (already scaled), "y": (N,)}``."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"latent_cache: {path!r} does not exist; encode the dataset with your VAE and "
            "torch.save({'x': latents, 'y': labels}, path) first"
        )
    d = torch.load(path, map_location="cpu")
    return TensorSource(d["x"], d["y"], num_classes=num_classes)


def build_data(name: str, **kw) -> DataSource:
    """``"checkerboard"``, ``"digits"``, ``"latents"`` (``path=``) or ``"folder"`` (``path=``, ``size=``)."""
    if name == "checkerboard":
        return Checkerboard(**kw)
    if name == "digits":
        return Digits(**kw)
    if name == "latents":
        return latent_cache(**kw)
    if name == "folder":
        return image_folder(kw["path"], kw["size"])
    raise ValueError(f"unknown data {name!r}; expected checkerboard, digits, latents or folder")
