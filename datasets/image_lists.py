"""Image lists: discovering images in folders, reading/writing `<path> <label>` files, loading images."""
import os
import warnings
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.atomic_files import atomic_write_text

Sample = tuple[str, int]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# How many missing paths an error message spells out before summarising the rest as a count.
_MAX_LISTED_MISSING = 5


class DataError(ValueError):
    """Bad or missing data: a folder, list file, list line or image that cannot be used."""


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with an image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_subfolders(folder: str) -> list[str]:
    """Sorted names of the non-hidden subdirectories of `folder`."""
    if not os.path.isdir(folder):
        raise DataError(f"folder does not exist: {folder}")
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def list_images(folder: str) -> list[str]:
    """Sorted absolute paths of the image files directly inside `folder`."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder does not exist: {folder}")
    folder = os.path.abspath(folder)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if is_image_file(e.name) and e.is_file()]
    return [os.path.join(folder, name) for name in sorted(names)]


def read_list_file(list_path: str, root: str) -> list[Sample]:
    """Read `<path relative to root> <label>` lines into (absolute path, label) samples."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}")
    root = os.path.abspath(root)
    samples: list[Sample] = []
    with open(list_path, "rb") as handle:
        raw_lines = handle.read().splitlines()
    for line_number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"{list_path}, line {line_number}: not UTF-8 text ({error.reason} at byte "
                            f"{error.start} of the line); expected '<relative path> <integer label>' lines") from None
        if not text:
            continue
        # The label is the last token so that paths containing spaces survive.
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_path}, line {line_number}: expected "
                            f"'<relative path> <integer label>', got {text!r}")
        rel_path, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{list_path}, line {line_number}: label {label_text!r} "
                            f"is not an integer (line {text!r})") from None
        samples.append((os.path.normpath(os.path.join(root, rel_path)), label))
    return samples


def read_split_lists(list_paths: Sequence[str], root: str, n_classes: int,
                     what: str) -> list[list[Sample]]:
    """The samples of each list file, labels checked against 0..n_classes-1 and every image present."""
    lists = []
    for list_path in list_paths:
        samples = read_list_file(list_path, root)
        bad = sorted({label for _, label in samples if not 0 <= label < n_classes})
        if bad:
            raise DataError(f"{list_path}: labels {bad} are outside 0..{n_classes - 1} of {what}")
        lists.append(samples)
    check_files_exist([sample for samples in lists for sample in samples])
    return lists


def write_list_file(list_path: str, samples: Iterable[Sample], root: str) -> None:
    """Write samples as `<path relative to root> <label>` lines (forward slashes), atomically."""
    root = os.path.abspath(root)
    lines = []
    for path, label in samples:
        rel_path = os.path.relpath(os.path.abspath(path), root)
        if rel_path == ".." or rel_path.startswith(".." + os.sep):
            raise DataError(f"image {path} is not inside the list root {root}")
        lines.append(f"{rel_path.replace(os.sep, '/')} {int(label)}\n")
    atomic_write_text(list_path, "".join(lines))


def check_files_exist(samples: Sequence[Sample]) -> None:
    """Raise DataError naming the first missing image files of `samples`."""
    # One directory listing per parent folder instead of one stat per image: ImageNet-sized lists
    # on network disks would otherwise take minutes.
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path, _ in samples:
        by_parent[os.path.dirname(path)].append(path)
    missing: list[str] = []
    for parent, paths in by_parent.items():
        try:
            with os.scandir(parent) as entries:
                present = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing.extend(p for p in paths if os.path.basename(p) not in present)
    if missing:
        missing.sort()
        shown = ", ".join(missing[:_MAX_LISTED_MISSING])
        more = len(missing) - _MAX_LISTED_MISSING
        suffix = f" (and {more} more)" if more > 0 else ""
        raise DataError(f"{len(missing)} listed image(s) do not exist: {shown}{suffix}")


# Truncated files already named in a warning by this process (each is named once per process).
_warned_truncated: set[str] = set()


def load_image(path: str, load_truncated: bool = False) -> Image.Image:
    """Open an image file as RGB; raise DataError naming the path if it cannot be read whole.

    A truncated file (a JPEG cut anywhere, even only its end marker) is an error unless `load_truncated`
    (--load_truncated_images, the authors' behaviour): then it is decoded with the missing part grey and
    named in a warning. Off by default: a grey-filled image is scored or trained on as if it were data.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        if load_truncated and "truncated" in str(error):
            return _load_truncated(path)
        raise DataError(f"cannot read image {path}: {error}") from error


def _load_truncated(path: str) -> Image.Image:
    """Decode a truncated image the authors' way (missing part grey), warning once per file."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as image:
            decoded = image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if path not in _warned_truncated:
        _warned_truncated.add(path)
        warnings.warn(f"{path} is truncated; its missing part is decoded grey (--load_truncated_images)",
                      stacklevel=2)
    return decoded


class ImageListDataset(Dataset):
    """Dataset over (path, label) samples returning (transformed image, label, index).

    `load_truncated` (see `load_image`) is stored on the dataset, so that DataLoader workers get it
    with the dataset whatever their start method (fork, or spawn: the macOS default).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, load_truncated: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.load_truncated = load_truncated

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_image(path, self.load_truncated)), label, index
