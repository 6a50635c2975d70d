"""The CLI contract for the foundation commands: results on stdout, one-line errors, exit codes."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


@pytest.fixture
def cli():
    """edgeres in this process: these tests read only its output, exit code and files."""
    from tests.conftest import run_cli_here

    return run_cli_here


FRAMEWORKS = ("torch", "tensorflow", "keras", "tf_keras", "onnx", "onnxruntime", "openvino", "ai_edge_litert",
              "executorch", "ray", "transformers")


@functools.cache
def heavy() -> tuple[str, ...]:
    """The frameworks, plus every top-level module of each registered target's runtime, compile tools and what
    its runtime needs beside it (read off the installed distributions' files), so a new target is covered."""
    import re
    from importlib import metadata

    from edgeres.targets import infos

    canon = lambda dist: re.sub(r"[-_.]+", "-", dist).lower()  # noqa: E731
    dists = {canon(d) for info in infos().values() for d in (info.dist, *info.tools, *info.runtime_needs)}
    owned = {module for module, owners in metadata.packages_distributions().items()
             if dists & {canon(o) for o in owners} and not module.startswith("_")
             and module not in sys.stdlib_module_names}
    return tuple(sorted(set(FRAMEWORKS) | owned))


def test_the_heavy_list_covers_every_targets_runtime():
    assert {"executorch", "torch", "tensorflow", "openvino", "onnxruntime", "ai_edge_litert", "nncf"} <= set(heavy())


@pytest.mark.parametrize("code", ["import edgeres", "import edgeres.calibration", "import edgeres.targets",
                                  "from edgeres import cli; import sys; sys.argv=['edgeres','--help']\ntry: cli.app()\nexcept SystemExit: pass"])
def test_light_imports_pull_in_no_runtime(code):
    probe = code + "\nimport sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (heavy(),)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_help_lists_the_commands(cli):
    r = cli("--help")
    assert r.returncode == 0
    for command in ("convert", "eval", "inspect", "zoo", "doctor"):
        assert command in r.stdout


def test_zoo_json_lists_imagenet_and_cifar_resnets(cli):
    names = [row["arch"] for row in json.loads(cli("zoo", "--json").stdout)]
    assert {"resnet18", "resnet50", "resnet152", "resnet20", "resnet110"} <= set(names)


def test_doctor_reports_runtimes_and_a_profile(cli):
    info = json.loads(cli("doctor", "--json").stdout)
    assert info["runtimes"]["onnxruntime"] and info["suggested_profile"]
    assert info["cpu"]["cores"] >= 1


def test_inspect_reports_narrowed_widths(cli, tmp_path):
    import torch

    from edgeres.model.torch_model import build_torch
    from edgeres.model.zoo import ZOO

    spec = ZOO["resnet20"].with_widths(16, (16, 24, 40), (((8,),) * 3, ((16,),) * 3, ((32,),) * 3))
    torch.save(build_torch(spec).state_dict(), tmp_path / "narrow.pt")
    info = json.loads(cli("inspect", tmp_path / "narrow.pt", "--json").stdout)
    assert info["stage_widths"] == [16, 24, 40]
    assert info["inner_widths"][0] == [[8], [8], [8]]
    assert info["macs"] < ZOO["resnet20"].cost()["macs"]


def test_eval_of_a_tiny_checkpoint_prints_json(cli, tiny_checkpoint, tiny_npz):
    r = cli("eval", tiny_checkpoint, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["images"] == 64 and 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.parametrize("case", ["corrupt", "wrong_arch", "empty_npz", "wrong_size", "missing"])
def test_bad_input_exits_2_with_one_line_naming_the_file(cli, tmp_path, tiny_checkpoint, tiny_npz, case):
    model, data, extra = tiny_checkpoint, tiny_npz, []
    if case == "corrupt":
        model = tmp_path / "corrupt.pt"
        model.write_bytes(b"\x80\x02garbage" * 50)
    elif case == "wrong_arch":
        import torch

        from edgeres.model.torch_model import build_torch
        from edgeres.model.zoo import ZOO

        model = tmp_path / "r20.pt"
        torch.save(build_torch(ZOO["resnet20"]).state_dict(), model)
        extra = ["--arch", "resnet18"]
    elif case == "empty_npz":
        data = tmp_path / "empty.npz"
        np.savez(data, x=np.zeros((0, 16, 16, 3), np.uint8), y=np.zeros(0, np.int64))
    elif case == "wrong_size":
        data = tmp_path / "big.npz"
        np.savez(data, x=np.zeros((4, 20, 20, 3), np.uint8), y=np.zeros(4, np.int64))
    elif case == "missing":
        model = tmp_path / "nothing.pt"
    r = cli("eval", model, "--data", data, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeres: error: ")
    named = data if case in ("empty_npz", "wrong_size") else model
    assert str(named) in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.realdata
@pytest.mark.parametrize("arch,top1", [("resnet20", 91.48), ("resnet32", 92.32)])
@pytest.mark.parametrize("with_arch", [True, False])
def test_eval_reproduces_published_cifar_accuracy(cli, cifar, arch, top1, with_arch):
    args = ["eval", cifar / f"{arch}.th", "--data", cifar / "cifar10_dev.npz", "--json"]
    r = cli(*args, *(["--arch", arch] if with_arch else []))
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["top1"] - top1) < 0.01
