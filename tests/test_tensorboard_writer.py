"""jax_diffusion/runtime/tensorboard_writer.py: the event files it writes read back with
TensorBoard's own reader (scalars and an image), the console lines, and no TensorFlow or
PyTorch imported."""
import io
import logging
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tiny_config import ROOT

from jax_diffusion.runtime import tensorboard_writer


def _read_back(logdir) -> event_accumulator.EventAccumulator:
    """Every scalar and image event under `logdir`, as TensorBoard loads them."""
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    return accumulator.Reload()


def test_scalars_and_an_image_read_back_with_tensorboard(tmp_path, caplog):
    grid = np.random.default_rng(0).integers(0, 256, (18, 34, 1), dtype=np.uint8)
    writer = tensorboard_writer.create_writer(str(tmp_path))
    with caplog.at_level(logging.INFO):
        writer.write_scalars(10, {"loss": 0.5, "lr": np.float32(2e-4), "stage": 1})
        writer.write_scalars(20, {"loss": 0.25, "lr": np.float32(1e-4), "stage": 2})
        writer.write_images(20, {"samples": grid[None]})
    writer.flush()
    writer.close()

    assert "[10] loss=0.5, lr=0.0002, stage=1" in caplog.text
    assert "[20] Got images: {'samples': (1, 18, 34, 1)}." in caplog.text
    events = _read_back(tmp_path)
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "stage"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 0.5), (20, 0.25)]
    np.testing.assert_allclose([e.value for e in events.Scalars("lr")], [2e-4, 1e-4], rtol=1e-6)
    [image] = events.Images("samples")
    assert (image.step, image.height, image.width) == (20, 18, 34)
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    # A one-channel grid is stored as RGB: three equal channels, pixel for pixel (PNG: lossless).
    np.testing.assert_array_equal(pixels, np.repeat(grid, 3, axis=-1))


def test_processes_other_than_zero_write_no_event_files(tmp_path, caplog):
    writer = tensorboard_writer.create_writer(str(tmp_path / "run"), just_logging=True)
    with caplog.at_level(logging.INFO):
        writer.write_scalars(3, {"loss": 1.0})
    writer.flush()
    assert "[3] loss=1" in caplog.text
    assert not (tmp_path / "run").exists()


def test_writing_imports_neither_tensorflow_nor_torch(tmp_path):
    """Both may be installed (the test environment has them): the writer must not load them."""
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from jax_diffusion.runtime import tensorboard_writer\n"
        f"writer = tensorboard_writer.create_writer({str(tmp_path)!r})\n"
        "writer.write_scalars(1, {'loss': 1.0})\n"
        "writer.write_images(1, {'samples': np.zeros((1, 4, 4, 3), np.uint8)})\n"
        "writer.close()\n"
        "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert _read_back(tmp_path).Tags()["images"] == ["samples"]
