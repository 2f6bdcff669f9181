"""A tfds dataset prepared on first use (jax_diffusion/data/), with nothing outside 127.0.0.1.

The real tfds CIFAR-10 builder downloads a small archive in the real cifar-10-binary.tar.gz
format (250 images written here) from a loopback HTTP server that counts its connections and
requests; tests/tfds_redirect.py points the builder's URL and registered checksum at it.

- main.py --mode=train on an empty data dir prepares the data (one request), trains, and the
  prepared examples are the archive's; a second run reuses them without connecting at all;
- the server down: main.py stops with one line naming the host, and the library call returns
  within seconds; a resolver that never answers and a connect that never completes are cut off
  by the probe's timeout;
- a registered checksum that does not match is refused by tfds and a download cut off halfway
  is one error (nothing prepared either time); config.data.download=False stops without a
  connection; a dataset tfds cannot download names the manual-download directory;
- several processes: process 0 prepares, the others wait for its outcome (fake processes on
  threads for every branch, and two real jax.distributed processes on the real builder).
"""
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli_helpers import ENV, MAIN, error_line
from loopback import serving
from tfds_redirect import ARCHIVE_NAME, redirect_cifar10
from tiny_config import ROOT, tiny_config, tiny_flags

from jax_diffusion import data
from jax_diffusion.errors import DatasetNotFoundError, DownloadError

# Integration: loopback servers, tfds builds. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

REDIRECT = os.path.join(ROOT, "tests", "tfds_redirect.py")
TIMEOUT = 300  # seconds for any one child run on a loaded 2-core machine
CLASS_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_PER_FILE, TEST_COUNT = 40, 50  # 5 x 40 training images, 50 test images


# ---------------------------------------------------------------- the archive and its server

def _cifar_archive() -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A gzipped tar laid out like cifar-10-binary.tar.gz; returns (bytes, {split: (images
    uint8 [n, 32, 32, 3], labels uint8 [n])}). A record is 1 label byte + 3072 bytes, the
    image as planes (C, H, W)."""
    rng = np.random.default_rng(0)
    splits = {"train": ([], []), "test": ([], [])}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))

        files = [(f"data_batch_{i}.bin", "train", TRAIN_PER_FILE) for i in range(1, 6)]
        for name, split, count in [*files, ("test_batch.bin", "test", TEST_COUNT)]:
            images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, count, dtype=np.uint8)
            records = np.concatenate(
                [labels[:, None], images.transpose(0, 3, 1, 2).reshape(count, 3072)], axis=1)
            add(name, records.tobytes())
            splits[split][0].append(images)
            splits[split][1].append(labels)
        add("batches.meta.txt", ("\n".join(CLASS_NAMES) + "\n\n").encode())
    return buffer.getvalue(), {k: (np.concatenate(v[0]), np.concatenate(v[1]))
                               for k, v in splits.items()}


class CountingServer(http.server.ThreadingHTTPServer):
    """Serves `files` ({path: bytes}) on 127.0.0.1 and counts connections and GET requests.
    Under /cut/<path> it announces the whole file but closes the connection halfway."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.connections = 0
        self.gets = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a client that connects and sends nothing does not hold a thread for long

    def do_GET(self):
        self.server.gets += 1
        cut = self.path.startswith("/cut/")
        body = self.server.files.get(self.path.removeprefix("/cut") if cut else self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        self.close_connection = True

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def archive():
    payload, splits = _cifar_archive()
    return {"bytes": payload, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
            "splits": splits}


@pytest.fixture(scope="module")
def server(archive):
    """The archive at http://127.0.0.1:<port>/cifar-10-binary.tar.gz, stopped at the end."""
    with serving(CountingServer({f"/{ARCHIVE_NAME}": archive["bytes"]})) as httpd:
        httpd.url = f"{httpd.url}/{ARCHIVE_NAME}"
        yield httpd


def _free_port() -> int:
    """A loopback port nothing listens on: connections are refused, a coordinator can bind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redirected(archive):
    """In-process redirect of the cifar10 builder: call with (url[, sha256]); undone after."""
    undos = []

    def redirect(url, sha256=archive["sha256"]):
        undos.append(redirect_cifar10(url, archive["size"], sha256))

    yield redirect
    for undo in reversed(undos):
        undo()


def _cifar_config(data_dir, **overrides):
    return tiny_config(data__dataset="cifar10", data__image_size=32, data__channels=3,
                       data__tfds_data_dir=str(data_dir), model__ch_mult=(1,),
                       train__num_steps=2, **overrides)


def _main(url, archive, workdir, data_dir):
    """main.py --mode=train in a child process with the cifar10 builder redirected to `url`."""
    flags = tiny_flags(data__dataset="cifar10", data__image_size=32, data__channels=3,
                       data__tfds_data_dir=str(data_dir), model__ch_mult="(1,)",
                       train__num_steps=2, train__checkpoint_every=2, train__log_every=1)
    command = [sys.executable, REDIRECT, url, str(archive["size"]), archive["sha256"], MAIN,
               f"--workdir={workdir}", "--mode=train", *flags]
    return subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _prepared(data_dir) -> bool:
    return any(data_dir.glob("cifar10/*/dataset_info.json"))


def _as_model_input(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ---------------------------------------------------------------- end to end through main.py

def test_first_run_prepares_cifar10_and_trains_then_reuses_it(server, archive, tmp_path):
    data_dir = tmp_path / "tfds"
    before = server.gets
    first = _main(server.url, archive, tmp_path / "run1", data_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    assert server.gets == before + 1  # the archive, once
    assert "Preparing tfds dataset 'cifar10'" in first.stderr
    assert "Prepared tfds dataset 'cifar10'" in first.stderr
    assert os.path.isdir(tmp_path / "run1" / "checkpoints" / "2")
    assert list(data_dir.glob("cifar10/3.0.2/cifar10-train.array_record-*"))

    # The prepared data are the archive's images and labels (tfds stores them in its own
    # order), the class names come from batches.meta.txt, and the counts are the archive's.
    config = _cifar_config(data_dir)
    assert data.dataset_info(config) == (5 * TRAIN_PER_FILE, 10)
    for split, count in (("train", 5 * TRAIN_PER_FILE), ("test", TEST_COUNT)):
        images, labels = data.load_eval_arrays(config, split=split)
        expected_images, expected_labels = archive["splits"][split]
        index = {image.tobytes(): i for i, image in enumerate(_as_model_input(expected_images))}
        order = [index[image.tobytes()] for image in images]
        assert sorted(order) == list(range(count))
        np.testing.assert_array_equal(labels, expected_labels[order])
    names = tfds.builder("cifar10", data_dir=str(data_dir)).info.features["label"].names
    assert names == CLASS_NAMES

    connections = server.connections
    second = _main(server.url, archive, tmp_path / "run2", data_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (server.gets, server.connections) == (before + 1, connections)  # not even a probe
    assert "Preparing tfds dataset" not in second.stderr
    assert os.path.isdir(tmp_path / "run2" / "checkpoints" / "2")


def test_server_down_gives_one_line(archive, tmp_path):
    port = _free_port()
    data_dir = tmp_path / "tfds"
    result = _main(f"http://127.0.0.1:{port}/{ARCHIVE_NAME}", archive, tmp_path / "run", data_dir)
    line = error_line(result)
    assert f"cannot connect to 127.0.0.1:{port}" in line
    assert "tfds build cifar10 --file_format=array_record" in line and str(data_dir) in line
    assert not _prepared(data_dir)


# ---------------------------------------------------------------- in process

def test_unreachable_server_fails_within_seconds(redirected, tmp_path):
    port = _free_port()
    redirected(f"http://127.0.0.1:{port}/{ARCHIVE_NAME}")
    config = _cifar_config(tmp_path)
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as error:
        data.create_train_iterator(config, seed=0)
    assert time.monotonic() - start < 10
    assert f"cannot connect to 127.0.0.1:{port}" in str(error.value)
    assert "tfds build cifar10" in str(error.value)
    assert not _prepared(tmp_path)


def test_a_resolver_that_never_answers_is_cut_off(monkeypatch):
    release = threading.Event()

    def hung_getaddrinfo(*args, **kwargs):
        release.wait()  # a DNS server that never answers
        raise socket.gaierror("released at the end of the test")

    monkeypatch.setattr(socket, "getaddrinfo", hung_getaddrinfo)
    try:
        problem = data.unreachable_download_host(["https://example.invalid/a.tar.gz"],
                                                 timeout=0.5)
    finally:
        release.set()
    assert problem == "no answer from example.invalid:443 within 0.5 s"


def test_a_connect_that_never_completes_is_cut_off():
    # A listener whose accept queue is full drops further SYNs: the connect hangs as it would
    # towards a firewalled host.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        problem = data.unreachable_download_host([f"http://127.0.0.1:{port}/x"], timeout=0.5)
    # The socket's own timeout and the probe's deadline are both 0.5 s: either may report it.
    assert problem in (f"cannot connect to 127.0.0.1:{port}: timed out",
                       f"no answer from 127.0.0.1:{port} within 0.5 s")


def test_reachable_hosts_and_proxies(server, monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert data.unreachable_download_host([server.url, "gs://bucket/file"]) is None
    # Behind a proxy, the proxy is what must answer, not the (unresolvable) origin.
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    assert data.unreachable_download_host(["https://example.invalid/a.tar.gz"]) is None
    port = _free_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    problem = data.unreachable_download_host(["https://example.invalid/a.tar.gz"])
    assert problem.startswith(f"cannot connect to 127.0.0.1:{port}")


def test_a_checksum_mismatch_is_refused_and_nothing_is_prepared(server, redirected, tmp_path):
    """Negative control for the verification: the same archive with another registered
    SHA-256 is downloaded and refused by tfds."""
    redirected(server.url, sha256=hashlib.sha256(b"another archive").hexdigest())
    before = server.gets
    with pytest.raises(DownloadError, match="does not match the checksum tfds registers"):
        data.dataset_info(_cifar_config(tmp_path))
    assert server.gets == before + 1
    assert not _prepared(tmp_path)


def test_an_interrupted_download_is_one_clear_error(server, redirected, tmp_path):
    redirected(server.url.replace(f"/{ARCHIVE_NAME}", f"/cut/{ARCHIVE_NAME}"))
    with pytest.raises(DownloadError, match="downloading tfds dataset 'cifar10' failed"):
        data.dataset_info(_cifar_config(tmp_path))
    assert not _prepared(tmp_path)


def test_a_dataset_that_needs_a_manual_download_says_so(tmp_path):
    config = tiny_config(data__dataset="imagenet2012", data__tfds_data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="fetched by hand into") as error:
        data.dataset_info(config)
    assert str(tmp_path / "downloads" / "manual") in str(error.value)


def test_download_off_stops_without_connecting(server, redirected, tmp_path):
    redirected(server.url)
    connections = server.connections
    with pytest.raises(DatasetNotFoundError, match="config.data.download is False") as error:
        data.create_train_iterator(_cifar_config(tmp_path, data__download=False), seed=0)
    assert "tfds build cifar10 --file_format=array_record" in str(error.value)
    assert server.connections == connections


# ---------------------------------------------------------------- several processes

class FakeChannel:
    """jax.distributed's key-value store for processes simulated by threads."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def publish(self, key, outcome):
        with self.changed:
            self.values[key] = outcome
            self.changed.notify_all()

    def wait(self, key, timeout):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout):
                raise TimeoutError(f"no value for {key} within {timeout} s")
            return self.values[key]


def _processes(count, work, timeout=60):
    """Runs work(process_index) on `count` threads; returns {index: result or exception}."""
    results = {}

    def run(index):
        try:
            results[index] = work(index)
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            results[index] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _coordinate(index, count, channel, is_prepared, prepare, timeout=30.0):
    data.prepare_on_process_zero(is_prepared, prepare, what="the data", key="k",
                                 process_index=index, process_count=count, channel=channel,
                                 timeout=timeout)


def test_process_zero_prepares_and_the_others_wait(tmp_path):
    marker = tmp_path / "prepared"
    prepared_by = []

    def prepare(index):
        prepared_by.append(index)
        time.sleep(0.5)  # long enough for the others to find nothing and start waiting
        marker.write_text("done")

    channel = FakeChannel()

    def work(index):
        _coordinate(index, 4, channel, marker.exists, lambda: prepare(index))
        return marker.exists()  # what this process finds when it goes on

    results = _processes(4, work)
    assert prepared_by == [0]
    assert results == {0: True, 1: True, 2: True, 3: True}


def test_without_coordination_every_process_would_prepare(tmp_path):
    """Negative control: the same processes each told they are alone all write."""
    marker = tmp_path / "prepared"
    prepared_by = []

    def prepare(index):
        prepared_by.append(index)
        time.sleep(0.5)
        marker.write_text("done")

    _processes(4, lambda i: _coordinate(i, 1, None, marker.exists, lambda: prepare(i)))
    assert sorted(prepared_by) == [0, 1, 2, 3]


def test_a_failure_on_process_zero_reaches_the_others():
    channel = FakeChannel()

    def prepare():
        raise DownloadError("the download broke off")

    results = _processes(3, lambda i: _coordinate(i, 3, channel, lambda: False, prepare))
    assert isinstance(results[0], DownloadError)
    for index in (1, 2):
        assert isinstance(results[index], DatasetNotFoundError)
        assert str(results[index]) == ("process 0 could not prepare the data: the download "
                                       "broke off")


def test_data_present_on_process_zero_only_is_a_clear_error():
    """Host-local data dirs: process 0 has the data (and publishes that), process 1 does not."""
    channel = FakeChannel()
    results = _processes(2, lambda i: _coordinate(i, 2, channel, lambda: i == 0,
                                                  lambda: pytest.fail("nothing to prepare")))
    assert results[0] is None
    assert isinstance(results[1], DatasetNotFoundError)
    assert "does not see it" in str(results[1]) and "shared filesystem" in str(results[1])


def test_waiting_is_bounded_by_the_timeout():
    with pytest.raises(DatasetNotFoundError, match="config.data.prepare_timeout=0.2 s"):
        _coordinate(1, 2, FakeChannel(), lambda: False, lambda: None, timeout=0.2)


_TWO_PROCESS_CHILD = textwrap.dedent('''
    import logging
    import sys

    import jax
    from jax_diffusion import data
    from tfds_redirect import redirect_cifar10
    from tiny_config import tiny_config

    url, size, sha256, port, index, data_dir = sys.argv[1:7]
    logging.getLogger().setLevel(logging.INFO)
    redirect_cifar10(url, int(size), sha256)
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(index), initialization_timeout=60)
    config = tiny_config(data__dataset="cifar10", data__image_size=32, data__channels=3,
                         data__tfds_data_dir=data_dir)
    print("examples", data.dataset_info(config)[0])
''')


def test_two_real_processes_prepare_once(server, archive, tmp_path):
    """Two jax.distributed processes open CIFAR-10 in one empty data dir at the same time:
    one download, process 1 logs that it waits, both read the 200 training images."""
    port = _free_port()
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}"}
    before = server.gets
    children = [subprocess.Popen(
        [sys.executable, "-c", _TWO_PROCESS_CHILD, server.url, str(archive["size"]),
         archive["sha256"], str(port), str(index), str(tmp_path)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True) for index in range(2)]
    try:
        outputs = [child.communicate(timeout=TIMEOUT) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, 9)
                child.wait()
    for child, (stdout, stderr) in zip(children, outputs, strict=True):
        assert child.returncode == 0, stderr[-4000:]
        # tfds prints its own "Downloading and preparing" lines on process 0's stdout.
        assert stdout.splitlines()[-1] == f"examples {5 * TRAIN_PER_FILE}", stdout
    assert server.gets == before + 1
    assert "Preparing tfds dataset 'cifar10'" in outputs[0][1]
    assert "Preparing tfds dataset" not in outputs[1][1]
    assert "waits for process 0 to prepare" in outputs[1][1]


_KEY_VALUE_CHILD = textwrap.dedent('''
    import sys
    import jax
    from jax_diffusion import data

    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 1, 0, initialization_timeout=60)
    channel = data.JaxKeyValueChannel()
    channel.publish("k", "first")
    channel.publish("k", "prepared")  # process 0 publishes again on every later open
    print(channel.wait("k", 1.0))
    try:
        channel.wait("never/published", 0.2)
    except TimeoutError:
        print("TimeoutError")
''')


def test_jax_key_value_channel_round_trip_and_timeout():
    """The real coordination service (one process): publish, overwrite, read, time out."""
    port = _free_port()
    result = subprocess.run([sys.executable, "-c", _KEY_VALUE_CHILD, str(port)], env=ENV,
                            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["prepared", "TimeoutError"]
