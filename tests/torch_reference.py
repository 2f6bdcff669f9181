"""PyTorch, the reference several tests compare against, is test-only and may be absent: PyPI's
Linux builds of it are CUDA builds of several GB, so `make test-compat` (Python 3.12, where no
CPU build is at hand) runs without it and skips what needs it, saying so."""
import pytest

REASON = "needs PyTorch (a test-only reference), which is not installed here"


def import_torch():
    """The torch module; where it is not installed, skips the calling test module."""
    return pytest.importorskip("torch", reason=REASON)
