"""In-memory dataset sources: bundled digits and MNIST-format files, on any fsspec URI. The large
ones (image folders, ImageNet, Parquet) stream: ``genstress_ray.data.streaming``."""

from __future__ import annotations

import gzip
import io
import posixpath

import numpy as np
from PIL import Image

from genstress_ray.data.base import DataError, DatasetSource, split_indices
from genstress_ray.storage import StorageError, filesystem_for, read_bytes

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _as_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4:
        return images
    raise DataError(f"{where}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {images.shape}")


def decode_image(data: bytes, mode: str | None, where: str) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 (C, H, W); ``mode`` "L" or "RGB" (None keeps grey as grey)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from exc
    if mode is None:
        mode = "L" if img.mode in ("1", "L", "I;16", "I") else "RGB"
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_images(blobs, names: list[str], mode: str | None) -> np.ndarray:
    """Decode encoded images into one uint8 NCHW array; the first image fixes the mode and size."""
    images = []
    for data, name in zip(blobs, names):
        images.append(decode_image(data, mode, name))
        mode = mode or ("L" if images[0].shape[0] == 1 else "RGB")
        if images[-1].shape != images[0].shape:
            raise DataError(f"{name}: image shape {images[-1].shape} differs from {names[0]}'s {images[0].shape}; "
                            "all images of a dataset must share one size")
    return np.stack(images).astype(np.uint8)


class DigitsSource(DatasetSource):
    """scikit-learn's bundled 8x8 digits (1,797 images, no files needed): the embedded default."""

    name = "digits"

    def pool(self) -> str:
        return "digits"  # one pool of 1,797 images, carved into the splits

    def _load_split(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        idx = split_indices(len(images), self.split, self.validation_fraction, self.test_fraction, self.seed)
        return images[idx], digits.target[idx], [str(i) for i in range(10)], idx.tolist()


class ScenesSource(DatasetSource):
    """Synthetic street scenes with segmentation masks (no files needed): sky over ground, and one
    object, a red sign or a dark car, whose class is the image's label. For segmentation models under
    test (the counterfactual strategy scores them by mIoU drop against these masks). ``size`` scenes
    of ``side`` x ``side`` RGB pixels make one pool, carved into the splits with ``seed``."""

    name = "scenes"
    CLASSES = ["ground", "sky", "sign", "car"]

    def __init__(self, *args, size: int = 600, side: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        if size < 10 or side < 16:
            raise DataError(f"data.options: the scenes source needs size >= 10 and side >= 16, got {size} and {side}")
        self.size, self.side = size, side

    def pool(self) -> str:
        return f"scenes|{self.size}|{self.side}"

    def _load_split(self):
        rng = np.random.default_rng(12345)  # one pool for every split and seed: the splits carve it
        n, side = self.size, self.side
        images, masks = np.zeros((n, 3, side, side), np.float32), np.zeros((n, side, side), np.uint8)
        labels = rng.integers(2, 4, n)
        for i in range(n):
            horizon = int(rng.integers(side * 3 // 10, side * 6 // 10))
            masks[i, :horizon] = 1
            images[i, :, :horizon] = (np.array([0.35, 0.55, 0.95]) * rng.uniform(0.7, 1.0))[:, None, None]
            images[i, :, horizon:] = rng.uniform(0.35, 0.6)
            if labels[i] == 2:  # a sign: a red square, anywhere
                h = w = side // 4
                colour = [0.9, 0.1, 0.1]
            else:  # a car: a wide dark-blue box, on the ground
                h, w = side // 5, side // 3
                colour = [0.15, 0.2, 0.45]
            top = int(rng.integers(horizon - h // 2 if labels[i] == 3 else 1, side - h))
            left = int(rng.integers(0, side - w))
            masks[i, top:top + h, left:left + w] = labels[i]
            images[i, :, top:top + h, left:left + w] = np.array(colour)[:, None, None]
        images = np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1)
        idx = split_indices(n, self.split, self.validation_fraction, self.test_fraction, self.seed)
        pixels = np.round(images[idx] * 255).astype(np.uint8)
        return pixels, labels[idx], list(self.CLASSES), idx.tolist(), masks[idx]


class MnistSource(DatasetSource):
    """MNIST-format files in one folder (local path or fsspec URI).

    Reads either the original IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``,
    ...) or NumPy archives (``x_train*.npz`` / ``y_train*.npz``, ``x_test*.npz`` / ``y_test*.npz``, first
    array in each). ``test`` reads the test files; ``train`` and ``validation`` are carved out of the
    train files with ``validation_fraction`` and ``seed``.

    ``split_from: test`` (or ``train``) instead carves all three splits out of that one file set with
    ``test_fraction``, ``validation_fraction`` and ``seed``, for a folder that holds only one of them.
    """

    name = "mnist"
    default_class_names = [str(i) for i in range(10)]

    def __init__(self, *args, split_from: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if split_from not in (None, "test", "train"):
            raise DataError(f"data.options.split_from: {split_from!r}; allowed: test, train")
        self.split_from = split_from

    def pool(self) -> str:
        files = self.split_from or ("test" if self.split == "test" else "train")
        return f"{self.name}|{(self.uri or '').rstrip('/')}|{files}"

    def _load_split(self):
        if not self.uri:
            raise DataError(f"data.uri: the {self.name} source needs the folder holding its files")
        if self.split_from:
            images, labels = self._read_pair(self.split_from)
            idx = split_indices(len(images), self.split, self.validation_fraction, self.test_fraction, self.seed)
            return images[idx], labels[idx], self.default_class_names, idx.tolist()
        part = "test" if self.split == "test" else "train"
        images, labels = self._read_pair(part)
        if part == "train":
            idx = split_indices(len(images), self.split, self.validation_fraction, 0.0, self.seed)
        else:
            idx = np.arange(len(images))
        return images[idx], labels[idx], self.default_class_names, idx.tolist()

    def _read_pair(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        fs, root = filesystem_for(self.uri)
        try:
            names = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))
        except (FileNotFoundError, NotADirectoryError, OSError) as exc:
            raise DataError(f"data.uri: cannot list {self.uri!r}: {exc}") from exc
        prefixes = ("t10k", "test") if part == "test" else ("train",)
        npz_x = [n for n in names if n.startswith(f"x_{part}") and n.endswith(".npz")]
        npz_y = [n for n in names if n.startswith(f"y_{part}") and n.endswith(".npz")]
        idx_x = [n for n in names if n.startswith(prefixes) and "-images-idx3-ubyte" in n]
        idx_y = [n for n in names if n.startswith(prefixes) and "-labels-idx1-ubyte" in n]
        if npz_x and npz_y:
            images = self._npz(f"{self.uri.rstrip('/')}/{npz_x[0]}")
            labels = self._npz(f"{self.uri.rstrip('/')}/{npz_y[0]}")
        elif idx_x and idx_y:
            images = self._idx(f"{self.uri.rstrip('/')}/{idx_x[0]}", 3)
            labels = self._idx(f"{self.uri.rstrip('/')}/{idx_y[0]}", 1)
        else:
            raise DataError(f"data.uri: {self.uri!r} has no {part} image+label pair "
                            f"(looked for x_{part}*.npz + y_{part}*.npz or {'/'.join(prefixes)}-images/labels-idx*-ubyte[.gz]); "
                            f"it holds: {', '.join(names) or 'nothing'}")
        if len(images) != len(labels):
            raise DataError(f"data.uri: {self.uri!r} {part} files hold {len(images)} images but {len(labels)} labels")
        return _as_nchw(images.astype(np.uint8), self.uri), labels.astype(np.int64)

    @staticmethod
    def _idx(uri: str, ndim: int) -> np.ndarray:
        try:
            raw = read_bytes(uri)
            data = gzip.decompress(raw) if uri.endswith(".gz") else raw
        except (StorageError, OSError, EOFError) as exc:
            raise DataError(f"{uri}: cannot read IDX file ({exc})") from exc
        magic = int.from_bytes(data[:4], "big")
        if magic != 0x0800 + ndim:
            raise DataError(f"{uri}: not an IDX uint8 file of {ndim} dimension(s) (magic {magic:#010x})")
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(dims)):
            raise DataError(f"{uri}: IDX header says {dims} but the file holds {body.size} values")
        return body.reshape(dims)

    @staticmethod
    def _npz(uri: str) -> np.ndarray:
        try:
            with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as archive:
                return archive[archive.files[0]]
        except (StorageError, OSError, ValueError) as exc:
            raise DataError(f"{uri}: cannot read .npz ({exc})") from exc


class FashionMnistSource(MnistSource):
    """Fashion-MNIST in the same file formats as MNIST, with its ten class names."""

    name = "fashion_mnist"
    default_class_names = FASHION_MNIST_CLASSES
