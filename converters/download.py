"""Download an official release file with resume (HTTP Range), a progress bar and its sha256.

Standard library only (``urllib``). The file is fetched into ``<file>.part`` and renamed to its
final name only when complete and, for a tarball, readable to its end: a killed download leaves a
``.part`` that the next run resumes (``Range: bytes=<size>-``), never a half file under the final
name. ``EFFDET_RELEASE_BASE_URL`` replaces the official base: the file is then fetched from
``<base>/<release file name>`` (a mirror, or a loopback server in tests).
"""
from __future__ import annotations

import gzip
import http.client
import os
import re
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from effdet_torch.files import atomic_write_text, sha256_file

__all__ = ["BASE_URL_ENV", "DownloadError", "RELEASE_URLS", "download", "release_url", "write_sha256_file"]

BASE_URL_ENV = "EFFDET_RELEASE_BASE_URL"
USER_AGENT = "effdet-parity-convert-ckpt"
CHUNK = 1 << 16
#: attempts per download (connection errors, 5xx and short bodies are retried, resuming the .part)
ATTEMPTS = 3
#: seconds before retry n (n = 1, 2, ...) is ``RETRY_DELAY_S * n``
RETRY_DELAY_S = 1.0
TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """A download that could not be completed; the message says why and what is left on disk."""


#: the official release file of every variant (google/automl README)
RELEASE_URLS = {
    **{f"efficientdet-d{i}": f"https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d{i}.tar.gz"
       for i in range(8)},
    "efficientdet-d7x": "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d7x.tar.gz",
    **{f"efficientdet-lite{i}": f"https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite{i}.tgz"
       for i in (0, 1, 2, 3, 4)},
    "efficientdet-lite3x": "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite3x.tgz",
}


def release_url(variant: str, official_url: str) -> str:
    """The URL to fetch: ``official_url``, or ``$EFFDET_RELEASE_BASE_URL/<file name>`` when set."""
    base = os.environ.get(BASE_URL_ENV, "").strip()
    if not base:
        return official_url
    name = official_url.rsplit("/", 1)[-1]
    return base.rstrip("/") + "/" + name


def write_sha256_file(path: Path, digest: str) -> Path:
    """Write ``<path>.sha256`` in ``sha256sum`` format (``<hex>  <name>``), atomically."""
    out = path.with_name(path.name + ".sha256")
    atomic_write_text(out, f"{digest}  {path.name}\n")
    return out


def read_sha256_file(path: Path) -> str | None:
    """The digest stored in ``<path>.sha256``, or None."""
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return None
    m = re.match(r"\s*([0-9a-fA-F]{64})\b", side.read_text())
    return m.group(1).lower() if m else None


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _start_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(\d+)-\d+/", value or "")
    return int(m.group(1)) if m else None


class _Retry(Exception):
    """A transient failure: try again (resuming whatever the .part holds)."""


def _fetch_once(url: str, part: Path, progress: bool, desc: str) -> int:
    """One request: append to ``part`` from its current size. Returns the total size; raises
    :class:`_Retry` for transient failures and :class:`DownloadError` for final ones."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is complete or wrong
            total = _total_from_content_range(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                return total
            part.unlink()
            raise _Retry(f"the server refused to resume at byte {have} (HTTP 416); starting over") from None
        e.close()
        msg = f"HTTP {e.code} {e.reason}"
        if e.code >= 500 or e.code == 429:
            raise _Retry(msg) from None
        raise DownloadError(f"{url}: {msg}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(f"cannot connect ({reason})") from None
    with resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"the server resumed at byte {start}, not {have}; starting over")
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range sends it all again)
            have = 0
            total = length
            mode = "wb"
        from tqdm import tqdm

        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not progress, leave=True, file=sys.stderr)
        got = have
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
                        raise _Retry(f"connection lost after {got} bytes ({type(e).__name__})") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
        if total is not None and got != total:
            raise _Retry(f"connection closed after {got} of {total} bytes")
        return got


def _check_complete_file(path: Path, name: str) -> None:
    """A downloaded tarball (by its final ``name``) must be readable to its end: the whole gzip
    stream (its CRC and length catch corruption and truncation) and every tar member."""
    if not name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        return
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            with gzip.open(path, "rb") as g:
                while g.read(1 << 20):
                    pass
        with tarfile.open(path, "r:*") as tar:
            n = 0
            for m in tar:
                if m.isfile():
                    f = tar.extractfile(m)
                    if f is not None:
                        while f.read(1 << 20):
                            pass
                n += 1
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        raise DownloadError(f"not a readable {'gzip' if name.lower().endswith('gz') else 'tar'} archive "
                            f"({type(e).__name__}: {e})") from None
    if n == 0:
        raise DownloadError("an empty tar archive")


def download(url: str, dest: str | os.PathLike, progress: bool = True, attempts: int | None = None,
             log=print) -> str:
    """Fetch ``url`` into ``dest`` (resuming ``<dest>.part``); write ``<dest>.sha256``; return the digest.

    An existing ``dest`` is not fetched again: its digest is checked against ``<dest>.sha256`` when
    there is one. A download that fails leaves no ``dest`` (a ``.part`` to resume may stay); a
    complete file that is not a readable tarball is deleted with its ``.part``.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs can be downloaded")
    if dest.exists():
        digest = sha256_file(dest)
        stored = read_sha256_file(dest)
        if stored is not None and stored != digest:
            raise DownloadError(f"{dest}: sha256 {digest} differs from the stored {dest.name}.sha256 ({stored}); "
                                f"the file changed since it was downloaded: delete both and run again")
        if stored is None:
            write_sha256_file(dest, digest)
        log(f"download    {dest} already here, not fetched again")
        return digest
    part = dest.with_name(dest.name + ".part")
    attempts = ATTEMPTS if attempts is None else attempts
    if part.exists():
        log(f"download    resuming {part.name} at {part.stat().st_size:,} bytes")
    last = ""
    for i in range(1, max(1, attempts) + 1):
        try:
            _fetch_once(url, part, progress, dest.name)
            break
        except _Retry as e:
            last = str(e)
            if i < attempts:
                log(f"download    {last}; retrying ({i + 1}/{attempts})")
                time.sleep(RETRY_DELAY_S * i)
    else:
        left = (f"; {part.name} ({part.stat().st_size:,} bytes) is kept and the next run resumes it"
                if part.exists() and part.stat().st_size else "")
        if part.exists() and not part.stat().st_size:
            part.unlink()
        raise DownloadError(f"{url}: download failed after {attempts} attempt(s): {last}{left}")
    try:
        _check_complete_file(part, dest.name)
    except DownloadError as e:
        size = part.stat().st_size
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the downloaded file ({size:,} bytes) is corrupt or truncated: {e}; "
                            f"it was deleted, run again to download it anew") from None
    digest = sha256_file(part)
    os.replace(part, dest)
    write_sha256_file(dest, digest)
    return digest

