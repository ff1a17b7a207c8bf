"""`python -m dwise_jax.data.download --root DIR`: fetch and unpack the real Sensorium 2023 data
(ten mice, 148 GB; docs/data.md#downloading-the-real-data). Which archives, and unpacking one
safely, is `dwise_jax.data.archives`; this module owns the HTTP transfer and the driver.

A mouse folder is skipped once present; a download resumes from `<mouse>.zip.part`, and only a
verified file becomes `<mouse>.zip`, so the final names only ever hold complete data. Only the
hosts of the archive URLs are contacted unless `--allow_host` names another.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from absl import flags

from dwise_jax import cli
from dwise_jax.atomic import write_json
from dwise_jax.data.archives import (
    CHUNK,
    MARKER,
    Archive,
    DownloadError,
    check_archive,
    default_manifest,
    file_digests,
    load_manifest,
    unpack,
)
from dwise_jax.data.sensorium import DatasetError

_HASHES = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}
ERRORS = (DownloadError, DatasetError)  # the command's users' to fix: one `error:` line, exit 1


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
        actual = file_digests(part, {"sha256", *expected})
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
        check_archive(archive)
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
                unpack(zip_path, root, archive, sha256)
            except DownloadError:
                zip_path.unlink()  # bad content: the next run downloads it again
                raise
            if not keep_archives:
                zip_path.unlink()
            done.append(archive.mouse)
    return done


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("root", None, "Dataset root to fill.", flag_values=fv)
    flags.mark_flag_as_required("root", flag_values=fv)
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
    flags.DEFINE_boolean("keep_archives", False, "Keep <mouse>.zip after unpacking.",
                         flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise cli.UsageError(f"unexpected arguments {args}; the dataset root is --root")
    archives = load_manifest(fv.manifest) if fv.manifest else default_manifest(fv.base_url)
    if fv.mice:
        unknown = sorted(set(fv.mice) - {a.mouse for a in archives})
        if unknown:
            raise DownloadError(f"no archive for {unknown}")
        archives = [a for a in archives if a.mouse in fv.mice]
    done = download(fv.root, archives, allow_hosts=tuple(fv.allow_host), retries=fv.retries,
                    retry_wait=fv.retry_wait, timeout=fv.timeout, keep_archives=fv.keep_archives)
    print(f"{len(done)} mice unpacked, {len(archives) - len(done)} already there; root {fv.root}")
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
