"""The download, against a real HTTP server on 127.0.0.1 serving small archives in the real
structure (`<mouse>/...` plus `__MACOSX/` litter), made from a tiny simulated tree."""

from __future__ import annotations

import base64
import filecmp
import hashlib
import io
import json
import re
import stat
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT_S

from dwise_jax import cli
from dwise_jax.data import download
from dwise_jax.data.sensorium import NEW_MICE, OLD_MICE, DummyLabelsWarning, SensoriumDataset

REPO = Path(__file__).resolve().parents[1]
NEW, OLD = NEW_MICE[0], OLD_MICE[0]


class ArchiveServer:
    """http.server with Range/If-Range support that can cut a response off halfway."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bytes_sent = 0
        self.cut_once: set[str] = set()
        self.headers: dict[str, dict[str, str]] = {}
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match and self.headers.get("If-Range", etag) == etag:
                    start = int(match[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                for key, value in server.headers.get(self.path, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                body = data[start:]
                if self.path in server.cut_once:  # half the body, then the connection closes
                    server.cut_once.discard(self.path)
                    body = body[:len(body) // 2]
                self.wfile.write(body)
                server.bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_zip(mouse_dir: Path, name: str, extra: dict[str, bytes] | None = None,
             comment: bytes = b"") -> bytes:
    """The archive of one mouse as the organisers lay it out: `<name>/...` and `__MACOSX/`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.comment = comment
        zf.writestr(f"{name}/", b"")
        for path in sorted(mouse_dir.rglob("*")):
            arcname = f"{name}/{path.relative_to(mouse_dir).as_posix()}"
            if path.is_dir():
                zf.writestr(arcname + "/", b"")
            else:
                zf.write(path, arcname)
        zf.writestr(f"__MACOSX/{name}/._meta", b"\0\5\26\7 apple double")
        for arcname, data in (extra or {}).items():
            zf.writestr(arcname, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Two simulated mice (folder names not real ones); the archives rename them."""
    from dwise_jax.data import synthetic

    root = tmp_path_factory.mktemp("src") / "sensorium"
    synthetic.generate(root, mice=2, neurons=3, trials=20, frames=40, seed=1)
    return root


@pytest.fixture(scope="module")
def sources(tree) -> dict[str, Path]:
    names = sorted(p.name for p in tree.iterdir() if p.name.startswith("dynamic"))
    return {NEW: tree / names[0], OLD: tree / names[1]}


@pytest.fixture(scope="module")
def archives(sources) -> dict[str, bytes]:
    return {mouse: make_zip(path, mouse) for mouse, path in sources.items()}


@pytest.fixture()
def server(archives):
    srv = ArchiveServer({f"/{m}.zip": data for m, data in archives.items()})
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def run(root: Path, *flags: str) -> int:
    """`python -m dwise_jax.data.download --root ROOT ...` in process; returns the exit status."""
    return cli.call(download.define_flags, download.run,
                    ["--root", str(root), "--retry_wait", "0", "--timeout", "60", *flags],
                    errors=download.ERRORS)


def manifest(tmp_path: Path, entries: list[dict]) -> str:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    return str(path)


def assert_same_tree(got: Path, want: Path) -> None:
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(got) for p in got.rglob("*")
                            if p.is_file() and p.name != download.MARKER) == files
    match, mismatch, errors = filecmp.cmpfiles(want, got, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == len(files)


def leftovers(root: Path) -> list[str]:
    """Anything beside mouse folders: parts, zips, state, temporary folders."""
    return sorted(p.name for p in root.iterdir()
                  if p.name != ".download.lock" and not (p.is_dir() and p.name.startswith("dyn")))


def test_default_manifest_names_both_official_repositories():
    archives = download.default_manifest()
    assert [a.mouse for a in archives] == [*NEW_MICE, *OLD_MICE]
    for a in archives:
        repo = "sensorium_2023_dataset" if a.mouse in NEW_MICE else "Sensorium2023Data"
        assert a.url == f"https://gin.g-node.org/pollytur/{repo}/raw/master/{a.mouse}.zip"
    mirror = download.default_manifest("http://mirror.example/s/")
    assert mirror[7].url == f"http://mirror.example/s/{OLD_MICE[2]}.zip"


def test_downloads_verifies_unpacks_and_then_skips(tmp_path, server, sources, archives):
    data = archives[NEW]
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    server.headers[f"/{NEW}.zip"] = {"Repr-Digest": f"sha-256=:{digest}:"}
    root = tmp_path / "data"
    assert run(root, "--base_url", server.url(), "--mice", f"{OLD},{NEW}") == 0
    with pytest.warns(DummyLabelsWarning):  # the old mouse's test tiers hold dummy zeros
        dataset = SensoriumDataset.open(root)
    assert dataset.names == [NEW, OLD]  # readout order: new mice first
    for mouse, src in sources.items():
        assert_same_tree(root / mouse, src)
        marker = json.loads((root / mouse / download.MARKER).read_text())
        assert marker["archive_sha256"] == hashlib.sha256(archives[mouse]).hexdigest()
        assert marker["url"] == server.url(f"{mouse}.zip")
    assert not (root / "__MACOSX").exists()
    assert leftovers(root) == []
    requests = len(server.requests)
    assert requests == 2
    assert run(root, "--base_url", server.url(), "--mice", f"{NEW},{OLD}") == 0
    assert len(server.requests) == requests  # complete mice are not fetched again


def test_resumes_a_download_cut_off_halfway(tmp_path, server, sources, archives):
    data, path = archives[NEW], f"/{NEW}.zip"
    server.cut_once.add(path)
    root = tmp_path / "data"
    args = [sys.executable, "-m", "dwise_jax.data.download", "--root", str(root), "--base_url",
            server.url(), "--mice", NEW, "--retries", "0"]
    first = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=HANG_TIMEOUT_S)
    assert first.returncode == 1 and "run again to resume" in first.stderr
    part = root / f"{NEW}.zip.part"
    assert part.read_bytes() == data[:len(data) // 2]
    assert not (root / NEW).exists() and not (root / f"{NEW}.zip").exists()

    assert run(root, "--base_url", server.url(), "--mice", NEW, "--retries", "0") == 0
    (_, h1), (_, h2) = server.requests
    assert "Range" not in h1
    assert h2["Range"] == f"bytes={len(data) // 2}-"
    assert h2["If-Range"] == f'"{hashlib.sha256(data).hexdigest()[:16]}"'
    assert server.bytes_sent == len(data)  # nothing fetched twice
    assert_same_tree(root / NEW, sources[NEW])
    assert leftovers(root) == []


def test_retries_by_itself_and_restarts_when_the_archive_changed(tmp_path, server, sources,
                                                                archives):
    path = f"/{NEW}.zip"
    server.cut_once.add(path)
    root = tmp_path / "data"
    assert run(root, "--base_url", server.url(), "--mice", NEW, "--retries", "0") == 1
    # The server now has another archive: If-Range makes it send the whole new file.
    new_data = make_zip(sources[NEW], NEW, comment=b"second edition")
    server.files[path] = new_data
    server.cut_once.add(path)  # and the first try of this run is cut off too
    assert run(root, "--base_url", server.url(), "--mice", NEW, "--retries", "2") == 0
    old_etag = f'"{hashlib.sha256(archives[NEW]).hexdigest()[:16]}"'
    new_etag = f'"{hashlib.sha256(new_data).hexdigest()[:16]}"'
    (_, h1), (_, h2), (_, h3) = server.requests
    assert h2["If-Range"] == old_etag  # answered with the whole new file (200), cut again
    assert (h3["Range"], h3["If-Range"]) == (f"bytes={len(new_data) // 2}-", new_etag)
    marker = json.loads((root / NEW / download.MARKER).read_text())
    assert marker["archive_sha256"] == hashlib.sha256(new_data).hexdigest()
    assert_same_tree(root / NEW, sources[NEW])
    assert leftovers(root) == []


@pytest.mark.parametrize("how", ["manifest_sha256", "manifest_size", "digest_header"])
def test_a_failed_check_leaves_nothing(tmp_path, server, archives, sources, how, capsys):
    data = archives[NEW]
    entry = {"mouse": NEW, "url": server.url(f"{NEW}.zip")}
    if how == "manifest_sha256":
        entry["sha256"] = hashlib.sha256(b"something else").hexdigest()
    elif how == "manifest_size":
        entry["size"] = len(data) + 1
    else:
        wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
        server.headers[f"/{NEW}.zip"] = {"Digest": f"MD5={wrong}"}
    root = tmp_path / "data"
    assert run(root, "--manifest", manifest(tmp_path, [entry])) == 1
    message = capsys.readouterr().err
    assert "the download was deleted" in message
    assert ("bytes, the manifest says" in message) == (how == "manifest_size")
    assert ("md5 is" in message) == (how == "digest_header")
    assert leftovers(root) == [] and not (root / NEW).exists()
    # With the right checksum it passes.
    entry.pop("size", None)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    server.headers.clear()
    assert run(root, "--manifest", manifest(tmp_path, [entry])) == 0
    assert_same_tree(root / NEW, sources[NEW])


def _symlink_member() -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(f"{NEW}/data/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


@pytest.mark.parametrize("member", ["../evil.npy", f"{NEW}/../../evil.npy", "/tmp/evil.npy",
                                    "elsewhere/evil.npy", "symlink"])
def test_refuses_unsafe_archives(tmp_path, server, sources, member, capsys):
    if member == "symlink":
        buf = io.BytesIO(make_zip(sources[NEW], NEW))
        with zipfile.ZipFile(buf, "a") as zf:
            zf.writestr(*_symlink_member())
        data = buf.getvalue()
    else:
        data = make_zip(sources[NEW], NEW, extra={member: b"gotcha"})
    server.files[f"/{NEW}.zip"] = data
    root = tmp_path / "a" / "data"
    assert run(root, "--base_url", server.url(), "--mice", NEW) == 1
    name = f"{NEW}/data/link" if member == "symlink" else member
    reason = {"symlink": "is a link", "elsewhere/evil.npy": "lies outside"}.get(member, "unsafe")
    err = capsys.readouterr().err
    assert repr(name) in err and reason in err
    assert not (root / NEW).exists() and leftovers(root) == []
    assert not list(tmp_path.rglob("evil.npy")) and not Path("/tmp/evil.npy").exists()


def test_a_tree_that_does_not_open_is_refused(tmp_path, server, sources):
    broken = tmp_path / "broken"
    for p in sources[NEW].rglob("*"):
        if p.is_file() and "behavior" not in p.parts:
            (broken / p.relative_to(sources[NEW])).parent.mkdir(parents=True, exist_ok=True)
            (broken / p.relative_to(sources[NEW])).write_bytes(p.read_bytes())
    server.files[f"/{NEW}.zip"] = make_zip(broken, NEW)
    root = tmp_path / "data"
    assert run(root, "--base_url", server.url(), "--mice", NEW) == 1
    assert not (root / NEW).exists() and leftovers(root) == []


def test_talks_only_to_configured_hosts(tmp_path, server, sources, capsys):
    server.redirects[f"/{NEW}.zip"] = f"http://localhost:{server.port}/moved.zip"
    server.files["/moved.zip"] = server.files[f"/{NEW}.zip"]
    root = tmp_path / "data"
    assert run(root, "--base_url", server.url(), "--mice", NEW) == 1
    assert "host 'localhost' is not one the download may contact" in capsys.readouterr().err
    assert [p for p, _ in server.requests] == [f"/{NEW}.zip"]  # the redirect was not followed
    assert run(root, "--base_url", server.url(), "--mice", NEW, "--allow_host", "localhost") == 0
    assert [p for p, _ in server.requests][1:] == [f"/{NEW}.zip", "/moved.zip"]
    assert_same_tree(root / NEW, sources[NEW])


def test_bad_manifests_and_foreign_folders(tmp_path, server):
    root = tmp_path / "data"
    bad_name = {"mouse": "../../etc", "url": server.url("x.zip")}
    assert run(root, "--manifest", manifest(tmp_path, [bad_name])) == 1
    bad_scheme = {"mouse": NEW, "url": "file:///etc/passwd"}
    assert run(root, "--manifest", manifest(tmp_path, [bad_scheme])) == 1
    # A mouse folder that this tool did not write is left alone and not fetched.
    (root / NEW).mkdir(parents=True)
    (root / NEW / "mine.txt").write_text("keep")
    assert run(root, "--base_url", server.url(), "--mice", NEW) == 0
    assert server.requests == [] and (root / NEW / "mine.txt").read_text() == "keep"


def test_after_a_crash_the_verified_archive_is_unpacked_and_stale_folders_go(tmp_path, server,
                                                                             archives, sources):
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{NEW}.zip").write_bytes(archives[NEW])  # verified, then killed while unpacking
    stale = root / f".{NEW}.unpack-x1y2"
    (stale / NEW / "data").mkdir(parents=True)
    assert run(root, "--base_url", server.url(), "--mice", NEW, "--keep_archives") == 0
    assert server.requests == []
    assert not stale.exists() and (root / f"{NEW}.zip").exists()
    assert_same_tree(root / NEW, sources[NEW])
