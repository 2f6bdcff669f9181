"""Downloads into the user cache from a loopback HTTP server the tests start: SHA-256 verified,
nothing left behind by a corrupt or cut transfer, the cache reused without a request, and one
clear error when the server is down or silent."""
import hashlib
import http.server
import os
import socket

import pytest
from tiny_config import default_eval_config
from loopback import serving

from jax_diffusion import downloads
from jax_diffusion.errors import ConfigError, DownloadError, InceptionWeightsNotFoundError
from jax_diffusion.evaluation import inception

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several read chunks
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/weights.pth: the payload; /corrupt.pth: other bytes of the same length; /cut.pth: the
    full Content-Length announced, half sent, connection closed; anything else: 404."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.path == "/weights.pth":
            body, announced = PAYLOAD, len(PAYLOAD)
        elif self.path == "/corrupt.pth":
            body, announced = bytes(len(PAYLOAD)), len(PAYLOAD)
        elif self.path == "/cut.pth":
            body, announced = PAYLOAD[: len(PAYLOAD) // 2], len(PAYLOAD)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    httpd.daemon_threads = True
    with serving(httpd):
        yield httpd


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("JAX_DIFFUSION_CACHE_DIR", str(directory))
    monkeypatch.setattr(downloads, "_VERIFIED", {})
    return directory


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAX_DIFFUSION_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert downloads.cache_dir() == str(tmp_path / "home" / ".cache" / "jax_diffusion")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.cache_dir() == str(tmp_path / "xdg" / "jax_diffusion")
    monkeypatch.setenv("JAX_DIFFUSION_CACHE_DIR", str(tmp_path / "mine"))
    assert downloads.cache_dir() == str(tmp_path / "mine")


def test_download_is_verified_then_served_from_the_cache(server, cache, monkeypatch):
    path = downloads.fetch(f"{server.url}/weights.pth", PAYLOAD_SHA256, "weights.pth")
    assert path == str(cache / "weights.pth")
    with open(path, "rb") as file:
        assert file.read() == PAYLOAD
    assert _files(cache) == ["weights.pth"]  # no temporary file left
    assert server.requests == ["/weights.pth"]
    # Again in this process, and as a new process would (nothing remembered): no request.
    assert downloads.fetch(f"{server.url}/weights.pth", PAYLOAD_SHA256, "weights.pth") == path
    monkeypatch.setattr(downloads, "_VERIFIED", {})
    assert downloads.fetch(f"{server.url}/weights.pth", PAYLOAD_SHA256, "weights.pth") == path
    assert server.requests == ["/weights.pth"]


def test_a_damaged_cached_file_is_fetched_again(server, cache, monkeypatch):
    path = downloads.fetch(f"{server.url}/weights.pth", PAYLOAD_SHA256, "weights.pth")
    with open(path, "r+b") as file:
        file.write(b"\0\0\0\0")
    monkeypatch.setattr(downloads, "_VERIFIED", {})
    downloads.fetch(f"{server.url}/weights.pth", PAYLOAD_SHA256, "weights.pth")
    with open(path, "rb") as file:
        assert file.read() == PAYLOAD
    assert len(server.requests) == 2


@pytest.mark.parametrize("route, reason", [
    ("/corrupt.pth", f"expected {PAYLOAD_SHA256}"),
    ("/cut.pth", f"connection closed after {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"),
    ("/missing.pth", "HTTP 404"),
])
def test_a_corrupt_cut_or_missing_download_leaves_nothing(server, cache, route, reason):
    url = f"{server.url}{route}"
    with pytest.raises(DownloadError) as error:
        downloads.fetch(url, PAYLOAD_SHA256, "weights.pth")
    message = str(error.value)
    assert "\n" not in message
    assert url in message and reason in message
    assert str(cache / "weights.pth") in message  # where to put a copy fetched by hand
    assert _files(cache) == []  # neither the file nor a temporary one


def test_server_down_gives_one_clear_line(cache):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights.pth"
    with pytest.raises(DownloadError, match="cannot connect") as error:
        downloads.fetch(url, PAYLOAD_SHA256, "weights.pth", timeout=2.0)
    assert url in str(error.value) and "\n" not in str(error.value)
    assert _files(cache) == []


def test_a_silent_server_times_out_instead_of_hanging(cache):
    """The connection is accepted by the kernel but nothing is ever answered."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/weights.pth"
        with pytest.raises(DownloadError, match="timed out") as error:
            downloads.fetch(url, PAYLOAD_SHA256, "weights.pth", timeout=0.5)
    assert url in str(error.value)
    assert _files(cache) == []


def test_bad_sha256_argument():
    with pytest.raises(ValueError, match="64 hex digits"):
        downloads.fetch("http://127.0.0.1:9/x", "6726825d", "x")


# ---------------------------------------------------------------------------------------------
# config.eval.inception_weights


def test_default_config_fetches_the_pytorch_fid_weights():
    config = default_eval_config()
    assert config.inception_weights == "auto"
    assert config.inception_url == inception.WEIGHTS_URL
    assert config.inception_sha256 == inception.WEIGHTS_SHA256
    assert config.inception_preprocess == "tf1"


def test_auto_weights_are_fetched_into_the_cache_by_the_url_name(server, cache):
    config = default_eval_config(inception_url=f"{server.url}/weights.pth",
                          inception_sha256=PAYLOAD_SHA256.upper())
    path = inception.resolve_weights(config)
    assert path == str(cache / "weights.pth")
    assert inception.resolve_weights(config) == path and server.requests == ["/weights.pth"]


def test_auto_weights_offline_say_what_to_do(cache):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = default_eval_config(inception_url=f"http://127.0.0.1:{port}/{inception.WEIGHTS_FILE}")
    with pytest.raises(DownloadError) as error:
        inception.resolve_weights(config)
    message = str(error.value)
    assert "\n" not in message and config.inception_url in message
    assert str(cache / inception.WEIGHTS_FILE) in message
    assert "config.eval.inception_weights" in message


def test_weights_paths_and_bad_hashes(tmp_path):
    given = tmp_path / "pt_inception.pth"
    given.write_bytes(b"x")
    given_config = default_eval_config(inception_weights=str(given))
    assert inception.resolve_weights(given_config) == str(given)
    for value in ("", str(tmp_path / "absent.pth")):
        with pytest.raises(InceptionWeightsNotFoundError, match="inception_weights=auto"):
            inception.resolve_weights(default_eval_config(inception_weights=value))
    with pytest.raises(ConfigError, match="config.eval.inception_sha256"):
        inception.resolve_weights(default_eval_config(inception_sha256="6726825d"))
