"""Map a ResNet-shaped fp32 ONNX graph back to a ``ResNetSpec`` + torch-style state_dict, so an ONNX
input goes through the same pipeline (pruning included) as a PyTorch checkpoint.

The graph is walked from its input along the data path: stem conv (+max-pool), residual blocks
(2 convs: basic, 3: bottleneck; shortcut = identity, 1×1 conv or Slice/Pad option A), global pool,
classifier. BatchNorm folded into conv bias (torch's eval-mode export) becomes an identity BN with
that bias; an explicit BatchNormalization node keeps its statistics. ``verify_mapping`` then runs the
original graph and the rebuilt model side by side, so a wrong mapping never converts silently."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgeres.errors import InputError
from edgeres.sources.graph_blocks import BN_EPS, ConvUnit, check_mapping, lay_out_stages, put_unit, residual_block

# ops allowed on the data path; anything else means the graph is not a plain ResNet
DATA_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Slice", "Pad", "GlobalAveragePool",
            "ReduceMean", "Flatten", "Reshape", "Squeeze", "Gemm", "MatMul", "Identity",
            # shape plumbing for Reshape (dynamic flatten): reads the shape, never the values
            "Shape", "Gather", "Unsqueeze", "Concat", "Cast"}
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Cast"}
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
        ok = (w.shape[-2] == k and a.get("group", 1) == 1 and list(a.get("dilations", [1, 1])) == [1, 1]
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
    if c not in (None, 3):
        raise _refuse(g.p, f"input {g.input.name} has {c} channels, expected 3 (NCHW RGB)")
    if h and w and h != w:
        raise _refuse(g.p, f"input {g.input.name} is {h}×{w}, edgeres ResNets take square images")
    return h or None


def map_onnx(path: str | Path):
    """(spec, state_dict) for the ResNet in ONNX file ``path``; ``InputError`` when it does not map."""
    import onnx
    import torch

    from edgeres.sources.loading import infer_spec
    from edgeres.model.zoo import _CIFAR_PRE, _IMAGENET_PRE

    p = Path(path)
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - protobuf/IO errors all mean a bad file
        raise InputError(f"{p}: is not a readable ONNX model ({type(e).__name__}); re-export it") from None
    g = _Graph(model, p)
    size = _static_size(g)
    sd = {}

    # -- stem ---------------------------------------------------------------------------------
    stem_node = g.one_user(g.input.name, "stem Conv")
    stem = g.conv(stem_node)
    k = stem.weight.shape[-1]
    if (k, stem.stride) == (7, 2):
        stem_kind = "imagenet"
    elif (k, stem.stride) == (3, 1):
        stem_kind = "cifar"
    else:
        raise _refuse(p, f"stem Conv {stem_node.name} is {k}×{k}/{stem.stride}, expected 7×7/2 or 3×3/1")
    put_unit(sd, "conv1", stem, "bn1")
    relu = g.one_user(stem.out, "Relu after the stem")
    if relu.op_type != "Relu":
        raise _refuse(p, f"found op {relu.op_type} at node {relu.name}, expected the stem Relu")
    x = relu.output[0]
    if stem_kind == "imagenet":
        pool = g.one_user(x, "stem MaxPool")
        from onnx import helper

        a = {t.name: helper.get_attribute_value(t) for t in pool.attribute}
        if pool.op_type != "MaxPool" or list(a.get("kernel_shape", [])) != [3, 3] or list(a.get("strides", [])) != [2, 2] \
                or list(a.get("pads", [0] * 4)) != [1] * 4 or a.get("ceil_mode", 0):
            raise _refuse(p, f"found {pool.op_type} at node {pool.name}, expected the stem MaxPool 3×3/2 pad 1")
        x = pool.output[0]

    # -- residual blocks ----------------------------------------------------------------------
    blocks = []  # dicts: units, shortcut kind, proj unit, cin, cout, stride
    while True:
        users = g.users(x)
        if len(users) == 1 and users[0].op_type in ("GlobalAveragePool", "ReduceMean"):
            break
        convs = [u for u in users if u.op_type == "Conv"]
        others = [u for u in users if u.op_type not in ("Conv", "Add", "Slice")]
        if others or not convs:
            bad = others[0] if others else users[0] if users else None
            what = f"found op {bad.op_type} at node {bad.name}" if bad else f"tensor {x} is not used"
            raise _refuse(p, f"{what}, expected a residual block or the global pool")
        units = {u.name: g.conv(u) for u in convs}
        proj = [u for u in convs if [v.op_type for v in g.users(units[u.name].out)] == ["Add"]]
        main = [u for u in convs if u not in proj]
        if len(main) != 1 or len(proj) > 1:
            raise _refuse(p, f"tensor {x} feeds {len(convs)} convs, not a residual block")
        chain = [units[main[0].name]]
        while True:
            nxt = g.one_user(chain[-1].out, "Relu or Add in a residual block")
            if nxt.op_type == "Add":
                break
            if nxt.op_type != "Relu" or len(chain) > 3:
                raise _refuse(p, f"found op {nxt.op_type} at node {nxt.name}, expected Relu or Add in a residual block")
            chain.append(g.conv(g.one_user(nxt.output[0], "Conv in a residual block")))
        add = nxt
        other = [t for t in add.input if g.source(t) != chain[-1].out]
        if len(add.input) != 2 or len(other) != 1:
            raise _refuse(p, f"Add {add.name} does not join a block's branch with its shortcut")
        sc_src = g.source(other[0])
        if proj:
            pu = units[proj[0].name]
            if sc_src != pu.out or pu.weight.shape[-1] != 1:
                raise _refuse(p, f"Add {add.name} shortcut is not the 1×1 projection conv {proj[0].name}")
            shortcut = ("projection", pu)
        elif sc_src == x:
            shortcut = ("identity", None)
        else:
            t = sc_src
            while t != x:  # option A: a chain of Slice / Pad back to the block input
                n = g.producer.get(t)
                if n is None or n.op_type not in ("Slice", "Pad"):
                    what = f"{n.op_type} at node {n.name}" if n is not None else f"tensor {t}"
                    raise _refuse(p, f"found {what} in the shortcut of Add {add.name}, expected Slice/Pad or a 1×1 conv")
                t = g.source(n.input[0])
            shortcut = ("option_a", None)
        blocks.append(residual_block(chain, shortcut, add.name, lambda what: _refuse(p, what)))
        out_relu = g.one_user(add.output[0], "Relu after the residual Add")
        if out_relu.op_type != "Relu":
            raise _refuse(p, f"found op {out_relu.op_type} at node {out_relu.name}, expected Relu after Add {add.name}")
        x = out_relu.output[0]

    # -- stages: a stride-2 block opens a new stage -------------------------------------------
    block_kind, shortcut_kind, stride_on = lay_out_stages(blocks, sd, lambda what: _refuse(p, what))
    head_name = "linear" if stem_kind == "cifar" and shortcut_kind == "option_a" else "fc"

    # -- head: global pool → flatten → Gemm / MatMul+Add ----------------------------------------
    node = g.users(x)[0]
    x = node.output[0]
    node = g.one_user(x, "Flatten and the classifier")
    while node.op_type in ("Flatten", "Reshape", "Squeeze"):
        x = node.output[0]
        node = g.one_user(x, "the classifier")
    from onnx import helper

    if node.op_type == "Gemm":
        a = {t.name: helper.get_attribute_value(t) for t in node.attribute}
        w, bias = g.weight(node, 1), g.weight(node, 2)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or bias is None:
            raise _refuse(p, f"Gemm {node.name} is not a plain fully connected layer")
        w = w if a.get("transB", 0) else w.T
        out = node.output[0]
    elif node.op_type == "MatMul":
        w = g.weight(node, 1).T
        add = g.one_user(node.output[0], "Add (classifier bias)")
        bias = g.weight(add, 1 if g.source(add.input[0]) == node.output[0] else 0) if add.op_type == "Add" else None
        if bias is None:
            raise _refuse(p, f"found op {add.op_type} at node {add.name}, expected the classifier bias Add")
        out = add.output[0]
    else:
        raise _refuse(p, f"found op {node.op_type} at node {node.name}, expected the classifier Gemm")
    if out not in g.outputs or g.users(out):
        after = g.users(out)
        what = f"found op {after[0].op_type} at node {after[0].name}" if after else "classifier is not the graph output"
        raise _refuse(p, f"{what}; export the logits, not probabilities")
    sd[f"{head_name}.weight"], sd[f"{head_name}.bias"] = g.np.ascontiguousarray(w), bias.reshape(-1)

    state_dict = {k: torch.from_numpy(g.np.ascontiguousarray(v, dtype=g.np.float32)) for k, v in sd.items()}
    spec = infer_spec(state_dict, p)
    if spec.shortcut != shortcut_kind:  # infer_spec reads "projection" only from downsample keys
        spec = replace(spec, shortcut=shortcut_kind)
    base_pre = _IMAGENET_PRE if stem_kind == "imagenet" else _CIFAR_PRE
    size = size or base_pre.size
    resize = None if base_pre.resize is None else round(size * base_pre.resize / base_pre.size)
    spec = replace(spec, stride_on=stride_on, preprocess=replace(base_pre, size=size, resize=resize))
    if stride_on != "3x3" and not spec.name.endswith("-custom"):
        spec = replace(spec, name=f"{spec.name}-custom")
    return spec, state_dict


def verify_mapping(path: str | Path, spec, state_dict, *, rel_tol: float = 1e-4, seed: int = 0) -> float:
    """Max |ONNX − rebuilt torch| logit difference on random inputs, relative to the logit scale;
    raise ``InputError`` when it exceeds ``rel_tol``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeres.model.torch_model import build_torch

    p = Path(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    try:
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: onnxruntime cannot load it ({type(e).__name__}); re-export the model") from None
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 4
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, spec.input_size, spec.input_size)).astype(np.float32)
    ref = sess.run(None, {inp.name: x})[0]
    model = build_torch(spec)
    model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    return check_mapping(p, "ONNX graph", spec, ref, got, rel_tol, HINT)
