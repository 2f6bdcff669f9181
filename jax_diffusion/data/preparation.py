"""Getting a tfds dataset onto disk: a bounded check that the download hosts answer, tfds'
own download and preparation, and in a multi-process run process 0 preparing while the others
wait (`prepare_on_process_zero`)."""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax

from jax_diffusion.errors import DatasetNotFoundError, DownloadError


# Seconds for resolving and connecting to each download host before a download starts.
_PROBE_TIMEOUT = 5.0
# What process 0 publishes when the dataset is ready; anything else is its error message.
_PREPARED = "prepared"


def unreachable_download_host(urls: Iterable[str], timeout: float | None = None) -> str | None:
    """Returns why a host that `urls` download from cannot be reached, or None if all answer.

    tfds' downloader sets no timeout and retries a refused connection ten times with a growing
    backoff, so a machine without network would wait minutes; this check bounds the wait. Each
    distinct host (or the proxy that requests would use for it) gets a DNS lookup plus a TCP
    connect within `timeout` seconds, all hosts in parallel. The lookup runs in a daemon thread
    because getaddrinfo has no timeout of its own. Non-network URLs (files, gs://) are skipped.
    `timeout` defaults to _PROBE_TIMEOUT.
    """
    import requests

    timeout = _PROBE_TIMEOUT if timeout is None else timeout

    default_ports = {"http": 80, "https": 443, "ftp": 21}
    hosts = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in default_ports:
            continue
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if proxy:
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        hosts.add((parts.hostname, parts.port or default_ports.get(parts.scheme, 80)))

    errors: queue.SimpleQueue = queue.SimpleQueue()

    def connect(host: str, port: int) -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            errors.put(None)
        except OSError as e:
            errors.put(f"cannot connect to {host}:{port}: {e}")

    for host, port in sorted(hosts):
        threading.Thread(target=connect, args=(host, port), daemon=True).start()
    deadline = time.monotonic() + timeout
    for _ in hosts:
        try:
            error = errors.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return (f"no answer from {', '.join(f'{h}:{p}' for h, p in sorted(hosts))} within "
                    f"{timeout:g} s")
        if error:
            return error
    return None


class OutcomeChannel(Protocol):
    """How process 0 tells the other processes that a dataset is ready (or why it is not)."""

    def publish(self, key: str, outcome: str) -> None: ...

    def wait(self, key: str, timeout: float) -> str:
        """Returns the outcome published under `key`; raises TimeoutError after `timeout` s."""


class JaxKeyValueChannel:
    """The key-value store of jax.distributed's coordination service (what JAX's own
    checkpointing uses to agree across processes)."""

    def __init__(self):
        from jax._src import distributed  # the client has no public accessor
        self._client = distributed.global_state.client

    def publish(self, key: str, outcome: str) -> None:
        self._client.key_value_set(key, outcome, allow_overwrite=True)

    def wait(self, key: str, timeout: float) -> str:
        try:
            return self._client.blocking_key_value_get(key, int(timeout * 1000))
        except jax.errors.JaxRuntimeError as e:
            raise TimeoutError(str(e).splitlines()[0] if str(e) else "timed out") from e


def prepare_on_process_zero(
    is_prepared: Callable[[], bool],
    prepare: Callable[[], None],
    *,
    what: str,
    key: str,
    process_index: int,
    process_count: int,
    channel: OutcomeChannel | None,
    timeout: float,
) -> None:
    """Makes sure the data described by `what` is prepared, with process 0 as its only writer.

    One process: prepares it if it is missing. Several: process 0 prepares it if missing and
    then publishes the outcome under `key` (also when it found the data already there); every
    other process that does not see the data waits up to `timeout` s for that outcome instead of
    writing into the same directory, then reads process 0's copy, which must therefore be on a
    filesystem all processes share (a host-local directory gives a clear error, not a second
    writer). A failure on process 0 reaches the others as their own error at once.
    """
    if process_count == 1:
        if not is_prepared():
            prepare()
        return
    if process_index == 0:
        try:
            if not is_prepared():
                prepare()
        except Exception as e:
            channel.publish(key, str(e) or type(e).__name__)
            raise
        channel.publish(key, _PREPARED)
        return
    if is_prepared():
        return
    logging.info("Process %d waits for process 0 to prepare %s", process_index, what)
    try:
        outcome = channel.wait(key, timeout)
    except TimeoutError as e:
        raise DatasetNotFoundError(
            f"process {process_index} got no word from process 0 on preparing {what} ({e}; "
            f"the wait is config.data.prepare_timeout={timeout:g} s): raise the timeout if "
            f"preparing takes longer, or prepare the data before starting the run") from None
    if outcome != _PREPARED:
        raise DatasetNotFoundError(f"process 0 could not prepare {what}: {outcome}")
    if not is_prepared():
        raise DatasetNotFoundError(
            f"process 0 prepared {what}, but process {process_index} does not see it: the data "
            f"directory must be one shared filesystem path on every host (NFS, GCS FUSE), or "
            f"prepare the data on every host before the run")


def tfds_not_prepared(name: str, split: str, searched: str, reason: str) -> str:
    return (
        f"tfds dataset {name!r} (split {split!r}) is not prepared in {searched}, and {reason}. "
        f"Prepare it on a machine with network access with\n"
        f"    tfds build {name} --file_format=array_record --data_dir=<dir>\n"
        f"(building needs TensorFlow: pip install -e '.[tfds]') and copy <dir> here, or "
        f"point --config.data.tfds_data_dir at an existing prepared copy.")


def download_and_prepare(builder: Any, not_prepared: Callable[[str], str]) -> None:
    """Builds `builder`'s dataset as array_record files with tfds' own download manager.

    tfds verifies every download against the checksum it has registered for the URL, writes
    into a temporary directory and renames it when complete, and keeps the archives in
    <data dir>/downloads. `not_prepared(reason)` gives the message when nothing can be fetched.
    """
    import requests
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    name = builder.name
    manual_dir = builder.data_dir_root / "downloads" / "manual"  # where tfds looks by default
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not any(manual_dir.glob("*")):
        raise DatasetNotFoundError(not_prepared(
            f"tfds cannot download it: its files must first be fetched by hand into "
            f"{manual_dir} (see https://www.tensorflow.org/datasets/catalog/{name})"))
    urls = sorted(builder.url_infos or ())
    if urls:
        problem = unreachable_download_host(urls)
        if problem:
            raise DatasetNotFoundError(not_prepared(f"it cannot be downloaded here ({problem})"))
    else:
        logging.warning("tfds registers no download URL for %r, so the network cannot be checked "
                        "first; without network the download may wait for minutes", name)
    logging.info("Preparing tfds dataset %r in %s: downloading %s, verifying the checksums tfds "
                 "registers and writing array_record files; later runs reuse them",
                 name, builder.data_path, ", ".join(urls) or "its files")
    start = time.monotonic()
    try:
        builder.download_and_prepare(
            file_format="array_record",
            # GCS holds only tfrecord copies: build from the original source.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except NonMatchingChecksumError as e:
        raise DownloadError(
            f"a file downloaded for tfds dataset {name!r} does not match the checksum tfds "
            f"registers for it ({one_line(e)}): the download was corrupted or replaced; run "
            f"again, or prepare it elsewhere with tfds build {name} "
            f"--file_format=array_record") from e
    except (requests.RequestException, tfds.download.DownloadError) as e:
        raise DownloadError(
            f"downloading tfds dataset {name!r} failed ({one_line(e)}); check the network and "
            f"run again, or prepare it elsewhere with tfds build {name} "
            f"--file_format=array_record") from e
    logging.info("Prepared tfds dataset %r in %s in %.0f s", name, builder.data_path,
                 time.monotonic() - start)


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or \
        type(error).__name__
