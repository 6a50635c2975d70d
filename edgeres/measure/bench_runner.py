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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# --- runtimes ------------------------------------------------------------------------------------

def artifact_files(path: str) -> list[str]:
    """The files the artifact consists of (an OpenVINO IR is .xml + .bin)."""
    files = [path]
    if path.endswith(".xml"):
        files.append(path[:-4] + ".bin")
    return files


def runtime_for(path: str) -> str:
    for suffix, runtime in ((".onnx", "onnxruntime"), (".xml", "openvino"), (".tflite", "litert")):
        if path.endswith(suffix):
            return runtime
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


ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def load_onnxruntime(path: str, threads: int, batch: int, shape_override):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BenchFailure("onnxruntime is not installed for this python; pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    if inp.type not in ONNX_TYPES:
        raise BenchFailure(f"input {inp.name!r} has type {inp.type}, which this runner cannot feed")
    shape = _static_shape(inp.name, list(inp.shape), batch, shape_override)
    x = random_input(shape, ONNX_TYPES[inp.type])
    feed = {inp.name: x}
    # ORT wraps the numpy buffer without copying, so this is the plain `session.run` loop users write
    return (lambda: session.run(None, feed)), {"name": inp.name, "shape": shape, "dtype": str(x.dtype)}, \
        ort.__version__


def _ir_setting(model, key: str):
    """A value edgeres stored in the IR's rt_info (``edgeres/<key>``), or None."""
    try:
        return model.get_rt_info(["edgeres", key]).astype(str)
    except Exception:  # noqa: BLE001 - absent in IRs made elsewhere
        return None


def load_openvino(path: str, threads: int, batch: int, shape_override):
    try:
        import openvino as ov
    except ImportError:
        raise BenchFailure("openvino is not installed for this python; pip install openvino") from None
    core = ov.Core()
    model = core.read_model(path)
    port = model.inputs[0]
    name = port.get_any_name()
    partial = port.get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in partial]
    shape = _static_shape(name, dims, batch, shape_override)
    if partial.is_dynamic or shape != dims:
        # a static shape lets the CPU plugin pick its kernels ahead of time (benchmark_app does the same)
        model.reshape({name: ov.PartialShape(shape)})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
              # what the artifact was compiled for (edgeres stores it in the IR), else f32: on CPUs with
              # bf16 OpenVINO would silently time an fp32 IR in bf16
              "INFERENCE_PRECISION_HINT": _ir_setting(model, "inference_precision") or "f32"}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    x = random_input(shape, port.get_element_type().to_dtype())
    request.set_input_tensor(ov.Tensor(x))
    return request.infer, {"name": name, "shape": shape, "dtype": str(x.dtype)}, ov.__version__


def load_litert(path: str, threads: int, batch: int, shape_override):
    try:
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert as rt
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
            import tflite_runtime as rt
        except ImportError:
            raise BenchFailure("no TFLite runtime for this python; pip install ai-edge-litert") from None
    interpreter = Interpreter(model_path=path, num_threads=threads)
    detail = interpreter.get_input_details()[0]
    dims = [int(d) for d in detail.get("shape_signature", detail["shape"])]
    dims = [d if d > 0 else None for d in dims]
    shape = _static_shape(detail["name"], dims, batch, shape_override)
    if list(detail["shape"]) != shape:
        interpreter.resize_tensor_input(detail["index"], shape)
    interpreter.allocate_tensors()
    x = random_input(shape, detail["dtype"])
    interpreter.set_tensor(detail["index"], x)
    return interpreter.invoke, {"name": detail["name"], "shape": shape, "dtype": str(x.dtype)}, \
        getattr(rt, "__version__", "unknown")


LOADERS = {"onnxruntime": load_onnxruntime, "openvino": load_openvino, "litert": load_litert}


# --- accuracy on the device: logits of preprocessed batches ------------------------------------
# Each returns run(x) for float32 N×C×H×W batches (the layout edgeres preprocesses to) -> float32 logits,
# doing what the host's runners in targets/ do, so the device's and the host's outputs are comparable.

def eval_onnxruntime(path: str, threads: int):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the CPU
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: np.asarray(session.run(None, {name: x})[0], np.float32)), ort.__version__


def _tflite_cast(x, detail, to_int: bool):
    import numpy as np

    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype if to_int else np.float32, copy=False)
    scale, zero_point = detail["quantization"]
    if not to_int:
        return (x.astype(np.float32) - zero_point) * scale
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def eval_litert(path: str, threads: int):
    import numpy as np

    try:
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert as rt
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
        import tflite_runtime as rt
    interp = Interpreter(model_path=path, num_threads=threads)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    dynamic = int(inp.get("shape_signature", inp["shape"])[0]) == -1
    norm = _embedded_pixel_normalization(path)
    feed = _to_pixels(norm) if norm else (lambda x: x)
    state = {"batch": int(inp["shape"][0])}
    interp.allocate_tensors()

    def invoke(nhwc):
        if dynamic and len(nhwc) != state["batch"]:
            interp.resize_tensor_input(inp["index"], [len(nhwc), *map(int, inp["shape"][1:])])
            interp.allocate_tensors()
            state["batch"] = len(nhwc)
        interp.set_tensor(inp["index"], _tflite_cast(nhwc, inp, True))
        interp.invoke()
        return _tflite_cast(interp.get_tensor(out["index"]), out, False)

    def run(x):
        nhwc = np.ascontiguousarray(feed(x).transpose(0, 2, 3, 1))
        if dynamic:
            return invoke(nhwc)
        b, outs = state["batch"], []  # fixed-batch model: chunks of its batch, the last one padded
        for start in range(0, len(nhwc), b):
            chunk = nhwc[start:start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            outs.append(invoke(chunk)[: b - pad])
        return np.concatenate(outs)

    return run, getattr(rt, "__version__", "unknown")


def eval_openvino(path: str, threads: int):
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    if _ir_setting(model, "input_preprocess"):
        raise BenchFailure(f"{os.path.basename(path)}: an IR with embedded preprocessing takes uint8 images; "
                           "the device evaluation sends preprocessed float batches")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
              "INFERENCE_PRECISION_HINT": _ir_setting(model, "inference_precision") or "f32"}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        return np.asarray(request.infer({0: x})[compiled.outputs[0]], np.float32)

    return run, ov.__version__


EVALUATORS = {"onnxruntime": eval_onnxruntime, "openvino": eval_openvino, "litert": eval_litert}
EVAL_SCHEMA = "edgeres-eval-run/1"


PIXELS_ENTRY = "edgeres.input"  # = targets.tflite.EMBEDDED_KEY (this file runs alone on the device)


def _embedded_pixel_normalization(path: str) -> dict | None:
    """The normalisation an edgeres ``.tflite`` does on its pixel input, from its own metadata (None:
    it takes normalised input). Read with LiteRT's flatbuffer schema, which ships with the runtime;
    the same reading as ``targets.tflite_metadata.entry``, repeated because this file runs alone."""
    import json

    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        schema = None
    data = open(path, "rb").read()
    if PIXELS_ENTRY.encode() not in data:
        return None
    if schema is None:
        raise BenchFailure(f"{os.path.basename(path)}: takes pixels, and reading how it normalises them needs "
                           "the model schema of ai-edge-litert; pip install ai-edge-litert")
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name().decode() == PIXELS_ENTRY:
            return json.loads(model.Buffers(m.Buffer()).DataAsNumpy().tobytes())["normalization"]
    return None


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


def _to_pixels(norm: dict):
    """Normalised N×C×H×W inputs back to the pixel values a model that normalises them itself takes."""
    import numpy as np

    std = np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
    mean = np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)
    return lambda x: ((x * std + mean) / np.float32(norm["scale"])).astype(np.float32)


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
        run, version = EVALUATORS[runtime](artifact, threads)
        outs = [run(np.ascontiguousarray(x_all[i:i + batch])).reshape(min(batch, len(x_all) - i), -1)
                for i in range(0, len(x_all), batch)]
    except BenchFailure:
        raise
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
        infer, input_info, version = LOADERS[runtime](artifact, threads, batch, input_shape)
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
    p.add_argument("--runtime", choices=sorted(LOADERS), help="the runtime to load it with [by its suffix]")
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
