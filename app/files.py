"""Files a browser session writes on the server: safe names, a confined folder, atomic no-overwrite writes.

In served mode the browser chooses a file *name* at most, never a path: :func:`safe_name` turns whatever
was typed into a plain file name (letters, digits, ``.``, ``_``, ``-``; no separators, no ``..``, not hidden,
at most :data:`MAX_NAME` characters) and :func:`write_atomic` writes it inside the operator's export folder
(``run_app.py --save-dir``). Writes go to a temporary name in the same folder, are flushed to disk
(``fsync``) and only then get their name through a hard link that fails if the name exists, so

- an existing file is never replaced (served: the next free numbered name ``name-1.h5ad``, ``name-2.h5ad``, ...;
  Jupyter: a typed error),
- a crash or a kill mid-write leaves no file of that name, only a hidden ``*.partial`` file that
  :func:`clean_stale_partials` removes once the process that wrote it is gone.

No Panel import here: the module is plain file handling used by :class:`app.state.AppState`.
"""
from __future__ import annotations

import logging
import os
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Callable

from engine.errors import DataError, LexicellError

__all__ = ["MAX_NAME", "EXPORT_FOLDER", "safe_name", "default_save_dir", "ensure_dir", "write_atomic",
           "clean_stale_partials", "PARTIAL_SUFFIX"]

log = logging.getLogger(__name__)

#: Longest file name the browser can choose (characters, suffix included; the file system allows 255 bytes and
#: the temporary name adds about 40).
MAX_NAME = 120
#: Name of the default export folder, created beside the dataset.
EXPORT_FOLDER = "lexicell-exports"
PARTIAL_SUFFIX = ".partial"
MAX_NUMBERED = 10_000

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_name(name: str, *, suffix: str = ".h5ad", max_len: int = MAX_NAME) -> str:
    """A plain file name made from what a browser typed.

    Unicode is folded to ASCII (``é`` -> ``e``); every run of characters other than letters, digits, ``.``,
    ``_`` and ``-`` (path separators, spaces, control characters, quotes) becomes one ``_``; runs of dots
    collapse to one, so ``..`` never survives; leading dots, underscores and dashes are dropped (no hidden file,
    nothing that reads as a command-line option); ``suffix`` is added unless the name already ends with it (any
    case); the stem is shortened so that the whole name has at most ``max_len`` characters. Windows device names
    (``CON``, ``NUL``, ...) get a leading ``file_``.

    Parameters
    ----------
    name
        What the user typed: a name, or a path of which only the letters survive (``../../etc/x`` -> ``etc_x``).
    suffix
        Required extension, with its dot (``.h5ad``); ``""`` for none.
    max_len
        Longest result, in characters (ASCII, so also bytes).

    Returns
    -------
    str
        A name without separators, never ``.``/``..``, never starting with a dot, of at most ``max_len``
        characters, ending with ``suffix``.

    Raises
    ------
    DataError
        When nothing usable is left (an empty name, only dots or symbols).
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("_", text.strip())
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"_{2,}", "_", text)
    if suffix and text.lower().endswith(suffix.lower()):
        text = text[: -len(suffix)]
    stem = text.lstrip("._-").rstrip("._-")
    if not stem or not re.search(r"[A-Za-z0-9]", stem):
        raise DataError("No usable file name", found=repr(str(name)[:80]),
                        expected="a name with letters or digits, e.g. 'pbmc_annotated.h5ad'",
                        fix="type a plain file name; the server keeps letters, digits, '.', '_' and '-'")
    if stem.split(".")[0].lower() in _RESERVED:
        stem = "file_" + stem
    stem = stem[: max(1, max_len - len(suffix))].rstrip("._-") or "file"
    return stem + suffix


def default_save_dir(data: str | os.PathLike | None) -> Path:
    """Where a served app writes by default: ``lexicell-exports/`` beside the data (the demo: the current folder).

    For a file it is the file's folder; for a 10x folder its parent. Nothing is created here.
    """
    if data is None:
        return Path.cwd() / EXPORT_FOLDER
    p = Path(data).expanduser()
    return p.resolve().parent / EXPORT_FOLDER


def ensure_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) if missing, with the process's umask; return it resolved.

    Raises
    ------
    DataError
        When it cannot be created or is not a folder.
    """
    p = Path(folder).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)  # mode 0o777 & ~umask
    except OSError as err:
        raise DataError("The export folder cannot be created", found=f"{p}: {err.strerror or err}",
                        expected="a folder the server may write to",
                        fix="ask whoever runs the server to pass --save-dir with a writable folder") from err
    if not p.is_dir():
        raise DataError("The export folder is not a folder", found=str(p), expected="a folder",
                        fix="ask whoever runs the server to pass --save-dir with a folder")
    return p.resolve()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _candidates(name: str, numbered: bool):
    yield name
    if not numbered:
        return
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, dot + ext) if stem else (name, "")
    for i in range(1, MAX_NUMBERED):
        yield f"{stem}-{i}{ext}"


def _link_first_free(tmp: Path, folder: Path, name: str, numbered: bool) -> Path:
    """Give ``tmp`` the first free name among ``name``, ``name-1``, ... without ever replacing a file."""
    for cand in _candidates(name, numbered):
        dest = folder / cand
        try:
            os.link(tmp, dest)  # atomic; fails if dest exists, also when another save took it a moment ago
            return dest
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: exclusive create, then replace the placeholder
            try:
                fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                continue
            os.close(fd)
            os.replace(tmp, dest)
            return dest
    if numbered:
        raise DataError("Too many files of this name", found=f"{name} and {MAX_NUMBERED - 1} numbered copies in {folder}",
                        expected="a new file name", fix="choose another file name")
    raise DataError("The file already exists", found=str(folder / name), expected="a new file name",
                    fix="choose a new file name (files are never overwritten)")


def write_atomic(folder: str | os.PathLike, name: str, write: Callable[[Path], None], *,
                 numbered: bool = True) -> Path:
    """Write a new file ``folder/name`` through ``write(tmp_path)``, atomically and never over an existing file.

    ``write`` fills a temporary file in the same folder (``.NAME.PID.RANDOM.partial``); the file is flushed to
    disk and then hard-linked to its name (the link fails if the name exists, so a concurrent save never loses
    either file); the temporary name is always removed, also when ``write`` fails. A kill mid-write leaves no
    file called ``name``.

    Parameters
    ----------
    folder
        An existing folder.
    name
        The file name (not a path: served callers pass it through :func:`safe_name` first).
    write
        Called once with the temporary path; must create that file.
    numbered
        If ``name`` exists, use ``stem-1.ext``, ``stem-2.ext``, ... (served mode); otherwise raise.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    DataError
        When the name exists (``numbered=False``) or writing fails (disk full, permissions, text that cannot be
        stored); the message names the underlying error. Other :class:`~engine.errors.LexicellError`s from
        ``write`` propagate unchanged; ``KeyboardInterrupt`` propagates after clean-up.
    """
    folder = Path(folder)
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
        raise DataError("A file name was expected, not a path", found=repr(name), expected="a plain file name")
    tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
    try:
        write(tmp)
        _fsync_file(tmp)
        dest = _link_first_free(tmp, folder, name, numbered)
        _fsync_dir(folder)
    except LexicellError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py, OS and encoding errors become one typed error
        raise DataError("The file could not be written", found=f"{folder / name}: {type(err).__name__}: {err}",
                        expected="a writable folder with free space, and text that can be stored",
                        fix="check the folder and the disk, then save again; nothing was left behind") from err
    finally:
        try:
            tmp.unlink(missing_ok=True)  # never leave a partial file, whatever happened
        except OSError:  # pragma: no cover
            log.warning("could not remove %s", tmp)
    return dest


_PARTIAL = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}" + re.escape(PARTIAL_SUFFIX) + "$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def clean_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove ``*.partial`` files left in ``folder`` by a process that no longer runs (killed mid-write).

    Only names of the form :func:`write_atomic` uses are touched, and only when the process id in the name is
    not alive; files of running saves stay. Returns the removed paths.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _PARTIAL.match(p.name)
        if m and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:  # pragma: no cover
                pass
    return removed
