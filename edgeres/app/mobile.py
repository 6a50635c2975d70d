"""The Android (Kotlin + Gradle) and iOS (Swift) code of ``export-app``, and the apps' READMEs.

Only the constants block is generated (from the app config, which comes from the manifest and the
artifact); the code around it is fixed text per runtime. Neither can be compiled on this machine
(no Android SDK or Xcode): the READMEs say so, and the tests check the constants against the manifest.
"""

from __future__ import annotations

import json

# runtimes with a mobile template here: LiteRT's Interpreter and onnxruntime-mobile, on both kinds (keys:
# TargetInfo.runtime). Any other target brings its own as data: a module-level ``MOBILE = {kind: {"title",
# "dependency" (android; may name "{tool}" versions from the artifact) or "pod" (ios), "code"}}``, whose Kotlin
# gets the shared code appended: resize/crop (Geometry), the input values (Pixels) and scores (Scores); see
# targets/executorch.py.
RUNTIMES = ("litert", "onnxruntime")
ANDROID_DEPENDENCY = {"litert": "com.google.ai.edge.litert:litert:1.4.0",
                      "onnxruntime": "com.microsoft.onnxruntime:onnxruntime-android:1.22.0"}
IOS_POD = {"litert": "pod 'TensorFlowLiteSwift', '~> 2.17.0'", "onnxruntime": "pod 'onnxruntime-objc', '~> 1.22.0'"}


def _floats(values, suffix: str = "") -> str:
    return ", ".join(f"{float(v)!r}{suffix}" for v in values)


def constants(config: dict) -> dict:
    """The values every generated file states, by name (the test compares them with the manifest)."""
    pre, inp = config["preprocess"], config["input"]
    return {"MODEL_FILE": config["model"], "LABELS_FILE": config["labels"], "NUM_CLASSES": config["num_classes"],
            "INPUT_SIZE": pre["size"], "RESIZE": pre.get("resize") or 0,
            "RESIZE_MODE": pre.get("resize_mode", "shorter_side_crop"), "RESIZE_FILTER": pre.get("filter", "bilinear"),
            "ANTIALIAS": bool(pre.get("antialias", True)), "SCALE": float(pre["scale"]),
            "MEAN": [float(v) for v in pre["mean"]], "STD": [float(v) for v in pre["std"]],
            "BGR": pre["channel_order"] == "BGR", "INPUT_LAYOUT": inp["layout"], "INPUT_DTYPE": inp["dtype"],
            "TAKES_PIXELS": inp["pixels"], "INPUT_NAME": inp["name"], "OUTPUT_NAME": config["output"]["name"],
            "OUTPUT_PROBABILITIES": bool(config["output"].get("probabilities", False))}


# how each language declares a constant of each kind: (bool, float list, float, int, string) and the wrapper
_DECLARATIONS = {
    "kotlin": ("object ModelConfig {{\n{}\n}}\n", {
        bool: "    const val {name} = {lower}", list: "    val {name} = floatArrayOf({floats_f})",
        float: "    const val {name} = {repr}f", int: "    const val {name} = {repr}", str: "    const val {name} = {json}"}),
    "swift": ("enum ModelConfig {{\n{}\n}}\n", {
        bool: "    static let {name} = {lower}", list: "    static let {name}: [Float] = [{floats}]",
        float: "    static let {name}: Float = {repr}", int: "    static let {name} = {repr}", str: "    static let {name} = {json}"}),
}


def _constants_block(language: str, config: dict) -> str:
    wrapper, forms = _DECLARATIONS[language]
    lines = []
    for name, value in constants(config).items():
        kind = next((t for t in (bool, list, float, int) if isinstance(value, t)), str)  # bool before int; else JSON
        lines.append(forms[kind].format(
            name=name, lower=str(value).lower(), repr=repr(value), json=json.dumps(value),
            floats=_floats(value) if kind is list else "", floats_f=_floats(value, "f") if kind is list else ""))
    return wrapper.format("\n".join(lines))


def kotlin_constants(config: dict) -> str:
    return _constants_block("kotlin", config)


def swift_constants(config: dict) -> str:
    return _constants_block("swift", config)


def unfed_input(config: dict) -> str | None:
    """What of the artifact's input the mobile code cannot feed, or None: it writes float32 values, or uint8
    pixel values 0..255 into a model that normalises inside (LiteRT's tflite.io=uint8), and reads float or
    uint8 outputs; an int8 input (and output), or uint8 holding normalised values, would be fed wrong bytes."""
    inp = config["input"]
    if inp["dtype"] == "float32" or (inp["dtype"] == "uint8" and inp["pixels"]):
        return None
    return f"takes {inp['dtype']} {'pixels' if inp['pixels'] else 'normalised values'}"


def target_templates(kind: str) -> dict[str, dict]:
    """{runtime: template} that target modules bring for ``kind`` (their ``MOBILE`` data)."""
    from edgeres.targets import get_target, infos

    found = {}
    for name, info in infos().items():
        template = (getattr(get_target(name), "MOBILE", None) or {}).get(kind)
        if template and info.runtime not in RUNTIMES:
            found[info.runtime] = template
    return found


def kind_runtimes(kind: str) -> tuple[str, ...]:
    """The runtimes an app of ``kind`` can be generated for."""
    return (*RUNTIMES, *target_templates(kind))


def generate(kind: str, config: dict, artifact: dict) -> dict[str, str]:
    """{file name: text} of the Android or iOS app code."""
    runtime = config["runtime"]
    header = (f"// Generated by edgeres export-app for {artifact['target']} {artifact['precision']} "
              f"({config['model']}). The constants come from the bundle's manifest: regenerate, do not edit.\n")
    plugin = target_templates(kind).get(runtime, {})
    if kind == "android":
        code = KOTLIN[runtime] if runtime in KOTLIN else plugin["code"] + SHARED_KOTLIN
        body = code.replace("// @CONSTANTS@\n", kotlin_constants(config))
        gradle = (f"// app/build.gradle.kts: the runtime, and the model kept uncompressed in the APK's assets\n"
                  f"dependencies {{\n    implementation(\"{_dependency(ANDROID_DEPENDENCY.get(runtime) or plugin['dependency'], artifact)}\")\n}}\n"
                  f"android {{\n    androidResources {{ noCompress += listOf(\"{config['model'].rsplit('.', 1)[-1]}\") }}\n}}\n")
        return {"ImageClassifier.kt": header + body, "build.gradle.kts.snippet": gradle,
                "README.md": mobile_readme(kind, config, artifact)}
    body = (SWIFT[runtime] if runtime in SWIFT else plugin["code"]).replace("// @CONSTANTS@\n", swift_constants(config))
    pod = IOS_POD.get(runtime) or plugin["pod"]
    return {"ImageClassifier.swift": header + body, "Podfile.snippet": f"# Podfile\n{pod}\n",
            "README.md": mobile_readme(kind, config, artifact)}


def _dependency(dependency: str, artifact: dict) -> str:
    """The Gradle coordinate, with any ``{tool}`` in it filled from the artifact's tool versions."""
    versions = {k: str(v).split("+")[0] for k, v in (artifact.get("tool_versions") or {}).items()}
    return dependency.format(**versions) if "{" in dependency else dependency


RUNTIME_TITLE = {"litert": "the LiteRT Interpreter", "onnxruntime": "onnxruntime"}


def _preprocess_text(config: dict) -> str:
    pre, inp = config["preprocess"], config["input"]
    how = ("the model normalises inside: it takes the pixel values 0..255" if inp["pixels"] else
           f"(pixel × {pre['scale']:g} − mean {pre['mean']}) / std {pre['std']}, {pre['channel_order']}")
    return (f"{pre['size']}×{pre['size']} {pre['channel_order']} input ({pre.get('resize_mode', 'shorter_side_crop')}"
            f", resize {pre.get('resize')}, {pre.get('filter', 'bilinear')}"
            f"{'' if pre.get('antialias', True) else ' not antialiased'}); {how}; layout {inp['layout']}, {inp['dtype']}; "
            f"tensors `{inp['name']}` → `{config['output']['name']}`")


def python_readme(config: dict, artifact: dict, requirements: str) -> str:
    return f"""# Image classifier ({artifact['target']} {artifact['precision']})

Made by `edgeres export-app --kind python`. Needs only numpy, Pillow and the runtime (no torch, no edgeres):

```
python -m venv .venv && .venv/bin/pip install -r requirements.txt
.venv/bin/python classify.py photo.jpg more/photos/ --top 3
.venv/bin/python classify.py photos/ --json
.venv/bin/python classify.py --camera 0        # needs: pip install opencv-python
```

Files: `classify.py`, `{config['model']}` (the artifact), `labels.txt` ({config['num_classes']} classes),
`requirements.txt` (the runtime pinned to the version the bundle was made and tested with), `app.json`.

Images are decoded as `edgeres predict` decodes them (the same code, copied into classify.py): the EXIF
orientation a phone camera writes is applied; 16-bit, greyscale, palette, CMYK and alpha images give
edgeres' pixels; only JPEG, PNG, BMP, WebP, TIFF and GIF content is decoded; a FIFO or device is refused
unopened and an image above 89 megapixels (or with a side above 65535 pixels) before it is decoded.

Preprocessing (written into classify.py from the bundle's manifest): {_preprocess_text(config)}.

requirements.txt:

```
{requirements.strip()}
```
"""


UPRIGHT = {  # what the mobile README says about EXIF orientation, per kind
    "android": "like BitmapFactory, which ignores the tag: rotate by ExifInterface's `rotationDegrees` (from "
               "CameraX: `imageInfo.rotationDegrees`) before `classify`",
    "ios": "like a CGImage, which has no orientation: draw a UIImage whose `imageOrientation` is not `.up` "
           "upright before `classify`",
}


def mobile_readme(kind: str, config: dict, artifact: dict) -> str:
    code, build = ("ImageClassifier.kt", "build.gradle.kts.snippet") if kind == "android" else \
        ("ImageClassifier.swift", "Podfile.snippet")
    where = ("`app/src/main/assets/`" if kind == "android" else "the app target's resources (Copy Bundle Resources)")
    return f"""# {kind} image classifier ({artifact['target']} {artifact['precision']})

Made by `edgeres export-app --kind {kind}`: `{code}` runs `{config['model']}` with
{RUNTIME_TITLE.get(config['runtime']) or target_templates(kind)[config['runtime']]['title']} and the bundle's
preprocessing; `{build}` adds the runtime to your build. Put `{config['model']}` and `labels.txt` in
{where}.

**Not compiled here**: this code was generated on a machine without the {'Android SDK' if kind == 'android' else 'Xcode'}
toolchain, so it has not been built or run; edgeres' tests check only that its constants equal the
bundle's manifest. Check it in your project before you rely on it. The platform's image scaling
(bilinear, not antialiased as Pillow's) can differ slightly from `edgeres predict` on downscaled images.

**Give it upright images.** edgeres and the Python app apply the EXIF orientation a phone camera writes
(a portrait photo is stored as landscape pixels plus a tag); this code classifies pixels as they lie,
{UPRIGHT[kind]}. The comment above `classify` in `{code}` shows how.

Preprocessing: {_preprocess_text(config)}.
"""


KOTLIN = {"litert": '''package com.example.edgeres

import android.content.Context
import android.graphics.Bitmap
import org.tensorflow.lite.Interpreter
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import kotlin.math.exp

// @CONSTANTS@

/** Classifies bitmaps with the LiteRT Interpreter, preprocessing as the bundle did. */
class ImageClassifier(context: Context, threads: Int = 2) : AutoCloseable {
    val labels: List<String> = context.assets.open(ModelConfig.LABELS_FILE).bufferedReader().readLines()
    private val interpreter: Interpreter

    init {
        val fd = context.assets.openFd(ModelConfig.MODEL_FILE)
        val model = FileInputStream(fd.fileDescriptor).channel
            .map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        interpreter = Interpreter(model, Interpreter.Options().setNumThreads(threads))
    }

    // UPRIGHT IMAGES ONLY: the bitmap is classified as its pixels lie. BitmapFactory ignores the EXIF
    // orientation a phone camera writes (a portrait photo is stored as landscape pixels plus a tag), and
    // edgeres applies it, so rotate first: ExifInterface(path).rotationDegrees (androidx.exifinterface) and
    // Bitmap.createBitmap(bitmap, 0, 0, w, h, Matrix().apply { postRotate(degrees) }, true); from CameraX
    // use imageProxy.imageInfo.rotationDegrees. Alpha is ignored, as edgeres drops it.
    fun classify(bitmap: Bitmap, top: Int = 5): List<Pair<String, Float>> {
        val input = toInput(Geometry.apply(bitmap))
        val output = interpreter.getOutputTensor(0)
        val raw = ByteBuffer.allocateDirect(output.numBytes()).order(ByteOrder.nativeOrder())
        interpreter.run(input, raw)
        raw.rewind()
        val q = output.quantizationParams()
        val logits = FloatArray(ModelConfig.NUM_CLASSES) {
            if (q.scale == 0f) raw.float else ((raw.get().toInt() and 0xff) - q.zeroPoint) * q.scale
        }
        return Scores.top(logits, labels, top)
    }

    private fun toInput(img: Bitmap): ByteBuffer {
        val values = Pixels.input(img)
        val uint8 = ModelConfig.INPUT_DTYPE == "uint8"
        val buf = ByteBuffer.allocateDirect(values.size * (if (uint8) 1 else 4)).order(ByteOrder.nativeOrder())
        for (v in values) {
            if (uint8) buf.put(v.toInt().toByte()) else buf.putFloat(v)
        }
        return buf.also { it.rewind() }
    }

    override fun close() = interpreter.close()
}
''' + '''
/** Resize and crop as the bundle's preprocessing says (Android's filter: bilinear for RESIZE_FILTER bilinear
 *  or bicubic, none for nearest; not Pillow's antialiased one, so a large downscale differs slightly). */
object Geometry {
    fun apply(bitmap: Bitmap): Bitmap {
        val n = ModelConfig.INPUT_SIZE
        val filter = ModelConfig.RESIZE_FILTER != "nearest"
        if (ModelConfig.RESIZE_MODE == "direct" || ModelConfig.RESIZE == 0) {
            return Bitmap.createScaledBitmap(bitmap, n, n, filter)
        }
        val s = ModelConfig.RESIZE.toFloat() / minOf(bitmap.width, bitmap.height)
        val w = maxOf(n, (bitmap.width * s).toInt())
        val h = maxOf(n, (bitmap.height * s).toInt())
        val scaled = Bitmap.createScaledBitmap(bitmap, w, h, filter)
        return Bitmap.createBitmap(scaled, Math.round((w - n) / 2f), Math.round((h - n) / 2f), n, n)
    }
}

/** The model's input values from an INPUT_SIZE² bitmap, in INPUT_LAYOUT order (NCHW: one plane per channel;
 *  NHWC: each pixel's channels together), channels in the bundle's order (BGR or RGB): the pixel values 0..255
 *  where the model takes them (it normalises inside, or its input is uint8), else (pixel × SCALE − MEAN) / STD.
 *  Alpha is ignored, as edgeres drops it. */
object Pixels {
    fun input(img: Bitmap): FloatArray {
        val n = ModelConfig.INPUT_SIZE
        val pixels = IntArray(n * n).also { img.getPixels(it, 0, n, 0, 0, n, n) }
        val raw = ModelConfig.TAKES_PIXELS || ModelConfig.INPUT_DTYPE == "uint8"
        val planar = ModelConfig.INPUT_LAYOUT == "NCHW"
        val order = if (ModelConfig.BGR) intArrayOf(2, 1, 0) else intArrayOf(0, 1, 2)
        val values = FloatArray(3 * n * n)
        for ((i, p) in pixels.withIndex()) {
            val rgb = intArrayOf((p shr 16) and 0xff, (p shr 8) and 0xff, p and 0xff)
            for ((slot, c) in order.withIndex()) {
                val v = rgb[c].toFloat()
                values[if (planar) slot * n * n + i else i * 3 + slot] =
                    if (raw) v else (v * ModelConfig.SCALE - ModelConfig.MEAN[slot]) / ModelConfig.STD[slot]
            }
        }
        return values
    }
}

object Scores {
    fun top(logits: FloatArray, labels: List<String>, k: Int): List<Pair<String, Float>> {
        // a model whose head ends in a softmax outputs probabilities already: its scores are the outputs
        val max = logits.maxOrNull() ?: 0f
        val e = logits.map { if (ModelConfig.OUTPUT_PROBABILITIES) it.toDouble() else exp((it - max).toDouble()) }
        val sum = if (ModelConfig.OUTPUT_PROBABILITIES) 1.0 else e.sum()
        return e.indices.sortedByDescending { e[it] }.take(k).map { labels[it] to (e[it] / sum).toFloat() }
    }
}
''', "onnxruntime": '''package com.example.edgeres

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import android.content.Context
import android.graphics.Bitmap
import java.nio.FloatBuffer
import kotlin.math.exp

// @CONSTANTS@

/** Classifies bitmaps with onnxruntime-android, preprocessing as the bundle did (NCHW float32). */
class ImageClassifier(context: Context, threads: Int = 2) : AutoCloseable {
    val labels: List<String> = context.assets.open(ModelConfig.LABELS_FILE).bufferedReader().readLines()
    private val env = OrtEnvironment.getEnvironment()
    private val session: OrtSession = env.createSession(
        context.assets.open(ModelConfig.MODEL_FILE).readBytes(),
        OrtSession.SessionOptions().apply { setIntraOpNumThreads(threads) })

    // UPRIGHT IMAGES ONLY: the bitmap is classified as its pixels lie. BitmapFactory ignores the EXIF
    // orientation a phone camera writes (a portrait photo is stored as landscape pixels plus a tag), and
    // edgeres applies it, so rotate first: ExifInterface(path).rotationDegrees (androidx.exifinterface) and
    // Bitmap.createBitmap(bitmap, 0, 0, w, h, Matrix().apply { postRotate(degrees) }, true); from CameraX
    // use imageProxy.imageInfo.rotationDegrees. Alpha is ignored, as edgeres drops it.
    fun classify(bitmap: Bitmap, top: Int = 5): List<Pair<String, Float>> {
        val n = ModelConfig.INPUT_SIZE
        val chw = Pixels.input(Geometry.apply(bitmap))
        val shape = longArrayOf(1, 3, n.toLong(), n.toLong())
        OnnxTensor.createTensor(env, FloatBuffer.wrap(chw), shape).use { input ->
            session.run(mapOf(ModelConfig.INPUT_NAME to input)).use { result ->
                @Suppress("UNCHECKED_CAST")
                val logits = (result[0].value as Array<FloatArray>)[0]
                return Scores.top(logits, labels, top)
            }
        }
    }

    override fun close() = session.close()
}
'''}
KOTLIN["onnxruntime"] += KOTLIN["litert"][KOTLIN["litert"].index("/** Resize and crop"):]
SHARED_KOTLIN = KOTLIN["litert"][KOTLIN["litert"].index("/** Resize and crop"):]  # geometry, input, scores

SWIFT = {"litert": '''import CoreGraphics
import Foundation
import TensorFlowLite

// @CONSTANTS@

/// Classifies images with the LiteRT (TensorFlow Lite) Interpreter, preprocessing as the bundle did.
final class ImageClassifier {
    let labels: [String]
    private let interpreter: Interpreter

    init(threads: Int = 2) throws {
        let model = Bundle.main.path(forResource: ModelConfig.MODEL_FILE, ofType: nil)!
        let labelsPath = Bundle.main.path(forResource: ModelConfig.LABELS_FILE, ofType: nil)!
        labels = try String(contentsOfFile: labelsPath, encoding: .utf8).split(separator: "\\n").map(String.init)
        var options = Interpreter.Options()
        options.threadCount = threads
        interpreter = try Interpreter(modelPath: model, options: options)
        try interpreter.allocateTensors()
    }

    // UPRIGHT IMAGES ONLY: a CGImage carries no orientation, so it is classified as its pixels lie, while
    // edgeres applies the EXIF orientation a camera writes. From a UIImage whose imageOrientation is not
    // .up, draw it upright first (UIGraphicsImageRenderer(size: image.size).image { _ in image.draw(at: .zero) }),
    // or load files with CGImageSourceCreateThumbnailAtIndex and kCGImageSourceCreateThumbnailWithTransform.
    func classify(_ image: CGImage, top: Int = 5) throws -> [(String, Float)] {
        let rgb = Geometry.rgbPixels(image)
        var data = Data()
        for i in 0..<(rgb.count / 3) {
            for (slot, c) in (ModelConfig.BGR ? [2, 1, 0] : [0, 1, 2]).enumerated() {
                let v = rgb[i * 3 + c]
                if ModelConfig.INPUT_DTYPE == "uint8" {
                    data.append(v)
                } else {
                    var f = ModelConfig.TAKES_PIXELS ? Float(v)
                        : (Float(v) * ModelConfig.SCALE - ModelConfig.MEAN[slot]) / ModelConfig.STD[slot]
                    withUnsafeBytes(of: &f) { data.append(contentsOf: $0) }
                }
            }
        }
        try interpreter.copy(data, toInputAt: 0)
        try interpreter.invoke()
        let out = try interpreter.output(at: 0)
        let logits: [Float]
        if let q = out.quantizationParameters, out.dataType == .uInt8 {
            logits = out.data.map { (Float($0) - Float(q.zeroPoint)) * q.scale }
        } else {
            logits = out.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        }
        return Scores.top(logits, labels, top)
    }
}
''' + '''
/// Resize and crop as the bundle's preprocessing says (Core Graphics' interpolation, not Pillow's).
enum Geometry {
    static func rgbPixels(_ image: CGImage) -> [UInt8] {
        let n = ModelConfig.INPUT_SIZE
        var rect = CGRect(x: 0, y: 0, width: n, height: n)
        if ModelConfig.RESIZE_MODE != "direct" && ModelConfig.RESIZE > 0 {
            let s = CGFloat(ModelConfig.RESIZE) / CGFloat(min(image.width, image.height))
            let w = max(CGFloat(n), CGFloat(image.width) * s), h = max(CGFloat(n), CGFloat(image.height) * s)
            rect = CGRect(x: -((w - CGFloat(n)) / 2).rounded(), y: -((h - CGFloat(n)) / 2).rounded(), width: w, height: h)
        }
        var rgba = [UInt8](repeating: 0, count: n * n * 4)
        let ctx = CGContext(data: &rgba, width: n, height: n, bitsPerComponent: 8, bytesPerRow: n * 4,
                            space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)!
        ctx.interpolationQuality = ModelConfig.RESIZE_FILTER == "nearest" ? .none
            : ModelConfig.RESIZE_FILTER == "bicubic" ? .high : .medium
        ctx.draw(image, in: rect)
        return (0..<(n * n)).flatMap { [rgba[$0 * 4], rgba[$0 * 4 + 1], rgba[$0 * 4 + 2]] }
    }
}

enum Scores {
    static func top(_ logits: [Float], _ labels: [String], _ k: Int) -> [(String, Float)] {
        // a model whose head ends in a softmax outputs probabilities already: its scores are the outputs
        let m = logits.max() ?? 0
        let e = logits.map { ModelConfig.OUTPUT_PROBABILITIES ? $0 : exp($0 - m) }
        let sum: Float = ModelConfig.OUTPUT_PROBABILITIES ? 1 : e.reduce(0, +)
        return e.indices.sorted { e[$0] > e[$1] }.prefix(k).map { (labels[$0], e[$0] / sum) }
    }
}
''', "onnxruntime": '''import CoreGraphics
import Foundation
import onnxruntime_objc

// @CONSTANTS@

/// Classifies images with onnxruntime (onnxruntime-objc), preprocessing as the bundle did (NCHW float32).
final class ImageClassifier {
    let labels: [String]
    private let env: ORTEnv
    private let session: ORTSession

    init(threads: Int = 2) throws {
        let model = Bundle.main.path(forResource: ModelConfig.MODEL_FILE, ofType: nil)!
        let labelsPath = Bundle.main.path(forResource: ModelConfig.LABELS_FILE, ofType: nil)!
        labels = try String(contentsOfFile: labelsPath, encoding: .utf8).split(separator: "\\n").map(String.init)
        env = try ORTEnv(loggingLevel: .warning)
        let options = try ORTSessionOptions()
        try options.setIntraOpNumThreads(Int32(threads))
        session = try ORTSession(env: env, modelPath: model, sessionOptions: options)
    }

    // UPRIGHT IMAGES ONLY: a CGImage carries no orientation, so it is classified as its pixels lie, while
    // edgeres applies the EXIF orientation a camera writes. From a UIImage whose imageOrientation is not
    // .up, draw it upright first (UIGraphicsImageRenderer(size: image.size).image { _ in image.draw(at: .zero) }),
    // or load files with CGImageSourceCreateThumbnailAtIndex and kCGImageSourceCreateThumbnailWithTransform.
    func classify(_ image: CGImage, top: Int = 5) throws -> [(String, Float)] {
        let n = ModelConfig.INPUT_SIZE
        let rgb = Geometry.rgbPixels(image)
        var chw = [Float](repeating: 0, count: 3 * n * n)
        let order = ModelConfig.BGR ? [2, 1, 0] : [0, 1, 2]
        for i in 0..<(n * n) {
            for (plane, c) in order.enumerated() {
                chw[plane * n * n + i] = (Float(rgb[i * 3 + c]) * ModelConfig.SCALE - ModelConfig.MEAN[plane])
                    / ModelConfig.STD[plane]
            }
        }
        let data = NSMutableData(bytes: &chw, length: chw.count * MemoryLayout<Float>.size)
        let input = try ORTValue(tensorData: data, elementType: .float, shape: [1, 3, NSNumber(value: n), NSNumber(value: n)])
        let outputs = try session.run(withInputs: [ModelConfig.INPUT_NAME: input],
                                      outputNames: [ModelConfig.OUTPUT_NAME], runOptions: nil)
        let raw = try outputs[ModelConfig.OUTPUT_NAME]!.tensorData() as Data
        let logits = raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        return Scores.top(logits, labels, top)
    }
}
'''}
SWIFT["onnxruntime"] += SWIFT["litert"][SWIFT["litert"].index("/// Resize and crop"):]
