"""Data directory resolution, checksum verification (cached per process) and downloads."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ._checksums import CHECKSUMS

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

# (resolved path, size, mtime_ns, accepted digests) -> True for files that already matched.
_VERIFIED: dict[tuple, bool] = {}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given, else ``$BILEVEL_DATA``, else ``~/.cache/bilevel``."""
    if path is None:
        path = os.environ.get(ENV_DATA) or DEFAULT_DATA_DIR
    return Path(path).expanduser()


def _download_default() -> bool:
    return os.environ.get(ENV_DOWNLOAD, "1").strip().lower() not in {"0", "false", "no", "off", ""}


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, accepted: Sequence[str]) -> bool:
    wanted: dict[str, set[str]] = {}
    for item in accepted:
        algo, _, hexd = item.partition(":")
        wanted.setdefault(algo, set()).add(hexd.lower())
    hashers = {algo: hashlib.new(algo) for algo in wanted}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return any(hashers[a].hexdigest() in wanted[a] for a in wanted)


def verify(path: str | os.PathLike, key: str | None = None, accepted: Sequence[str] | None = None) -> bool:
    """Check ``path`` against its known digest(s); raise ``ValueError`` naming the file on mismatch.

    ``key`` is the path relative to the data directory used to look up
    :data:`CHECKSUMS`; ``accepted`` overrides the table (``"sha256:<hex>"`` /
    ``"md5:<hex>"`` entries).  Returns False when no digest is known (nothing
    checked), True when it matched.  Results are cached per process, keyed on the
    file's resolved path, size and modification time, so repeated loads are cheap.
    """
    path = Path(path)
    if accepted is None:
        accepted = CHECKSUMS.get(key) if key is not None else None
    if not accepted:
        return False
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, tuple(accepted))
    if _VERIFIED.get(cache_key):
        return True
    if not _matches(path, accepted):
        raise ValueError(
            f"checksum mismatch for data file {path} (expected {' or '.join(accepted)}); "
            "the file is corrupt or not the expected version: delete it and download it again"
        )
    _VERIFIED[cache_key] = True
    return True


def clear_verification_cache() -> None:
    _VERIFIED.clear()


def download(url: str, dest: str | os.PathLike, accepted: Sequence[str] | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` (any scheme urllib knows, including ``file://``) to ``dest``.

    Writes to a temporary file in the destination folder, checks it against
    ``accepted`` digests when given (``ValueError`` on mismatch, nothing left
    behind), then renames it into place. A failed download removes the folders it created.
    """
    dest = Path(dest)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if accepted:
            verify(tmp, accepted=accepted)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
        if not dest.exists():  # a failed download leaves no empty folders behind
            for d in created:  # innermost first
                try:
                    d.rmdir()
                except OSError:
                    break
    return dest


def fetch(
    key: str,
    root: str | os.PathLike | None = None,
    urls: Sequence[str] = (),
    download_if_missing: bool | None = None,
    check: bool = True,
) -> Path:
    """Path of data file ``key`` (relative to the data directory), verified.

    When the file is absent and downloading is allowed (``download_if_missing``,
    default ``$BILEVEL_DOWNLOAD`` which defaults to on) each of ``urls`` is tried in
    turn.  Otherwise ``FileNotFoundError`` names the path and how to provide it.
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
                    download(url, path, accepted=CHECKSUMS.get(key) if check else None)
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
