"""The safe PyTorch-file reader against torch.load(weights_only=True) on files torch.save wrote,
and its refusal of pickles that would run code (proved not to have run)."""
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
from torch_reference import import_torch

from jax_diffusion.convert import torch_pickle
from jax_diffusion.errors import InputFileError, UnsafePickleError

torch = import_torch()


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Reference values; dtypes numpy lacks are compared bit for bit through an integer view."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


def _bits(array: np.ndarray) -> np.ndarray:
    if array.dtype.name == "bfloat16":
        return array.view(np.int16)
    if array.dtype.name.startswith("float8"):
        return array.view(np.uint8)
    return array


def _model_like_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=generator)
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 3, 3, 3,
                                                                     generator=generator),
        "model.diffusion_model.time_embed.0.bias": torch.nn.Parameter(torch.randn(16)),
        "first_stage.half": torch.randn(4, 5, generator=generator).half(),
        "first_stage.double": torch.randn(3, generator=generator).double(),
        "bf16": torch.randn(7, generator=generator).bfloat16(),
        "f8": torch.randn(5, generator=generator).to(torch.float8_e4m3fn),
        "steps": torch.arange(-3, 9, dtype=torch.int64),
        "int32": torch.arange(5, dtype=torch.int32) * -7,
        "int16": torch.arange(4, dtype=torch.int16) - 2,
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "uint16": torch.tensor([1, 40000], dtype=torch.uint16),
        "mask": torch.tensor([True, False, True]),
        "complex": torch.randn(3, dtype=torch.complex64, generator=generator),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bn.num_batches_tracked": torch.tensor(12),
        # Views: transposed, strided with an offset, and two tensors sharing one storage.
        "transposed": base.t(),
        "strided": base[1::2, 3:9:2],
        "shared_a": base[2],
        "shared_b": base,
    }
    assert not state["transposed"].is_contiguous() and state["strided"].storage_offset() > 0
    assert state["shared_a"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return state


def _assert_equal_to_torch(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        expected = _as_numpy(tensor)
        got = _bits(ours[name])
        assert got.shape == expected.shape, name
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_every_tensor_equals_torch_load_weights_only(tmp_path):
    path = str(tmp_path / "model.pth")
    torch.save(_model_like_state_dict(), path)
    reference = torch.load(path, weights_only=True)
    ours = torch_pickle.load_state_dict(path)
    _assert_equal_to_torch(ours, reference)
    assert ours["bf16"].dtype.name == "bfloat16" and ours["f8"].dtype.name == "float8_e4m3fn"
    # Views of one storage come back as independent arrays.
    assert not np.shares_memory(ours["shared_a"], ours["shared_b"])


def test_nested_checkpoints_resolve_to_their_one_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # per-parameter states (dicts of tensors under integer keys)
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "name": "run-1"}, path)
    _assert_equal_to_torch(torch_pickle.load_state_dict(path), model.state_dict())

    nested = str(tmp_path / "lightning.ckpt")
    torch.save({"state_dict": {"net.weight": torch.ones(2)}, "hparams": {"lr": 1e-4}}, nested)
    assert list(torch_pickle.load_state_dict(nested)) == ["net.weight"]

    two = str(tmp_path / "two.pt")
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.full((2,), 2.0)}}, two)
    with pytest.raises(InputFileError, match=r"2 state dicts.*'ema', 'model'") as error:
        torch_pickle.load_state_dict(two)
    assert two in str(error.value)
    np.testing.assert_array_equal(torch_pickle.load_state_dict(two, key="ema")["w"], [2.0, 2.0])
    with pytest.raises(InputFileError, match="no state dict at key 'optimizer'"):
        torch_pickle.load_state_dict(two, key="optimizer")

    # `load` keeps the whole structure, with arrays for tensors.
    whole = torch_pickle.load(path)
    assert whole["epoch"] == 3 and whole["name"] == "run-1"
    assert whole["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def _rewrite_zip(source: str, target: str, change) -> None:
    """Copy a torch.save zip entry by entry; change(name, data) -> new data or None to drop."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)


def test_big_endian_files_follow_their_byteorder_record(tmp_path):
    state = {"f32": torch.randn(3, 4), "i64": torch.arange(5) * 1000003,
             "f16": torch.randn(6).half(), "bf16": torch.randn(2).bfloat16()}
    little, big = str(tmp_path / "little.pth"), str(tmp_path / "big.pth")
    torch.save(state, little)
    # torch numbers storages in the order it pickles them: data/0 is f32, data/1 i64, ...
    itemsize = {"0": 4, "1": 8, "2": 2, "3": 2}

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            return np.frombuffer(data, f"<u{itemsize[key]}").astype(f">u{itemsize[key]}").tobytes()
        return data

    _rewrite_zip(little, big, to_big_endian)
    reference = torch.load(big, weights_only=True)  # torch swaps the bytes back itself
    ours = torch_pickle.load_state_dict(big)
    _assert_equal_to_torch(ours, reference)
    _assert_equal_to_torch(ours, state)
    assert all(a.dtype.isnative for a in ours.values())
    # Negative control: the same bytes read as little-endian are different numbers.
    _rewrite_zip(big, str(tmp_path / "mislabelled.pth"),
                 lambda name, data: b"little" if name.endswith("/byteorder") else data)
    wrong = torch_pickle.load_state_dict(str(tmp_path / "mislabelled.pth"))
    assert not np.array_equal(wrong["i64"], state["i64"].numpy())


# ---------------------------------------------------------------------------------------------
# Files that are not what they claim


@pytest.fixture()
def saved(tmp_path):
    path = str(tmp_path / "weights.pth")
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, path)
    return path


def test_truncated_and_garbage_files_name_the_file(saved, tmp_path):
    with open(saved, "rb") as file:
        raw = file.read()
    for name, content in [("truncated.pth", raw[: len(raw) // 2]), ("garbage.pth", b"\0" * 100),
                          ("empty.pth", b""), ("text.pth", b"PK\x03\x04 not really a zip")]:
        path = str(tmp_path / name)
        with open(path, "wb") as file:
            file.write(content)
        with pytest.raises(InputFileError) as error:
            torch_pickle.load_state_dict(path)
        assert path in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputFileError, match="no such file"):
        torch_pickle.load(str(tmp_path / "absent.pth"))


def test_missing_or_short_storages_are_refused_not_read_past(saved, tmp_path):
    missing, short = str(tmp_path / "missing.pth"), str(tmp_path / "short.pth")
    _rewrite_zip(saved, missing, lambda name, data: None if name.endswith("/data/0") else data)
    with pytest.raises(InputFileError, match="missing"):
        torch_pickle.load_state_dict(missing)
    # A storage cut to 100 floats while the tensor needs 64 x 64: as_strided would read past it.
    _rewrite_zip(saved, short, lambda name, data: data[:400] if name.endswith("/data/0") else data)
    with pytest.raises(InputFileError, match=r"needs 4096 elements but its storage holds 100"):
        torch_pickle.load_state_dict(short)


def test_the_legacy_format_equals_torch_load_too(tmp_path):
    """torch.save before 1.6 (and with _use_new_zipfile_serialization=False), the format of
    pytorch-fid's Inception weights."""
    path = str(tmp_path / "legacy.pth")
    # Without the dtypes that have no legacy storage class (torch cannot read them back).
    state = {name: tensor for name, tensor in _model_like_state_dict().items()
             if name not in ("f8", "uint16")}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as file:
        assert file.read(2) == b"\x80\x02"  # a pickle, not a zip
    reference = torch.load(path, weights_only=True)
    _assert_equal_to_torch(torch_pickle.load_state_dict(path), reference)
    # Cut inside the storages: refused, naming the file.
    with open(path, "rb") as file:
        raw = file.read()
    cut = str(tmp_path / "cut.pth")
    with open(cut, "wb") as file:
        file.write(raw[:-100])
    with pytest.raises(InputFileError, match="truncated or corrupt") as error:
        torch_pickle.load_state_dict(cut)
    assert cut in str(error.value)


# ---------------------------------------------------------------------------------------------
# Pickles that would run code


class _Payload:
    """Pickles as the call function(*args): what a malicious checkpoint contains."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker: str) -> dict[str, _Payload]:
    return {
        "posix.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({marker!r}, 'w').close()"),
        "subprocess.check_call": _Payload(subprocess.check_call, ["touch", marker]),
    }


def _evil_checkpoint(path: str, payload: _Payload, layout: str) -> None:
    """A torch.save file whose object pickle is swapped for one that holds the payload."""
    evil = pickle.dumps({"a": [1.0, 1.0, 1.0], "payload": payload}, protocol=2)
    if layout == "legacy":  # the legacy header (magic number, protocol, sys_info), then the pickle
        header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}]
        with open(path, "wb") as file:
            file.write(b"".join(pickle.dumps(part, protocol=2) for part in header) + evil
                       + pickle.dumps([], protocol=2))
        return
    torch.save({"a": torch.ones(3)}, path)
    _rewrite_zip(path, path + ".evil",
                 lambda name, data: evil if name.endswith("/data.pkl") else data)
    os.replace(path + ".evil", path)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("global_name", ["posix.system", "builtins.eval",
                                         "subprocess.check_call"])
def test_pickles_that_would_run_code_are_refused_and_nothing_runs(tmp_path, global_name, layout):
    marker = str(tmp_path / "payload_ran")
    payload = _payloads(marker)[global_name]
    # The payload is live: unpickled without restriction it creates the marker.
    pickle.loads(pickle.dumps(payload, protocol=2))
    assert os.path.exists(marker)
    os.remove(marker)

    path = str(tmp_path / "evil.pth")
    _evil_checkpoint(path, payload, layout)
    with pytest.raises(UnsafePickleError) as error:
        torch_pickle.load_state_dict(path)
    message = str(error.value)
    assert global_name in message and path in message and "nothing was run" in message
    assert not os.path.exists(marker)
    # PyTorch's own safe loader refuses the same file.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("target", [b"ctorch\nfloat32\n", b"ctorch\nFloatStorage\n",
                                    b"ccollections\nOrderedDict\n"])
def test_build_cannot_alter_what_the_pickle_gets_hold_of(tmp_path, target):
    """BUILD (setting an object's state) on a resolved global: numpy's dtypes are process-wide
    singletons, so they are never handed to the pickle."""
    path = str(tmp_path / "build.pth")
    evil = b"\x80\x02" + target + b"}X\x08\x00\x00\x00itemsizeK\x01sb."
    torch.save({"a": torch.ones(3)}, path)
    _rewrite_zip(path, path + ".evil",
                 lambda name, data: evil if name.endswith("/data.pkl") else data)
    with pytest.raises(InputFileError):
        torch_pickle.load(path + ".evil")
    assert np.dtype(np.float32).itemsize == 4
    np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["a"], [1.0, 1.0, 1.0])
