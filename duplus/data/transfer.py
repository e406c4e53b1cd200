"""Resumable HTTP(S) download of one file with retries, backoff and a published checksum.

Bytes go to ``<name>.part`` (resumed with a Range request); only a verified file is renamed to its final name.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from duplus.errors import ChecksumError, DownloadError
from duplus.hashing import md5_file, sha256_file
from duplus.progress import progress

log = logging.getLogger(__name__)

# A host with no route out: network unreachable, host unreachable, connection refused.
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED}

CHUNK = 1 << 20
USER_AGENT = "duplus-downloader/1.0"
# Client errors that a retry cannot fix.
PERMANENT = {400, 401, 403, 404, 405, 410, 451}


class _Incomplete(Exception):
    """The server closed the connection before sending every byte."""


def _checksum_mismatch(path: Path, md5: str | None, sha256: str | None) -> tuple[str, str, str] | None:
    """``(algorithm, expected, computed)`` of the first published checksum ``path`` fails, or None."""
    for algorithm, expected, digest in (("sha256", sha256, sha256_file), ("md5", md5, md5_file)):
        if expected:
            got = digest(path)
            if got.lower() != expected.lower():
                return algorithm, expected.lower(), got
    return None


def verify_checksum(path: Path, md5: str | None = None, sha256: str | None = None, name: str | None = None) -> None:
    """Raise ``ChecksumError`` (naming the file, the expected and the computed digest) on a mismatch."""
    mismatch = _checksum_mismatch(path, md5, sha256)
    if mismatch:
        algorithm, expected, got = mismatch
        raise ChecksumError(f"{name or path.name}: {algorithm} mismatch: expected {expected}, got {got}")


SHORT_DIGEST = 12  # hex digits: enough to tell two files apart in a message a person reads


def verify_existing_download(path: Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Check a file found where a download would go; ``ChecksumError`` saying what to do if it is another file.

    Users put archives there by hand to skip a download, so the file is never deleted: without
    the advice, every rerun would fail on it with the same bare mismatch.
    """
    mismatch = _checksum_mismatch(path, md5, sha256)
    if mismatch:
        algorithm, expected, got = mismatch
        raise ChecksumError(
            f"{path} is already at the download path but is not the expected file ({algorithm} {got[:SHORT_DIGEST]}..., "
            f"expected {expected[:SHORT_DIGEST]}...). Delete or move it and rerun to fetch the file again; it is "
            f"left in place because it may be a copy you put there yourself")


def _total_from(response: http.client.HTTPResponse, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range")
    if content_range:
        match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", content_range)
        if match and match.group(2) != "*":
            return int(match.group(2))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _attempt(url: str, part: Path, timeout: float) -> bool:
    """One request: resume ``part`` from its current size; raise on any incomplete transfer.

    Returns whether ``part`` now holds bytes kept from before this request (a resume).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left to send: the .part is already complete (the checksum decides).
            return True
        raise
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            offset = 0  # the server ignored the Range header: start over
        if offset:
            start = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Incomplete(f"server resumed at the wrong offset ({response.headers.get('Content-Range')})")
        total = _total_from(response, offset)
        mode = "ab" if offset else "wb"
        with open(part, mode) as handle, progress(total=total, initial=offset, unit="B", unit_scale=True,
                                                  desc=part.name[:-5]) as bar:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                handle.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Incomplete(f"received {size} of {total} bytes")
    return bool(offset)


def download_file(url: str, destination: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
                  retries: int = 4, backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` (resuming ``destination.part``), verify it, rename it into place.

    Raises:
        DownloadError: after ``retries`` failed attempts (the ``.part`` file is kept for the next resume),
            or at once on a permanent HTTP error (404, 403, ...).
        ChecksumError: the complete file does not match ``md5`` / ``sha256`` (the bad ``.part`` is removed).
            A transfer that resumed a partial file is first repeated once from the start. A wrong file
            already at ``destination`` is kept, and the error says to delete or move it.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        verify_existing_download(destination, md5, sha256)
        return destination
    part = destination.with_name(destination.name + ".part")
    resumed = _transfer(url, part, retries, backoff, timeout)
    try:
        verify_checksum(part, md5, sha256, name=destination.name)
    except ChecksumError as error:
        part.unlink(missing_ok=True)
        if not resumed:
            raise
        # The bytes kept from an earlier run may be stale (the server's file changed since, or a
        # crash left the partial file damaged): one download from the first byte tells a bad
        # partial file from a bad published file.
        log.warning("%s after resuming the partial file %s; downloading it again from the start", error, part)
        _transfer(url, part, retries, backoff, timeout)
        try:
            verify_checksum(part, md5, sha256, name=destination.name)
        except ChecksumError as again:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{again} (downloaded twice from {url}, the second time from the start)") from None
    os.replace(part, destination)
    return destination


def _offline_hint(error: Exception | None) -> str:
    """Says so when this host found no route to the server at all (no DNS, no network), the usual
    case on a cluster's compute nodes: the message then says where the download has to run."""
    reason = getattr(error, "reason", error)  # a URLError wraps the socket's error
    offline = isinstance(reason, (socket.gaierror, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in _NO_ROUTE)
    if not offline:
        return ""
    return (f"; {socket.gethostname()} finds no route to the server: without network here, download on a host "
            "that has it (the pipeline runs downloads where Snakemake runs, not on compute nodes)")


def _transfer(url: str, part: Path, retries: int, backoff: float, timeout: float) -> bool:
    """Fill ``part`` with the whole file, resuming it across ``retries`` attempts; whether any attempt resumed."""
    last_error: Exception | None = None
    resumed = False
    for attempt in range(1, retries + 1):
        try:
            resumed = _attempt(url, part, timeout) or resumed
            last_error = None
            break
        except urllib.error.HTTPError as error:
            if error.code in PERMANENT:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; check the URL or your access") from None
            last_error = error
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Incomplete) as error:
            last_error = error
        wait = backoff * (2 ** (attempt - 1))
        log.warning("download of %s failed (attempt %d/%d: %s); retrying in %.1f s", url, attempt, retries,
                    last_error, wait)
        if attempt < retries:
            time.sleep(wait)
    if last_error is not None or not part.exists():
        raise DownloadError(f"{url}: download failed after {retries} attempts ({last_error}){_offline_hint(last_error)}; "
                            f"the partial file {part} is kept and the next run resumes it")
    return resumed
