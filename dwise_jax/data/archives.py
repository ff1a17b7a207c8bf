"""The real data's per-mouse zip archives: where they are (the manifest), and unpacking one
safely into place. `dwise_jax.data.download` fetches them (docs/data.md#downloading-the-real-data).

One zip per mouse at `<repository>/raw/master/<mouse>.zip`, holding the folder `<mouse>/` in the
layout `dwise_jax.data.sensorium` reads (macOS `__MACOSX/` litter is skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from dwise_jax.atomic import write_json
from dwise_jax.data.sensorium import (
    MOUSE_NAME_PATTERN,
    NEW_MICE,
    OLD_MICE,
    DatasetError,
    SensoriumDataset,
)

NEW_REPOSITORY = "https://gin.g-node.org/pollytur/sensorium_2023_dataset"
OLD_REPOSITORY = "https://gin.g-node.org/pollytur/Sensorium2023Data"
MARKER = ".dwise_download.json"  # in a mouse folder: the download completed it
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download or unpack that cannot complete; the message says what and where."""


@dataclass(frozen=True)
class Archive:
    """One mouse's zip: where it lives and, when known, its exact size and sha256."""

    mouse: str
    url: str
    size: int | None = None
    sha256: str | None = None


def default_manifest(base_url: str | None = None) -> list[Archive]:
    """The ten mice in readout order, from the two official repositories or from `base_url`."""
    def url(repository: str, mouse: str) -> str:
        if base_url:
            return f"{base_url.rstrip('/')}/{mouse}.zip"
        return f"{repository}/raw/master/{mouse}.zip"

    return ([Archive(m, url(NEW_REPOSITORY, m)) for m in NEW_MICE]
            + [Archive(m, url(OLD_REPOSITORY, m)) for m in OLD_MICE])


def load_manifest(path: str | os.PathLike) -> list[Archive]:
    """Reads a JSON list of {"mouse", "url", "size"?, "sha256"?} objects."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DownloadError(f"{path}: cannot read the manifest ({err})") from None
    if not isinstance(items, list):
        raise DownloadError(f"{path}: the manifest must be a JSON list of archives")
    archives = []
    for item in items:
        if not isinstance(item, dict) or not {"mouse", "url"} <= set(item) \
                or not set(item) <= {"mouse", "url", "size", "sha256"}:
            raise DownloadError(f"{path}: entry {item!r} needs mouse and url (size and sha256 "
                                "are optional) and nothing else")
        archives.append(Archive(**item))
    return archives


def check_archive(archive: Archive) -> None:
    """Refuses an entry whose mouse is not a folder name, or whose URL or checksums are odd."""
    # The mouse name becomes a path: only the real naming pattern is accepted.
    if not isinstance(archive.mouse, str) or not MOUSE_NAME_PATTERN.fullmatch(archive.mouse):
        raise DownloadError(f"{archive.mouse!r}: not a mouse folder name "
                            "(dynamic<digits>-<digits>-<digits>-Video-<32 hex digits>)")
    if urlsplit(archive.url).scheme not in ("http", "https"):
        raise DownloadError(f"{archive.url}: only http and https URLs are fetched")
    if archive.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(archive.sha256)):
        raise DownloadError(f"{archive.mouse}: sha256 must be 64 lowercase hex digits")
    if archive.size is not None and (type(archive.size) is not int or archive.size < 0):
        raise DownloadError(f"{archive.mouse}: size must be a whole number of bytes")


def file_digests(path: Path, names: set[str]) -> dict[str, str]:
    """{hashlib name: hex digest} of a file, read once."""
    hashes = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _members(zf: zipfile.ZipFile, mouse: str,
             where: Path) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members to extract, as (info, path parts); refuses the whole archive if one is unsafe.

    Checked like tarfile's "data" filter: no absolute or drive paths, no `..`, no backslashes,
    no links or special files, nothing outside `<mouse>/` (macOS `__MACOSX/` litter is skipped).
    """
    keep = []
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name).parts
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no file type
        if (name.startswith("/") or "\\" in name or "\0" in name or re.match(r"[A-Za-z]:", name)
                or ".." in parts or not parts):
            raise DownloadError(f"{where}: unsafe member {name!r} (absolute path or '..')")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DownloadError(f"{where}: member {name!r} is a link or special file")
        if parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
            continue
        if parts[0] != mouse or len(parts) == 1 and not info.is_dir():
            raise DownloadError(f"{where}: member {name!r} lies outside the folder {mouse}/")
        keep.append((info, parts))
    return keep


def unpack(zip_path: Path, root: Path, archive: Archive, sha256: str | None) -> None:
    """Extracts into a temporary folder beside `root/<mouse>`, opens it with
    `SensoriumDataset`, writes the marker and renames it into place (removed on any failure)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.mouse}.unpack-", dir=root))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info, parts in _members(zf, archive.mouse, zip_path):
                    target = staging.joinpath(*parts)
                    if not target.resolve().is_relative_to(staging.resolve()):  # belt and braces
                        raise DownloadError(f"{zip_path}: member {info.filename!r} escapes")
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "xb") as dst:  # x: no duplicates
                        shutil.copyfileobj(src, dst, CHUNK)  # zipfile checks each CRC
        except (zipfile.BadZipFile, zipfile.LargeZipFile, FileExistsError, EOFError) as err:
            raise DownloadError(f"{zip_path}: not a valid archive ({err})") from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                dataset = SensoriumDataset.open(staging)
                dataset.mouse(archive.mouse).response_std()
            except (DatasetError, KeyError) as err:
                raise DownloadError(f"{zip_path}: does not unpack into the Sensorium layout "
                                    f"({err})") from None
        for warning in caught:
            print(f"  note: {warning.message}", file=sys.stderr)
        mouse_dir = staging / archive.mouse
        sha256 = sha256 or file_digests(zip_path, {"sha256"})["sha256"]
        write_json(mouse_dir / MARKER, {
            **asdict(archive), "archive_bytes": zip_path.stat().st_size,
            "archive_sha256": sha256, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.rename(mouse_dir, root / archive.mouse)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
