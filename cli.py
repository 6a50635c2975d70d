"""edgeres command line: parsing and printing only; the work lives in ``edgeres``."""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import List, Optional

import typer
from typer.core import TyperGroup

try:  # typer ≥ 0.22 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the click package
    from click.exceptions import NoArgsIsHelpError, UsageError


class OneLineUsageErrors(TyperGroup):
    """Usage errors (unknown option, missing or mistyped value) as one ``edgeres: error:`` line, exit 2,
    like every other error, instead of a multi-line box. Both the console script and ``CliRunner`` go
    through these methods: the group's own flags are parsed in ``make_context``, the command name and
    the command's flags in ``invoke``."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors(None):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors(ctx):
            return super().invoke(ctx)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[_COMMAND_KEY] = name  # some parser errors carry no context to name the command by
        return name, command, rest


_COMMAND_KEY = "edgeres.command"


@contextlib.contextmanager
def _one_line_usage_errors(group_ctx):
    try:
        yield
    except NoArgsIsHelpError:
        raise  # bare `edgeres`: the help text is the answer
    except UsageError as e:
        if e.ctx is not None and e.ctx.parent is not None:
            command = e.ctx.info_name
        else:
            command = group_ctx.meta.get(_COMMAND_KEY) if group_ctx is not None else None
        message = " ".join(e.format_message().split()).rstrip(".")
        _err(f"{message}; see edgeres {command + ' ' if command else ''}--help")
        raise typer.Exit(2) from None


from edgeres import targets as target_table  # the runtime records only: no runtime is imported

app = typer.Typer(
    cls=OneLineUsageErrors,
    # help text is plain: "[int8]"-style defaults must print as written, not be read as Rich markup
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune, quantise and compile trained ResNets for edge devices (ONNX, OpenVINO, TFLite).",
)
_state = {"debug": False}


def _err(message: str) -> None:
    from edgeres.tables import printable

    print(f"edgeres: error: {printable(message)}", file=sys.stderr)


def _say(line: str) -> None:
    """A line on stdout with control characters escaped (a newline too): labels, file names and model names
    come from users' files. --json output keeps the exact text."""
    from edgeres.tables import printable

    print(printable(line))


def _say_document(text: str) -> None:
    """A multi-line text (a Markdown report) on stdout, each line as ``_say`` prints it."""
    from edgeres.tables import printable_lines

    print(printable_lines(text))


def handled(fn):
    """Map user-caused errors to one line and exit 2 (input) or 3 (runtime); bugs exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgeres.calibration.errors import DataError
        from edgeres.errors import EdgeResError
        from edgeres.targets.base import TargetError

        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
            return result
        except (EdgeResError, DataError, TargetError) as e:
            if _state["debug"]:
                raise
            _err(str(e))
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            _err("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `edgeres doctor | head -1`: the reader has what it wanted
            _quiet_broken_pipe()
            raise typer.Exit(0) from None
        except typer.Exit:
            raise
        except Exception as e:  # noqa: BLE001
            if _state["debug"]:
                raise
            _err(f"internal error: {type(e).__name__}: {e} (re-run with --debug for a traceback and report it)")
            raise typer.Exit(1) from None

    return wrapper


def _print_json(data) -> None:
    from edgeres.bundle import json_text

    print(json_text(data))


def _quiet_broken_pipe() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _targets_help() -> str:
    return f"Comma list of {','.join(target_table.names())} [all, or the device's]."


def _precision_help() -> str:
    per_target = "; ".join(f"{name}: {','.join(info.precisions)}" for name, info in target_table.infos().items())
    return f"Comma list of precisions ({per_target}) [int8]."


def _option_help() -> str:
    known = ", ".join(f"{name}.{o.name}" for name, info in target_table.infos().items() for o in info.options)
    return f"Target option TARGET.KEY=VALUE (repeatable); known: {known}."


def _csv(value: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _print_version(value: bool) -> None:
    if value:
        from edgeres import __version__

        print(f"edgeres {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and the runtimes' own log output."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")):
    _state["debug"] = debug
    from edgeres.progress import set_debug
    from edgeres.targets.base import rarer_collections

    set_debug(debug)
    rarer_collections()  # before any runtime is imported


@app.command()
@handled
def zoo(json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Known architectures."""
    from edgeres.measure.describe import describe_spec
    from edgeres.model.zoo import ZOO

    rows = [describe_spec(s) for s in ZOO.values()]
    if json_out:
        return _print_json(rows)
    from edgeres.tables import print_table

    print_table(["arch", "block", "layers", "stage widths", "input", "classes", "params M", "GMACs"],
                [[r["arch"], r["block"], "-".join(map(str, r["layers"])), "/".join(map(str, r["stage_widths"])),
                  r["input_size"], r["num_classes"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}"] for r in rows])


@app.command()
@handled
def inspect(
    path: str = typer.Argument(..., metavar="MODEL|DIR", help="A checkpoint or a bundle directory."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (inferred when omitted)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Arch, params, MACs, widths per stage and (for a bundle) its artifacts."""
    from edgeres.calibration import Preprocess
    from edgeres.measure.describe import inspect_path

    info = inspect_path(path, arch)
    if json_out:
        return _print_json(info)
    from edgeres.measure.describe import plain

    for key in ("file", "bundle", "format", "file_size_bytes", "arch", "block", "layers", "depth", "stem_width",
                "stage_widths", "shortcut", "num_classes", "input_size", "head"):
        if key in info:
            _say(f"{key:16} {plain(info[key])}")
    _say(f"{'preprocess':16} {Preprocess.from_dict(info['preprocess']).describe()}")
    from edgeres.measure.describe import labels_text

    _say(f"{'labels':16} {labels_text(info.get('labels'), info['num_classes'])}")
    _say(f"{'params':16} {info['params']:,}")
    _say(f"{'MACs':16} {info['macs']:,} ({info['macs'] / 1e6:.1f} M)")
    for s, stage in enumerate(info["inner_widths"]):
        _say(f"{'layer' + str(s + 1):16} out {info['stage_widths'][s]}, inner widths per block {plain(stage)}")
    for a in info.get("artifacts", []):
        _say(f"artifact         {a['target']} {a['precision']} {a['file'] or ''} {a['status']}")


@app.command()
@handled
def doctor(json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Runtimes installed, CPU features and the suggested device profile."""
    from edgeres.device.doctor import doctor as run_doctor

    info = run_doctor()
    if json_out:
        return _print_json(info)
    print(f"python           {info['python']} ({info['platform']})")
    cpu = info["cpu"]
    print(f"cpu              {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores)")
    print(f"cpu features     {' '.join(cpu['features']) or 'none detected'}")
    for name, version in info["runtimes"].items():
        print(f"{name:16} {version or 'not installed'}")
    for name, target in info["targets"].items():
        state = target["version"] and f"ready ({target['dist']} {target['version']})" or f"needs pip install {target['dist']}"
        print(f"{'target ' + name:16} {state}; makes {' '.join(target['precisions'])}")
    print(f"suggested device {info['suggested_profile']}")


@app.command("eval")
@handled
def eval_cmd(
    path: str = typer.Argument(..., metavar="MODEL|DIR", help="A checkpoint (torch fp32) or a bundle directory."),
    data: str = typer.Option(..., "--data", help=".npz (x uint8 N×H×W×3, y) or image folder root/<class>/."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of MODEL (inferred when omitted)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate at most this many images (spread evenly)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads."),
    layers: bool = typer.Option(False, "--layers", help="Per-layer SQNR of every int8 artifact vs the fp32 reference, worst first."),
    remote: Optional[str] = typer.Option(None, "--remote", help="Run every artifact on USER@HOST over ssh (key auth) and compare with here."),
    remote_python: str = typer.Option("python3", "--remote-python", help="Python on the remote host."),
    ssh_option: List[str] = typer.Option([], "--ssh-option", help="Extra ssh -o KEY=VALUE, e.g. Port=2222 (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """Accuracy of a model (torch fp32) or of every artifact in a bundle vs the fp32 reference."""
    from edgeres.calibration import open_dataset
    from edgeres.flags import check_number, check_remote, check_threads
    from edgeres.measure.bundle_eval import check_eval_request, evaluate_path

    check_number("--limit", limit, at_least=1)
    check_threads("--threads", threads)
    check_remote("--remote", remote)  # '' is refused, not read as "here"
    check_eval_request(path, layers)
    if remote is not None:
        return _eval_remote(path, data, remote, remote_python, ssh_option, layers, limit, threads, json_out)
    result = evaluate_path(path, open_dataset(data), arch=arch, limit=limit, threads=threads, layers=layers)
    if json_out:
        return _print_json(result)
    if "artifacts" in result:
        from edgeres.tables import print_eval

        return print_eval(result)
    _say(f"{result['arch']}  top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  ({result['images']} images)")


@app.command("check-preprocess")
@handled
def check_preprocess(
    path: str = typer.Argument(..., metavar="DIR", help="A bundle directory (its fp32 reference is run)."),
    data: str = typer.Option(..., "--data", help="Labelled images: .npz (x, y) or image folder root/<class>/."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many images (spread evenly)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """fp32 top-1 under the standard preprocessing conventions (crop or direct resize, bilinear or bicubic, RGB or BGR, mean/std sets) beside the bundle's."""
    from edgeres.calibration import open_dataset
    from pathlib import Path

    from edgeres.errors import InputError
    from edgeres.flags import check_number, check_threads
    from edgeres.measure.preprocess_check import check_bundle, print_check

    check_number("--limit", limit, at_least=1)
    check_threads("--threads", threads)
    if not Path(path).is_dir():
        raise InputError(f"{path}: not a bundle directory; convert the model first (edgeres convert MODEL --out DIR)")
    result = check_bundle(path, open_dataset(data, require_labels=True), limit=limit, threads=threads)
    if json_out:
        return _print_json(result)
    print_check(result)


def _eval_remote(path, data, remote, remote_python, ssh_option, layers, limit, threads, json_out) -> None:
    from edgeres.calibration import open_dataset
    from edgeres.errors import InputError
    from edgeres.measure.bench import RemoteHost
    from edgeres.measure.remote_eval import device_eval_table, evaluate_bundle_remote

    if layers:
        raise InputError("--layers with --remote: per-layer SQNR runs here; drop one of them")
    host = RemoteHost(remote, python=remote_python, ssh_options=tuple(ssh_option))
    host.validate()
    result = evaluate_bundle_remote(path, open_dataset(data), host, limit=limit, threads=threads)
    if json_out:
        return _print_json(result)
    from edgeres.tables import print_table

    device = result["device"]
    print(f"{result['host']}: {device.get('machine')} {device.get('cpu_model')}; {result['images']} images"
          + ("; EMULATED: accuracy of the emulated ARM kernels, no latency claimed" if result["emulated"] else ""))
    print_table(*device_eval_table(result))
    if any(r["status"] != "ok" for r in result["artifacts"]):
        raise typer.Exit(3)


@app.command()
@handled
def predict(
    bundle: str = typer.Argument(..., metavar="DIR", help="A bundle directory made by convert."),
    inputs: List[str] = typer.Argument(..., metavar="IMAGE...|FOLDER", help="Image files and/or folders of images."),
    target: Optional[str] = typer.Option(None, "--target", help="Which artifact's runtime [int8, else fp32, of the first]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Which artifact's precision [int8, else fp32]."),
    top: int = typer.Option(5, "--top", help="How many classes to show per image."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """Classify images with one artifact of a bundle (its runtime only; no torch)."""
    from edgeres.flags import check_threads
    from edgeres.measure.predict import predict as run_predict

    check_threads("--threads", threads)
    result = run_predict(bundle, list(inputs), target=target, precision=precision, top=top, threads=threads)
    if json_out:
        return _print_json(result)
    for p in result["predictions"]:
        _say(f"{p['file']}: " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top"]))


@app.command("export-app")
@handled
def export_app(
    bundle: str = typer.Argument(..., metavar="DIR", help="A bundle directory made by convert."),
    kind: str = typer.Option(..., "--kind", help="python (standalone classify.py), android (Kotlin) or ios (Swift)."),
    out: str = typer.Option(..., "--out", help="The app folder to write (written whole, then renamed into place)."),
    target: Optional[str] = typer.Option(None, "--target", help="Which artifact's runtime [int8, else fp32, of the first]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Which artifact's precision [int8, else fp32]."),
    force: bool = typer.Option(False, "--force", help="Replace an app exported to --out before."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """An app folder from one artifact: the model, labels.txt and code that runs it with the bundle's preprocessing."""
    from edgeres.app.export import export_app as run_export

    record = run_export(bundle, kind, out, target=target, precision=precision, force=force)
    if json_out:
        return _print_json(record)
    print(f"{out}: {record['kind']} app for {record['target']} {record['precision']}")
    for name in record["files"]:
        print(f"  {name}")


@app.command()
@handled
def convert(
    model: str = typer.Argument(..., help="PyTorch checkpoint (.pt/.pth/.th, or .safetensors), ResNet ONNX (.onnx) or Keras ResNet v1 (.keras/.h5/SavedModel folder)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (inferred when omitted)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration images (.npz or folder)."),
    targets: Optional[str] = typer.Option(None, "--targets", help=_targets_help()),
    precision: Optional[str] = typer.Option(None, "--precision", help=_precision_help()),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile: auto, rpi4, rpi5, x86-avx2, x86-vnni, android-arm64, generic."),
    estimator: str = typer.Option("mse", "--estimator", help="Range estimator: mse (default), percentile, entropy, minmax."),
    quant: str = typer.Option("fast", "--quant", help="int8 preset: fast (plain PTQ), accurate (weight clipping + bias correction) or finetune (quantisation-aware KD on --finetune-data)."),
    calib_images: int = typer.Option(300, "--calib-images", help="Calibration images to use (spread evenly)."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Labelled images to evaluate every artifact on."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Evaluate on at most this many images."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads [the device's]."),
    option: List[str] = typer.Option([], "--option", help=_option_help()),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget", help="Max top-1 drop (pp) per int8 artifact; over-budget ones are re-made with better settings (needs --eval)."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Benchmark the artifacts locally for the report."),
    bench_threads: Optional[str] = typer.Option(None, "--bench-threads", help="Comma list of thread counts [the device's, or 1]."),
    bench_runs: int = typer.Option(50, "--bench-runs", help="Timed inferences per artifact in the local benchmark."),
    prune_ratio: Optional[float] = typer.Option(None, "--prune", help="Prune this share of channels first, in [0, 0.95) (see `edgeres prune`)."),
    prune_importance: str = typer.Option("l2", "--prune-importance", help="Channel importance for --prune: l1, l2, bn-scale, taylor."),
    finetune_data: Optional[str] = typer.Option(None, "--finetune-data", help="Training images for KD recovery after --prune and for --quant finetune."),
    epochs: int = typer.Option(0, "--epochs", help="KD fine-tuning epochs after --prune and of --quant finetune (default 1 there; needs --finetune-data)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --quant finetune (data order, augmentation, torch)."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="Override the model's preprocessing: resize=256,crop=224,mode=shorter_side_crop|direct,filter=bilinear|bicubic|nearest,antialias=true|false,order=RGB|BGR,mean=a,b,c,std=a,b,c,scale=s (any of them), or a JSON file with those keys."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names: a text file with one name per line, or a TSV/CSV with an index column and name columns (e.g. ImageNet's classes.tsv: index, wnid, name); class folders named by any column are matched."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Target compiles at once, each in its own process [from cores and free memory]; 0 compiles (and evaluates) in this process."),
    out: str = typer.Option(..., "--out", help="Bundle directory to write."),
    force: bool = typer.Option(False, "--force", help="Redo every step and replace an existing bundle at --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest and the results document (as report --json) as JSON."),
):
    """Convert MODEL into one bundle with an artifact per target and precision (resumable)."""
    from edgeres.convert.config import ConvertConfig, apply_profile, parse_preprocess_override, parse_target_options
    from edgeres.convert.run import convert as run_convert

    cfg = ConvertConfig(model=model, out=out, arch=arch, calib=calib,
                        targets=_csv(targets) or target_table.names(),
                        precisions=_csv(precision) or ConvertConfig.precisions, estimator=estimator,
                        calib_images=calib_images, eval_data=eval_data, eval_images=eval_images, threads=threads,
                        force=force, target_options=parse_target_options(option), bench=bench,
                        bench_threads=_int_csv(bench_threads, "--bench-threads") or ConvertConfig.bench_threads,
                        bench_runs=bench_runs, prune=prune_ratio, prune_importance=prune_importance,
                        finetune_data=finetune_data, finetune_epochs=epochs, accuracy_budget_pp=accuracy_budget,
                        quant=quant, seed=seed, preprocess=parse_preprocess_override(preprocess), labels=labels, jobs=jobs)
    cfg = apply_profile(cfg, device, targets_given=targets is not None, precisions_given=precision is not None,
                        threads_given=threads is not None, bench_threads_given=bench_threads is not None)
    manifest = run_convert(cfg)
    if json_out:
        from edgeres.measure.report import load_report, results_document

        _print_json({"manifest": manifest, "results": results_document(load_report(out))})
    else:
        _print_conversion(out, manifest)
    if any(a["status"] != "ok" for a in manifest["artifacts"]):
        raise typer.Exit(3)


MAX_BENCH_BATCH = 1024


def _int_csv(value: Optional[str], flag: str) -> tuple[int, ...]:
    from edgeres.errors import InputError

    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise InputError(f"{flag} {value!r}: expected a comma list of integers, e.g. 1,2,4") from None


def _print_conversion(out: str, manifest: dict) -> None:
    """The bundle's files, then the report table (accuracy and latency where measured)."""
    from edgeres.measure.report import report_table
    from edgeres.tables import print_bundle, print_table

    print_bundle(out, manifest)
    print()
    print_table(*report_table(out))


# --- bench / report commands (issue 9) go here ---
@app.command()
@handled
def bench(
    bundle: str = typer.Argument(..., metavar="DIR", help="A bundle directory made by `edgeres convert`."),
    threads: str = typer.Option("1", "--threads", help="Comma list of thread counts, e.g. 1,2,4."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed inferences after the first one."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed inferences per artifact (default 100)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Time inferences for this long instead of --runs."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the random input."),
    remote: Optional[str] = typer.Option(None, "--remote", help="Run on USER@HOST over ssh (key auth) instead of here."),
    remote_python: str = typer.Option("python3", "--remote-python", help="Python on the remote host."),
    ssh_option: List[str] = typer.Option([], "--ssh-option", help="Extra ssh -o KEY=VALUE, e.g. Port=2222 (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """Latency, FPS and peak memory of every artifact, each in a fresh process (locally or on a device)."""
    from edgeres.measure.bench import BenchConfig, RemoteHost, any_failed, bench_bundle, bench_table
    from edgeres.flags import check_number, check_remote, check_threads

    thread_counts = _int_csv(threads, "--threads")
    check_threads("--threads", thread_counts)
    check_number("--warmup", warmup, at_least=0)
    check_number("--runs", runs, at_least=1)
    max_seconds = BenchConfig.run_timeout_s * 2 / 3
    check_number("--seconds", seconds, above=0, at_most=max_seconds,
                 why=f"each run is stopped after {BenchConfig.run_timeout_s:.0f} s, loading and warm-up included")
    check_number("--batch", batch, at_least=1, at_most=MAX_BENCH_BATCH,
                 why="a larger random input does not fit an edge device's memory")
    cfg = BenchConfig(threads=thread_counts, warmup=warmup, runs=None if seconds is not None and runs is None
                      else (runs if runs is not None else 100), seconds=seconds, batch=batch)
    check_remote("--remote", remote)  # '' is refused, not read as "here"
    host = RemoteHost(remote, python=remote_python, ssh_options=tuple(ssh_option)) if remote is not None else None
    result = bench_bundle(bundle, cfg, host)
    if json_out:
        _print_json(result)
    else:
        from edgeres.tables import print_table

        system = result.get("system") or {}
        features = " ".join((system.get("cpu_features") or {}).get("features", [])) or "none detected"
        print(f"{result['host']}: {system.get('cpu_model', '?')} ({system.get('machine', '?')}; {features}), "
              f"governor {system.get('governor') or 'n/a'}, batch {cfg.batch}")
        if (system.get("emulation") or {}).get("emulated"):
            print("EMULATED (" + "; ".join(system["emulation"]["evidence"]) + "): these latencies are the "
                  "emulator's, not the device's")
        print_table(*bench_table(result))
    if any_failed(result):
        raise typer.Exit(3)



@app.command()
@handled
def report(
    bundle: str = typer.Argument(..., metavar="DIR", help="A bundle directory (uses its kept eval and bench runs)."),
    html_out: bool = typer.Option(False, "--html", help="Also write a self-contained DIR/report.html with plots."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Show latency at this thread count (default: the largest benchmarked)."),
    eval_run: Optional[str] = typer.Option(None, "--eval-run", help="Use this kept eval run (DIR/evals/RUN.json) [the most complete]."),
    bench_run: Optional[str] = typer.Option(None, "--bench-run", help="Use this kept bench run (DIR/benches/RUN.json) [the latest per host and threads]."),
    json_out: bool = typer.Option(False, "--json", help="Print the results document as JSON instead of Markdown."),
):
    """Accuracy-drop and latency table (Markdown on stdout and DIR/report.md); --html adds plots."""
    from edgeres.flags import check_threads
    from edgeres.measure.report import write_report

    check_threads("--threads", threads)
    from pathlib import Path

    if (Path(bundle) / "sweep.json").is_file():  # a sweep folder: its own report (edgeres/sweep/report.py)
        from edgeres.sweep.report import read_sweep, write_sweep_report

        swept = write_sweep_report(Path(bundle), read_sweep(Path(bundle)), html_out=html_out)
        _say_document(swept["markdown_text"])
        if html_out:
            print(f"wrote {swept['html']}", file=sys.stderr)
        return
    result = write_report(bundle, html_out=html_out, threads=threads, eval_run=eval_run, bench_run=bench_run)
    if json_out:
        _print_json(result["results"])
    else:
        _say_document(result["markdown_text"])
    if html_out:
        print(f"wrote {result['html']}", file=sys.stderr)


@app.command()
@handled
def prune(
    model: str = typer.Argument(..., help="PyTorch checkpoint (.pt/.pth/.th, or .safetensors), ResNet ONNX (.onnx) or Keras ResNet v1 (.keras/.h5/SavedModel folder)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (inferred when omitted)."),
    ratio: float = typer.Option(..., "--ratio", help="Share of channels to remove, in [0, 0.95)."),
    importance: str = typer.Option("l2", "--importance", help="Channel importance: l1, l2, bn-scale, taylor (needs data)."),
    global_ranking: bool = typer.Option(False, "--global", help="Rank channels across all layers (default: same ratio per layer)."),
    round_to: int = typer.Option(8, "--round-to", help="Round widths to multiples of N (at most 1/8 of a layer's width with --match-macs); 1 disables."),
    match_macs: bool = typer.Option(False, "--match-macs/--nearest", help="--match-macs: round widths so MACs stay at or below the exact ratio's, narrow layers in steps below N; --nearest (default): each width to its nearest multiple of N."),
    steps: int = typer.Option(1, "--steps", help="Reach --ratio in K steps with one recovery epoch between them."),
    reconstruct: bool = typer.Option(True, "--reconstruct/--no-reconstruct", help="With --finetune-data: refit each pruned layer to the unpruned model's outputs by least squares (default); --no-reconstruct: only re-estimate BatchNorm statistics."),
    finetune_data: Optional[str] = typer.Option(None, "--finetune-data", help="Training images (.npz or folder) for reconstruction (or BN re-estimation), taylor and KD fine-tuning."),
    epochs: int = typer.Option(0, "--epochs", help="Epochs of KD fine-tuning from the unpruned model."),
    lr: float = typer.Option(0.005, "--lr", help="Peak learning rate (SGD, warm-up then cosine)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Fine-tuning batch size."),
    kd_loss: str = typer.Option("mse", "--kd-loss", help="Distillation loss: mse (squared error on the logits, default) or kl (softened outputs, T=4)."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, data order and augmentation."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Labelled images: top-1 before/after pruning and per epoch."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Evaluate before/after on at most this many images."),
    out: str = typer.Option(..., "--out", help="Pruned checkpoint to write (.pt)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file (never the input model)."),
    json_out: bool = typer.Option(False, "--json", help="Print the pruning record as JSON."),
):
    """Structured channel pruning (+ optional KD recovery) into a new, smaller checkpoint."""
    _check_prune_numbers(round_to=round_to, steps=steps, epochs=epochs, batch_size=batch_size, seed=seed,
                         eval_images=eval_images)
    from edgeres.calibration import open_dataset
    from edgeres.compress.distill import FinetuneConfig, check_finetune_flags
    from edgeres.sources.loading import load_model
    from edgeres.compress.prune import PruneConfig, check_output_path, prune_loaded, save_pruned

    cfg = PruneConfig(ratio=ratio, importance=importance, global_ranking=global_ranking, round_to=round_to, steps=steps,
                      match_macs=match_macs, reconstruct=reconstruct)
    cfg.validate()
    check_output_path(out, model, force=force)
    check_finetune_flags(epochs, finetune_data)
    finetune = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, loss=kd_loss) if epochs else None
    if finetune is not None:
        finetune.validate()
    train = open_dataset(finetune_data) if finetune_data else None
    evald = open_dataset(eval_data, require_labels=True) if eval_data else None
    loaded = load_model(model, arch)
    outcome = prune_loaded(loaded, cfg, train_data=train, finetune=finetune, eval_data=evald, eval_images=eval_images)
    save_pruned(out, outcome, model, force=force)
    r = outcome.record
    if json_out:
        return _print_json({"out": out, "arch": outcome.spec.name, **r})
    from edgeres.tables import print_table

    rows = [["params", f"{r['params_before']:,}", f"{r['params_after']:,}", f"{r['params_before'] / r['params_after']:.2f}x"],
            ["MACs", f"{r['macs_before']:,}", f"{r['macs_after']:,}", f"{r['macs_ratio']:.2f}x"],
            ["stage widths", "/".join(map(str, r["stage_widths_before"])), "/".join(map(str, r["stage_widths_after"])), ""]]
    if "top1_before" in r:
        rows.append(["top-1 %", f"{r['top1_before']:.2f}", f"{r['top1_after']:.2f}", f"drop {r['top1_drop_pp']:.2f} pp"])
    print_table(["", "before", "after", "change"], rows)
    for row in (r.get("finetune") or {}).get("curve", []):
        if "top1" in row:
            print(f"epoch {row['epoch']:2}  top-1 {row['top1']:.2f} %  (on {r['finetune']['curve_images']} images)")
    print(f"wrote {out} ({outcome.spec.name})")



def _check_prune_numbers(*, round_to: int, steps: int, epochs: int, batch_size: int, seed: int,
                         eval_images: int | None) -> None:
    from edgeres.flags import check_number

    check_number("--round-to", round_to, at_least=1)
    check_number("--steps", steps, at_least=1)
    check_number("--epochs", epochs, at_least=0)
    check_number("--batch-size", batch_size, at_least=1)
    check_number("--seed", seed, at_least=0, at_most=2**63 - 1, why="torch takes 64-bit seeds")
    check_number("--eval-images", eval_images, at_least=1)


@app.command()
@handled
def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for the demo model, data and bundle."),
    train_seconds: float = typer.Option(1800.0, "--train-seconds", help="Stop training early after this many seconds (8 epochs take ~30 s)."),
):
    """Whole pipeline on a built-in model: train a ResNet-20 on scikit-learn digits, convert, evaluate, report."""
    from edgeres.demo import DemoConfig, run_demo
    from edgeres.flags import check_number

    check_number("--train-seconds", train_seconds, above=0)
    result = run_demo(DemoConfig(out=out, train_seconds=train_seconds))
    _print_conversion(result["bundle"], result["manifest"])
    if any(a["status"] != "ok" for a in result["manifest"]["artifacts"]):
        raise typer.Exit(3)



@app.command()
@handled
def sweep(
    model: str = typer.Argument(..., help="PyTorch checkpoint, ResNet ONNX or Keras ResNet v1 (as for convert)."),
    calib: str = typer.Option(..., "--calib", help="Calibration images (.npz or folder)."),
    eval_data: str = typer.Option(..., "--eval", help="Labelled images every trial is evaluated on."),
    out: str = typer.Option(..., "--out", help="Sweep folder: one bundle per conversion, sweep.json, sweep.md."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (inferred when omitted)."),
    prune_ratios: str = typer.Option("0", "--prune", help="Comma list of prune ratios, e.g. 0,0.3,0.5 (0: unpruned)."),
    precision: str = typer.Option("int8", "--precision", help="Comma list of precisions, e.g. fp32,fp16,int8."),
    targets: Optional[str] = typer.Option(None, "--targets", help=_targets_help()),
    estimator: str = typer.Option("mse", "--estimator", help="Comma list of int8 range estimators: mse, percentile, entropy, minmax."),
    threads: str = typer.Option("1", "--threads", help="Comma list of benchmark thread counts, e.g. 1,2,4."),
    calib_images: int = typer.Option(300, "--calib-images", help="Calibration images to use (spread evenly)."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Evaluate on at most this many images."),
    finetune_data: Optional[str] = typer.Option(None, "--finetune-data", help="Training images for KD recovery after pruning."),
    epochs: int = typer.Option(0, "--epochs", help="KD fine-tuning epochs after pruning (needs --finetune-data)."),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget", help="Max top-1 drop (pp) vs the unpruned fp32 model for the best pick."),
    objective: str = typer.Option("latency", "--objective", help="What the best pick minimises: latency or size."),
    address: Optional[str] = typer.Option(None, "--address", help="Join a running Ray cluster (auto or HOST:PORT) instead of an embedded one."),
    remote: Optional[str] = typer.Option(None, "--remote", help="Benchmark on USER@HOST over ssh (key auth)."),
    bench_runs: int = typer.Option(50, "--bench-runs", help="Timed inferences per artifact and thread count."),
    html_out: bool = typer.Option(False, "--html", help="Also write DIR/sweep.html with the Pareto plot."),
    json_out: bool = typer.Option(False, "--json", help="Print sweep.json."),
):
    """Search prune ratio × precision × target × threads on Ray: Pareto front and the best under a budget."""
    from edgeres.sweep.grid import SweepConfig
    from edgeres.sweep.report import table
    from edgeres.sweep.run import sweep as run_sweep

    cfg = SweepConfig(model=model, out=out, calib=calib, eval_data=eval_data, arch=arch,
                      prune=_float_csv(prune_ratios, "--prune"), precisions=_csv(precision),
                      targets=_csv(targets) or target_table.names(), estimators=_csv(estimator),
                      threads=_int_csv(threads, "--threads"), calib_images=calib_images, eval_images=eval_images,
                      finetune_data=finetune_data, finetune_epochs=epochs, accuracy_budget_pp=accuracy_budget,
                      objective=objective, address=address, remote=remote, bench_runs=bench_runs, html=html_out)
    from edgeres.sweep.engine import Terminated

    try:
        doc = run_sweep(cfg)
    except Terminated:
        _err(f"terminated (SIGTERM); finished trials are kept in {out}: re-run the same command to go on")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        _err(f"interrupted; finished trials are kept in {out}: re-run the same command to go on")
        raise typer.Exit(130) from None
    if json_out:
        _print_json(doc)
    else:
        from edgeres.sweep.report import summary_lines
        from edgeres.tables import print_table

        print_table(*table(doc))
        print("\n".join(summary_lines(doc)))
    if any(t["status"] != "ok" for t in doc["trials"]):
        raise typer.Exit(3)


def _float_csv(value: Optional[str], flag: str) -> tuple[float, ...]:
    from edgeres.errors import InputError

    try:
        return tuple(float(v) for v in _csv(value))
    except ValueError:
        raise InputError(f"{flag} {value!r}: expected a comma list of numbers, e.g. 0,0.3,0.5") from None


if __name__ == "__main__":
    app()
