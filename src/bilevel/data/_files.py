"""Data directory resolution, checksum verification (cached per process) and downloads, on pooch.

Hashing (:func:`pooch.file_hash`) and downloading
(:func:`pooch.retrieve`: temporary file, known-hash check, progress bar) are pooch's;
this module adds the data-directory rules, the per-process verification cache, the
one-line errors, and the promise that a failed download leaves no folder behind.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pooch

from ._checksums import CHECKSUMS, REGISTRY

__all__ = [
    "ENV_DATA",
    "ENV_DOWNLOAD",
    "DEFAULT_DATA_DIR",
    "data_dir",
    "file_digest",
    "verify",
    "clear_verification_cache",
    "download",
    "fetch",
]

ENV_DATA = "BILEVEL_DATA"
ENV_DOWNLOAD = "BILEVEL_DOWNLOAD"
DEFAULT_DATA_DIR = Path("~/.cache/bilevel")

# (resolved path, size, mtime_ns, "algo:hex") of files already seen to match that hash in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory.

    Args:
        path: an explicit directory.

    Returns:
        ``path`` if given, else ``$BILEVEL_DATA``, else ``~/.cache/bilevel`` (user-expanded).
    """
    if path is None:
        path = os.environ.get(ENV_DATA) or DEFAULT_DATA_DIR
    return Path(path).expanduser()


def _download_default() -> bool:
    return os.environ.get(ENV_DOWNLOAD, "1").strip().lower() not in {"0", "false", "no", "off", ""}


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """Hex digest of a file (:func:`pooch.file_hash`).

    Args:
        path: the file.
        algo: ``"sha256"`` or ``"md5"``.

    Returns:
        The digest in hexadecimal.
    """
    return str(pooch.file_hash(str(path), alg=algo))


def _state(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def verify(path: str | os.PathLike, key: str | None = None, accepted: Sequence[str] | None = None) -> bool:
    """Check a data file against its known digest(s).

    Results are cached per process, keyed on the file's resolved path, size and modification time, so
    repeated loads are cheap.

    Args:
        path: the file.
        key: its path relative to the data directory, to look up :data:`CHECKSUMS` (``None``: no lookup).
        accepted: digests that override the table (``"sha256:<hex>"`` / ``"md5:<hex>"`` entries).

    Returns:
        ``True`` when a digest matched (hashed with :func:`pooch.file_hash`), ``False`` when none is known
        (nothing checked).

    Raises:
        ValueError: a mismatch, naming the file, the expected hash and what to do.
    """
    path = Path(path)
    if accepted is None:
        accepted = CHECKSUMS.get(key) if key is not None else None
    if not accepted:
        return False
    state = _state(path)
    if any((*state, h) in _VERIFIED for h in accepted):
        return True
    digests: dict[str, str] = {}  # one pass over the file per algorithm
    for h in accepted:
        algo, _, hexd = h.rpartition(":")
        algo = algo or "sha256"
        if algo not in digests:
            digests[algo] = file_digest(path, algo)
        if digests[algo] == hexd.lower():
            _VERIFIED.add((*state, h))
            return True
    raise ValueError(
        f"checksum mismatch for data file {path} (expected {' or '.join(accepted)}); "
        "the file is corrupt or not the expected version: delete it and download it again"
    )


def clear_verification_cache() -> None:
    """Forget which files were verified in this process (the next load hashes them again)."""
    _VERIFIED.clear()


def _copy_file_url(url: str, output_file: str, pooch_: object = None, check_only: bool = False) -> bool | None:
    """A pooch downloader for ``file://`` URLs (a local mirror), which pooch itself does not handle."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if check_only:
        return source.is_file()
    shutil.copyfile(source, output_file)
    return None


def download(url: str, dest: str | os.PathLike, known_hash: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with :func:`pooch.retrieve`.

    ``http(s)://`` and ``ftp://`` go through pooch's downloaders with a progress bar;
    ``file://`` URLs are copied. pooch writes to a temporary file in the destination
    folder and checks it before moving it into place. A failed download also removes the
    folders it created.

    Args:
        url: where the file is served.
        dest: the file to write.
        known_hash: ``"sha256:<hex>"`` / ``"md5:<hex>"`` the download must match (``None``: unchecked).

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the download does not match ``known_hash`` (nothing is left behind).
    """
    dest = Path(dest)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # innermost first
    downloader = _copy_file_url if urllib.parse.urlparse(url).scheme == "file" else None
    try:
        pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent, downloader=downloader, progressbar=True)
    finally:
        if not dest.exists():  # a failed download leaves no empty folders behind
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
    if known_hash:
        _VERIFIED.add((*_state(dest), known_hash))  # pooch has just checked it
    return dest


def fetch(
    key: str,
    root: str | os.PathLike | None = None,
    urls: Sequence[str] = (),
    download_if_missing: bool | None = None,
    check: bool = True,
) -> Path:
    """Path of a data file, verified (and downloaded if missing and allowed).

    A file present in the data directory is used as it is (checked against :data:`CHECKSUMS`). When it
    is absent and downloading is allowed, each of ``urls`` is tried in turn with :func:`download`,
    checked against the file's :data:`REGISTRY` hash.

    Args:
        key: the file's path relative to the data directory.
        root: the data directory (:func:`data_dir`).
        urls: official sources of the file, tried in order.
        download_if_missing: allow downloading (default ``$BILEVEL_DOWNLOAD``, which defaults to on).
        check: verify the file (:func:`verify`).

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: the file is absent and cannot be downloaded (naming the path and how to provide it).
        ValueError: the file does not match its digest.
    """
    root = data_dir(root)
    path = root / key
    if not path.exists():
        if download_if_missing is None:
            download_if_missing = _download_default()
        errors: list[str] = []
        if download_if_missing:
            for url in urls:
                try:
                    download(url, path, known_hash=REGISTRY.get(key) if check else None)
                    break
                except Exception as exc:  # network errors, HTTP errors, bad checksum
                    errors.append(f"{url}: {exc}")
        if not path.exists():
            why = (
                ("download failed: " + "; ".join(errors))
                if errors
                else ("downloading is disabled" if not download_if_missing else "no download URL known")
            )
            src = f" It can be obtained from {urls[0]}." if urls else ""
            raise FileNotFoundError(
                f"data file not found: {path} ({why}). Put the file there, or point the loader at a "
                f"folder that has '{key}' with data_dir=... / --data-dir or the {ENV_DATA} environment "
                f"variable (current data directory: {root}).{src}"
            )
    if check:
        verify(path, key)
    return path
