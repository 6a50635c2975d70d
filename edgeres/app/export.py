"""``export-app``: a folder an app developer can use as it is — one artifact of a bundle, its labels,
and code that runs it with the bundle's preprocessing: a standalone Python script (numpy, Pillow and
the runtime only), or a Kotlin (Android) / Swift (iOS) class with a build snippet.

Everything the generated code needs is taken from the manifest and from the artifact as its runtime
loads it (tensor names, whether it normalises inside), so nothing is re-typed by hand. The folder is
written beside ``--out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
from pathlib import Path

from edgeres import __version__
from edgeres.app import mobile
from edgeres.bundle import OutputLock, artifact_path, check_output_dir, label_names, outputs_probabilities, read_manifest, verify_file
from edgeres.errors import InputError
from edgeres.measure.predict import pick_artifact
from edgeres.progress import log
from edgeres.targets import companion_files, get_info, get_target

KINDS = ("python", "android", "ios")
APP_FILE = "app.json"  # what was exported from where; marks the folder as made by export-app
TEMPLATE = Path(__file__).with_name("classify_template.py")
CONFIG_LINE = "CONFIG: dict = {}  # written by edgeres export-app: runtime, model, labels, preprocess, input"
# the template imports edgeres' image decoding; the app gets that module's source in its place (one rule)
IMAGE_FILE_LINE = "from edgeres.calibration.image_file import ImageRefused, decode_image  # export-app puts that module's source here"
IMAGE_FILE_MODULE = "edgeres.calibration.image_file"


def check_request(kind: str, out: str | Path, force: bool) -> Path:
    """Refuse a bad ``--kind`` or ``--out`` before any work (the rules of ``convert --out``)."""
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    out = Path(out)
    if out.is_symlink():  # publishing renames onto --out: a link there would be replaced (or, dangling, fail)
        target = os.readlink(out)
        where = target if out.exists() else f"{target}, which does not exist"
        raise InputError(f"--out {out}: is a symbolic link (to {where}); export-app never replaces a link: give "
                         "the folder itself or a new path")
    check_output_dir(out, force, marker=APP_FILE, made_by="an app made by export-app", holding="an exported app")
    return out


def _choose(manifest: dict, bundle: Path, kind: str, target: str | None, precision: str | None) -> dict:
    """The artifact to export; Android and iOS take the runtimes they have templates for."""
    if kind == "python":
        return pick_artifact(manifest, bundle, target, precision)
    usable = [a for a in manifest["artifacts"] if get_info(a["target"]).runtime in mobile.kind_runtimes(kind)]
    if target is not None and target not in {a["target"] for a in usable}:
        names = sorted({n for n in (a["target"] for a in manifest["artifacts"])
                        if get_info(n).runtime in mobile.kind_runtimes(kind)})
        raise InputError(f"--target {target}: --kind {kind} runs {', '.join(names) or 'no target of this bundle'} "
                         f"artifacts ({', '.join(mobile.kind_runtimes(kind))} on the device); choose one of those")
    return pick_artifact({**manifest, "artifacts": usable}, bundle, target, precision)


def app_config(manifest: dict, artifact: dict, runner, model_file: str) -> dict:
    """What the generated code needs: runtime, files, preprocessing, the model's input and tensor names."""
    input_name, output_name = runner.io_names()
    dtype = artifact.get("input_dtype", "float32")
    return {"runtime": get_info(artifact["target"]).runtime, "model": model_file, "labels": "labels.txt",
            "num_classes": manifest["arch"]["num_classes"], "preprocess": manifest["preprocess"],
            "input": {"layout": artifact.get("input_layout", "NCHW"), "dtype": dtype, "pixels": bool(runner.takes_pixels),
                      "name": input_name},
            "output": {"name": output_name, "probabilities": outputs_probabilities(manifest)}}


def requirements(artifact: dict) -> str:
    """requirements.txt: numpy, Pillow and the runtime (with what it imports beside it, ``TargetInfo
    .runtime_needs``) at the versions the bundle was made and tested with. A local build tag (``+cpu``) is
    dropped: package indexes publish none."""
    info = get_info(artifact["target"])
    versions = artifact.get("tool_versions") or {}
    lines = []
    for dist in (info.dist, *info.runtime_needs):
        version = str(versions.get(dist) or "").split("+")[0]
        lines.append(f"{dist}=={version}" if version else f"{dist}  # version not recorded in the bundle")
    return "numpy>=1.26\npillow>=10\n" + "".join(f"{line}\n" for line in lines)


def export_app(bundle: str | Path, kind: str, out: str | Path, *, target: str | None = None,
               precision: str | None = None, force: bool = False) -> dict:
    """Write the app folder ``out``; returns ``app.json`` (kind, artifact, files)."""
    bundle, out = Path(bundle), check_request(kind, out, force)
    manifest = read_manifest(bundle, verify=False)
    if kind != "python" and manifest["preprocess"].get("channel_order") == "L":
        raise InputError(f"{bundle}: is a greyscale (one-channel) model; the {kind} app code feeds RGB camera frames, "
                         "so export the python app (export-app --kind python) or convert the frames to grey yourself")
    artifact = _choose(manifest, bundle, kind, target, precision)
    for record in artifact.get("file_records", []):
        verify_file(bundle, record)
    model = artifact_path(bundle, artifact)
    runner = get_target(artifact["target"]).load_runner(model)  # the artifact runs here, and tells its tensor names
    config = app_config(manifest, artifact, runner, model.name)
    unfed = mobile.unfed_input(config) if kind != "python" else None
    if unfed:
        raise InputError(f"{model}: {unfed}, which the {kind} code does not feed (float32 input, or uint8 pixels "
                         f"into a model that normalises inside); convert it with float I/O (--option tflite.io=float, "
                         f"the default) or export --kind python")
    with OutputLock(out):
        staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            files = _write(staging, kind, bundle, manifest, artifact, model, config)
            record = {"kind": kind, "made_by": f"edgeres {__version__}", "bundle": str(bundle),
                      "conversion_key": manifest.get("conversion_key"), "target": artifact["target"],
                      "precision": artifact["precision"], "config": config, "files": sorted([*files, APP_FILE])}
            (staging / APP_FILE).write_text(json.dumps(record, indent=2) + "\n")
            _publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"exported a {kind} app for {artifact['target']} {artifact['precision']} to {out}")
    return record


def _write(staging: Path, kind: str, bundle: Path, manifest: dict, artifact: dict, model: Path, config: dict) -> list[str]:
    files = [model.name, "labels.txt"]
    shutil.copyfile(model, staging / model.name)
    for companion in companion_files(artifact["file"]):  # an OpenVINO IR's .bin
        shutil.copyfile(bundle / companion, staging / Path(companion).name)
        files.append(Path(companion).name)
    (staging / "labels.txt").write_text("".join(f"{v}\n" for v in label_names(manifest)), encoding="utf-8")
    if kind == "python":
        generated = {"classify.py": classify_script(config), "requirements.txt": requirements(artifact),
                     "README.md": mobile.python_readme(config, artifact, requirements(artifact))}
    else:
        generated = mobile.generate(kind, config, artifact)
    for name, text in generated.items():
        (staging / name).write_text(text, encoding="utf-8")
    return files + list(generated)


def classify_script(config: dict) -> str:
    """The standalone classify.py with this app's CONFIG written in."""
    text = TEMPLATE.read_text(encoding="utf-8")
    if text.count(CONFIG_LINE) != 1 or text.count(IMAGE_FILE_LINE) != 1:
        raise RuntimeError(f"{TEMPLATE}: the CONFIG or image-file line to fill in is missing")
    text = text.replace(IMAGE_FILE_LINE, image_file_source())
    return text.replace(CONFIG_LINE, "CONFIG: dict = " + pprint.pformat(config, sort_dicts=False, width=110)
                        + "  # written by edgeres export-app")


def image_file_source() -> str:
    """``calibration/image_file.py`` as it goes into classify.py: its code, the module docstring as comments
    and without the ``__future__`` import (the script has its own at the top)."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec(IMAGE_FILE_MODULE).origin).read_text(encoding="utf-8")
    body = ast.parse(source).body
    docstring = ast.get_docstring(ast.parse(source)) or ""
    code_from = next(node.lineno for node in body[1:] if not (isinstance(node, ast.ImportFrom)
                                                                and node.module == "__future__"))
    code = "\n".join(source.splitlines()[code_from - 1:])
    comments = "\n".join(f"# {line}".rstrip() for line in docstring.splitlines())
    return f"# calibration/image_file.py of edgeres {__version__}, copied in by export-app:\n{comments}\n\n{code}"


def _publish(staging: Path, out: Path) -> None:
    """Rename the complete folder into place, replacing an app made earlier (``--force`` was checked)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
