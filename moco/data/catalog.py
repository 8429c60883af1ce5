"""What each dataset consists of: file names, checksums, download addresses, classes, normalisation constants.

Everything here is immutable data. The checksums come from ``shared/data/MD5SUMS`` and ``shared/data/README.md``:

* ``gz_md5`` is the MD5 of the published ``.gz`` file (the values torchvision checks for MNIST/Fashion-MNIST).
* ``raw_md5`` is the MD5 of the uncompressed content. For CIFAR-10 these are the published MD5s of the original
  ``.bin`` batch files (the only published ones: the ``.gz`` copies in ``shared/data`` were made locally). For the IDX
  files they were computed by gunzipping the verified originals (the Fashion-MNIST image values are also stated in
  the README), so an uncompressed copy of a file (torchvision keeps one next to the ``.gz``) can be verified too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CIFAR10", "CIFAR10_ARCHIVE_FOLDER", "CIFAR10_ARCHIVE_MD5", "CIFAR10_ARCHIVE_URL",
    "CIFAR10_RECORD_BYTES", "DATASETS", "DatasetSpec", "FASHION_MNIST", "FASHION_MNIST_MIRRORS", "FileSpec",
    "MNIST", "MNIST_MIRRORS",
]

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
CIFAR10_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE_FOLDER = "cifar-10-batches-bin"  # folder inside the archive holding the batch files

CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # 1 label byte, then the R, G and B planes (32x32, row-major each)


@dataclass(frozen=True)
class FileSpec:
    """One dataset file.

    ``name`` is the uncompressed file name (``train-images-idx3-ubyte``, ``data_batch_1.bin``); on disk it may also
    carry a ``.gz`` suffix. ``gz_md5``/``raw_md5`` are the known MD5s of the gzip file and of the uncompressed
    content (None where none is known). ``required`` is False for files a loader can do without.
    """

    name: str
    gz_md5: str | None
    raw_md5: str | None
    required: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset in a data root.

    ``folders`` are the sub-folders of a root searched for its files, in order; the first is moco's own layout (as
    in ``shared/data``, and where downloads go), the others torchvision's layout. ``mean``/``std`` are per channel,
    for pixels scaled to [0, 1]. ``image_shape`` is (C, H, W).
    """

    name: str
    folders: tuple[str, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]
    train: tuple[FileSpec, ...]
    test: tuple[FileSpec, ...]
    extra: tuple[FileSpec, ...] = ()
    mirrors: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[FileSpec, ...]:
        """All files of the dataset: train, test, then optional extras."""
        return self.train + self.test + self.extra

    @property
    def required(self) -> tuple[FileSpec, ...]:
        """The files that must be present for both splits to load."""
        return tuple(f for f in self.files if f.required)

    def split_files(self, train: bool) -> tuple[FileSpec, ...]:
        """The files one split needs (train or test)."""
        return self.train if train else self.test


MNIST = DatasetSpec(
    name="mnist",
    folders=("mnist", "MNIST/raw"),
    classes=tuple(str(d) for d in range(10)),
    mean=(0.1307,),
    std=(0.3081,),
    image_shape=(1, 28, 28),
    train=(
        FileSpec("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        FileSpec("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    ),
    test=(
        FileSpec("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        FileSpec("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    ),
    mirrors=MNIST_MIRRORS,
)

FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    folders=("fashion-mnist", "FashionMNIST/raw"),
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    mean=(0.2860,),
    std=(0.3530,),
    image_shape=(1, 28, 28),
    train=(
        FileSpec("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        FileSpec("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    ),
    test=(
        FileSpec("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        FileSpec("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    ),
    mirrors=FASHION_MNIST_MIRRORS,
)

CIFAR10 = DatasetSpec(
    name="cifar10",
    folders=("cifar-10", CIFAR10_ARCHIVE_FOLDER),
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    image_shape=(3, 32, 32),
    train=(
        FileSpec("data_batch_1.bin", None, "5dd7e06a14cb22eb9f671a540d1b7c25"),
        FileSpec("data_batch_2.bin", None, "5ea93a67294ea407fff1d09f752e9692"),
        FileSpec("data_batch_3.bin", None, "942cd6a4bcdd0dd3c604fbe906cb4421"),
        FileSpec("data_batch_4.bin", None, "ae636b3ba5c66a11e91e8cb52e771fcb"),
        FileSpec("data_batch_5.bin", None, "53f37980c15c3d472c316c40844f3f0d"),
    ),
    test=(FileSpec("test_batch.bin", None, "803d5f7f4d78ea53de84dbe85f74fb6d"),),
    # Class names, one per line; the loader uses the constant ``classes``, so this file is optional.
    extra=(FileSpec("batches.meta.txt", None, "728051cd483f366e254dddb25bead8b3", required=False),),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10)}
"""The file-based datasets by canonical name (digits is embedded in scikit-learn and needs no files)."""
