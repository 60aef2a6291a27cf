"""Finding image files, pairing them by name, and writing outputs atomically."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath

try:
    import fcntl
except ImportError:  # Windows: no flock; temporaries are then not protected from a second run
    fcntl = None

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)  # OME-Zarr images are folders

log = logging.getLogger(__name__)


def cache_folder() -> Path:
    """Where unetseg keeps what it makes once and reuses: $UNETSEG_CACHE, else ~/.cache/unetseg."""
    return Path(os.environ.get("UNETSEG_CACHE", Path.home() / ".cache" / "unetseg"))


class DuplicateNameError(ValueError):
    """Two files with one name (`a.png` and `a.tif`): they would pair with, or be written to, the same file."""

    def __init__(self, first: Path, second: Path, key: str):
        super().__init__(f"{first} and {second}: two files with one name; keep one")
        self.first, self.second, self.key = first, second, key


def image_suffix(path: Path) -> str:
    """A file's suffix in lower case, ".nii.gz" counted as one (NIfTI volumes are often gzipped)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def image_stem(path: Path) -> str:
    """A file's name without its (image) suffix: `brain.nii.gz` -> `brain`."""
    return path.name[: len(path.name) - len(image_suffix(path))] if image_suffix(path) else path.name


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is one we can read (.nii.gz counted as one), or an OME-Zarr (.zarr) folder."""
    if path.name.startswith("."):
        return False
    return path.is_file() and image_suffix(path) in IMAGE_SUFFIXES or path.is_dir() and is_zarr_folder(path)


def is_zarr_folder(path: Path) -> bool:
    """True for a .zarr (or .ome.zarr) folder, an image read whole rather than searched."""
    return path.suffix.lower() in ZARR_SUFFIXES and path.is_dir()


def image_key(path: Path, root: Path) -> str:
    """A file's name for pairing: its path under `root` without suffix (`sub/cell_01`; `a.ome.zarr` -> `a`;
    `ct/brain.nii.gz` -> `ct/brain`)."""
    relative = path.relative_to(root)
    if image_suffix(path) == ".nii.gz":
        return (relative.parent / image_stem(path)).as_posix()
    key = relative.with_suffix("")
    if path.suffix.lower() in ZARR_SUFFIXES and key.suffix.lower() == ".ome":
        key = key.with_suffix("")
    return key.as_posix()


def find_images(root: str | Path, glob: str | None = None, exclude: str | Path | None = None) -> dict[str, Path]:
    """The image files under `root`, searched recursively, keyed by `image_key` and sorted.

    Hidden files and folders are skipped, and so is anything inside `exclude` (an output
    folder that lies inside the input). `glob` filters by the path relative to `root`
    (`PurePath.match`, so "*.tif" matches at any depth). Raises DuplicateNameError (a
    ValueError) naming both files when two have one key (`a.png` and `a.tif`). An empty result
    is returned as is: callers say what they were looking for.
    """
    root = Path(root)
    excluded = Path(exclude).resolve() if exclude is not None else None
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_symlink() and not path.exists():
            log.warning("%s: skipped: a broken or looping symbolic link", path)
            continue
        if not is_image_file(path):
            continue
        if any(part.lower().endswith(ZARR_SUFFIXES) for part in relative.parts[:-1]):
            continue  # inside an OME-Zarr image (its labels, its levels)
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        if glob is not None and not PurePosixPath(relative.as_posix()).match(glob):
            continue
        key = image_key(path, root)
        if key in files:
            raise DuplicateNameError(files[key], path, key)
        files[key] = path
    return files


def temporary_names(path: Path, suffix: str) -> re.Pattern:
    """The names `atomic_output` gives the temporary files of `path` (mkstemp adds 8 random characters)."""
    return re.compile(re.escape(f".{path.stem}.") + r"[a-z0-9_]{8}" + re.escape(suffix))


def hold(path: str | Path) -> int:
    """Take an exclusive lock (`flock`) on a file or folder being written; returns the descriptor holding it,
    to be closed (`os.close`) when the writing is over. The kernel drops the lock when its process dies,
    SIGKILL included, so a locked temporary belongs to a live writer (`is_stale`)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks: the temporary is still written, just not protected
        pass
    return descriptor


def is_stale(path: str | Path) -> bool:
    """True for a temporary file or folder that no live process holds (`hold`): left by a killed run."""
    if fcntl is None:
        return True
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to judge
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # another process is writing it right now
    except OSError:
        return True  # no locks on this filesystem: as before, a temporary of the same name is stale
    finally:
        os.close(descriptor)
    return True


def remove_stale_temporaries(path: str | Path, suffix: str = ".tmp.tif") -> list[Path]:
    """Delete temporary files of `path` left by a killed run (SIGKILL skips every cleanup); returns them.

    A temporary that another live process is writing (two runs into one folder) is locked and kept.
    """
    path = Path(path)
    pattern = temporary_names(path, suffix)
    candidates = path.parent.glob(glob_escape(f".{path.stem}.") + "*" + glob_escape(suffix))
    stale = [entry for entry in candidates if pattern.fullmatch(entry.name) and is_stale(entry)]
    for entry in stale:
        entry.unlink(missing_ok=True)
        log.info("%s: removed a temporary file left by an interrupted run", entry)
    return stale


def remove_stale_folders(folder: str | Path, pattern: str) -> list[Path]:
    """Delete hidden scratch folders matching `pattern` (a glob) in `folder` that no live process holds."""
    stale = [entry for entry in Path(folder).glob(pattern) if entry.is_dir() and is_stale(entry)]
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
        log.info("%s: removed a scratch folder left by an interrupted run", entry)
    return stale


def check_writable(path: str | Path) -> None:
    """OSError naming `path` when nothing can be written in it (or, while it does not exist, its nearest
    existing parent, where it would be made): a read-only folder fails once, before any work."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        handle, probe = tempfile.mkstemp(prefix=".unetseg-write-test.", dir=folder)
    except OSError as error:
        failure = OSError(f"OUTPUT {path}: cannot write in {folder} ({error.strerror or error})")
        failure.errno = error.errno
        raise failure from None
    os.close(handle)
    os.unlink(probe)


def sync_rename(temporary: str | Path, path: str | Path) -> None:
    """Flush a finished file to disk, rename it over `path`, and flush the folder, so the rename survives a crash."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    try:
        folder = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:  # some systems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp.tif") -> Iterator[Path]:
    """A temporary file in `path`'s folder, renamed to `path` when the block succeeds, deleted if it fails.

    An interrupted write never leaves a half-written file under the final name: the file is
    written beside its target (never copied across filesystems), flushed to disk (fsync) and
    renamed. Temporary files of `path` left by a killed run are removed first; the temporary is
    locked while it is written, so a second run writing into the same folder never removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, suffix)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    lock = hold(temporary)  # another run writing into this folder leaves it alone (`remove_stale_temporaries`)
    try:
        yield Path(temporary)
        umask = os.umask(0)  # reading the umask means setting it
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
        sync_rename(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


def find_pairs(root: str | Path, images: str = "images", masks: str = "masks") -> list[tuple[Path, Path]]:
    """Image/mask file pairs under root/images and root/masks, matched by relative path and stem.

    Raises ValueError naming every image without a mask, mask without an image, or duplicate
    stem, and when nothing is found.
    """
    root = Path(root)
    image_dir, mask_dir = root / images, root / masks
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found (expected {root}/{images} and {root}/{masks})")
    image_files, mask_files = find_images(image_dir), find_images(mask_dir)
    if not image_files:
        raise ValueError(f"{image_dir}: no image files found (looked for .tif, .tiff, .png, .jpg)")
    problems = [f"{image_files[key]}: no mask in {mask_dir}" for key in sorted(image_files.keys() - mask_files.keys())]
    problems += [
        f"{mask_files[key]}: no image in {image_dir}" for key in sorted(mask_files.keys() - image_files.keys())
    ]
    if problems:
        raise ValueError("images and masks do not pair up by name:\n  " + "\n  ".join(problems))
    return [(image_files[key], mask_files[key]) for key in sorted(image_files)]


def pair_name(image_path: Path, image_dir: Path) -> str:
    """A pair's name: its path under the images folder, without suffix (`sub/cell_01`)."""
    return image_key(image_path, image_dir)
