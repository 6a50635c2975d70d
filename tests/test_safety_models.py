"""Model files never run code and never exhaust memory, table-driven like tests/test_safety.py: each
payload is generated here, every case exits 2 with one line naming the file, and no payload ever
writes its marker. Memory bombs run the CLI in a process of its own under a 4 GB address-space limit and a
timeout, so a regression fails instead of eating the machine."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_safety import Case, _assert_one_line, _invoke, _no_partial

MEMORY_LIMIT = 4 << 30
ESCAPED_LAMBDA = '"\\u004cambda"'  # JSON for "Lambda": the same class once parsed


# -- Keras payloads: a Lambda that writes the marker when it is called --------------------------------

def _keras(writer: str):
    return pytest.importorskip("keras", minversion="3") if writer == "keras3" else pytest.importorskip("tf_keras")


def _marker_lambda(marker: Path):
    return eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")  # noqa: S307 - the payload itself


def _lambda_model(K, marker: Path, nested: bool):
    L = K.layers
    inputs = K.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    if nested:  # the Lambda inside a sub-model, one level down in the config
        sub_in = K.Input((8, 8, 4))
        x = K.Model(sub_in, L.Lambda(_marker_lambda(marker))(sub_in), name="inner")(x)
    else:
        x = L.Lambda(_marker_lambda(marker))(x)
    return K.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def _escape_keras_zip(path: Path) -> None:
    tmp = path.with_name(path.name + ".rewrite")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "config.json":
                data = data.replace(b'"Lambda"', ESCAPED_LAMBDA.encode())
                assert ESCAPED_LAMBDA.encode() in data
            dst.writestr(info, data)
    tmp.replace(path)


def _escape_h5(path: Path) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        config = f.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        assert '"Lambda"' in config
        f.attrs["model_config"] = config.replace('"Lambda"', ESCAPED_LAMBDA)


def _escape_saved_model(path: Path) -> None:
    from tf_keras.protobuf import saved_metadata_pb2

    meta = saved_metadata_pb2.SavedMetadata()
    meta.ParseFromString((path / "keras_metadata.pb").read_bytes())
    for node in meta.nodes:
        node.metadata = node.metadata.replace('"Lambda"', ESCAPED_LAMBDA)
    assert any(ESCAPED_LAMBDA in n.metadata for n in meta.nodes)
    (path / "keras_metadata.pb").write_bytes(meta.SerializeToString())


def keras_lambda(writer: str, suffix: str, spelling: str, nested: bool):
    """A builder for a Keras Lambda payload saved by ``writer`` as ``suffix`` ("" = SavedModel folder)."""

    def make(tmp: Path, marker: Path) -> list:
        K = _keras(writer)
        path = tmp / f"lambda{suffix or '-savedmodel'}"
        _lambda_model(K, marker, nested).save(str(path))
        marker.unlink(missing_ok=True)  # building the model called the Lambda once
        if spelling == "escaped":
            {".keras": _escape_keras_zip, ".h5": _escape_h5, "": _escape_saved_model}[suffix](path)
        return [path]

    return make


def _registered_layer(tmp: Path, marker: Path) -> list:
    """A custom layer registered in this process that writes the marker when Keras rebuilds it."""
    keras = _keras("keras3")

    @keras.saving.register_keras_serializable(package="edgeres_test")
    class MarkerLayer(keras.layers.Layer):
        def __init__(self, armed=False, **kwargs):
            super().__init__(**kwargs)
            if armed:
                open(marker, "w").close()

        def call(self, x):
            return x

        def get_config(self):
            return {**super().get_config(), "armed": True}

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(MarkerLayer()(inputs))))
    model.save(tmp / "custom.keras")
    return [tmp / "custom.keras"]


def _rescaling_layer(tmp: Path, marker: Path) -> list:
    keras = _keras("keras3")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x))).save(tmp / "rescaling.h5")
    return [tmp / "rescaling.h5"]


# -- TorchScript payloads: a submodule whose __setstate__ creates the marker --------------------------

def _scripted_payload(marker: Path):
    import torch
    from typing import Tuple  # noqa: UP035 - TorchScript reads typing annotations

    class Payload(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.path = str(marker)
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x):
            return x * self.scale

        @torch.jit.export
        def __getstate__(self) -> Tuple[str, bool, torch.Tensor]:
            return (self.path, self.training, self.scale)

        @torch.jit.export
        def __setstate__(self, state: Tuple[str, bool, torch.Tensor]) -> None:
            self.path = state[0]
            self.training = state[1]
            touched = torch.from_file(self.path, True, 1, dtype=torch.uint8)  # creates the file
            self.scale = state[2] + touched.sum() * 0

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Payload()

        def forward(self, x):
            return self.inner(x)

    return torch.jit.script(Outer())


def torchscript(suffix: str):
    def make(tmp: Path, marker: Path) -> list:
        path = tmp / f"scripted{suffix}"
        _scripted_payload(marker).save(str(path))
        return [path]

    return make


CODE_CASES = [
    *[Case(f"keras-lambda-{w}-{s or 'savedmodel'}-{spelling}-{'nested' if nested else 'flat'}",
           keras_lambda(w, s, spelling, nested), r"contains a Lambda layer.*nothing was executed")
      for w, suffixes in (("keras3", (".keras", ".h5")), ("tf_keras", (".keras", ".h5", "")))
      for s in suffixes for spelling in ("plain", "escaped") for nested in (False, True)],
    Case("keras-registered-custom-layer", _registered_layer, r"is a MarkerLayer, not one of the layer classes"),
    Case("keras-unmapped-builtin-layer", _rescaling_layer, r"is a Rescaling, not one of the layer classes"),
    *[Case(f"torchscript{s}", torchscript(s), r"is a TorchScript archive \(a program; loading it would run its code\)"
           r".*torch.save\(model.state_dict\(\), path\)") for s in (".pt", ".pth", ".bin")],
]


@pytest.mark.parametrize("case", CODE_CASES, ids=lambda c: c.id)
def test_model_file_that_would_run_code_is_refused(tmp_path, case):
    marker = tmp_path / "payload-ran"
    model = case.make(tmp_path, marker)[0]
    code, _, stderr = _invoke(["inspect", model])
    _assert_one_line(code, stderr, case, named=Path(model).name)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("case", [c for c in CODE_CASES if c.id in ("keras-lambda-tf_keras-.h5-escaped-nested",
                                                                    "torchscript.pth")], ids=lambda c: c.id)
def test_convert_refuses_code_before_any_work(tmp_path, case, tiny_npz):
    marker, out = tmp_path / "payload-ran", tmp_path / "bundle"
    model = case.make(tmp_path, marker)[0]
    code, _, stderr = _invoke(["convert", model, "--calib", tiny_npz, "--targets", "onnx", "--out", out])
    _assert_one_line(code, stderr, case, named=Path(model).name)
    assert not marker.exists() and not out.exists()
    _no_partial(tmp_path)


def test_the_payloads_are_live(tmp_path):
    """The markers prove something: loaded by the loaders edgeres no longer uses, the payloads run."""
    import torch

    marker = tmp_path / "ran"
    torch.jit.load(str(torchscript(".pt")(tmp_path, marker)[0]))
    assert marker.exists()
    marker.unlink()
    tf_keras = _keras("tf_keras")
    tf_keras.models.load_model(str(keras_lambda("tf_keras", ".h5", "escaped", True)(tmp_path, marker)[0]),
                               compile=False)
    assert marker.exists()


# -- ONNX external data: only regular files beside the model ------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model):
    import warnings

    import torch

    spec, model = tiny_model
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def _with_external_data(tiny_onnx: Path, tmp: Path, location: str, *, make_target=None) -> Path:
    """``tiny_onnx`` with its tensors moved to external data, then pointed at ``location``."""
    import onnx

    model = onnx.load(str(tiny_onnx))
    onnx.save(model, str(tmp / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    model = onnx.load(str(tmp / "ext.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    if make_target:
        make_target(tmp, tmp / "ext.onnx.data")
    onnx.save(model, str(tmp / "ext.onnx"))
    return tmp / "ext.onnx"


def _symlink_out(tmp: Path, data: Path) -> None:
    (tmp / "link.data").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")


def _truncate(tmp: Path, data: Path) -> None:
    (tmp / "short.data").write_bytes(data.read_bytes()[:100])


def _fifo(tmp: Path, data: Path) -> None:
    os.mkfifo(tmp / "pipe.data")


EXTERNAL_CASES = [
    Case("onnx-external-absolute", lambda t, o: _with_external_data(o, t, "/etc/passwd"),
         r"external data file '/etc/passwd' outside the model's folder"),
    Case("onnx-external-parent", lambda t, o: _with_external_data(o, t, "../ext.onnx.data"),
         r"external data file '../ext.onnx.data' outside the model's folder"),
    Case("onnx-external-symlink-out", lambda t, o: _with_external_data(o, t, "link.data", make_target=_symlink_out),
         r"external data file 'link.data' outside the model's folder"),
    Case("onnx-external-missing", lambda t, o: _with_external_data(o, t, "gone.data"),
         r"external data file 'gone.data' that does not exist"),
    Case("onnx-external-too-short", lambda t, o: _with_external_data(o, t, "short.data", make_target=_truncate),
         r"external data file 'short.data' too short for tensor"),
    Case("onnx-external-fifo", lambda t, o: _with_external_data(o, t, "pipe.data", make_target=_fifo),
         r"external data file 'pipe.data' that is not a regular file"),
]
FIX = r"which edgeres refuses \(nothing was read from it\); save all tensors inside the \.onnx: onnx\.save\(model, " \
      r"path, save_as_external_data=False\)"


def _run_limited(args, timeout=240):
    """The CLI in a process of its own under a 4 GB address-space limit: a bomb fails, it cannot swap (forked from
    a warm helper, tests/forked_cli.py: ~2.5 s of imports less per case)."""
    from tests.forked_cli import run_forked

    return run_forked(args, limit=MEMORY_LIMIT, timeout=timeout)


@pytest.mark.parametrize("case", EXTERNAL_CASES, ids=lambda c: c.id)
def test_onnx_external_data_outside_the_model_is_refused_naming_the_file(tmp_path, tiny_onnx, case):
    model = case.make(tmp_path, tiny_onnx)
    code, _, stderr = _run_limited(["inspect", model], timeout=120)  # a FIFO must not hang it
    _assert_one_line(code, stderr, Case(case.id, None, case.expect + ".*" + FIX), named=model.name)


# -- memory bombs: small on disk, huge once allocated ---------------------------------------------------

def _torch_save(path: Path, obj, **kwargs) -> list:
    import torch

    torch.save(obj, path, **kwargs)
    return [path]


def _expanded(tmp: Path, dtype: str, legacy: bool = False) -> list:
    """A state_dict whose tensors store one value and declare 10**10 (stride 0): 40 GB once copied."""
    import torch

    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import ZOO

    sd = build_torch(ZOO["resnet20"]).state_dict()
    sd["conv1.weight"] = torch.zeros(1, dtype=getattr(torch, dtype)).expand(10**10)
    return _torch_save(tmp / "expanded.pth", sd, _use_new_zipfile_serialization=not legacy)


def _torch_zip_bomb(tmp: Path) -> list:
    """A torch zip whose storage member is deflated: 256 MiB of zeros in a 0.3 MB file."""
    import torch

    class Rebuild:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (STORAGE, 0, (64 << 20,), (1,), False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 64 << 20) if obj is STORAGE else None

    STORAGE = object()
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"conv1.weight": Rebuild()})
    path = tmp / "bomb.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bomb/data.pkl", buf.getvalue())
        z.writestr("bomb/byteorder", "little")
        info = zipfile.ZipInfo("bomb/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(bytes(4 << 20))
        z.writestr("bomb/version", "3\n")
    return [path]


def _onnx_with(tiny_onnx: Path, tmp: Path, edit) -> list:
    import onnx

    model = onnx.load(str(tiny_onnx))
    edit(model)
    onnx.save(model, str(tmp / "edited.onnx"))
    return [tmp / "edited.onnx"]


def _fixed_batch(model, batch=100_000):
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch


def _huge_side(model):
    for i in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_value = 100_000


def _declared_not_stored(model):
    t = model.graph.initializer[0]
    del t.dims[:]
    t.dims.extend([100_000, 100_000])


def _computed_bomb(model):
    """A second output filled by ConstantOfShape(10**10): no stored tensor is large, the run would be 40 GB."""
    from onnx import TensorProto, helper, numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.array([10**10], np.int64), "bomb_shape"))
    model.graph.node.append(helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb"))
    model.graph.output.append(helper.make_tensor_value_info("bomb", TensorProto.FLOAT, [10**10]))


def _sparse(model):
    from onnx import helper, numpy_helper

    values = numpy_helper.from_array(np.ones(1, np.float32), "sparse_bomb")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "sparse_bomb_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [10**10]))


def _tiny_keras(tmp: Path, name: str, *, units=2, side=8):
    keras = _keras("keras3")
    model = keras.Sequential([keras.Input((side, side, 3)), keras.layers.Flatten(), keras.layers.Dense(units)])
    model.save(tmp / name)
    return tmp / name


def _keras_zip_bomb(tmp: Path) -> list:
    """A .keras archive with an extra deflated member of 256 MiB zeros (0.3 MB on disk)."""
    path = _tiny_keras(tmp, "bomb.keras")
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo("assets/blob.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(bytes(4 << 20))
    return [path]


def _h5_dataset_bomb(tmp: Path) -> list:
    """A .h5 whose weights hold a gzip-chunked dataset declaring 8 GiB and storing nothing."""
    import h5py

    path = _tiny_keras(tmp, "bomb.h5")
    with h5py.File(path, "a") as f:
        f["model_weights"].create_dataset("bomb", shape=(2 << 30,), dtype="f4", chunks=(1 << 20,), compression="gzip")
    return [path]


def _keras_config_edit(tmp: Path, name: str, edit) -> list:
    path = _tiny_keras(tmp, name)
    tmp_zip = path.with_name(name + ".rewrite")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_zip, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config["config"]["layers"])
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    tmp_zip.replace(path)
    return [path]


def _saved_model_fifo(tmp: Path) -> list:
    """A tf_keras SavedModel whose variables data file is a FIFO: reading it would block forever."""
    tf_keras = _keras("tf_keras")
    model = tf_keras.Sequential([tf_keras.Input((8, 8, 3)), tf_keras.layers.Flatten(), tf_keras.layers.Dense(2)])
    model.save(str(tmp / "fifo-savedmodel"))
    data = next((tmp / "fifo-savedmodel" / "variables").glob("variables.data-*"))
    data.unlink()
    os.mkfifo(data)
    return [tmp / "fifo-savedmodel"]


def _dense_units(layers, units=10**9):
    next(layer for layer in layers if layer["class_name"] == "Dense")["config"]["units"] = units


def _input_side(layers, side=100_000):
    layers[0]["config"]["batch_shape"] = [None, side, side, 3]


BOMB_CASES = [
    Case("pth-stride0-float32", lambda t, o: _expanded(t, "float32"), r"conv1\.weight .*stride-0"),
    Case("pth-stride0-float16", lambda t, o: _expanded(t, "float16"), r"conv1\.weight .*stride-0"),
    Case("pth-stride0-legacy-format", lambda t, o: _expanded(t, "float16", legacy=True), r"conv1\.weight .*stride-0"),
    Case("pth-deflated-storage", lambda t, o: _torch_zip_bomb(t), r"member bomb/data/0 inflates .* decompression bomb"),
    Case("onnx-fixed-huge-batch", lambda t, o: _onnx_with(o, t, _fixed_batch), r"input input at batch 100000 .*per batch"),
    Case("onnx-huge-image-side", lambda t, o: _onnx_with(o, t, _huge_side), r"declares 100000×100000 images"),
    Case("onnx-dims-without-data", lambda t, o: _onnx_with(o, t, _declared_not_stored), r"declares 37\.3 GiB but stores"),
    Case("onnx-sparse-initializer", lambda t, o: _onnx_with(o, t, _sparse), r"sparse initializer"),
    Case("onnx-size-computed-in-graph", lambda t, o: _onnx_with(o, t, _computed_bomb), r"a node asks for 37\.3 GiB"),
    Case("keras-zip-bomb", lambda t, o: _keras_zip_bomb(t), r"member assets/blob\.bin inflates .* decompression bomb"),
    Case("keras-h5-dataset-bomb", lambda t, o: _h5_dataset_bomb(t), r"dataset model_weights/bomb inflates"),
    Case("keras-config-dense-bomb", lambda t, o: _keras_config_edit(t, "dense.keras", _dense_units),
         r"its layers \(up to dense\w*\) declare .* of weights"),
    Case("keras-savedmodel-variables-fifo", lambda t, o: _saved_model_fifo(t),
         r"variables/variables\.data-\S+ is not a regular file"),
    Case("keras-config-input-side", lambda t, o: _keras_config_edit(t, "side.keras", _input_side),
         r"declares shape \[100000, 100000, 3\]"),
]


@pytest.mark.parametrize("case", BOMB_CASES, ids=lambda c: c.id)
def test_memory_bomb_is_refused_from_declared_sizes(tmp_path, tiny_onnx, case):
    model = case.make(tmp_path, tiny_onnx)[0]
    assert model.stat().st_size < 2 << 20  # small on disk
    code, _, stderr = _run_limited(["inspect", model])
    _assert_one_line(code, stderr, case, named=model.name)


def test_checkpoint_loads_from_mmap_into_memory_of_its_own(tmp_path):
    """Checked tensors are copied out of the memory-mapped file: replacing the file later changes nothing."""
    import torch

    from edgeres.sources.loading import load_model
    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import ZOO

    sd = build_torch(ZOO["resnet20"]).state_dict()
    path = _torch_save(tmp_path / "r20.pt", sd)[0]
    loaded = load_model(path)
    path.write_bytes(b"")
    assert torch.equal(loaded.state_dict["conv1.weight"], sd["conv1.weight"])
