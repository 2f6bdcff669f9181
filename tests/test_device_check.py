"""scripts/device_check.py, the prepared accelerator check, on this CPU: --tiny runs every part
with the packages an accelerator machine lacks (grain, tfds, TensorFlow, clu, Pillow, ...) made
unimportable; the report always has the keys that checks outside the repository read; a part
that fails or does not fit the budget is recorded with its reason and the others go on; MFU's
peaks by precision."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from cli_helpers import ENV
from tiny_config import ROOT

from jax_diffusion.bench.peak_flops import default_precision, peak_flops

SCRIPT = os.path.join(ROOT, "scripts", "device_check.py")
# Installed here, absent from an accelerator machine's stack and from device_requirements.txt.
ABSENT_THERE = ("grain", "tensorflow", "tensorflow_datasets", "clu", "PIL", "matplotlib",
                "tensorboard", "array_record", "safetensors", "diffusers")
REQUIRED = ("device_kind", "results", "smoke_loss_decreased", "checkpoint_roundtrip_ok")
ENTRY_KEYS = ("network", "dtype", "train_img_per_s", "mfu", "forward_img_per_s",
              "sample_img_per_s")


def _load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


device_check = _load_script()


def _unimportable(folder) -> str:
    """A folder of stand-ins that raise ImportError, to put first on PYTHONPATH."""
    for name in ABSENT_THERE:
        os.makedirs(folder / name)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on an accelerator machine')\n")
    return str(folder)


def _run(out, *args, env=None, timeout=900) -> tuple[dict, subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, SCRIPT, f"--out={out}", *args], env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(out, "device_check.json")) as file:
        assert json.load(file) == report
    return report, done


@pytest.mark.slow
def test_tiny_check_runs_every_part_without_the_packages_an_accelerator_lacks(tmp_path):
    # OMP_WAIT_POLICY: PyTorch's spinning OpenMP threads are 20x slower on a shared machine.
    env = {**ENV, "PYTHONPATH": _unimportable(tmp_path / "absent"), "OMP_WAIT_POLICY": "PASSIVE"}
    report, _ = _run(tmp_path / "out", "--tiny", "--budget-s=840", env=env)
    failed = {name: part for name, part in report["parts"].items() if part["status"] != "ok"}
    assert not failed, failed
    assert set(REQUIRED) <= set(report)
    assert report["device_kind"] == "cpu" and report["device_count"] == 1
    assert [(e["network"], e["dtype"]) for e in report["results"]] == [
        ("ddpm", "float32"), ("improved", "float32")]
    for entry in report["results"]:
        assert set(ENTRY_KEYS) <= set(entry)
        for key in ("train_img_per_s", "forward_img_per_s", "sample_img_per_s",
                    "torch_train_img_per_s", "torch_forward_img_per_s", "train_compile_s"):
            assert entry[key] > 0, (entry["network"], key)
        assert entry["mfu"] is None  # no peak is known for a CPU
        assert entry["params"] == entry["torch_params"]  # the yardstick is the same network
    assert report["smoke_loss_decreased"] is True and report["smoke"]["finite"] is True
    assert report["smoke"]["loss_last"] < 0.8 * report["smoke"]["loss_first"]
    assert report["checkpoint_roundtrip_ok"] is True and report["checkpoint"]["leaves"] > 100
    assert report["inception"]["inception_img_per_s"] > 0


def test_without_budget_every_part_is_skipped_and_the_report_still_written(tmp_path):
    report, done = _run(tmp_path, "--tiny", "--budget-s=0", timeout=120)
    assert set(REQUIRED) <= set(report)
    assert report["smoke_loss_decreased"] is False and report["checkpoint_roundtrip_ok"] is False
    assert {part["status"] for part in report["parts"].values()} == {"skipped"}
    # Every part waits for the budget, but the PyTorch one, where PyTorch is absent, says so.
    no_torch = importlib.util.find_spec("torch") is None
    for name, part in report["parts"].items():
        expected = "PyTorch is not installed" if name == "torch" and no_torch else "budget"
        assert expected in part["reason"], (name, part)
    for entry in report["results"]:
        assert set(ENTRY_KEYS) <= set(entry) and entry["train_img_per_s"] is None


def test_a_failing_part_is_recorded_with_its_reason(tmp_path):
    check = device_check.Check(str(tmp_path), device_check.TINY, budget_s=120)
    assert check.part("bench/nonesuch/float32", "bench",
                      {"network": "nonesuch", "dtype": "float32"}) is None
    part = check.report["parts"]["bench/nonesuch/float32"]
    assert part["status"] == "failed" and "KeyError" in part["reason"]
    assert "\n" not in part["reason"]
    assert os.path.exists(tmp_path / "logs" / "bench_nonesuch_float32.log")


@pytest.mark.parametrize("kind, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H100 80GB HBM3", "float32", 67e12), ("NVIDIA H100 PCIe", "tf32", 378e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156e12), ("TPU v4", "float32", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5p", "tf32", 459e12), ("cpu", "bfloat16", None),
])
def test_peak_flops_by_precision(kind, precision, peak):
    assert peak_flops(kind, precision) == peak


def test_mfu_divides_by_the_peak_of_the_precision_the_chip_runs():
    assert default_precision("gpu", "float32") == "tf32"
    assert default_precision("tpu", "float32") == "bfloat16"
    assert default_precision("cpu", "float32") == "float32"
    assert default_precision("gpu", "bfloat16") == "bfloat16"
    fields = device_check.mfu_fields(37e9, 1000.0, "NVIDIA H100 80GB HBM3", "gpu", "float32", 2)
    assert fields["mfu_precision"] == "tf32"
    assert fields["mfu"] == pytest.approx(37e12 / (2 * 495e12))
    assert fields["mfu_vs_bf16_peak"] == pytest.approx(37e12 / (2 * 989e12))
    assert device_check.mfu_fields(37e9, 1000.0, "cpu", "cpu", "float32", 1)["mfu"] is None
    assert device_check.mfu_fields(37e9, None, "TPU v4", "tpu", "bfloat16", 1)["mfu"] is None
