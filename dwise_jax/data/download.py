"""`python -m dwise_jax.data.download --root DIR`: fetch and unpack the real Sensorium 2023 data
(ten mice, 148 GB; docs/data.md#downloading-the-real-data), one zip per mouse holding `<mouse>/`.
A mouse folder is skipped once present; a download resumes from `<mouse>.zip.part`, and only a
verified file becomes `<mouse>.zip`. Only the archive URLs' hosts (and `--allow_host`) are asked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from absl import flags

from dwise_jax import cli
from dwise_jax.atomic import write_json
from dwise_jax.data import sensorium

NEW_REPOSITORY = "https://gin.g-node.org/pollytur/sensorium_2023_dataset"
OLD_REPOSITORY = "https://gin.g-node.org/pollytur/Sensorium2023Data"
MARKER = ".dwise_download.json"  # in a mouse folder: the download completed it
CHUNK = 1 << 20
_HASHES = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}


class DownloadError(Exception):
    """A download or unpack that cannot complete; the message says what and where."""


ERRORS = (DownloadError, sensorium.DatasetError)  # the user's to fix: one `error:` line, exit 1


@dataclass(frozen=True)
class Archive:
    """One mouse's zip: where it lives and, when known, its exact size and sha256."""

    mouse: str
    url: str
    size: int | None = None
    sha256: str | None = None


def default_manifest(base_url: str | None = None) -> list[Archive]:
    """The ten mice in readout order, from the two official repositories or from `base_url`."""
    where = ((NEW_REPOSITORY, sensorium.NEW_MICE), (OLD_REPOSITORY, sensorium.OLD_MICE))
    return [Archive(m, f"{base_url.rstrip('/')}/{m}.zip" if base_url
                    else f"{repository}/raw/master/{m}.zip")
            for repository, mice in where for m in mice]


def load_manifest(path: str | os.PathLike) -> list[Archive]:
    """Reads a JSON list of {"mouse", "url", "size"?, "sha256"?} objects."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DownloadError(f"{path}: cannot read the manifest ({err})") from None
    if not isinstance(items, list):
        raise DownloadError(f"{path}: the manifest must be a JSON list of archives")
    for item in items:
        if not isinstance(item, dict) or not {"mouse", "url"} <= set(item) \
                or not set(item) <= {"mouse", "url", "size", "sha256"}:
            raise DownloadError(f"{path}: entry {item!r} needs mouse and url (size and sha256 "
                                "are optional) and nothing else")
    return [Archive(**item) for item in items]


def check_archive(archive: Archive) -> None:
    """Refuses an entry whose mouse is not a folder name, or whose URL or checksums are odd."""
    if not sensorium.MOUSE_NAME_PATTERN.fullmatch(str(archive.mouse)):
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
    """The members to extract, as (info, path parts), checked like tarfile's "data" filter: one
    absolute or drive path, `..`, backslash, link, special file or member outside `<mouse>/`
    refuses the whole archive (macOS `__MACOSX/` litter is skipped)."""
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
                sensorium.SensoriumDataset.open(staging).mouse(archive.mouse).response_std()
            except (sensorium.DatasetError, KeyError) as err:
                raise DownloadError(f"{zip_path}: does not unpack into the Sensorium layout "
                                    f"({err})") from None
        for warning in caught:
            print(f"  note: {warning.message}", file=sys.stderr)
        write_json(staging / archive.mouse / MARKER, {
            **asdict(archive), "archive_bytes": zip_path.stat().st_size,
            "archive_sha256": sha256 or file_digests(zip_path, {"sha256"})["sha256"],
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.rename(staging / archive.mouse, root / archive.mouse)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _HostGuard(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to allowed hosts, and never from https down to http."""

    def __init__(self, hosts: frozenset[str]):
        self.hosts = hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.hosts)
        if urlsplit(req.full_url).scheme == "https" and urlsplit(newurl).scheme != "https":
            raise DownloadError(f"{req.full_url}: refusing the redirect to {newurl} (not https)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_host(url: str, hosts: frozenset[str]) -> None:
    host = (urlsplit(url).hostname or "").lower()
    if host not in hosts:
        raise DownloadError(f"{url}: host {host!r} is not one the download may contact "
                            f"({', '.join(sorted(hosts))}); add it with --allow_host")


def _parse_digests(headers: http.client.HTTPMessage, whole_body: bool) -> dict[str, str]:
    """{hashlib name: hex digest} from Content-MD5 (it covers the body sent: a whole (200) body
    only), Repr-Digest (RFC 9530) and Digest (RFC 3230), each later one winning."""
    md5 = headers.get("Content-MD5")
    items = [f"md5={md5}"] if md5 and whole_body else []
    for field in ("Repr-Digest", "Digest"):
        items += [item for value in headers.get_all(field) or [] for item in value.split(",")]
    found = {}
    for item in items:
        algorithm, _, encoded = item.strip().partition("=")
        if name := _HASHES.get(algorithm.strip().lower()):
            encoded = encoded.strip().strip(":")  # Repr-Digest wraps it in colons
            try:
                found[name] = base64.b64decode(encoded, validate=True).hex()
            except (binascii.Error, ValueError):
                raise DownloadError(f"unreadable {algorithm} digest {encoded!r}") from None
    return found


class _Retry(Exception):
    """A recoverable problem: try again (resuming where the file stands)."""


def _attempt(archive: Archive, part: Path, state_path: Path, opener, timeout: float) -> dict:
    """One request: appends to (or restarts) `part`; returns the saved download state."""
    state = {"url": archive.url, "validator": None, "total": None, "digests": {}}
    offset = 0
    if part.exists() and state_path.exists():
        with contextlib.suppress(ValueError):
            saved = json.loads(state_path.read_text())
            if saved.get("url") == archive.url:
                state, offset = saved, part.stat().st_size
    request = urllib.request.Request(archive.url, headers={
        "User-Agent": "dwise_jax-download", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        if state["validator"]:
            request.add_header("If-Range", state["validator"])
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset and state["total"] == offset:
            return state  # the part was already whole when the last run stopped
        if err.code in (408, 416, 429) or err.code >= 500:
            if err.code == 416:
                part.unlink()
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{archive.url}: HTTP {err.code} {err.reason}") from None
    with response:
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)",
                                 response.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != offset:
                part.unlink()
                raise _Retry(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            total, mode = int(match[3]), ("ab" if offset else "wb")
        elif response.status == 200:
            length = response.headers.get("Content-Length")
            total, mode, offset = (int(length) if length else None), "wb", 0
            state["digests"] = {}
        else:
            raise DownloadError(f"{archive.url}: unexpected HTTP {response.status}")
        if state["total"] is not None and total != state["total"] and mode == "ab":
            part.unlink()
            raise _Retry("the archive changed size between requests")
        state["total"] = total
        state["validator"] = response.headers.get("ETag") or response.headers.get("Last-Modified")
        state["digests"].update(_parse_digests(response.headers, whole_body=response.status == 200))
        write_json(state_path, state)  # before the body, so a cut keeps the validator
        done, shown = offset, time.monotonic()
        with open(part, mode) as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                if time.monotonic() - shown > 10:
                    shown = time.monotonic()
                    of = f" of {total / 2**20:.0f}" if total else ""
                    print(f"  {archive.mouse}: {done / 2**20:.0f}{of} MiB", file=sys.stderr)
    if total is not None and part.stat().st_size != total:
        raise _Retry(f"got {part.stat().st_size} of {total} bytes")
    return state


def _download(archive: Archive, root: Path, hosts: frozenset[str], *, retries: int,
              retry_wait: float, timeout: float) -> str:
    """Downloads and verifies `<root>/<mouse>.zip` (resuming a `.part`); returns its sha256."""
    part, state_path = root / f"{archive.mouse}.zip.part", root / f"{archive.mouse}.zip.part.json"
    _check_host(archive.url, hosts)
    opener = urllib.request.build_opener(_HostGuard(hosts))
    for attempt in range(retries + 1):
        try:
            state = _attempt(archive, part, state_path, opener, timeout)
            break
        except (_Retry, OSError, http.client.HTTPException) as err:
            # OSError covers URLError, resets and timeouts; HTTPException a cut-off body.
            have = part.stat().st_size if part.exists() else 0
            reason = err if isinstance(err, _Retry) else repr(err)
            if attempt == retries:
                raise DownloadError(f"{archive.url}: {reason}; {have} bytes kept in {part}, "
                                    "run again to resume") from None
            print(f"  {archive.mouse}: {reason} after {have} bytes, retrying", file=sys.stderr)
            time.sleep(retry_wait * 2**attempt)
    expected = dict(state["digests"])
    if archive.sha256:
        expected["sha256"] = archive.sha256
    try:
        size = part.stat().st_size
        if archive.size is not None and size != archive.size:
            raise DownloadError(f"{archive.url}: got {size} bytes, the manifest says "
                                f"{archive.size}; the download was deleted")
        actual = file_digests(part, {"sha256", *expected})
        for name, digest in expected.items():
            if actual[name] != digest.lower():
                raise DownloadError(f"{archive.url}: {name} is {actual[name]}, expected "
                                    f"{digest}; the download was deleted")
    except DownloadError:
        part.unlink()
        state_path.unlink(missing_ok=True)
        raise
    os.replace(part, root / f"{archive.mouse}.zip")
    state_path.unlink(missing_ok=True)
    checked = sorted(expected) + (["size"] if state["total"] or archive.size else [])
    print(f"  {archive.mouse}: {size / 2**20:.1f} MiB, sha256 {actual['sha256']} "
          f"(checked: {', '.join(checked) or 'nothing the server offered'})", file=sys.stderr)
    return actual["sha256"]


def download(root: str | os.PathLike, archives: list[Archive], *,
             allow_hosts: tuple[str, ...] = (), retries: int = 5, retry_wait: float = 5.0,
             timeout: float = 60.0, keep_archives: bool = False) -> list[str]:
    """Downloads, verifies and unpacks every archive not yet under `root`; returns the mice
    unpacked by this call. The keywords are the command's flags of the same names."""
    root = Path(root)
    for archive in archives:
        check_archive(archive)
    hosts = frozenset({(urlsplit(a.url).hostname or "").lower() for a in archives}
                      | {h.lower() for h in allow_hosts})
    root.mkdir(parents=True, exist_ok=True)
    done = []
    with open(root / ".download.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"{root}: another download is running here") from None
        for archive in archives:
            mouse_dir = root / archive.mouse
            for stale in root.glob(f".{archive.mouse}.unpack-*"):  # a killed earlier run
                shutil.rmtree(stale, ignore_errors=True)
            if (mouse_dir / MARKER).exists():
                print(f"{archive.mouse}: complete, skipped", file=sys.stderr)
                continue
            if mouse_dir.exists():
                print(f"{archive.mouse}: {mouse_dir} exists but was not downloaded here (no "
                      f"{MARKER}); left as it is (python -m dwise_jax.data.sensorium "
                      f"{root} --check validates it)", file=sys.stderr)
                continue
            zip_path, sha256 = root / f"{archive.mouse}.zip", None
            if not zip_path.exists():  # only a verified download ever gets this name
                print(f"{archive.mouse}: downloading {archive.url}", file=sys.stderr)
                sha256 = _download(archive, root, hosts, retries=retries,
                                   retry_wait=retry_wait, timeout=timeout)
            print(f"{archive.mouse}: unpacking", file=sys.stderr)
            try:
                unpack(zip_path, root, archive, sha256)
            except DownloadError:
                zip_path.unlink()  # bad content: the next run downloads it again
                raise
            if not keep_archives:
                zip_path.unlink()
            done.append(archive.mouse)
    return done


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("root", None, "Dataset root to fill.", required=True, flag_values=fv)
    flags.DEFINE_list("mice", None, "Comma-separated mouse folder names; none: every archive.",
                      flag_values=fv)
    flags.DEFINE_string("base_url", None, "Fetch BASE_URL/<mouse>.zip instead of the official "
                        "repositories.", flag_values=fv)
    flags.DEFINE_string("manifest", None, 'JSON list of {"mouse", "url", "size"?, "sha256"?}.',
                        flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["base_url", "manifest"], flag_values=fv)
    flags.DEFINE_multi_string("allow_host", [], "Another host that redirects may lead to",
                              flag_values=fv)
    flags.DEFINE_integer("retries", 5, "Network failures tolerated per archive.", flag_values=fv)
    flags.DEFINE_float("retry_wait", 5.0, "Seconds before the first retry, doubling after each.",
                       flag_values=fv)
    flags.DEFINE_float("timeout", 60.0, "Seconds a connection may stall.", flag_values=fv)
    flags.DEFINE_boolean("keep_archives", False, "Keep <mouse>.zip once unpacked.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise cli.UsageError(f"unexpected arguments {args}; the dataset root is --root")
    archives = load_manifest(fv.manifest) if fv.manifest else default_manifest(fv.base_url)
    if fv.mice:
        if unknown := sorted(set(fv.mice) - {a.mouse for a in archives}):
            raise DownloadError(f"no archive for {unknown}")
        archives = [a for a in archives if a.mouse in fv.mice]
    done = download(fv.root, archives, allow_hosts=tuple(fv.allow_host), retries=fv.retries,
                    retry_wait=fv.retry_wait, timeout=fv.timeout, keep_archives=fv.keep_archives)
    print(f"{len(done)} mice unpacked, {len(archives) - len(done)} already there; root {fv.root}")
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
