"""Map a ResNet-shaped fp32 ONNX graph back to a ``ResNetSpec`` + torch-style state_dict, so an ONNX
input goes through the same pipeline (pruning included) as a PyTorch checkpoint.

The graph is walked from its input along the data path: stem conv (+max-pool), residual blocks
(2 convs: basic, 3: bottleneck; shortcut = identity, 1×1 conv or Slice/Pad option A), global pool,
classifier. BatchNorm folded into conv bias (torch's eval-mode export) becomes an identity BN with
that bias; an explicit BatchNormalization node keeps its statistics. ``verify_mapping`` then runs the
original graph and the rebuilt model side by side, so a wrong mapping never converts silently."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from edgeres.errors import InputError
from edgeres.sources.graph_blocks import (BN_EPS, Branch, ConvUnit, Shortcut, Stem, Trunk, check_mapping, stem_kind,
                                          to_state_dict, walk_trunk)
from edgeres.model.limits import (MAX_ACTIVATION_BYTES, MAX_WEIGHT_BYTES, check_batch, check_input_side,
                                  check_weight_bytes, size_text)

# ops allowed on the data path; anything else means the graph is not a plain ResNet
DATA_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Slice", "Pad", "GlobalAveragePool",
            "ReduceMean", "Flatten", "Reshape", "Squeeze", "Gemm", "MatMul", "Identity",
            # shape plumbing for Reshape (dynamic flatten): reads the shape, never the values
            "Shape", "Gather", "Unsqueeze", "Concat", "Cast"}
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Cast"}
VERIFY_BATCH = 4  # images run through both models when the graph's batch is dynamic
HINT = ("edgeres maps only torchvision/CIFAR-layout ResNets from ONNX; give the PyTorch checkpoint "
        "(.pt) instead, or convert this graph with onnxruntime/OpenVINO directly (pruning unavailable)")


def _refuse(p: Path, what: str) -> InputError:
    return InputError(f"{p}: is not a ResNet this tool can map ({what}); {HINT}")


class _Graph:
    def __init__(self, model, p: Path):
        import numpy as np
        from onnx import numpy_helper

        self.p = p
        g = model.graph
        self.const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = numpy_helper.to_array(a.t)
        inputs = [i for i in g.input if i.name not in self.const]
        if len(inputs) != 1:
            raise _refuse(p, f"{len(inputs)} graph inputs, expected one image tensor")
        self.input = inputs[0]
        self.outputs = {o.name for o in g.output}
        # the data path: nodes that (transitively) read the image
        live, self.producer, self.consumers = {self.input.name}, {}, {}
        for n in g.node:  # ONNX requires topological order
            if any(t in live for t in n.input):
                if n.op_type not in DATA_OPS:
                    raise _refuse(p, f"found op {n.op_type} at node {n.name or n.output[0]}")
                live.update(n.output)
                for t in n.output:
                    self.producer[t] = n
                for t in n.input:
                    if t in live:
                        self.consumers.setdefault(t, []).append(n)
        self.np = np

    def users(self, t: str):
        """Data consumers of ``t``, looking through Identity and ignoring shape reads."""
        out = []
        for n in self.consumers.get(t, []):
            if n.op_type == "Identity":
                out.extend(self.users(n.output[0]))
            elif n.op_type != "Shape":
                out.append(n)
        return out

    def one_user(self, t: str, expected: str):
        users = self.users(t)
        if len(users) != 1:
            kinds = ", ".join(f"{u.op_type} {u.name}" for u in users) or "nothing"
            raise _refuse(self.p, f"tensor {t} feeds {kinds}, expected one {expected}")
        return users[0]

    def source(self, t: str) -> str:
        """``t`` with Identity nodes before it skipped."""
        n = self.producer.get(t)
        while n is not None and n.op_type == "Identity":
            t = n.input[0]
            n = self.producer.get(t)
        return t

    def weight(self, node, i: int):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            return None
        if name not in self.const:
            raise _refuse(self.p, f"{node.op_type} {node.name} input {i} is computed, not a stored weight")
        return self.const[name].astype(self.np.float32)

    def conv(self, node, kernel: int | None = None) -> ConvUnit:
        from onnx import helper

        if node.op_type != "Conv":
            raise _refuse(self.p, f"found op {node.op_type} at node {node.name}, expected a Conv")
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        w, b = self.weight(node, 1), self.weight(node, 2)
        k = int(w.shape[-1])
        stride = list(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        # grouped 3×3 convs (ResNeXt) map as they are: torch stores them (out, in / groups, k, k), as ONNX does
        ok = (w.shape[-2] == k and (a.get("group", 1) == 1 or k == 3) and list(a.get("dilations", [1, 1])) == [1, 1]
              and stride[0] == stride[1] and pads == [k // 2] * 4 and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
              and (kernel is None or k == kernel))
        if not ok:
            raise _refuse(self.p, f"Conv {node.name} is {w.shape[-2]}×{k}/{stride} pads {pads} group {a.get('group', 1)}, "
                          f"not a ResNet {kernel or k}×{kernel or k} conv with same padding")
        np = self.np
        out = node.output[0]
        bias = b if b is not None else np.zeros(w.shape[0], np.float32)
        users = self.users(out)
        if len(users) == 1 and users[0].op_type == "BatchNormalization":
            bn = users[0]
            ba = {x.name: helper.get_attribute_value(x) for x in bn.attribute}
            scale, shift, mean, var = (self.weight(bn, i) for i in (1, 2, 3, 4))
            eps = float(ba.get("epsilon", 1e-5))
            # fold the conv bias into the mean, and the epsilon difference into the variance: exact
            bn_params = {"weight": scale, "bias": shift, "running_mean": mean - bias, "running_var": var + eps - BN_EPS}
            out = bn.output[0]
        else:
            # folded BN (torch eval export): identity BN whose bias is the conv bias
            c = w.shape[0]
            bn_params = {"weight": np.ones(c, np.float32), "bias": bias, "running_mean": np.zeros(c, np.float32),
                         "running_var": np.full(c, 1.0 - BN_EPS, np.float32)}
        return ConvUnit(w, int(stride[0]), bn_params, out)


def _static_size(g: _Graph) -> int | None:
    dims = g.input.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise _refuse(g.p, f"input {g.input.name} has rank {len(dims)}, expected NCHW images")
    c, h, w = (d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    if c not in (None, 1, 3):
        raise _refuse(g.p, f"input {g.input.name} has {c} channels; edgeres converts colour (3) and greyscale (1) "
                      "models (NCHW)")
    if h and w and h != w:
        raise _refuse(g.p, f"input {g.input.name} is {h}×{w}, edgeres ResNets take square images")
    check_input_side(g.p, f"input {g.input.name}", h or None)
    return h or None


def verify_batch(p: Path, name: str, dims: list, size: int, channels: int = 3) -> int:
    """The batch ``verify_mapping`` runs: the graph's own when it is fixed, after checking its size."""
    batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else VERIFY_BATCH
    check_batch(p, f"input {name} at batch {batch}", (batch, channels, size, size))
    return batch


# -- reading: nothing outside the file, declared sizes checked --------------------------------------

def read_onnx(path: str | Path):
    """The ONNX model in ``path`` with its declared sizes checked; external data only from regular files
    beside it. ``InputError`` for anything else."""
    import onnx
    from onnx import TensorProto

    p = Path(path)
    check_weight_bytes(p, p.stat().st_size, "its contents")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf/IO errors all mean a bad file
        raise InputError(f"{p}: is not a readable ONNX model ({type(e).__name__}); re-export it") from None
    tensors = list(_stored_tensors(model.graph, p))
    external = [(n, t) for n, t in tensors if t.data_location == TensorProto.EXTERNAL]
    total = sum(_declared_bytes(p, n, t) for n, t in tensors if t.data_location != TensorProto.EXTERNAL)
    total += sum(_external_bytes(p, n, t) for n, t in external)
    check_weight_bytes(p, total, "its tensors")
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{p}: its external data cannot be read ({type(e).__name__}); save all tensors inside "
                             "the .onnx: onnx.save(model, path, save_as_external_data=False)") from None
    return model


def _stored_tensors(graph, p: Path):
    """(name, TensorProto) of every tensor stored in ``graph`` and its subgraphs."""
    from onnx import AttributeProto

    if len(graph.sparse_initializer):
        raise _refuse(p, f"sparse initializer {graph.sparse_initializer[0].values.name}: a dense size is declared and "
                      "nothing stored; ResNet exports have none")
    for t in graph.initializer:
        yield t.name, t
    for n in graph.node:
        for a in n.attribute:
            if a.type == AttributeProto.SPARSE_TENSOR or a.type == AttributeProto.SPARSE_TENSORS:
                raise _refuse(p, f"node {n.name or n.op_type} holds a sparse tensor; ResNet exports have none")
            for t in ([a.t] if a.type == AttributeProto.TENSOR else list(a.tensors)):
                yield f"{n.name or n.op_type}.{a.name}", t
            for sub in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)):
                yield from _stored_tensors(sub, p)


def _external_bytes(p: Path, name: str, t) -> int:
    """The bytes external tensor ``t`` declares, after checking the file it names: a regular file in the
    model's folder (torch's default exporter writes one), long enough to hold them."""
    import stat

    info = {kv.key: kv.value for kv in t.external_data}
    location = info.get("location", "")
    declared = _nbytes(p, name, t)
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", declared))
    except ValueError:
        raise _external_refusal(p, location, "with an unreadable offset or length") from None
    folder = p.parent.resolve()
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise _external_refusal(p, location, "outside the model's folder")
    try:
        real = (p.parent / location).resolve(strict=True)
        info_stat = real.stat()
    except (OSError, RuntimeError):
        raise _external_refusal(p, location, "that does not exist") from None
    if not real.is_relative_to(folder):  # a symlink out of the folder
        raise _external_refusal(p, location, "outside the model's folder")
    if not stat.S_ISREG(info_stat.st_mode):
        raise _external_refusal(p, location, "that is not a regular file")
    if length != declared or offset < 0 or offset + declared > info_stat.st_size:
        raise _external_refusal(p, location, f"too short for tensor {name} ({size_text(declared)} at offset {offset})")
    return declared


def _external_refusal(p: Path, location: str, why: str) -> InputError:
    return InputError(f"{p}: references external data file {location!r} {why}, which edgeres refuses (nothing was "
                      "read from it); save all tensors inside the .onnx: onnx.save(model, path, "
                      "save_as_external_data=False)")


def _nbytes(p: Path, name: str, t) -> int:
    from onnx import helper

    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise _refuse(p, f"tensor {name} has data type {t.data_type}, not a numeric one") from None
    declared = itemsize
    for d in t.dims:
        declared *= max(int(d), 0)
    return declared


def _declared_bytes(p: Path, name: str, t) -> int:
    """The bytes ``t`` declares by its dims; refused when that is more than it holds."""
    declared = _nbytes(p, name, t)
    # typed fields pack small values into fewer bytes (a zero int8 is one varint byte), never below 1/8
    if declared > 8 * t.ByteSize() + 64:
        shape = "×".join(str(d) for d in t.dims)
        raise InputError(f"{p}: tensor {name} ({shape}) declares {size_text(declared)} but stores "
                         f"{size_text(t.ByteSize())}, refused (nothing was allocated); the file is damaged or hostile; "
                         "re-export the model")
    return declared


def map_onnx(path: str | Path):
    """(spec, state_dict) for the ResNet in ONNX file ``path``; ``InputError`` when it does not map."""
    p = Path(path)
    g = _Graph(read_onnx(p), p)
    size = _static_size(g)
    sd = {}
    trunk = walk_trunk(_Walk(g), sd)
    # torchvision calls the classifier fc; the CIFAR option-A ResNets edgeres' zoo follows call it linear
    head_name = "linear" if trunk.stem.kind == "cifar" and trunk.layout.shortcut_kind == "option_a" else "fc"
    fc = _classifier(g, trunk.out)
    sd[f"{head_name}.weight"], sd[f"{head_name}.bias"] = g.np.ascontiguousarray(fc.weight), fc.bias.reshape(-1)
    state_dict = to_state_dict(sd)
    return _onnx_spec(g, state_dict, trunk, size), state_dict


class _Walk:
    """The phases of an ONNX ResNet graph, driven by ``graph_blocks.walk_trunk``."""

    def __init__(self, g: _Graph):
        self.g = g

    def refuse(self, what: str) -> InputError:
        return _refuse(self.g.p, what)

    def stem(self) -> Stem:
        g = self.g
        node = g.one_user(g.input.name, "stem Conv")
        unit = g.conv(node)
        kind = stem_kind(unit, f"stem Conv {node.name}", self.refuse)
        relu = g.one_user(unit.out, "Relu after the stem")
        if relu.op_type != "Relu":
            raise self.refuse(f"found op {relu.op_type} at node {relu.name}, expected the stem Relu")
        x = relu.output[0]
        return Stem(unit, kind, self._stem_pool(x) if kind == "imagenet" else x)

    def _stem_pool(self, x: str) -> str:
        from onnx import helper

        pool = self.g.one_user(x, "stem MaxPool")
        a = {t.name: helper.get_attribute_value(t) for t in pool.attribute}
        if pool.op_type != "MaxPool" or list(a.get("kernel_shape", [])) != [3, 3] or list(a.get("strides", [])) != [2, 2] \
                or list(a.get("pads", [0] * 4)) != [1] * 4 or a.get("ceil_mode", 0):
            raise self.refuse(f"found {pool.op_type} at node {pool.name}, expected the stem MaxPool 3×3/2 pad 1")
        return pool.output[0]

    def at_head(self, x: str) -> bool:
        users = self.g.users(x)
        return len(users) == 1 and users[0].op_type in ("GlobalAveragePool", "ReduceMean")

    def branch(self, x: str) -> Branch:
        """The convs from block input ``x`` to the Add, and the shortcut joining them there."""
        g = self.g
        users = g.users(x)
        convs = [u for u in users if u.op_type == "Conv"]
        others = [u for u in users if u.op_type not in ("Conv", "Add", "Slice")]
        if others or not convs:
            bad = others[0] if others else users[0] if users else None
            what = f"found op {bad.op_type} at node {bad.name}" if bad else f"tensor {x} is not used"
            raise self.refuse(f"{what}, expected a residual block or the global pool")
        units = {u.name: g.conv(u) for u in convs}
        proj = [u for u in convs if [v.op_type for v in g.users(units[u.name].out)] == ["Add"]]
        main = [u for u in convs if u not in proj]
        if len(main) != 1 or len(proj) > 1:
            raise self.refuse(f"tensor {x} feeds {len(convs)} convs, not a residual block")
        chain = [units[main[0].name]]
        while True:
            nxt = g.one_user(chain[-1].out, "Relu or Add in a residual block")
            if nxt.op_type == "Add":
                break
            if nxt.op_type != "Relu" or len(chain) > 3:
                raise self.refuse(f"found op {nxt.op_type} at node {nxt.name}, expected Relu or Add in a residual "
                                  "block")
            chain.append(g.conv(g.one_user(nxt.output[0], "Conv in a residual block")))
        add = nxt
        other = [t for t in add.input if g.source(t) != chain[-1].out]
        if len(add.input) != 2 or len(other) != 1:
            raise self.refuse(f"Add {add.name} does not join a block's branch with its shortcut")
        shortcut = self._shortcut(x, add, g.source(other[0]), proj[0] if proj else None, units)
        return Branch(tuple(chain), shortcut, add.name, add.output[0])

    def _shortcut(self, x: str, add, source: str, proj, units: dict[str, ConvUnit]) -> Shortcut:
        """What joins block input ``x`` to ``add`` through tensor ``source``: the 1×1 conv node ``proj``
        (its unit in ``units``), ``x`` itself, or a chain of Slice / Pad back to ``x`` (option A)."""
        if proj is not None:
            unit = units[proj.name]
            if source != unit.out or unit.weight.shape[-1] != 1:
                raise self.refuse(f"Add {add.name} shortcut is not the 1×1 projection conv {proj.name}")
            return Shortcut("projection", unit)
        if source == x:
            return Shortcut("identity")
        t = source
        while t != x:
            n = self.g.producer.get(t)
            if n is None or n.op_type not in ("Slice", "Pad"):
                what = f"{n.op_type} at node {n.name}" if n is not None else f"tensor {t}"
                raise self.refuse(f"found {what} in the shortcut of Add {add.name}, expected Slice/Pad or a 1×1 conv")
            t = self.g.source(n.input[0])
        return Shortcut("option_a")

    def after_add(self, branch: Branch) -> str:
        relu = self.g.one_user(branch.add_out, "Relu after the residual Add")
        if relu.op_type != "Relu":
            raise self.refuse(f"found op {relu.op_type} at node {relu.name}, expected Relu after Add {branch.add}")
        return relu.output[0]


@dataclass(frozen=True)
class _Classifier:
    weight: object  # numpy (classes, features), as torch's Linear holds it
    bias: object
    out: str  # the tensor it writes


def _classifier(g: _Graph, x: str) -> _Classifier:
    """The head after the last block ``x``: global pool → Flatten / Reshape / Squeeze → the classifier,
    which must write the graph's output."""
    node = g.users(x)[0]  # the global pool walk_trunk stopped at
    x = node.output[0]
    node = g.one_user(x, "Flatten and the classifier")
    while node.op_type in ("Flatten", "Reshape", "Squeeze"):
        x = node.output[0]
        node = g.one_user(x, "the classifier")
    fc = _fully_connected(g, node)
    if fc.out not in g.outputs or g.users(fc.out):
        after = g.users(fc.out)
        what = f"found op {after[0].op_type} at node {after[0].name}" if after else "classifier is not the graph output"
        raise _refuse(g.p, f"{what}; export the logits, not probabilities")
    return fc


def _fully_connected(g: _Graph, node) -> _Classifier:
    """A plain Gemm, or MatMul + Add, as torch's exporters write a Linear."""
    from onnx import helper

    if node.op_type == "Gemm":
        a = {t.name: helper.get_attribute_value(t) for t in node.attribute}
        w, bias = g.weight(node, 1), g.weight(node, 2)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or bias is None:
            raise _refuse(g.p, f"Gemm {node.name} is not a plain fully connected layer")
        return _Classifier(w if a.get("transB", 0) else w.T, bias, node.output[0])
    if node.op_type == "MatMul":
        w = g.weight(node, 1).T
        add = g.one_user(node.output[0], "Add (classifier bias)")
        bias = g.weight(add, 1 if g.source(add.input[0]) == node.output[0] else 0) if add.op_type == "Add" else None
        if bias is None:
            raise _refuse(g.p, f"found op {add.op_type} at node {add.name}, expected the classifier bias Add")
        return _Classifier(w, bias, add.output[0])
    raise _refuse(g.p, f"found op {node.op_type} at node {node.name}, expected the classifier Gemm")


def _onnx_spec(g: _Graph, state_dict: dict, trunk: Trunk, size: int | None):
    """The spec read off ``state_dict``, with what the keys cannot tell: shortcut kind, stride placement
    and the preprocessing at the graph's input ``size`` (the stem's default when the graph leaves it open)."""
    from edgeres.model.infer import infer_spec
    from edgeres.model.zoo import CIFAR_PREPROCESS, IMAGENET_PREPROCESS, greyscale, resized_preprocess

    p, layout = g.p, trunk.layout
    spec = infer_spec(state_dict, p)
    if spec.shortcut != layout.shortcut_kind:  # infer_spec reads "projection" only from downsample keys
        spec = replace(spec, shortcut=layout.shortcut_kind)
    base_pre = IMAGENET_PREPROCESS if trunk.stem.kind == "imagenet" else CIFAR_PREPROCESS
    if spec.in_channels == 1:
        base_pre = greyscale(base_pre)
    size = size or base_pre.size
    verify_batch(p, g.input.name, [d.dim_value or None for d in g.input.type.tensor_type.shape.dim], size,
                 spec.in_channels)
    spec = replace(spec, stride_on=layout.stride_on, preprocess=resized_preprocess(base_pre, size))
    if layout.stride_on != "3x3" and not spec.name.endswith("-custom"):
        spec = replace(spec, name=f"{spec.name}-custom")
    return spec


# the verifying session's memory: a graph may declare any size in ways no static check sees
# (a Pad or ConstantOfShape computed from constants), so onnxruntime's own arena is capped
_ARENA_BYTES = MAX_WEIGHT_BYTES + MAX_ACTIVATION_BYTES
_arena = {"registered": False}


def _capped_session_options(ort):
    if not _arena["registered"]:
        cfg = ort.OrtArenaCfg({"max_mem": _ARENA_BYTES, "arena_extend_strategy": 1})  # 1: grow by what is asked
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, cfg)
        except Exception:  # noqa: BLE001 - one is registered already: sessions share it
            pass
        _arena["registered"] = True
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    # weights (already checked against the file) outside the arena, freed with the session; the
    # arena holds only activations and hands them back after the run
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    so.intra_op_num_threads = 1
    so.log_severity_level = 4  # a refused allocation is reported in one line below, not logged
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return so


def _run_failure(e: Exception) -> str:
    asked = re.search(r"requested bytes of (\d+)", str(e))
    if asked:
        return (f"a node asks for {size_text(int(asked.group(1)))} at once, more than the {size_text(_ARENA_BYTES)} "
                "edgeres gives a model while verifying it; nothing was allocated")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][-160:]}" if lines else type(e).__name__


def verify_mapping(path: str | Path, spec, state_dict, *, rel_tol: float = 1e-4, seed: int = 0) -> float:
    """Max |ONNX − rebuilt torch| logit difference on random inputs, relative to the logit scale;
    raise ``InputError`` when it exceeds ``rel_tol``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeres.model.torch_model import build_torch

    p = Path(path)
    # the checked bytes, not the path: onnxruntime runs exactly what was read and opens no other file
    data = read_onnx(p).SerializeToString()
    try:
        sess = ort.InferenceSession(data, _capped_session_options(ort), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: onnxruntime cannot load it ({type(e).__name__}); re-export the model") from None
    inp = sess.get_inputs()[0]
    batch = verify_batch(p, inp.name, list(inp.shape), spec.input_size, spec.in_channels)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, spec.in_channels, spec.input_size, spec.input_size)).astype(np.float32)
    run = ort.RunOptions()
    run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")  # hand the memory back after
    try:
        ref = sess.run(None, {inp.name: x}, run)[0]
    except Exception as e:  # noqa: BLE001 - the memory cap, or a graph that does not run
        raise InputError(f"{p}: onnxruntime cannot run it ({_run_failure(e)}); re-export the model") from None
    model = build_torch(spec)
    model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    return check_mapping(p, "ONNX graph", spec, ref, got, rel_tol, HINT)
