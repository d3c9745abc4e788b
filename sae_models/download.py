"""A resuming, verifying downloader for files served the way Hugging Face's `resolve` endpoint serves them
(stdlib only: the quick start uses it before torch is installed).

The server states each file's size and hash in its headers (`X-Linked-Size` and `X-Linked-ETag` = sha256 for
files stored with git LFS or Xet; `ETag` = the git blob sha1 for small files). A download goes to
`<file>.part`, resumes from there with an HTTP Range request after a break, and is renamed into place only when
its size and hash match. A file without a stated hash is not downloaded, and `max_bytes` bounds what a server
may send.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class DownloadError(RuntimeError):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def expected_size_and_hash(url: str, timeout: float = 30) -> tuple[int | None, str | None, str | None]:
    """(size, hash algorithm, hex digest) announced by the server for `url`, without downloading it."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
    try:
        resp = opener.open(req, timeout=timeout)
        headers = resp.headers
    except urllib.error.HTTPError as e:  # a 3xx redirect lands here, with the headers we want
        if e.code >= 400:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        headers = e.headers
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({e.reason})") from None
    except OSError as e:  # a connection dropped before any answer (urllib raises it unwrapped)
        raise DownloadError(f"{url}: cannot connect ({e.__class__.__name__}: {e})") from None
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    linked = (headers.get("X-Linked-ETag") or "").strip('W/"')
    etag = (headers.get("ETag") or "").strip('W/"')
    if re.fullmatch(r"[0-9a-f]{64}", linked):
        return (int(size) if size else None), "sha256", linked
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return (int(size) if size else None), "git-sha1", etag
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return (int(size) if size else None), "sha256", etag
    return (int(size) if size else None), None, None


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "git-sha1":  # git's blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(name: str, done: int, total: int | None, started: float, out=sys.stderr):
    rate = done / max(time.monotonic() - started, 1e-6)
    if total:
        filled = int(30 * done / total)
        out.write(f"\r{name[:40]:<40} [{'#' * filled}{'.' * (30 - filled)}] {done / total:6.1%} "
                  f"{done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate / 1e6:6.1f} MB/s")
    else:
        out.write(f"\r{name[:40]:<40} {done / 1e6:8.1f} MB {rate / 1e6:6.1f} MB/s")
    out.flush()


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 60, chunk: int = 1 << 20,
             max_bytes: int | None = None) -> Path:
    """Download `url` to `dest`, resuming `dest.part`; verify size and hash before renaming into place. With
    `max_bytes`, a file the server states (or turns out) to be larger is refused and nothing is kept."""
    dest = Path(dest)
    size, algorithm, digest = expected_size_and_hash(url, timeout)
    if algorithm is None:
        raise DownloadError(f"{url}: the server gives no hash for this file, so it cannot be verified; not downloaded")
    if max_bytes is not None and (size is None or size > max_bytes):
        raise DownloadError(f"{url}: the server states {'no size' if size is None else f'{size} bytes'} for this "
                            f"file; at most {max_bytes} bytes are accepted here; not downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and have == size:
                resp = None
            else:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"{url}: cannot connect ({e.reason})") from None
        except OSError as e:
            raise DownloadError(f"{url}: cannot connect ({e.__class__.__name__}: {e})") from None
        if resp is not None:
            mode = "ab" if have and resp.status == 206 else "wb"
            done = have if mode == "ab" else 0
            started = time.monotonic()
            try:
                with resp, open(part, mode) as f:
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        f.write(block)
                        done += len(block)
                        if max_bytes is not None and done > max_bytes:
                            raise OSError(f"more than the {max_bytes} bytes accepted here")
                        if progress:
                            _progress(dest.name, done, size, started)
            except (OSError, urllib.error.URLError) as e:
                if progress:
                    sys.stderr.write("\n")
                if max_bytes is not None and done > max_bytes:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{url}: {e}; the part was deleted") from None
                raise DownloadError(
                    f"{url}: the download broke off after {done} bytes ({e}); run again to resume from {part}"
                ) from None
            if progress:
                sys.stderr.write("\n")
    got = part.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; run again to resume from {part}")
    actual = file_digest(part, algorithm)
    if actual != digest:
        part.unlink()
        raise DownloadError(f"{url}: {algorithm} of the download is {actual}, expected {digest}; the file was deleted")
    os.replace(part, dest)
    return dest
