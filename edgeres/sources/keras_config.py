"""A saved Keras model as its config says, read and checked before Keras deserialises anything.

The config comes from the file without running it (``.keras``: the zip's config.json; ``.h5``: the
``model_config`` attribute; a SavedModel: the root entry of keras_metadata.pb) and is parsed as JSON,
so a class name is checked as Keras will read it, however it is spelled (``"\\u004cambda"`` is
``Lambda``). Every object in it, down every nested model, must be a class on the allow-lists below:
the layers ``map_keras`` maps and the initializers, regularizers and dtype policies they carry; a
Lambda (stored Python code), a custom registered class or an object from a module outside Keras is
refused by name. The sizes it declares (zip members, HDF5 datasets, checkpoint tensors, the layers'
parameters and outputs) are checked against ``model_limits`` before Keras allocates them.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeres.errors import InputError
from edgeres.model.limits import (MAX_ACTIVATION_BYTES, MAX_CONFIG_BYTES, MAX_INPUT_SIDE, check_archive,
                                  check_inflation, check_weight_bytes, size_text)

# the layers map_keras maps (keras.applications ResNet v1 and its transfer-learning heads)
LAYER_CLASSES = frozenset({
    "InputLayer", "Conv2D", "BatchNormalization", "Activation", "ReLU", "Softmax", "Add", "ZeroPadding2D",
    "MaxPooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Dense",
    "Dropout", "SpatialDropout2D", "GaussianDropout", "AlphaDropout", "GaussianNoise",
})
MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
# objects inside a layer's config, and the wrappers Keras writes for tensors, tuples and shapes
CONFIG_CLASSES = frozenset({
    "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity", "IdentityInitializer",
    "LecunNormal", "LecunUniform", "Ones", "Orthogonal", "OrthogonalInitializer", "RandomNormal", "RandomUniform",
    "TruncatedNormal", "VarianceScaling", "Zeros",
    "L1", "L2", "L1L2", "OrthogonalRegularizer", "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "RadialConstraint",
    "DTypePolicy", "FloatDTypePolicy", "Policy", "__keras_tensor__", "__tuple__", "TensorShape",
})
# classes whose config holds Python code (marshalled bytecode, a function name to import)
CODE_CLASSES = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__", "function"})
KERAS_MODULES = ("keras", "tf_keras")
VERIFY_BATCH = 2  # images verify_mapping runs through the Keras model


@dataclass(frozen=True)
class StoredModel:
    """The checked config of a saved model and the Keras that wrote it ("keras 3" or "tf_keras")."""

    config: dict
    writer: str


def read_checked_config(p: Path) -> StoredModel:
    """The model config stored in ``p`` after every check above; ``InputError`` naming the file otherwise."""
    if p.is_dir():
        config, writer = _saved_model_config(p)
    elif zipfile.is_zipfile(p):
        config, writer = _keras_archive_config(p)
    else:
        config, writer = _h5_config(p)
    check_classes(config, p)
    check_declared_sizes(config, p)
    return StoredModel(config, writer)


# -- reading the config without deserialising it ---------------------------------------------------

def _weights_only(p: Path) -> InputError:
    what = ("a SavedModel without Keras metadata (written by model.export or tf.saved_model.save)" if p.is_dir()
            else "weights only (model.save_weights), no model config")
    return InputError(f"{p}: holds {what}; save the whole model with model.save('model.keras')")


def _unreadable(p: Path, e: Exception) -> InputError:
    return InputError(f"{p}: is not a readable Keras model ({type(e).__name__}); the file is corrupt or truncated; "
                      "re-save it with model.save('model.keras')")


def _writer(version) -> str:
    version = version.decode() if isinstance(version, bytes) else str(version or "")
    return "tf_keras" if version.startswith(("1.", "2.")) else "keras 3"


def _keras_archive_config(p: Path) -> tuple[dict, str]:
    members = {m.filename: m for m in check_archive(p, "Keras archive")}
    if "config.json" not in members:
        raise _weights_only(p)
    for name in ("config.json", "metadata.json"):
        if name in members and members[name].file_size > MAX_CONFIG_BYTES:
            raise InputError(f"{p}: its {name} is {size_text(members[name].file_size)}, more than the "
                             f"{size_text(MAX_CONFIG_BYTES)} a model config takes; refused")
    try:
        with zipfile.ZipFile(p) as z:
            config = parse_config(z.read("config.json"), p)
            meta = parse_config(z.read("metadata.json"), p) if "metadata.json" in members else {}
            for name, member in members.items():
                if name.endswith(".h5"):
                    _check_h5_member(p, z, member)
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise _unreadable(p, e) from None
    return config, _writer(meta.get("keras_version") if isinstance(meta, dict) else None)


def _check_h5_member(p: Path, z: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    import io

    import h5py

    # a stored member is read in place; a compressed one (ratio already checked) from memory, as
    # seeking in a deflate stream restarts it
    source = z.open(member) if member.compress_type == zipfile.ZIP_STORED else io.BytesIO(z.read(member))
    with source, h5py.File(source, "r") as f:
        check_h5_datasets(p, f, f"{member.filename}:")


def _h5_config(p: Path) -> tuple[dict, str]:
    try:
        import h5py
    except ImportError:
        raise InputError(f"{p}: reading Keras .h5 files needs h5py; pip install 'edgeres[tflite]'") from None
    try:
        with h5py.File(p, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise _weights_only(p)
            config = parse_config(raw.encode() if isinstance(raw, str) else bytes(raw), p)
            writer = _writer(f.attrs.get("keras_version"))
            check_h5_datasets(p, f, "")
    except (OSError, KeyError) as e:
        raise _unreadable(p, e) from None
    return config, writer


def _saved_model_config(p: Path) -> tuple[dict, str]:
    """The root model's config from keras_metadata.pb; the SavedModel's graphs are never loaded."""
    meta_file = p / "keras_metadata.pb"
    if not meta_file.is_file():
        raise _weights_only(p)
    if meta_file.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{p}: keras_metadata.pb is {size_text(meta_file.stat().st_size)}, more than the "
                         f"{size_text(MAX_CONFIG_BYTES)} a model config takes; refused")
    try:
        from google.protobuf.message import DecodeError
        from tf_keras.protobuf import saved_metadata_pb2
    except ImportError:
        raise InputError(f"{p}: reading a Keras SavedModel needs tf_keras; pip install tf_keras, or re-save the "
                         "model with model.save('model.keras')") from None
    meta = saved_metadata_pb2.SavedMetadata()
    try:
        meta.ParseFromString(meta_file.read_bytes())
    except (DecodeError, OSError) as e:
        raise _unreadable(p, e) from None
    roots = [n for n in meta.nodes if n.node_path == "root"]
    if len(roots) != 1:
        raise InputError(f"{p}: keras_metadata.pb has {len(roots)} root entries, not one; re-save the model with "
                         "model.save('model.keras')")
    root = parse_config(roots[0].metadata.encode(), p)
    if not isinstance(root, dict) or "class_name" not in root or "config" not in root:
        raise InputError(f"{p}: keras_metadata.pb holds no model config (a subclassed model?); {_REBUILD_HINT}")
    _check_checkpoint(p)
    return {"class_name": root["class_name"], "config": root["config"]}, "tf_keras"


def _check_checkpoint(p: Path) -> None:
    """The variables a SavedModel's checkpoint declares, against the data files that hold them."""
    import tensorflow as tf

    prefix = p / "variables" / "variables"
    odd = [f.name for f in prefix.parent.glob("*") if f.is_symlink() or not f.is_file()]
    if odd:  # a FIFO would hang the reader, a symlink would read another file
        raise InputError(f"{p}: variables/{odd[0]} is not a regular file in the SavedModel, refused; re-save the model")
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except Exception as e:  # noqa: BLE001 - any failure is a bad checkpoint
        raise InputError(f"{p}: its variables checkpoint cannot be read ({type(e).__name__}); re-save the model") from None
    declared = 0
    for name, shape in shapes.items():
        n = dtypes[name].size if dtypes[name].is_numpy_compatible else 8
        for d in shape:
            n *= max(int(d), 0)
        declared += n
    stored = sum(f.stat().st_size for f in prefix.parent.glob("variables.data-*") if f.is_file())
    check_weight_bytes(p, declared, "its checkpoint's variables")
    check_inflation(p, "its variables checkpoint", declared, stored)


def check_h5_datasets(p: Path, f, where: str) -> None:
    """Every dataset in HDF5 file ``f``: numeric, stored in this file, not inflating like a bomb."""
    import h5py

    total = 0

    def link(name, info):
        if isinstance(info, h5py.ExternalLink):
            raise InputError(f"{p}: {where}{name} links to another file ({info.filename}), refused; re-save the model")

    def dataset(name, obj):
        nonlocal total
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.external or obj.is_virtual:
            raise InputError(f"{p}: dataset {where}{name} reads its data from other files, refused; re-save the model")
        if obj.dtype.kind not in "biuf":
            raise InputError(f"{p}: dataset {where}{name} holds {obj.dtype}, not numbers; re-save the model")
        declared = int(obj.size) * obj.dtype.itemsize
        check_inflation(p, f"dataset {where}{name}", declared, obj.id.get_storage_size())
        total += declared

    f.visititems_links(link)
    f.visititems(dataset)
    check_weight_bytes(p, total, f"its {where or 'HDF5'} datasets")


def parse_config(data: bytes, p: Path):
    """JSON as Keras reads it, refusing a key given twice (parsers disagree on which one counts)."""

    def pairs(items):
        keys = [k for k, _v in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InputError(f"{p}: the model config gives key {dup!r} twice in one object, refused; re-save the model")
        obj = dict(items)
        if obj.get("class_name") in ("__tuple__", "TensorShape") and isinstance(obj.get("items"), list):
            return obj["items"]  # tf_keras' SavedModel encoding of tuples and shapes
        return obj

    try:
        return json.loads(data, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{p}: its model config is not valid JSON ({type(e).__name__}); re-save the model") from None


# -- the classes it names ---------------------------------------------------------------------------

PREPROCESSING_CLASSES = frozenset({"Rescaling", "Normalization", "Resizing", "CenterCrop"})
_PREPROCESSING_HINT = ("preprocessing inside the model is not mapped: save the model without it, edgeres applies "
                       "keras.applications' preprocessing itself (caffe for ResNet v1, tf for v2)")
_REBUILD_HINT = ("edgeres loads only Keras ResNets (v1, v2) built from standard layers; convert other models with "
                 "TensorFlow's TFLite converter directly")


def check_classes(config, p: Path) -> None:
    """Refuse any object in ``config`` whose class is not on the allow-lists (nothing is deserialised)."""
    if not isinstance(config, dict) or config.get("class_name") not in MODEL_CLASSES:
        got = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{p}: the saved model is a {got}, not a Functional or Sequential model; {_REBUILD_HINT}")
    _walk(config, p, in_layers=True)


def _walk(obj, p: Path, in_layers: bool) -> None:
    if isinstance(obj, dict):
        if "class_name" in obj:
            _check_object(obj, p, in_layers)
        for key, value in obj.items():
            if key != "compile_config":  # never deserialised: models load with compile=False
                _walk(value, p, in_layers=key == "layers")
    elif isinstance(obj, list):
        for item in obj:
            _walk(item, p, in_layers)


def _check_object(obj: dict, p: Path, is_layer: bool) -> None:
    cls, module, registered = obj.get("class_name"), obj.get("module"), obj.get("registered_name")
    cfg = obj.get("config")
    name = (cfg.get("name") if isinstance(cfg, dict) else None) or obj.get("name") or "?"
    what = f"layer {name}" if is_layer else "an object in the config"
    if cls in CODE_CLASSES:
        holder = f"a {cls} layer ({name})" if is_layer else f"a {cls} object in a layer's config"
        raise InputError(f"{p}: contains {holder}, whose stored Python code edgeres will not run (nothing was "
                         "executed); replace it with standard layers or convert with TensorFlow directly")
    allowed = LAYER_CLASSES | MODEL_CLASSES if is_layer else CONFIG_CLASSES
    if not isinstance(cls, str) or cls not in allowed:
        kinds = "layer classes a ResNet v1 import maps" if is_layer else "initializers, regularizers and dtype policies"
        hint = _PREPROCESSING_HINT if cls in PREPROCESSING_CLASSES else _REBUILD_HINT
        raise InputError(f"{p}: {what} is a {cls}, not one of the {kinds}, refused (nothing was loaded); {hint}")
    if module is not None and not (isinstance(module, str) and module.split(".")[0] in KERAS_MODULES):
        raise InputError(f"{p}: {what} ({cls}) comes from module {module!r}, not from Keras, refused (nothing was "
                         f"loaded); {_REBUILD_HINT}")
    if registered is not None and registered != cls:
        raise InputError(f"{p}: {what} is registered as {registered!r}, a custom class, refused (nothing was "
                         f"loaded); {_REBUILD_HINT}")


# -- the sizes it declares ----------------------------------------------------------------------------

def histories(obj):
    """Names of the layers whose outputs a saved ``inbound_nodes`` / ``output_layers`` entry reads
    (keras 3: ``__keras_tensor__`` dicts; Keras 2: ``[name, node, tensor, kwargs]`` lists)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            yield obj["config"]["keras_history"][0]
            return
        for v in obj.values():
            yield from histories(v)
    elif isinstance(obj, (list, tuple)):
        if len(obj) in (3, 4) and isinstance(obj[0], str) and isinstance(obj[1], int) and isinstance(obj[2], int):
            yield obj[0]
            return
        for v in obj:
            yield from histories(v)


class _Sizes:
    """Parameters and the largest layer output Keras will allocate for a config, walked shape by shape
    (channels-last shapes without the batch; ``None`` where the config leaves a size open)."""

    def __init__(self, p: Path):
        self.p = p
        self.params = 0
        self.largest = (0, "")
        self.layer = "?"

    def model(self, entry: dict, inputs: list | None) -> list:
        cfg = entry["config"]
        if "input_layers" in cfg:
            return self._functional(cfg, inputs)
        shape = inputs[0] if inputs else cfg.get("build_input_shape") and tuple(cfg["build_input_shape"][1:])
        for layer in cfg["layers"]:
            if layer["class_name"] == "InputLayer":
                shape = shape if inputs else self._input(layer)
                continue
            shape = shape or _declared_input(layer)
            if shape is None:
                return [None]  # built only when called: nothing is allocated on load
            shape = self.layer_output(layer, [shape])[0]
        return [shape]

    def _functional(self, cfg: dict, inputs: list | None) -> list:
        outputs: dict[str, tuple] = {}
        input_names = list(histories(cfg["input_layers"]))
        for layer in cfg["layers"]:
            name = layer.get("name") or layer["config"]["name"]
            if layer["class_name"] == "InputLayer":
                outputs[name] = self._input(layer) if inputs is None else inputs[input_names.index(name)]
            elif layer.get("inbound_nodes"):
                outputs[name] = self.layer_output(layer, [outputs[s] for s in histories(layer["inbound_nodes"][0])])[0]
        return [outputs[s] for s in histories(cfg["output_layers"])]

    def _input(self, layer: dict) -> tuple:
        c = layer["config"]
        shape = tuple(_dim(d) for d in (c.get("batch_shape") or c.get("batch_input_shape"))[1:])
        if any(d is not None and d > MAX_INPUT_SIDE for d in shape):
            raise InputError(f"{self.p}: input {c.get('name')} declares shape {list(shape)}; edgeres takes images of "
                             f"at most {MAX_INPUT_SIDE} pixels a side; re-save the model with its real input size")
        return shape

    def layer_output(self, layer: dict, ins: list) -> list:
        cls, c = layer["class_name"], layer.get("config", {})
        if cls in MODEL_CLASSES:
            return self.model(layer, ins)
        self.layer = c.get("name", "?")
        x = ins[0]
        if x is None:
            return [None]
        if cls == "Conv2D":
            y = self._conv(c, x)
        elif cls == "Dense":
            units = _dim(c["units"])
            self._add_params(None if x[-1] is None else (x[-1] + 1) * units)
            y = (*x[:-1], units)
        elif cls == "BatchNormalization":
            self._add_params(None if x[-1] is None else 4 * x[-1])
            y = x
        elif cls == "ZeroPadding2D":
            (t, b), (left, r) = _padding(c.get("padding", 1))
            y = (_plus(x[0], t + b), _plus(x[1], left + r), x[2])
        elif cls == "MaxPooling2D":
            k, s = _pair(c.get("pool_size", 2)), _pair(c.get("strides") or c.get("pool_size", 2))
            y = (*(_out(x[i], k[i], s[i], 1, c.get("padding", "valid")) for i in (0, 1)), x[2])
        elif cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            y = (1, 1, x[-1]) if c.get("keepdims") else (x[-1],)
        elif cls == "Flatten":
            y = (_product(x),)
        else:  # activations, Add, dropout and noise keep the shape
            y = x
        n = _product(y)
        if n is not None and n > self.largest[0]:
            self.largest = (n, self.layer)
        return [y]

    def _conv(self, c: dict, x: tuple) -> tuple:
        k, s, d = _pair(c["kernel_size"]), _pair(c.get("strides", 1)), _pair(c.get("dilation_rate", 1))
        filters, groups = _dim(c["filters"]), max(_dim(c.get("groups", 1)), 1)
        self._add_params(None if x[2] is None else k[0] * k[1] * (x[2] // groups) * filters + filters)
        padding = c.get("padding", "valid")
        return (*(_out(x[i], k[i], s[i], d[i], padding) for i in (0, 1)), filters)

    def _add_params(self, n: int | None) -> None:
        self.params += n or 0
        check_weight_bytes(self.p, 4 * self.params, f"its layers (up to {self.layer})")


def _declared_input(layer: dict):
    shape = layer.get("config", {}).get("batch_input_shape") or layer.get("config", {}).get("batch_shape")
    return tuple(_dim(d) for d in shape[1:]) if shape else None


def _dim(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 31:
        raise ValueError(f"{v!r} is not a size")
    return v


def _pair(v) -> tuple[int, int]:
    v = [v, v] if not isinstance(v, (list, tuple)) else list(v)
    if len(v) != 2:
        raise ValueError(f"{v!r} is not a pair of sizes")
    return _dim(v[0]) or 1, _dim(v[1]) or 1


def _padding(v) -> tuple[tuple[int, int], tuple[int, int]]:
    if not isinstance(v, (list, tuple)):
        return (_dim(v), _dim(v)), (_dim(v), _dim(v))
    rows, cols = v
    return (_pair(rows) if isinstance(rows, (list, tuple)) else (_dim(rows),) * 2,
            _pair(cols) if isinstance(cols, (list, tuple)) else (_dim(cols),) * 2)


def _plus(a: int | None, b: int) -> int | None:
    return None if a is None else a + b


def _out(n: int | None, k: int, s: int, d: int, padding: str) -> int | None:
    if n is None:
        return None
    return -(-n // s) if padding == "same" else max((n - (k - 1) * d - 1) // s + 1, 0)


def _product(shape) -> int | None:
    n = 1
    for d in shape:
        if d is None:
            return None
        n *= d
    return n


def check_declared_sizes(config: dict, p: Path) -> None:
    """Refuse a config whose layers would allocate more than ``model_limits`` allows when Keras builds
    them, before it does (a 1 kB config can ask for Dense(10**9))."""
    sizes = _Sizes(p)
    try:
        sizes.model(config, None)
    except InputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise InputError(f"{p}: the model config is malformed at layer {sizes.layer} ({type(e).__name__}: {e}); "
                         "re-save the model") from None
    elements, layer = sizes.largest
    if VERIFY_BATCH * 4 * elements > MAX_ACTIVATION_BYTES:
        raise InputError(f"{p}: layer {layer} outputs {elements:,} values per image ({size_text(4 * elements)}), "
                         f"more than edgeres runs to verify a model ({size_text(MAX_ACTIVATION_BYTES)} for "
                         f"{VERIFY_BATCH} images); re-save the model with its real input size")
