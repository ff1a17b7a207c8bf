"""`python -m dwise_jax.data.download --root DIR`: fetch and unpack the real Sensorium 2023 data.

The organisers publish one zip per mouse in two GIN repositories (docs/original.md#data-layout): the
five new mice in `pollytur/sensorium_2023_dataset`, the five old ones in
`pollytur/Sensorium2023Data`, each at `<repository>/raw/master/<mouse>.zip`. A zip holds the folder
`<mouse>/` in the layout `dwise_jax.data.sensorium` reads, plus macOS `__MACOSX/` litter that is
skipped. The whole dataset is 148 GB.

Per mouse, in readout order:

1. Skip it when `<root>/<mouse>/` exists: with the marker `.dwise_download.json` this tool
   completed it; without one it came from elsewhere and is left untouched (with a note).
2. Download into `<root>/<mouse>.zip.part`. An interrupted download resumes with an HTTP Range
   request; `If-Range` carries the server's ETag (or Last-Modified), so a changed archive is
   fetched anew instead of being spliced onto the old bytes. Network errors are retried.
3. Verify the size (Content-Length / Content-Range, and the manifest's size) and every checksum
   on offer: the manifest's sha256 and the `Repr-Digest`, `Digest` and `Content-MD5` headers
   (sha-256, sha-512, md5). ETags are opaque and never read as checksums. Only a verified file
   is renamed to `<mouse>.zip`; one that fails is deleted.
4. Unpack into a temporary folder beside the destination, refusing unsafe members (absolute
   paths, `..`, links, anything outside `<mouse>/`), open it with `SensoriumDataset`, write the
   marker, rename the folder into place and delete the zip (`--keep_archives` keeps it).

So a partial download lives only under `.part` and a partial unpack only in a temporary folder
(removed on failure or at the next run); the final names only ever hold complete data.

Only the hosts of the archive URLs are contacted (by default gin.g-node.org); a redirect to any
other host is refused unless `--allow_host` names it. `--base_url URL` fetches `URL/<mouse>.zip`
instead (a mirror); `--manifest FILE` gives a JSON list of `{"mouse", "url", "size"?,
"sha256"?}` entries.

Not done here: the old mice's test-tier responses in these archives are dummy zeros; the
original fetched the real ones from deeplake (`hub://sinzlab/...`). `SensoriumDataset` warns
about them and treats those trials as unlabeled.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
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
MARKER = ".dwise_download.json"
CHUNK = 1 << 20
_HASHES = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}


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


def _check_archive(archive: Archive) -> None:
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


# ----------------------------------------------------------------------------- network
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
    """{hashlib name: hex digest} from Repr-Digest (RFC 9530), Digest (RFC 3230), Content-MD5."""
    found = {}
    fields = [(v, True) for v in headers.get_all("Repr-Digest") or []]
    fields += [(v, False) for v in headers.get_all("Digest") or []]
    for value, structured in fields:
        for item in value.split(","):
            algorithm, _, encoded = item.strip().partition("=")
            name = _HASHES.get(algorithm.strip().lower())
            if name is None:
                continue
            encoded = encoded.strip()
            if structured:
                encoded = encoded.strip(":")
            try:
                found[name] = base64.b64decode(encoded, validate=True).hex()
            except (binascii.Error, ValueError):
                raise DownloadError(f"unreadable {algorithm} digest {encoded!r}") from None
    md5 = headers.get("Content-MD5")
    if md5 and whole_body:  # it covers the body sent, so only a full (200) body
        try:
            found.setdefault("md5", base64.b64decode(md5.strip(), validate=True).hex())
        except (binascii.Error, ValueError):
            raise DownloadError(f"unreadable Content-MD5 {md5!r}") from None
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
        state["validator"] = (response.headers.get("ETag")
                              or response.headers.get("Last-Modified"))
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
    final = root / f"{archive.mouse}.zip"
    part = final.with_name(final.name + ".part")
    state_path = final.with_name(final.name + ".part.json")
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
        actual = _file_digests(part, {"sha256", *expected})
        for name, digest in expected.items():
            if actual[name] != digest.lower():
                raise DownloadError(f"{archive.url}: {name} is {actual[name]}, expected "
                                    f"{digest}; the download was deleted")
    except DownloadError:
        part.unlink()
        state_path.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    state_path.unlink(missing_ok=True)
    checked = sorted(expected) + (["size"] if state["total"] or archive.size else [])
    print(f"  {archive.mouse}: {size / 2**20:.1f} MiB, sha256 {actual['sha256']} "
          f"(checked: {', '.join(checked) or 'nothing the server offered'})", file=sys.stderr)
    return actual["sha256"]


def _file_digests(path: Path, names: set[str]) -> dict[str, str]:
    hashes = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


# ----------------------------------------------------------------------------- unpacking
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


def _unpack(zip_path: Path, root: Path, archive: Archive, sha256: str | None) -> None:
    """Extracts into a temporary folder, checks it, writes the marker and renames it into place."""
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
        sha256 = sha256 or _file_digests(zip_path, {"sha256"})["sha256"]
        write_json(mouse_dir / MARKER, {
            **asdict(archive), "archive_bytes": zip_path.stat().st_size,
            "archive_sha256": sha256, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.rename(mouse_dir, root / archive.mouse)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- driver
@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    with open(root / ".download.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"{root}: another download is running here") from None
        yield


def download(root: str | os.PathLike, archives: list[Archive], *,
             allow_hosts: tuple[str, ...] = (), retries: int = 5, retry_wait: float = 5.0,
             timeout: float = 60.0, keep_archives: bool = False) -> list[str]:
    """Downloads, verifies and unpacks every archive not yet under `root`.

    Args:
      root: the dataset root; mouse folders appear under it.
      archives: what to fetch (`default_manifest()` for the real data).
      allow_hosts: hosts that redirects may lead to, besides the hosts of the archive URLs.
      retries: network failures tolerated per archive (each resumes the partial file).
      retry_wait: seconds before the first retry, doubling after each.
      timeout: seconds a connection may stall.
      keep_archives: keep `<mouse>.zip` after unpacking.

    Returns:
      The mice unpacked by this call.
    """
    root = Path(root)
    for archive in archives:
        _check_archive(archive)
    hosts = frozenset({(urlsplit(a.url).hostname or "").lower() for a in archives}
                      | {h.lower() for h in allow_hosts})
    root.mkdir(parents=True, exist_ok=True)
    done = []
    with _lock(root):
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
                _unpack(zip_path, root, archive, sha256)
            except DownloadError:
                zip_path.unlink()  # bad content: the next run downloads it again
                raise
            if not keep_archives:
                zip_path.unlink()
            done.append(archive.mouse)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dwise_jax.data.download",
        description="Download the Sensorium 2023 archives (10 mice, 148 GB unpacked) into ROOT, "
                    "resuming and skipping what is complete.")
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill")
    parser.add_argument("--mice", default=None,
                        help="comma-separated mouse folder names (default: every archive)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--base_url", default=None,
                        help="fetch BASE_URL/<mouse>.zip instead of the official repositories")
    source.add_argument("--manifest", type=Path, default=None,
                        help='JSON list of {"mouse", "url", "size"?, "sha256"?}')
    parser.add_argument("--allow_host", action="append", default=[],
                        help="another host that redirects may lead to (repeatable)")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--retry_wait", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--keep_archives", action="store_true")
    args = parser.parse_args(argv)
    try:
        archives = (load_manifest(args.manifest) if args.manifest
                    else default_manifest(args.base_url))
        if args.mice:
            wanted = args.mice.split(",")
            unknown = sorted(set(wanted) - {a.mouse for a in archives})
            if unknown:
                raise DownloadError(f"no archive for {unknown}")
            archives = [a for a in archives if a.mouse in wanted]
        done = download(args.root, archives, allow_hosts=tuple(args.allow_host),
                        retries=args.retries, retry_wait=args.retry_wait, timeout=args.timeout,
                        keep_archives=args.keep_archives)
    except (DownloadError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{len(done)} mice unpacked, {len(archives) - len(done)} already there; "
          f"root {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
