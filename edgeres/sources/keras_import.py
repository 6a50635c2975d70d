"""Map a Keras ResNet (``.keras``, ``.h5`` or a SavedModel folder) to a ``ResNetSpec`` + torch-style
state_dict, so a Keras model goes through the same pipeline (pruning included, v1 only) as a PyTorch checkpoint.

The layer graph (nested models flattened) is walked from the input along the data path, the way
``keras.applications`` ResNet50/101/152 builds it: ZeroPadding2D(3) + 7×7/2 conv, BN, ReLU,
ZeroPadding2D(1) + 3×3/2 max-pool, bottleneck blocks with the stride on the first 1×1 conv and a
1×1 projection on each stage's first block; then a head of global pooling or Flatten, Dropout and
Dense layers. Layer names are never relied on. Conv biases fold into the BN mean, and Keras' BN
epsilon (1.001e-5) into the variance, both exactly. ``verify_mapping`` runs the Keras model and the
rebuilt torch model side by side, so a wrong mapping never converts silently. A pre-activation ResNet
(v2: some BN normalises what no conv made) is walked by ``keras_resnet_v2``; the head is read here for both.

Keras models from ``keras`` 3 and from ``tf_keras`` (Keras 2) load, each by the Keras that wrote it and
in safe mode, once ``keras_config`` has checked the stored config against an allow-list of layer
classes and its declared sizes; a Lambda or custom layer is refused before anything is deserialised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.errors import InputError
from edgeres.sources.graph_blocks import (BN_EPS, Branch, ConvUnit, Shortcut, Stem, Trunk, check_mapping, stem_kind,
                                          to_state_dict, walk_trunk)
from edgeres.sources.keras_config import VERIFY_BATCH, StoredModel, histories, read_checked_config

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
HINT = ("edgeres maps Keras ResNets (the keras.applications ResNet50/101/152 and ResNet50V2/101V2/152V2 layouts) with "
        "Flatten / global-pooling / Dense / Dropout heads; convert other models with TensorFlow's "
        "TFLite converter directly (pruning unavailable)")
# keras.applications.resnet (v1) preprocess_input, mode "caffe": RGB→BGR, minus the ImageNet BGR mean, no scaling
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
RELU = "relu"


def _refuse(p: Path, what: str) -> InputError:
    return InputError(f"{p}: is not a Keras ResNet this tool can map ({what}); {HINT}")


# -- loading ---------------------------------------------------------------------------------------

def is_saved_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "saved_model.pb").exists()


def load_keras(path: str | Path):
    """The Keras model in ``path``, loaded only after its stored config passed ``keras_config``'s checks,
    by the Keras that wrote it, in safe mode; ``InputError`` naming the file and the fix otherwise."""
    from edgeres.targets.tflite import native_stderr_quiet

    p = Path(path)
    missing = []
    with native_stderr_quiet():  # TensorFlow's start-up chatter, also from reading a SavedModel checkpoint
        stored = read_checked_config(p)
        if p.is_dir():
            loaders = [_load_saved_model]
        elif stored.writer == "tf_keras":
            loaders = [_load_tf_keras, _load_keras3]  # keras 3 reads Keras 2 files too, when tf_keras is absent
        else:
            loaders = [_load_keras3]
        for loader in loaders:
            try:
                return loader(p, stored)
            except ImportError as e:
                missing.append(f"{loader.__doc__}: not installed ({e.name})")
            except Exception as e:  # noqa: BLE001 - any failure to deserialise is a bad or foreign file
                text = str(e).strip().splitlines()
                raise InputError(f"{p}: cannot be loaded as a Keras model ({loader.__doc__}: {type(e).__name__}: "
                                 f"{text[0][:140] if text else ''}); re-save it with model.save('model.keras') from "
                                 "the Keras that trained it") from None
    raise InputError(f"{p}: cannot be loaded as a Keras model ({'; '.join(missing)}); Keras comes with "
                     "pip install 'edgeres[tflite]'")


def release_keras() -> None:
    """Drop the Keras session state of a loaded model (whichever Keras loaded it) and give the freed heap back."""
    import sys

    from edgeres.targets.base import release_memory

    for name in ("keras", "tf_keras"):
        module = sys.modules.get(name)
        clear = getattr(getattr(module, "backend", None), "clear_session", None)
        if clear is not None:
            clear()
    release_memory()


def _load_keras3(p: Path, stored: StoredModel):
    """keras 3"""
    import keras

    if not keras.__version__.startswith("3"):
        raise ImportError(name="keras>=3")
    return keras.saving.load_model(str(p), compile=False, safe_mode=True)


def _tf_keras():
    """tf_keras and its safe-mode scope, TensorFlow's logging quietened."""
    import tensorflow as tf
    import tf_keras
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    tf.get_logger().setLevel("ERROR")  # "compiled metrics have yet to be built" and the like
    return tf_keras, SafeModeScope


def _load_tf_keras(p: Path, stored: StoredModel):
    """tf_keras"""
    import warnings

    tf_keras, safe_mode_scope = _tf_keras()
    # tf_keras honours safe_mode only for .keras files; the scope covers its .h5 reader too
    with warnings.catch_warnings(), safe_mode_scope(True):
        warnings.simplefilter("ignore")
        return tf_keras.models.load_model(str(p), compile=False, safe_mode=True)


def _load_saved_model(p: Path, stored: StoredModel):
    """tf_keras (SavedModel)"""
    import warnings

    # rebuilt from the checked config with the weights read from the checkpoint: tf_keras' SavedModel
    # loader would also revive layers from the saved TensorFlow graphs and run their restore functions
    tf_keras, safe_mode_scope = _tf_keras()
    with warnings.catch_warnings(), safe_mode_scope(True):
        warnings.simplefilter("ignore")
        model = tf_keras.models.model_from_config(stored.config)
        model.load_weights(str(p / "variables" / "variables")).assert_existing_objects_matched()
    return model


# -- the layer graph, nested models flattened ---------------------------------------------------------

@dataclass
class _Node:
    id: str
    layer: object
    cls: str
    inputs: list

    @property
    def cfg(self) -> dict:
        return self.layer.get_config() if self.layer is not None else {}


@dataclass(frozen=True)
class _KerasConv:
    unit: ConvUnit
    fused_relu: bool  # the Conv2D applies its own ReLU (activation="relu"): no BN may follow


class _Graph:
    def __init__(self, model, p: Path):
        self.p = p
        self.nodes: dict[str, _Node] = {}
        self.input_ids: list[str] = []
        outs = self._add_model(model, "", None)
        if len(self.input_ids) != 1 or len(outs) != 1:
            raise _refuse(p, f"{len(self.input_ids)} inputs and {len(outs)} outputs, expected one image in, one tensor out")
        self.input, self.output = self.input_ids[0], outs[0]
        self.consumers: dict[str, list[_Node]] = {}
        for n in self.nodes.values():
            for i in n.inputs:
                self.consumers.setdefault(i, []).append(n)

    def _new(self, node_id: str, layer, cls: str, inputs: list) -> str:
        self.nodes[node_id] = _Node(node_id, layer, cls, inputs)
        return node_id

    def _input(self, node_id: str, layer_cfg: dict) -> str:
        self.input_ids.append(node_id)
        shape = layer_cfg.get("config", {})
        self.input_shape = shape.get("batch_shape") or shape.get("batch_input_shape")
        return self._new(node_id, None, "InputLayer", [])

    def _add_layer(self, layer, prefix: str, inputs: list) -> list[str]:
        if hasattr(layer, "layers") and hasattr(layer, "get_layer"):  # a nested model: splice its graph in
            return self._add_model(layer, f"{prefix}{layer.name}/", inputs)
        return [self._new(f"{prefix}{layer.name}", layer, type(layer).__name__, inputs)]

    def _add_model(self, model, prefix: str, inputs: list | None) -> list[str]:
        cfg = model.get_config()
        entries = cfg.get("layers", [])
        if "input_layers" not in cfg:  # Sequential: a chain
            prev = inputs
            for entry in entries:
                name = entry["config"]["name"]
                if entry["class_name"] == "InputLayer":
                    if prev is None:
                        prev = [self._input(f"{prefix}{name}", entry)]
                    continue
                if prev is None:
                    raise _refuse(self.p, f"Sequential {model.name} has no input shape; build it with keras.Input first")
                prev = self._add_layer(model.get_layer(name), prefix, prev)
            return prev or []
        local: dict[str, list[str]] = {}
        input_names = list(histories(cfg["input_layers"]))
        for entry in entries:
            name = entry.get("name") or entry["config"]["name"]
            if entry["class_name"] == "InputLayer":
                local[name] = [self._input(f"{prefix}{name}", entry)] if inputs is None else [inputs[input_names.index(name)]]
                continue
            if len(entry.get("inbound_nodes", [])) != 1:
                raise _refuse(self.p, f"layer {prefix}{name} is used {len(entry.get('inbound_nodes', []))} times; "
                              "shared layers are not a ResNet")
            ins = [t for src in histories(entry["inbound_nodes"]) for t in local[src]]
            local[name] = self._add_layer(model.get_layer(name), prefix, ins)
        return [t for src in histories(cfg["output_layers"]) for t in local[src]]

    # -- walking ----------------------------------------------------------------------------------
    def users(self, node_id: str) -> list[_Node]:
        return self.consumers.get(node_id, [])

    def one_user(self, node_id: str, expected: str) -> _Node:
        users = self.users(node_id)
        if len(users) != 1:
            kinds = ", ".join(f"{u.cls} {u.id}" for u in users) or "nothing"
            raise _refuse(self.p, f"{self.nodes[node_id].cls} {node_id} feeds {kinds}, expected one {expected}")
        return users[0]

    def found(self, node: _Node, expected: str) -> InputError:
        return _refuse(self.p, f"found {node.cls} {node.id}, expected {expected}")

    def is_relu(self, node: _Node) -> bool:
        c = node.cfg
        if node.cls == "Activation":
            return c.get("activation") == RELU
        if node.cls == "ReLU":
            return not c.get("max_value") and not c.get("negative_slope") and not c.get("threshold")
        return False

    def relu_after(self, node_id: str, where: str) -> str:
        nxt = self.one_user(node_id, f"ReLU {where}")
        if not self.is_relu(nxt):
            raise self.found(nxt, f"a ReLU {where}")
        return nxt.id

    def padding(self, node: _Node) -> int:
        """The symmetric amount of a ZeroPadding2D, or a refusal."""
        pads = [int(v) for v in _flat(node.cfg.get("padding"))]
        if len(set(pads)) != 1 or node.cfg.get("data_format", "channels_last") != "channels_last":
            raise _refuse(self.p, f"ZeroPadding2D {node.id} pads {pads}; only equal padding on every side maps")
        return pads[0]

    def conv(self, node_id: str) -> _KerasConv:
        """[ZeroPadding2D →] Conv2D [→ BatchNormalization] as a unit with torch's symmetric padding."""
        import numpy as np

        node = self.nodes[node_id]
        pad = 0
        if node.cls == "ZeroPadding2D":
            pad = self.padding(node)
            node = self.one_user(node.id, "Conv2D after the ZeroPadding2D")
        if node.cls != "Conv2D":
            raise self.found(node, "a Conv2D")
        c = node.cfg
        k, kw = (int(v) for v in c["kernel_size"])
        s, sw = (int(v) for v in c["strides"])
        act = c.get("activation", "linear")
        if (k != kw or s != sw or list(c.get("dilation_rate", (1, 1))) != [1, 1] or int(c.get("groups", 1)) != 1
                or c.get("data_format", "channels_last") != "channels_last" or act not in ("linear", RELU)):
            raise _refuse(self.p, f"Conv2D {node.id} is {k}×{kw}/{s}×{sw}, groups {c.get('groups', 1)}, dilation "
                          f"{c.get('dilation_rate')}, activation {act}, {c.get('data_format')}; not a plain ResNet conv")
        if c["padding"] == "same":
            # TF "same" is symmetric only at stride 1 (odd k) or for 1×1 kernels; else it pads bottom/right more
            same = k // 2 if (s == 1 and k % 2) or k == 1 else None
            if same is None or pad:
                raise _refuse(self.p, f"Conv2D {node.id} ({k}×{k}/{s}) uses 'same' padding, which TF applies "
                              "asymmetrically; torch ResNets pad symmetrically (ZeroPadding2D + 'valid' maps)")
            pad = same
        if pad != k // 2:
            raise _refuse(self.p, f"Conv2D {node.id} ({k}×{k}/{s}) is padded by {pad}, not {k // 2} as in a ResNet")
        weights = node.layer.get_weights()
        w = weights[0].astype(np.float64).transpose(3, 2, 0, 1)  # HWIO → OIHW
        bias = weights[1].astype(np.float64) if c.get("use_bias", True) else np.zeros(w.shape[0])
        users = self.users(node.id)
        out, fused_relu = node.id, act == RELU
        if len(users) == 1 and users[0].cls == "BatchNormalization":
            if fused_relu:
                raise _refuse(self.p, f"Conv2D {node.id} applies ReLU before its BatchNormalization {users[0].id}")
            bn = self.batch_norm(users[0], w.shape[0])
            bn["running_mean"] = bn["running_mean"] - bias  # BN(conv + b) = BN'(conv) with mean - b: exact
            out = users[0].id
        else:
            n = w.shape[0]  # no BN: an identity BN whose shift is the conv bias
            bn = {"weight": np.ones(n), "bias": bias, "running_mean": np.zeros(n), "running_var": np.full(n, 1.0 - BN_EPS)}
        return _KerasConv(ConvUnit(w, s, bn, out), fused_relu)

    def batch_norm(self, node: _Node, channels: int) -> dict:
        import numpy as np

        c = node.cfg
        axis = [int(a) for a in _flat(c.get("axis", -1))]
        if axis not in ([-1], [3]):
            raise _refuse(self.p, f"BatchNormalization {node.id} normalises axis {axis}, not the channels (-1)")
        weights = [v.astype(np.float64) for v in node.layer.get_weights()]
        gamma = weights.pop(0) if c.get("scale", True) else np.ones(channels)
        beta = weights.pop(0) if c.get("center", True) else np.zeros(channels)
        mean, var = weights[:2]
        eps = float(c.get("epsilon", 1e-3))
        # (x - m) / sqrt(v + eps) == (x - m) / sqrt((v + eps - BN_EPS) + BN_EPS): the epsilon folds exactly
        return {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var + eps - BN_EPS}


def _flat(v):
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _flat(x)
    elif v is not None:
        yield v


# -- mapping ------------------------------------------------------------------------------------------

HEAD_POOL = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max", "Flatten": "flatten"}


@dataclass(frozen=True)
class _Pooling:
    kind: str  # a HEAD_POOL value
    out: str  # the layer after it (a keepdims pool's Flatten)


@dataclass(frozen=True)
class _Dense:
    kernel: object  # numpy (in, out), as Keras holds it
    bias: object
    activation: str  # "linear", "relu" or "softmax", the Dense's own or the layer after it


@dataclass(frozen=True)
class _KerasHead:
    pool: str  # "avg", "max" or "flatten"
    dense: tuple[_Dense, ...]  # hidden layers, then the classifier; Flatten's rows already in torch's order
    feature: int | None  # side of the feature map a Flatten head sees

    def layers(self):
        """The spec's record of this head."""
        from edgeres.model.zoo import Head

        *hidden, last = self.dense
        return Head(self.pool, tuple((int(d.kernel.shape[1]), "linear" if d.activation == "linear" else RELU)
                                     for d in hidden), last.activation == "softmax")


def map_keras(model, path: str | Path):
    """(spec, state_dict) for the Keras ResNet ``model`` loaded from ``path``; ``InputError`` when it does not map."""
    p = Path(path)
    g = _Graph(model, p)
    side = _image_side(g)
    sd = {}
    if _pre_activation(g):
        from edgeres.sources.keras_resnet_v2 import walk_v2

        trunk_v2 = walk_v2(g, _Walk(g), sd)
        head = _head(g, trunk_v2.out, trunk_v2.channels)
        _put_head(sd, head)
        state_dict = to_state_dict(sd)
        return trunk_v2.spec(head, side, lambda what: _refuse(p, what)), state_dict
    trunk = walk_trunk(_Walk(g), sd)
    head = _head(g, trunk.out, int(trunk.blocks[-1].cout))
    _put_head(sd, head)
    state_dict = to_state_dict(sd)
    return _keras_spec(p, state_dict, trunk, head, side), state_dict


def _put_head(sd: dict, head: _KerasHead) -> None:
    *hidden, last = head.dense
    for i, d in enumerate(hidden):
        sd[f"hidden.{i}.weight"], sd[f"hidden.{i}.bias"] = d.kernel.T, d.bias
    sd["fc.weight"], sd["fc.bias"] = last.kernel.T, last.bias


def _pre_activation(g: _Graph) -> bool:
    """True for a pre-activation ResNet (v2): some BatchNormalization normalises what no conv made."""
    return any(n.cls == "BatchNormalization" and n.inputs and g.nodes[n.inputs[0]].cls not in ("Conv2D", "Dense")
               for n in g.nodes.values())


def _image_side(g: _Graph) -> int | None:
    """The input's side (None when the model leaves it open), after refusing non-images."""
    shape = list(g.input_shape or [])
    if len(shape) != 4 or shape[-1] != 3:
        raise _refuse(g.p, f"input shape {shape}, expected (batch, height, width, 3) channels-last images")
    if shape[1] != shape[2]:
        raise _refuse(g.p, f"input is {shape[1]}×{shape[2]}; edgeres ResNets take square images")
    return shape[1]


class _Walk:
    """The phases of a Keras ResNet v1 layer graph, driven by ``graph_blocks.walk_trunk``."""

    def __init__(self, g: _Graph):
        self.g = g

    def refuse(self, what: str) -> InputError:
        return _refuse(self.g.p, what)

    def stem(self) -> Stem:
        g = self.g
        first = g.one_user(g.input, "stem convolution")
        if first.cls not in ("Conv2D", "ZeroPadding2D"):
            raise self.refuse(f"found {first.cls} {first.id} after the input, expected the stem convolution; "
                              "preprocessing inside the model (Rescaling, preprocess_input ops) is not mapped: save "
                              "the model without it, edgeres applies keras.applications' caffe preprocessing itself")
        conv = g.conv(first.id)
        kind = stem_kind(conv.unit, "stem conv", self.refuse)
        x = conv.unit.out if conv.fused_relu else g.relu_after(conv.unit.out, "after the stem conv")
        return Stem(conv.unit, kind, self.stem_pool(x) if kind == "imagenet" else x)

    def stem_pool(self, x: str) -> str:
        """The ZeroPadding2D(1) + MaxPooling2D(3, 2) after ``x``: the layer it ends at."""
        g = self.g
        node = g.one_user(x, "ZeroPadding2D(1) + MaxPooling2D(3, 2)")
        pad = 0
        if node.cls == "ZeroPadding2D":
            pad = g.padding(node)
            node = g.one_user(node.id, "MaxPooling2D after the ZeroPadding2D")
        c = node.cfg if node.cls == "MaxPooling2D" else {}
        ok = (node.cls == "MaxPooling2D" and [int(v) for v in _flat(c.get("pool_size"))] == [3, 3]
              and [int(v) for v in _flat(c.get("strides"))] == [2, 2] and c.get("padding") == "valid" and pad == 1)
        if not ok:
            raise self.refuse(f"found {node.cls} {node.id} (pad {pad}, {c.get('pool_size')}/{c.get('strides')} "
                              f"{c.get('padding')}), expected ZeroPadding2D(1) + MaxPooling2D(3, strides=2, 'valid')")
        return node.id

    def at_head(self, x: str) -> bool:
        users = self.g.users(x)
        return len(users) == 1 and users[0].cls in (*HEAD_POOL, "Dropout")

    def branch(self, x: str) -> Branch:
        """The convs from block input ``x`` to the Add, and the shortcut joining them there."""
        g = self.g
        users = g.users(x)
        starts = [u for u in users if u.cls in ("Conv2D", "ZeroPadding2D")]
        others = [u for u in users if u not in starts and u.cls != "Add"]
        if others or not starts:
            bad = others[0] if others else users[0] if users else None
            hint = ""
            what = f"found {bad.cls} {bad.id}{hint}" if bad else f"{x} is the model output, with no classifier"
            raise self.refuse(f"{what}, expected a residual block or the head (pooling / Flatten)")
        convs = [g.conv(u.id) for u in starts]
        proj = [c.unit for c in convs if not c.fused_relu and [v.cls for v in g.users(c.unit.out)] == ["Add"]]
        main = [c for c in convs if all(c.unit is not q for q in proj)]
        if len(main) != 1 or len(proj) > 1:
            raise self.refuse(f"{x} feeds {len(starts)} convolutions, not one residual block")
        chain = [main[0].unit]
        relu = main[0].fused_relu
        while True:
            nxt = g.one_user(chain[-1].out, "ReLU or Add in a residual block")
            if nxt.cls == "Add" and not relu:
                break
            if relu:  # the conv applied its own ReLU: the next conv follows directly
                start = nxt
            elif g.is_relu(nxt) and len(chain) < 3:
                start = g.one_user(nxt.id, "Conv2D in a residual block")
            else:
                raise g.found(nxt, "ReLU or Add in a residual block")
            conv = g.conv(start.id)
            chain.append(conv.unit)
            relu = conv.fused_relu
        add = nxt
        ins = list(add.inputs)
        if len(ins) != 2 or chain[-1].out not in ins:
            raise self.refuse(f"Add {add.id} does not join a block's branch with its shortcut")
        shortcut = self._shortcut(x, add, ins[1 - ins.index(chain[-1].out)], proj[0] if proj else None)
        return Branch(tuple(chain), shortcut, add.id, add.id)

    def _shortcut(self, x: str, add: _Node, source: str, proj: ConvUnit | None) -> Shortcut:
        """What joins block input ``x`` to ``add`` through layer ``source``: the 1×1 conv ``proj`` or ``x`` itself."""
        if proj is not None:
            if source != proj.out or proj.weight.shape[-1] != 1:
                raise self.refuse(f"Add {add.id} shortcut is not a 1×1 projection conv")
            return Shortcut("projection", proj)
        if source == x:
            return Shortcut("identity")
        raise self.refuse(f"Add {add.id} shortcut comes from {self.g.nodes[source].cls} {source}, not the block input "
                          "or a 1×1 conv")

    def after_add(self, branch: Branch) -> str:
        return self.g.relu_after(branch.add_out, f"after Add {branch.add}")


# -- the head: pooling / Flatten, then Dense (+ReLU) … Dense (+softmax), Dropout anywhere -------------

def _head(g: _Graph, out: str, channels: int) -> _KerasHead:
    """The head after the trunk's last layer ``out`` (``channels`` wide), its first Dense's rows in torch's
    (C, H, W) order after a Flatten."""
    from edgeres.model.keras_model import flatten_rows_to_chw

    pooling = _head_pool(g, out)
    dense = _dense_layers(g, pooling.out)
    first_in = int(dense[0].kernel.shape[0])
    feature = None
    if pooling.kind == "flatten":
        size2, rem = divmod(first_in, channels)
        feature = round(size2**0.5)
        if rem or feature * feature != size2:
            raise _refuse(g.p, f"Flatten → Dense {first_in} inputs is not {channels} channels × a square feature map")
        dense[0] = replace(dense[0], kernel=flatten_rows_to_chw(dense[0].kernel, channels, feature))
    elif first_in != channels:
        raise _refuse(g.p, f"the first Dense takes {first_in} inputs, the last stage gives {channels}")
    return _KerasHead(pooling.kind, tuple(dense), feature)


def _head_pool(g: _Graph, x: str) -> _Pooling:
    node = g.one_user(x, "the head (GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten)")
    node = _skip_dropout(g, node)
    if node.cls not in HEAD_POOL:
        raise g.found(node, "GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten after the last block")
    kind = HEAD_POOL[node.cls]
    if node.cfg.get("data_format", "channels_last") != "channels_last":
        raise _refuse(g.p, f"{node.cls} {node.id} is channels_first")
    if kind != "flatten" and node.cfg.get("keepdims"):
        node = g.one_user(node.id, "Flatten after the keepdims pooling")
        if node.cls != "Flatten":
            raise g.found(node, "Flatten after the keepdims pooling")
    return _Pooling(kind, node.id)


def _dense_layers(g: _Graph, out: str) -> list[_Dense]:
    """The Dense layers from ``out`` to the model output, each with the activation that follows it."""
    import numpy as np

    dense = []
    while out != g.output:
        node = _skip_dropout(g, g.one_user(out, "Dense, Dropout or an activation in the head"))
        c = node.cfg
        if node.cls == "Dense":
            act = c.get("activation", "linear")
            if act not in ("linear", RELU, "softmax"):
                raise _refuse(g.p, f"Dense {node.id} has activation {act}; the head maps relu, softmax or none")
            weights = node.layer.get_weights()
            bias = weights[1] if c.get("use_bias", True) else np.zeros(weights[0].shape[1], np.float32)
            dense.append(_Dense(weights[0], bias, act))
        elif dense and dense[-1].activation == "linear" and (g.is_relu(node) or node.cls in ("Softmax", "Activation")):
            act = RELU if g.is_relu(node) else "softmax" if node.cls == "Softmax" or c.get("activation") == "softmax" else None
            if act is None or (node.cls == "Softmax" and [int(a) for a in _flat(c.get("axis", -1))] not in ([-1], [1])):
                raise g.found(node, "ReLU or softmax after a Dense")
            dense[-1] = replace(dense[-1], activation=act)
        else:
            raise g.found(node, "Dense, Dropout, ReLU or softmax in the head")
        out = node.id
    if not dense:
        raise _refuse(g.p, "the model ends without a Dense classifier; add the classification head")
    acts = [d.activation for d in dense]
    if any(a == "softmax" for a in acts[:-1]) or acts[-1] == RELU:
        raise _refuse(g.p, f"head activations {acts}; softmax may only end the model, and the classifier may not "
                      "end in ReLU")
    return dense


def _keras_spec(p: Path, state_dict: dict, trunk: Trunk, head: _KerasHead, side: int | None):
    """The spec read off ``state_dict`` (hidden head layers aside), with the Keras head, stride placement
    and caffe preprocessing at the model's input side (inferred from the head when the model leaves it open)."""
    from edgeres.model.infer import infer_spec

    spec = infer_spec({k: v for k, v in state_dict.items() if not k.startswith("hidden.")}, p)
    stages = len(spec.layers)
    strides = 2 ** (stages - 1) * (4 if trunk.stem.kind == "imagenet" else 1)
    size = side or (head.feature * strides if head.pool == "flatten" else 224 if trunk.stem.kind == "imagenet" else 32)
    spec = replace(spec, name=f"{spec.name.split('-')[0]}-keras", stride_on=trunk.layout.stride_on,
                   head_layers=head.layers(), preprocess=keras_caffe_preprocess(int(size), imagenet=trunk.stem.kind == "imagenet"))
    if head.pool == "flatten" and spec.feature_size != head.feature:
        raise _refuse(p, f"Flatten sees a {head.feature}×{head.feature} map but a {size}² input gives "
                      f"{spec.feature_size}×{spec.feature_size}")
    return spec


def keras_caffe_preprocess(size: int, *, imagenet: bool = True):
    """``keras.applications.resnet.preprocess_input`` (caffe mode) at ``size``, geometry as the family is
    evaluated: ImageNet-stem models shorter side to size·256/224 then a centre crop (the ImageNet evaluation
    convention these weights were scored with; a straight resize to 224² costs them ~10 points top-1 on real
    photos), CIFAR-stem models straight to ``size``² (their images already are)."""
    from edgeres.calibration.preprocess import Preprocess

    geometry = (dict(resize=round(size * 256 / 224), resize_mode="shorter_side_crop") if imagenet
                else dict(resize=None, resize_mode="direct"))
    return Preprocess(size=size, **geometry, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), scale=1.0, channel_order="BGR")



def _skip_dropout(g: _Graph, node: _Node) -> _Node:
    while node.cls in ("Dropout", "SpatialDropout2D", "GaussianDropout", "AlphaDropout", "GaussianNoise"):
        if node.id == g.output:
            break
        node = g.one_user(node.id, "the next head layer after Dropout")
    return node


def verify_mapping(model, path: str | Path, spec, state_dict, *, rel_tol: float = 1e-4, seed: int = 0) -> float:
    """Max |Keras − rebuilt torch| output difference on random inputs, relative to the output scale
    (on log-probabilities when the model ends in a softmax); ``InputError`` above ``rel_tol``."""
    import numpy as np
    import torch

    from edgeres.model.torch_model import build_torch
    from edgeres.targets.tflite import native_stderr_quiet

    p = Path(path)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((VERIFY_BATCH, spec.input_size, spec.input_size, 3)).astype(np.float32)
    with native_stderr_quiet():
        ref = np.asarray(model(x, training=False), dtype=np.float64)
    rebuilt = build_torch(spec)
    rebuilt.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        got = rebuilt.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float64)
    # probabilities hide logit errors: compare log-probabilities where they are resolvable
    if got.shape == ref.shape and spec.head_layers.softmax:
        keep = (ref > 1e-6) & (got > 1e-6)
        ref, got = np.where(keep, np.log(np.maximum(ref, 1e-30)), 0.0), np.where(keep, np.log(np.maximum(got, 1e-30)), 0.0)
    return check_mapping(p, "Keras model", spec, ref, got, rel_tol, HINT)
