"""Files fetched on first use (the FID Inception weights) into a user cache, hash-verified.

`fetch(url, sha256, filename)` returns `<cache_dir()>/<filename>`, downloading it when it is absent
or does not match `sha256`. The download goes to a temporary name in the same directory and is
renamed only after its SHA-256 matched, so an interrupted or corrupt transfer never leaves a file
that looks complete. Every network step is bounded by `timeout` (DNS included), so an offline
machine gets one clear error within seconds instead of a hang.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request

from tqdm import tqdm

from jax_diffusion.errors import DownloadError

_CHUNK = 1 << 20
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# path -> (size, mtime_ns) of cached files already hashed by this process.
_VERIFIED: dict[str, tuple[int, int]] = {}


def cache_dir() -> str:
    """$JAX_DIFFUSION_CACHE_DIR, else $XDG_CACHE_HOME/jax_diffusion, else
    ~/.cache/jax_diffusion (not created here)."""
    explicit = os.environ.get("JAX_DIFFUSION_CACHE_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_diffusion")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_valid(path: str, sha256: str) -> bool:
    """Whether the cached file matches; hashed once per process while its size and mtime hold."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    signature = (stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(path) == signature:
        return True
    if sha256_of(path) != sha256:
        return False
    _VERIFIED[path] = signature
    return True


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    """urlopen with the whole connection set-up bounded: the socket timeout covers connect and
    reads, not the name lookup, so the call runs in a thread that is abandoned after `timeout`."""
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome["response"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=connect, daemon=True, name="download-connect")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"timed out: no answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def _download_to(url: str, file, timeout: float, label: str) -> str:
    """Stream `url` into the open binary `file`; returns the SHA-256 of what was received.
    Raises OSError-family or http.client errors on failure, including a short body."""
    digest = hashlib.sha256()
    with _open(url, timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=expected, unit="B", unit_scale=True, desc=label, disable=None) as bar:
            while chunk := response.read(_CHUNK):
                file.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")
    return digest.hexdigest()


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot connect ({error.reason})"
    if isinstance(error, http.client.IncompleteRead):
        return f"connection closed after {len(error.partial)} bytes"
    return str(error) or type(error).__name__


def fetch(url: str, sha256: str, filename: str, timeout: float = 10.0) -> str:
    """The local path of `filename` in cache_dir(), downloaded from `url` unless a copy with the
    SHA-256 `sha256` (64 hex digits) is already there. `timeout` bounds the connection set-up
    and every read, not the whole transfer. Raises DownloadError (no file left behind) when the
    download fails, is cut short or does not match `sha256`."""
    sha256 = sha256.lower()
    if not SHA256_PATTERN.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    directory = cache_dir()
    path = os.path.join(directory, filename)
    if _is_valid(path, sha256):
        return path
    if os.path.exists(path):
        logging.warning("%s does not match SHA-256 %s: downloading it again", path, sha256)
    by_hand = (f"download it by hand to {path} (SHA-256 {sha256}), or set "
               f"$JAX_DIFFUSION_CACHE_DIR to a directory that holds it")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the cache directory {directory} ({error.strerror}); "
                            f"set $JAX_DIFFUSION_CACHE_DIR to a writable directory") from error
    logging.info("downloading %s to %s", url, path)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{filename}.",
                                             suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as file:
            try:
                got = _download_to(url, file, timeout, filename)
            except (OSError, http.client.HTTPException, ValueError) as error:
                raise DownloadError(f"downloading {url} failed: {_reason(error)}; check the "
                                    f"connection and retry, or {by_hand}") from error
        if got != sha256:
            raise DownloadError(f"{url} gave a file with SHA-256 {got}, expected {sha256}: the "
                                f"download is corrupt or the file changed upstream; nothing was "
                                f"kept. Retry, or {by_hand}")
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    stat = os.stat(path)
    _VERIFIED[path] = (stat.st_size, stat.st_mtime_ns)
    logging.info("saved %s (SHA-256 verified)", path)
    return path
