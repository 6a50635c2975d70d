#!/usr/bin/env python3
"""Benchmark one model artifact in this process and print the result.

Standalone on purpose: it needs only the standard library, numpy and the artifact's runtime
(onnxruntime for .onnx, openvino for .xml, ai-edge-litert or tflite-runtime for .tflite), so it
can be copied to a device (a Raspberry Pi) and run there. It never imports edgeres.

    python bench_runner.py --artifact model.onnx --threads 4 --warmup 10 --runs 100 --json

Protocol: time the load/compile, time the first inference separately (it often pays for lazy
initialisation), run ``--warmup`` untimed inferences, then time ``--runs`` inferences (or as many
as fit in ``--seconds``) on one fixed random input of the model's own shape and dtype. Peak RSS is
the whole process's, so run one artifact per fresh process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import time

SCHEMA = "edgeres-bench-run/1"
EXIT_USAGE, EXIT_FAILED = 2, 3
PARENT_PID_ENV = "EDGERES_BENCH_PARENT_PID"  # set by `edgeres bench`: end this runner when that process ends
PR_SET_PDEATHSIG = 1

# vcgencmd get_throttled bits (Raspberry Pi firmware); bits 0-3 are "now", 16-19 "since boot".
THROTTLE_BITS = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}
SINCE_BOOT_SHIFT = 16
HOT_CELSIUS = 80.0


class BenchFailure(RuntimeError):
    """The artifact cannot be loaded or run here; reported as one line with exit code 3."""


# --- system facts --------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    names = {}
    for line in (_read(cpuinfo) or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "model") and value.strip():
            names.setdefault(key, value.strip())
    # x86 has "model name" (and a numeric "model"); a Raspberry Pi has "Model : Raspberry Pi 5 ..."
    return names.get("model name") or names.get("model") or names.get("hardware") or platform.processor() \
        or platform.machine()


def temperatures_c(pattern: str = "/sys/class/thermal/thermal_zone*") -> dict[str, float]:
    out = {}
    for zone in sorted(glob.glob(pattern)):
        raw = _read(os.path.join(zone, "temp"))
        if raw is None:
            continue
        try:
            millideg = int(raw)
        except ValueError:
            continue
        kind = _read(os.path.join(zone, "type")) or os.path.basename(zone)
        out[f"{os.path.basename(zone)}:{kind}"] = round(millideg / 1000.0, 1)
    return out


def decode_throttled(value: int) -> dict:
    """Decode ``vcgencmd get_throttled``: which limits are active now and which occurred since boot."""
    now = [name for bit, name in THROTTLE_BITS.items() if value >> bit & 1]
    since_boot = [name for bit, name in THROTTLE_BITS.items() if value >> (bit + SINCE_BOOT_SHIFT) & 1]
    return {"raw": hex(value), "now": now, "since_boot": since_boot}


def read_throttled(timeout_s: float = 5.0) -> dict | None:
    """The Pi firmware's throttling flags, or None where ``vcgencmd`` is absent or fails."""
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    if out.returncode != 0 or "=" not in text:
        return None
    try:
        return decode_throttled(int(text.split("=", 1)[1], 16))
    except ValueError:
        return None


# AT_HWCAP / AT_HWCAP2 bits on aarch64 (linux/arch/arm64/include/uapi/asm/hwcap.h): what the kernel, or
# qemu-user for the CPU it emulates, tells programs, and what the runtimes pick their int8 kernels by
AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_NAMES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
               "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
               "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
HWCAP2_NAMES = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
                "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte")
X86_INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
QEMU_HINT_ENV = "QEMU_CPU"


def hwcap_features() -> list[str]:
    """aarch64 CPU features from the auxiliary vector (empty elsewhere or when unreadable)."""
    if not sys.platform.startswith("linux") or os.uname().machine.lower() not in ("aarch64", "arm64"):
        return []
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        words = (getauxval(AT_HWCAP), getauxval(AT_HWCAP2))
    except (OSError, AttributeError):
        return []
    return [name for word, names in zip(words, (HWCAP_NAMES, HWCAP2_NAMES))
            for bit, name in enumerate(names) if word >> bit & 1]


def cpu_features(cpuinfo: str | None = None) -> dict:
    """The CPU features the runtimes see: HWCAP on aarch64, else the int8-relevant /proc/cpuinfo flags."""
    found = hwcap_features()
    if found:
        return {"source": "hwcap", "features": found}
    flags = set()
    for line in (cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    arm = {"asimd", "asimddp", "i8mm", "sve", "bf16"} & flags
    return {"source": "cpuinfo", "features": sorted(arm) if arm else [f for f in X86_INT8_FLAGS if f in flags]}


def emulation(cpuinfo: str | None = None, proc: str = "/proc") -> dict:
    """Whether this process runs under an instruction-set emulator, with the evidence.

    Two signals from the kernel, which the emulator cannot rewrite: the executable the kernel started
    for this process (under qemu-user via binfmt_misc it is the qemu binary; qemu rewrites only the
    path ``/proc/self/exe``, so it is read relative to ``/proc``), and a /proc/cpuinfo that describes
    another architecture than this process's (an x86 kernel behind aarch64 code). An environment
    variable would prove nothing: anyone can set one, and a real device never would.
    """
    evidence = []
    try:
        fd = os.open(proc, os.O_RDONLY)
        try:
            exe = os.readlink("self/exe", dir_fd=fd)
        finally:
            os.close(fd)
        if "qemu" in os.path.basename(exe).lower():
            evidence.append(f"the kernel runs this process as {exe}")
    except OSError:
        pass
    text = cpuinfo if cpuinfo is not None else _read(os.path.join(proc, "cpuinfo")) or ""
    machine = platform.machine().lower()
    x86_kernel = any(line.split(":")[0].strip() in ("vendor_id", "flags") for line in text.splitlines())
    if machine in ("aarch64", "arm64") and x86_kernel:
        evidence.append("/proc/cpuinfo describes an x86 CPU while this process runs aarch64 code")
    hint = os.environ.get(QEMU_HINT_ENV) if evidence else None
    return {"emulated": bool(evidence), "evidence": evidence, "emulated_cpu": hint}


def system_info() -> dict:
    cpu0 = "/sys/devices/system/cpu/cpu0/cpufreq"
    freq = _read(f"{cpu0}/scaling_cur_freq")
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "cpus_usable": affinity,
        "governor": _read(f"{cpu0}/scaling_governor"),
        "cpu0_freq_mhz": round(int(freq) / 1000) if freq and freq.isdigit() else None,
        "loadavg": load,
        "temperatures_c": temperatures_c(),
        "throttled": read_throttled(),
        "board": (_read("/proc/device-tree/model") or "").rstrip("\x00") or None,
        "cpu_features": cpu_features(),
        "emulation": emulation(),
    }


def warnings_for(before: dict, after: dict) -> list[str]:
    """Conditions that make a latency number untrustworthy or unrepresentative."""
    notes = []
    for when, info in (("before", before), ("after", after)):
        throttled = info.get("throttled")
        if throttled and throttled["now"]:
            notes.append(f"throttling active {when} the run: {', '.join(throttled['now'])}")
    if after.get("throttled") and after["throttled"]["since_boot"]:
        notes.append(f"throttling occurred since boot: {', '.join(after['throttled']['since_boot'])}")
    hottest = max(after.get("temperatures_c", {}).values(), default=None)
    if hottest is not None and hottest >= HOT_CELSIUS:
        notes.append(f"hot: {hottest:.1f} °C after the run")
    if (after.get("emulation") or {}).get("emulated"):
        notes.append("EMULATED (" + "; ".join(after["emulation"]["evidence"]) + "): latency is the emulator's, "
                     "not a device figure; accuracy is the emulated ARM kernels'")
    governor = after.get("governor")
    if governor and governor not in ("performance",):
        notes.append(f"cpufreq governor is {governor!r}, not 'performance' (latency may vary with clock ramps)")
    return notes


def peak_rss_mb() -> float:
    """This process's peak RSS in MB of 10^6 bytes, the unit of every size edgeres shows."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e6, 1)


# --- runtimes ------------------------------------------------------------------------------------

def artifact_files(path: str) -> list[str]:
    """The files the artifact consists of (an OpenVINO IR is .xml + .bin)."""
    for cls in RUNNER_CLASSES:
        if path.endswith(cls.suffix):
            return [path, *(path[: -len(cls.suffix)] + c for c in cls.companions)]
    return [path]


def runtime_for(path: str) -> str:
    for cls in RUNNER_CLASSES:
        if path.endswith(cls.suffix):
            return cls.runtime
    raise ValueError(f"{path}: unknown artifact type; expected .onnx, .xml (OpenVINO IR) or .tflite")


def _static_shape(name: str, dims: list, batch: int, override: list[int] | None) -> list[int]:
    if override:
        if len(override) != len(dims):
            raise BenchFailure(f"--input-shape has {len(override)} dims but input {name!r} has {len(dims)}")
        return override
    shape = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            shape.append(batch if i == 0 and batch != d else d)
        elif i == 0:
            shape.append(batch)
        else:
            raise BenchFailure(f"input {name!r} has dynamic dim {i} ({d!r}); give --input-shape")
    return shape


def random_input(shape: list[int], dtype, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -128), min(info.max, 255) + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


# How each runtime loads and runs an artifact: the modules of targets/runners, the host's own, written in below.
# Timing runs the model's own input (shape and dtype); accuracy runs float32 N×C×H×W batches, the layout
# edgeres preprocesses to, into logits, exactly as the host does.
BENCH_SETTINGS = {"onnxruntime": {}, "openvino": {"hint": "LATENCY", "streams": 1}, "litert": {}}
EVAL_SETTINGS = {"onnxruntime": {"spin": False}, "openvino": {"hint": "LATENCY"}, "litert": {}}


def _load_runner(runtime: str, path: str, threads: int, settings: dict):
    """The runtime's runner for ``path``; ``BenchFailure`` naming the install when the runtime is missing."""
    cls = RUNNERS[runtime]
    try:
        return cls(path, threads, **settings.get(runtime, {}))
    except ImportError:
        raise BenchFailure(cls.missing) from None


def load_runtime(runtime: str, path: str, threads: int, batch: int, shape_override):
    """(a call running one inference on a fixed random input, the input's description, the runtime's version)."""
    runner = _load_runner(runtime, path, threads, BENCH_SETTINGS)
    spec = runner.input_spec()
    if spec["dtype"] is None:
        raise BenchFailure(f"input {spec['name']!r} has type {spec['type']}, which this runner cannot feed")
    shape = _static_shape(spec["name"], spec["dims"], batch, shape_override)
    runner.reshape(shape)
    x = random_input(shape, spec["dtype"])
    return runner.fixed_input_call(x), {"name": spec["name"], "shape": shape, "dtype": str(x.dtype)}, runner.version


EVAL_SCHEMA = "edgeres-eval-run/1"


def _nan_to_none(v):
    """``edgeres.bundle.json_text``'s rule, repeated because this file runs alone on the device."""
    import math

    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def evaluate(artifact: str, inputs: str, logits_out: str, threads: int, batch: int,
             runtime: str | None = None) -> dict:
    """Logits of every input (a float32 N×C×H×W .npy, memory-mapped: read one batch at a time) into
    ``logits_out`` (.npy); raises ``BenchFailure`` when the artifact cannot run here."""
    import numpy as np

    runtime, size_mb = _check_artifact(artifact, runtime)
    try:
        x_all = np.load(inputs, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise BenchFailure(f"{inputs}: not a readable .npy ({_first_line(e)})") from None
    if x_all.ndim != 4 or x_all.dtype != np.float32:
        raise BenchFailure(f"{inputs}: expected float32 N×C×H×W, got {x_all.dtype} {x_all.shape}")
    t0 = time.perf_counter()
    try:
        run = _load_runner(runtime, artifact, threads, EVAL_SETTINGS)
        version = run.version
        outs = [run(np.ascontiguousarray(x_all[i:i + batch])).reshape(min(batch, len(x_all) - i), -1)
                for i in range(0, len(x_all), batch)]
    except BenchFailure:
        raise
    except ImportError as e:  # e.g. a model that takes pixels needs LiteRT's schema to say how it normalises
        raise BenchFailure(f"{os.path.basename(artifact)}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - every runtime has its own exception types
        raise BenchFailure(f"{runtime} cannot run {os.path.basename(artifact)}: {_first_line(e)}") from None
    logits = np.concatenate(outs).astype(np.float32)
    tmp = logits_out + ".tmp.npy"
    np.save(tmp, logits)
    os.replace(tmp, logits_out)
    info = system_info()
    return {"schema": EVAL_SCHEMA, "status": "ok", "artifact": os.path.basename(artifact), "runtime": runtime,
            "runtime_version": version, "threads": threads, "images": int(len(logits)),
            "classes": int(logits.shape[1]), "seconds": round(time.perf_counter() - t0, 2), "size_mb": round(size_mb, 3),
            "peak_rss_mb": peak_rss_mb(), "emulated": bool(info["emulation"]["emulated"]), "system": info}


# >>> runners: assembled from targets/runners by `python -m edgeres.targets.runners.assemble FILE`; edit there, not here

# --- targets/runners/onnxruntime_runner.py ---
"""onnxruntime: run an ``.onnx`` on NCHW float32 batches (numpy + onnxruntime only; copied verbatim into
the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

onnxruntime reports usage to Microsoft (and keeps a device ID under ``~/.cache/Microsoft``) unless
``ORT_DISABLE_TELEMETRY=1`` when it starts: set here, before onnxruntime is imported, unless the user has set it."""


import os

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # the standalone runners' copy of edgeres/__init__.py's line

ORT_INPUT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                   "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32",
                   "tensor(int64)": "int64"}
ORT_QUANTIZE_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime's quantizer renames a graph output it quantises


def ort_cores() -> int:
    """Physical cores (SMT siblings counted once, as onnxruntime counts them) among those this process may use."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


class OnnxRuntimeRunner:
    """One ``InferenceSession`` on the CPU. ``spin=False``: idle threads yield the CPU (long evaluations)."""

    runtime = "onnxruntime"
    suffix, companions = ".onnx", ()
    missing = "onnxruntime is not installed for this python; pip install onnxruntime"
    input_layout = tensor_layout = "NCHW"  # its input; its intermediate tensors
    takes_pixels = False

    def __init__(self, path, threads: int | None = None, *, spin: bool = True):
        import onnxruntime as ort

        self.path = path
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no count given: the physical cores among those this process may use. onnxruntime's own default is a
        # thread per physical core of the machine, each pinned to its core, so under taskset or a container's
        # cpuset it ran on cores it was not given
        opts.intra_op_num_threads = int(threads or ort_cores())
        opts.inter_op_num_threads = 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._options = opts
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def input_spec(self) -> dict:
        """The first input: name, dims (None where dynamic), numpy dtype name (None if not a plain
        tensor type) and the runtime's type string."""
        inp = self.session.get_inputs()[0]
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        return {"name": inp.name, "dims": dims, "dtype": ORT_INPUT_TYPES.get(inp.type), "type": inp.type}

    def io_names(self) -> tuple[str, str]:
        return self.input_name, self.session.get_outputs()[0].name

    def reshape(self, shape) -> None:
        """A static input shape (onnxruntime takes any shape the graph allows: nothing to do)."""

    def fixed_input_call(self, x: np.ndarray):
        """A call running the model on ``x`` (the model's own input) as a user's loop would, for timing."""
        feed = {self.input_name: x}  # onnxruntime wraps the numpy buffer without copying
        return lambda: self.session.run(None, feed)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the model's own input."""
        return np.asarray(self.session.run(None, {self.input_name: x})[0], np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        return self.run_native(np.asarray(x, np.float32))

    def intermediate_tensors(self):
        """``run(x)`` giving each activation the graph computes, as float32, for a batch ``x`` (NCHW
        float32): in a QDQ graph the outputs of its QuantizeLinear nodes (what the fused int8 kernels
        produce), dequantised with the node's own scale and zero point and named by the float tensor they
        quantise; in a float graph every float node output. Entries: name, op (the producer's type,
        ``+Relu`` when a Relu follows it), value. A second session fetches them; needs ``onnx``."""
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        model = onnx.load(str(self.path))
        graph = model.graph
        constants = {t.name: t for t in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        points = _ort_quantised_points(graph, constants, producer) or _ort_float_points(model, constants)
        existing = {o.name for o in graph.output}
        inputs = {i.name for i in graph.input}
        for point in points:
            if point["fetch"] not in existing and point["fetch"] not in inputs:
                graph.output.append(onnx.ValueInfoProto(name=point["fetch"]))
        session = ort.InferenceSession(model.SerializeToString(), self._options, providers=["CPUExecutionProvider"])
        fetch = [p["fetch"] for p in points if p["fetch"] not in inputs]
        grids = {p["name"]: tuple(np.float32(numpy_helper.to_array(constants[p[k]])) for k in ("scale", "zero_point"))
                 for p in points if p.get("scale") is not None}
        ops = {p["name"]: _ort_op_label(p["name"], producer) for p in points}

        def run(x: np.ndarray) -> list[dict]:
            x = np.asarray(x, np.float32)
            got = dict(zip(fetch, session.run(fetch, {self.input_name: x})))
            out = []
            for p in points:
                value = x if p["fetch"] in inputs else got[p["fetch"]]
                if p["name"] in grids:
                    scale, zero_point = grids[p["name"]]
                    value = (value.astype(np.float32) - zero_point) * scale
                out.append({"name": p["name"], "op": ops[p["name"]], "value": np.asarray(value, np.float32)})
            return out
        return run


def _ort_quantised_points(graph, constants: dict, producer: dict) -> list[dict]:
    """The activations a QDQ graph quantises: (float tensor name, QuantizeLinear output, scale, zero point)."""
    points, seen = [], set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        name = node.input[0]
        if name not in producer and name.endswith(ORT_QUANTIZE_INPUT_SUFFIX):
            name = name[: -len(ORT_QUANTIZE_INPUT_SUFFIX)]
        scale = constants.get(node.input[1])
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] in constants else None
        if name in seen or scale is None or int(np.prod(scale.dims)) != 1 or zero_point is None:
            continue
        seen.add(name)
        points.append({"name": name, "fetch": node.output[0], "scale": node.input[1], "zero_point": zero_point})
    return points


def _ort_float_points(model, constants: dict) -> list[dict]:
    """Every float activation of a float graph (its input and node outputs, no weights), graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name and name in floats and name not in constants:
                names.setdefault(name, None)
    return [{"name": n, "fetch": n} for n in names]


def _ort_op_label(name: str, producer: dict) -> str:
    node = producer.get(name)
    if node is None:
        return "input"
    if node.op_type == "Relu" and node.input[0] in producer:
        return f"{producer[node.input[0]].op_type}+Relu"  # the quantiser fuses the Relu into its producer
    return node.op_type


# --- targets/runners/openvino_runner.py ---
"""OpenVINO: run an IR (``.xml`` + ``.bin``) on NCHW float32 batches (numpy + openvino only; copied verbatim
into the standalone runners, so no edgeres imports and no module-level name shared with the other runners).

The runtime settings travel in the IR's rt_info (``edgeres/hint``, ``edgeres/inference_precision``): f32
unless the IR says otherwise, because OpenVINO's CPU default is bf16 on CPUs with avx512_bf16/AMX, which
would silently run an "fp32" IR in bf16. An IR with embedded preprocessing (``edgeres/input_preprocess``)
takes uint8 NHWC images; its runner turns the NCHW float batches back into them (exact for inputs made
from uint8 images).

OpenVINO is imported through ``openvino_by_consent``: its usage telemetry goes out only where the user said yes.
"""


import json

import numpy as np

OPENVINO_RT_INFO_KEY = "edgeres"


def openvino_by_consent():
    """``import openvino``, its usage reports sent only where the user agreed to them.

    OpenVINO's converter (imported with ``openvino`` itself) and NNCF report usage to Google Analytics unless the
    user declined with OpenVINO's ``opt_in_out`` tool: no consent file (``~/intel/openvino_telemetry``) counts
    as yes; they then write a client ID into ``~/intel`` and fork the whole process for each event. From here on,
    in this process, they report only where that file says yes (the user opted in with that tool); it is read, never
    written. A reporter made before this (NNCF makes one when imported) is asked again too."""
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no openvino-telemetry: nothing is reported
        pass
    else:
        check = OptInChecker.check
        if not getattr(check, "edgeres_by_consent", False):
            def by_consent(self, enable_opt_in_dialog, disable_in_ci=False):
                found = check(self, enable_opt_in_dialog, disable_in_ci)
                return found if found == ConsentCheckResult.ACCEPTED else ConsentCheckResult.DECLINED

            by_consent.edgeres_by_consent = True
            OptInChecker.check = by_consent
        made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
        if made is not None and getattr(made, "consent", False):
            made.consent = OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.ACCEPTED
    import openvino

    return openvino


class OpenVinoIrRunner:
    """An IR compiled for the CPU on first use (or by ``compile()``); ``reshape`` before that fixes its input shape."""

    runtime = "openvino"
    suffix, companions = ".xml", (".bin",)
    missing = "openvino is not installed for this python; pip install openvino"
    tensor_layout = "NCHW"  # of its intermediate tensors

    def __init__(self, path, threads: int | None = None, *, hint: str | None = None,
                 inference_precision: str | None = None, streams: int | None = None):
        ov = openvino_by_consent()

        self.path = path
        self.version = ov.__version__
        self.threads, self.streams = threads, streams
        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.hint = (hint or _openvino_rt_info(self.model, "hint") or "LATENCY").upper()
        self.inference_precision = inference_precision or _openvino_rt_info(self.model, "inference_precision") or "f32"
        stored = _openvino_rt_info(self.model, "input_preprocess")
        self.raw_preprocess = json.loads(stored) if stored else None
        self.takes_pixels = self.raw_preprocess is not None
        self.input_layout, self.input_dtype = ("NHWC", "uint8") if self.takes_pixels else ("NCHW", "float32")
        self.compiled = self.request = None

    def config(self) -> dict:
        config = {"PERFORMANCE_HINT": self.hint, "INFERENCE_PRECISION_HINT": self.inference_precision}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.streams:
            config["NUM_STREAMS"] = int(self.streams)
        return config

    def compile(self):
        if self.compiled is None:
            self.compiled = self.core.compile_model(self.model, "CPU", self.config())
            self.request = self.compiled.create_infer_request()
        return self

    def input_spec(self) -> dict:
        port = self.model.inputs[0]
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        dtype = np.dtype(port.get_element_type().to_dtype()).name
        return {"name": port.get_any_name(), "dims": dims, "dtype": dtype, "type": dtype}

    def reshape(self, shape) -> None:
        """A static input shape, so the CPU plugin picks its kernels ahead of time (benchmark_app does the same)."""
        import openvino as ov  # imported by __init__, through openvino_by_consent

        port = self.model.inputs[0]
        partial = port.get_partial_shape()
        if partial.is_dynamic or [d.get_length() for d in partial] != list(shape):
            if self.compiled is not None:
                raise RuntimeError("reshape after compile")
            self.model.reshape({port.get_any_name(): ov.PartialShape(list(shape))})

    def io_names(self) -> tuple[str, str]:
        self.compile()
        return self.compiled.input(0).get_any_name(), self.compiled.output(0).get_any_name()

    def fixed_input_call(self, x: np.ndarray):
        import openvino as ov  # imported by __init__, through openvino_by_consent

        self.compile()
        self.request.set_input_tensor(ov.Tensor(x))
        return self.request.infer

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the IR's own input (NCHW float32, or uint8 NHWC images when preprocessing is embedded)."""
        self.compile()
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        x = np.asarray(x, dtype=np.float32)
        if self.raw_preprocess is not None:
            x = self.to_uint8_images(x)
        return self.run_native(np.ascontiguousarray(x))

    def to_uint8_images(self, x: np.ndarray) -> np.ndarray:
        """Undo float preprocessing: exact for inputs made from uint8 images, others round to the nearest level."""
        p = self.raw_preprocess
        v = x.transpose(0, 2, 3, 1) * np.asarray(p["std"], np.float32) + np.asarray(p["mean"], np.float32)
        if p["channel_order"] == "BGR":
            v = v[..., ::-1]
        return np.clip(np.rint(v / np.float32(p["scale"])), 0, 255).astype(np.uint8)

    def intermediate_tensors(self):
        """``run(x)`` giving each quantised activation of an int8 IR (the outputs of its FakeQuantize ops
        on activations, float as the IR defines them), or each float op output of a float IR, for a batch
        ``x`` (NCHW float32). Entries: name (a tensor name of the activation it quantises, as the source
        graph named it), names (all of them), op (the producer's type), value. The IR is compiled afresh
        with the extra outputs (``model.add_outputs``); the artifact's own compiled model is left as it is."""
        model = self.core.read_model(str(self.path))
        points = []
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant":
                source = op.input_value(0)
                points.append((op.output(0), source, source.get_node().get_type_name()))
        if not points:
            skip = ("Parameter", "Constant", "Result", "Convert", "ShapeOf")
            points = [(op.output(0), op.output(0), op.get_type_name()) for op in model.get_ordered_ops()
                      if op.get_type_name() not in skip and op.get_output_size() == 1
                      and op.output(0).get_element_type().is_real() and op.output(0).get_partial_shape().rank.is_static
                      and op.output(0).get_partial_shape().rank.get_length() >= 2]
        model.add_outputs([p[0] for p in points])  # a port that already is an output is not added twice
        fed = [result.input_value(0) for result in model.get_results()]  # model outputs, in order
        keys = [(o.get_node().get_friendly_name(), o.get_index()) for o in fed]
        where = [keys.index((port.get_node().get_friendly_name(), port.get_index())) for port, _, _ in points]
        compiled = self.core.compile_model(model, "CPU", self.config())
        request = compiled.create_infer_request()
        names = [sorted(source.get_names()) or [source.get_node().get_friendly_name()] for _, source, _ in points]

        def run(x: np.ndarray) -> list[dict]:
            x = np.asarray(x, dtype=np.float32)
            if self.raw_preprocess is not None:
                x = self.to_uint8_images(x)
            request.infer({0: np.ascontiguousarray(x)})
            return [{"name": n[0], "names": n, "op": op,
                     "value": np.array(request.get_output_tensor(i).data, np.float32)}
                    for i, (_, _, op), n in zip(where, points, names)]
        return run


def _openvino_rt_info(model, key: str) -> str | None:
    """A value edgeres stored in the IR's rt_info (``edgeres/<key>``), or None (IRs made elsewhere)."""
    path = [OPENVINO_RT_INFO_KEY, key]
    return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None


# --- targets/runners/litert_runner.py ---
"""LiteRT: run a ``.tflite`` on NCHW float32 batches (numpy + ai-edge-litert or tflite-runtime only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the
other runners).

Batches are transposed to NHWC and quantised when the model's input is integer; integer outputs are
dequantised. A model made by edgeres that normalises its pixel input itself says so in its metadata
(``edgeres.input``), and gets the batches back as pixel values. XNNPACK is LiteRT's default CPU delegate.
"""


import json
import os

import numpy as np

LITERT_PIXELS_ENTRY = "edgeres.input"  # model metadata entry: the normalisation the model does on its pixel input
LITERT_NO_SCHEMA = ("takes pixels, and reading how it normalises them needs the model schema of ai-edge-litert; "
                    "pip install ai-edge-litert")


def litert_interpreter_module():
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter`` (ImportError if neither)."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        from tflite_runtime import interpreter
    return interpreter


def litert_version() -> str:
    try:
        import ai_edge_litert as rt
    except ImportError:
        import tflite_runtime as rt
    return getattr(rt, "__version__", "unknown")


class LiteRtRunner:
    """One LiteRT ``Interpreter``; a fixed-batch model runs in chunks of its batch, the last one padded."""

    runtime = "litert"
    suffix, companions = ".tflite", ()
    missing = "no TFLite runtime for this python; pip install ai-edge-litert"
    tensor_layout = "NHWC"  # of its intermediate tensors

    def __init__(self, path, threads: int | None = None):
        module = litert_interpreter_module()
        self.path = path
        self.version = litert_version()
        self.interp = module.Interpreter(model_path=str(path), num_threads=threads)
        self.interp.allocate_tensors()
        self.input = self.interp.get_input_details()[0]
        self.output = self.interp.get_output_details()[0]
        self.dynamic_batch = int(self.input.get("shape_signature", self.input["shape"])[0]) == -1
        self.batch = int(self.input["shape"][0])
        self._normalization = None

    @property
    def normalization(self) -> dict | None:
        """How the model normalises its pixel input (None: it takes normalised input), read once."""
        if self._normalization is None:
            self._normalization = litert_embedded_normalization(self.path) or {}
        return self._normalization or None

    @property
    def takes_pixels(self) -> bool:
        return self.normalization is not None

    def input_spec(self) -> dict:
        dims = [int(d) if int(d) > 0 else None for d in self.input.get("shape_signature", self.input["shape"])]
        dtype = np.dtype(self.input["dtype"]).name
        return {"name": self.input["name"], "dims": dims, "dtype": dtype, "type": dtype}

    def io_names(self) -> tuple[str, str]:
        return self.input["name"], self.output["name"]

    def reshape(self, shape) -> None:
        if [int(v) for v in self.interp.get_input_details()[0]["shape"]] != list(shape):
            self.interp.resize_tensor_input(self.input["index"], list(shape))
            self.interp.allocate_tensors()
            self.batch = int(shape[0])

    def fixed_input_call(self, x: np.ndarray):
        self.interp.set_tensor(self.input["index"], x)
        return self.interp.invoke

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output (dequantised, float32) for the model's own input layout (NHWC); float values
        are quantised onto an integer input's grid, values already of its dtype are fed as they are."""
        dtype = np.dtype(self.input["dtype"])
        self.interp.set_tensor(self.input["index"], x if x.dtype == dtype else litert_quantize(x, self.input))
        self.interp.invoke()
        return litert_dequantize(self.interp.get_tensor(self.output["index"]), self.output)

    def _nhwc(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected an N×C×H×W batch, got shape {x.shape}")
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return nhwc if self.normalization is None else litert_to_pixels(nhwc, self.normalization)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch."""
        nhwc = self._nhwc(x)
        if self.dynamic_batch:
            if len(nhwc) != self.batch:
                self.reshape([len(nhwc), *(int(v) for v in self.input["shape"][1:])])
            return self._run_float(nhwc)
        b, outs = self.batch, []
        for start in range(0, len(nhwc), b):
            chunk = nhwc[start:start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            outs.append(self._run_float(chunk)[: b - pad])
        return np.concatenate(outs)

    def _run_float(self, nhwc: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.input["index"], litert_quantize(nhwc, self.input))
        self.interp.invoke()
        return litert_dequantize(self.interp.get_tensor(self.output["index"]), self.output)

    def intermediate_tensors(self):
        """``run(x)`` giving every activation tensor (op outputs) for a batch ``x`` (NCHW float32),
        dequantised with each tensor's own scale and zero point, in NHWC as LiteRT holds them. Entries:
        name, op, value. A second interpreter keeps every tensor (``experimental_preserve_all_tensors``)
        and runs LiteRT's builtin kernels: the XNNPACK delegate would hide the tensors inside what it fuses."""
        import warnings

        module = litert_interpreter_module()
        with warnings.catch_warnings():  # that keeping every tensor is meant for debugging: it is
            warnings.simplefilter("ignore", UserWarning)
            keep = module.Interpreter(model_path=str(self.path), experimental_preserve_all_tensors=True,
                                      experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        inp = keep.get_input_details()[0]
        dynamic = int(inp.get("shape_signature", inp["shape"])[0]) == -1
        state = {"batch": None}

        def run(x: np.ndarray) -> list[dict]:
            nhwc = self._nhwc(x)
            if len(nhwc) != state["batch"]:
                if not dynamic and len(nhwc) != int(inp["shape"][0]):
                    raise ValueError(f"intermediate tensors of a fixed-batch model need batches of {inp['shape'][0]}")
                keep.resize_tensor_input(inp["index"], [len(nhwc), *(int(v) for v in inp["shape"][1:])])
                keep.allocate_tensors()
                state["batch"] = len(nhwc)
            keep.set_tensor(inp["index"], litert_quantize(nhwc, inp))
            keep.invoke()
            details = {t["index"]: t for t in keep.get_tensor_details()}
            out = []
            for op in keep._get_ops_details():  # noqa: SLF001 - the only API listing ops with their tensors
                if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
                    continue
                for index in op["outputs"]:
                    detail = details.get(int(index))
                    if detail is not None and np.dtype(detail["dtype"]).kind in "fiu":
                        out.append({"name": detail["name"], "op": op["op_name"],
                                    "value": litert_dequantize(keep.get_tensor(int(index)), detail)})
            return out
        return run


def litert_quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float → the tensor's dtype with its (scale, zero_point); float tensors pass through."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def litert_dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's values as float32 (integer tensors with their scale and zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


def litert_to_pixels(x_nhwc: np.ndarray, norm: dict) -> np.ndarray:
    """Normalised NHWC input back to the 0..255 pixel values it came from (float32)."""
    return ((x_nhwc * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32))
            / np.float32(norm["scale"])).astype(np.float32)


def litert_metadata_entry(data: bytes, name: str) -> bytes | None:
    """The model metadata buffer called ``name``, read with the LiteRT package's own flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name().decode() == name:
            return model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
    return None


def litert_embedded_normalization(path) -> dict | None:
    """The normalisation a ``.tflite`` made by edgeres does on its pixel input (None: it takes the
    normalised input). ImportError naming the fix when it takes pixels and no schema is installed."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    if LITERT_PIXELS_ENTRY.encode() not in data:
        return None
    try:
        entry = litert_metadata_entry(data, LITERT_PIXELS_ENTRY)
    except ImportError:
        raise ImportError(LITERT_NO_SCHEMA) from None
    return json.loads(entry)["normalization"] if entry else None


# --- targets/runners/executorch_runner.py ---
"""ExecuTorch: run a ``.pte`` (XNNPACK delegate) on NCHW float32 batches (numpy + executorch only; copied
verbatim into the standalone runners, so no edgeres imports and no module-level name shared with the other
runners). ExecuTorch's Python runtime takes torch tensors, so torch comes with it (the pip package needs it)."""


import json
import os

import numpy as np

EXECUTORCH_SIDECAR = ".json"  # beside model.<precision>.pte: labels, preprocessing, the op audit (app metadata)
EXECUTORCH_DTYPES = {6: "float32", 5: "float16", 0: "uint8", 1: "int8", 3: "int32", 4: "int64"}  # c10 ScalarType


class ExecuTorchRunner:
    """One ``.pte`` loaded by ExecuTorch's runtime. The program's input is batch 1 (what a phone runs); a
    batch runs image by image. Threads: XNNPACK's process-wide threadpool, the one knob ExecuTorch's Python
    runtime has (``_unsafe_reset_threadpool``)."""

    runtime = "executorch"
    suffix, companions = ".pte", (EXECUTORCH_SIDECAR,)
    missing = "executorch is not installed for this python; pip install executorch (its runtime needs torch)"
    input_layout = tensor_layout = "NCHW"
    takes_pixels = False

    def __init__(self, path, threads: int | None = None):
        import warnings

        with warnings.catch_warnings():  # "This API is experimental": said once per import, not ours to show
            warnings.simplefilter("ignore")
            import torch
            from executorch.extension.pybindings import portable_lib
        from importlib import metadata

        self._torch = torch
        self.path = path
        self.version = metadata.version("executorch")
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.threads = int(portable_lib._threadpool_get_thread_count())
        self.module = portable_lib._load_for_executorch(str(path))
        meta = self.module.method_meta("forward")
        info = meta.input_tensor_meta(0)
        self._dims, self._dtype = list(info.sizes()), EXECUTORCH_DTYPES.get(int(info.dtype()))
        self.metadata = executorch_sidecar(path)

    def input_spec(self) -> dict:
        """The first input: name, dims, numpy dtype name and the runtime's type."""
        return {"name": self.io_names()[0], "dims": list(self._dims), "dtype": self._dtype,
                "type": f"Tensor[{self._dtype}]"}

    def io_names(self) -> tuple[str, str]:
        return tuple(self.metadata.get("io_names") or ("x", "output"))

    def reshape(self, shape) -> None:
        """The program's input shape is fixed at export (batch 1): another is refused."""
        if list(shape) != list(self._dims):
            raise ValueError(f"{self.path}: the ExecuTorch program takes {self._dims}, not {list(shape)}")

    def fixed_input_call(self, x: np.ndarray):
        """A call running the model on ``x`` (the model's own input) as a user's loop would, for timing."""
        inputs = (self._torch.from_numpy(np.ascontiguousarray(x)),)
        forward = self.module.forward
        return lambda: forward(inputs)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        """The first output for the model's own input (batch 1)."""
        out = self.module.forward((self._torch.from_numpy(np.ascontiguousarray(x)),))
        return out[0].numpy().astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of an N×C×H×W float32 batch, one image at a time."""
        x = np.asarray(x, np.float32)
        return np.concatenate([self.run_native(x[i:i + 1]) for i in range(len(x))]) if len(x) else \
            np.zeros((0, 0), np.float32)


def executorch_sidecar(path) -> dict:
    """What the ``.json`` beside a ``.pte`` says (labels, preprocessing, input, the op audit); empty if none."""
    side = str(path)[: -len(ExecuTorchRunner.suffix)] + EXECUTORCH_SIDECAR if str(path).endswith(".pte") else ""
    if not side or not os.path.isfile(side):
        return {}
    with open(side, encoding="utf-8") as f:
        return json.load(f)


RUNNER_CLASSES = (OnnxRuntimeRunner, OpenVinoIrRunner, LiteRtRunner, ExecuTorchRunner,)
# <<< runners

RUNNERS = {cls.runtime: cls for cls in RUNNER_CLASSES}


# --- the measurement -----------------------------------------------------------------------------

def summarise(latencies_ms, batch: int) -> dict:
    import numpy as np

    a = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    mean = float(a.mean())
    return {
        "p50_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3), "p99_ms": round(float(p99), 3),
        "mean_ms": round(mean, 3), "std_ms": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 3),
        "min_ms": round(float(a.min()), 3), "max_ms": round(float(a.max()), 3),
        "fps": round(batch * 1000.0 / mean, 2) if mean > 0 else None,
    }


def _check_artifact(artifact: str, runtime: str | None = None) -> tuple[str, float]:
    """The artifact's runtime (given, or read off its suffix) and size in MB; raises ``BenchFailure``
    when a file of it is missing."""
    if not os.path.isfile(artifact):
        raise BenchFailure(f"{artifact}: no such file")
    runtime = runtime or runtime_for(artifact)
    files = artifact_files(artifact)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise BenchFailure(f"{missing[0]}: missing (the artifact needs it)")
    return runtime, sum(os.path.getsize(f) for f in files) / 1e6


def _time_inferences(infer, warmup: int, runs: int | None, seconds: float | None) -> tuple[float, list[float]]:
    """The first inference's ms, then after ``warmup`` untimed ones the ms of each timed inference:
    ``runs`` of them, or as many as fit in ``seconds`` (at least two, for a spread)."""
    t0 = time.perf_counter()
    infer()
    first_ms = (time.perf_counter() - t0) * 1000
    for _ in range(warmup):
        infer()
    latencies = []
    clock = time.perf_counter
    deadline = clock() + seconds if seconds else None
    while True:
        t0 = clock()
        infer()
        latencies.append((clock() - t0) * 1000)
        if deadline is None and len(latencies) >= runs:
            break
        if deadline is not None and clock() >= deadline and len(latencies) >= 2:
            break
    return first_ms, latencies


def bench(artifact: str, threads: int, warmup: int, runs: int | None, seconds: float | None, batch: int,
          input_shape: list[int] | None = None, runtime: str | None = None) -> dict:
    """Load, time and describe one artifact; raises ``BenchFailure`` when it cannot run here."""
    runtime, size_mb = _check_artifact(artifact, runtime)
    before = system_info()
    rss_before_load = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        infer, input_info, version = load_runtime(runtime, artifact, threads, batch, input_shape)
    except BenchFailure:
        raise
    except Exception as e:  # noqa: BLE001 - every runtime has its own exception types
        raise BenchFailure(f"{runtime} cannot load {os.path.basename(artifact)}: {_first_line(e)}") from None
    load_ms = (time.perf_counter() - t0) * 1000
    try:
        first_ms, latencies = _time_inferences(infer, warmup, runs, seconds)
    except Exception as e:  # noqa: BLE001
        raise BenchFailure(f"{runtime} failed running {os.path.basename(artifact)}: {_first_line(e)}") from None
    after = system_info()
    return {
        "schema": SCHEMA,
        "status": "ok",
        "artifact": os.path.basename(artifact),
        "runtime": runtime,
        "runtime_version": version,
        "threads": threads,
        "batch": batch,
        "input": input_info,
        "warmup": warmup,
        "runs": len(latencies),
        "size_mb": round(size_mb, 3),
        "load_ms": round(load_ms, 2),
        "first_ms": round(first_ms, 2),
        **summarise(latencies, batch),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_load_mb": rss_before_load,
        "emulated": bool((after.get("emulation") or {}).get("emulated")),
        "throttled": bool(any(i.get("throttled") and i["throttled"]["now"] for i in (before, after))),
        "warnings": warnings_for(before, after),
        "system": after,
        "temperature_before_c": max(before["temperatures_c"].values(), default=None),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark one ONNX / OpenVINO IR / TFLite artifact.")
    p.add_argument("--artifact", required=True, help="model.onnx, model.xml (+ .bin beside it) or model.tflite")
    p.add_argument("--runtime", choices=sorted(RUNNERS), help="the runtime to load it with [by its suffix]")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (with --eval-inputs, 0: all cores)")
    p.add_argument("--warmup", type=int, default=10)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--runs", type=int, help="timed inferences (default 100)")
    group.add_argument("--seconds", type=float, help="time inferences for this long instead of --runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-shape", help="static input shape, comma separated (e.g. 1,3,224,224)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--eval-inputs", help="instead of timing: logits of these preprocessed inputs (float32 "
                   "N×C×H×W .npy), written to --logits-out")
    p.add_argument("--logits-out", help="where --eval-inputs writes its logits (.npy)")
    args = p.parse_args(argv)
    if args.runs is None and args.seconds is None:
        args.runs = 100
    if args.eval_inputs and args.threads == 0:  # accuracy, not latency: every core of the device
        args.threads = os.cpu_count() or 1
    if args.threads < 1 or args.warmup < 0 or args.batch < 1 or (args.runs is not None and args.runs < 1) \
            or (args.seconds is not None and args.seconds <= 0):
        p.error("--threads, --batch and --runs must be at least 1, --warmup at least 0, --seconds positive")
    if bool(args.eval_inputs) != bool(args.logits_out):
        p.error("--eval-inputs and --logits-out go together")
    if args.input_shape:
        try:
            args.input_shape = [int(v) for v in args.input_shape.split(",")]
        except ValueError:
            p.error(f"--input-shape {args.input_shape!r}: expected integers separated by commas")
    return args


def die_with_parent(environ=os.environ) -> None:
    """Under `edgeres bench` on Linux, have the kernel kill this runner when its parent dies, even by
    SIGKILL, so an interrupted benchmark never leaves a runner busy on the CPU."""
    parent = environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent was already gone before the request took effect
        os._exit(EXIT_FAILED)


def main(argv=None) -> int:
    die_with_parent()
    args = parse_args(argv)
    try:
        if args.runtime is None:
            runtime_for(args.artifact)
        if args.eval_inputs:
            result = evaluate(args.artifact, args.eval_inputs, args.logits_out, args.threads, args.batch,
                              runtime=args.runtime)
        else:
            result = bench(args.artifact, args.threads, args.warmup, args.runs, args.seconds, args.batch,
                           args.input_shape, runtime=args.runtime)
    except (BenchFailure, ValueError) as e:
        if args.json:
            print(json.dumps({"schema": EVAL_SCHEMA if args.eval_inputs else SCHEMA, "status": "failed", "artifact": os.path.basename(args.artifact),
                              "threads": args.threads, "error": str(e)}))
        else:
            print(f"bench_runner: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:  # strict JSON: a non-finite timing (never expected) would be null, not a bare NaN
        print(json.dumps(_nan_to_none(result), allow_nan=False))
    elif args.eval_inputs:
        print(f"{result['artifact']}: {result['images']} images in {result['seconds']} s -> {args.logits_out}")
    else:
        print(f"{result['artifact']} ({result['runtime']} {result['runtime_version']}, {args.threads} threads, "
              f"batch {args.batch}): load {result['load_ms']:.1f} ms, first {result['first_ms']:.1f} ms, "
              f"p50 {result['p50_ms']:.2f} ms, p90 {result['p90_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
              f"{result['fps']} FPS, peak RSS {result['peak_rss_mb']} MB")
        for w in result["warnings"]:
            print(f"warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
