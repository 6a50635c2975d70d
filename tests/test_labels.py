"""Class names: ``convert --labels FILE`` (one name per line, or a TSV/CSV with an index and name columns such as
ImageNet's classes.tsv), checked before any work; labels from any route are strings on one line; class folders
named by any label column (name or wnid) map to the right indices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_images
from tests.test_safety import Case, _assert_one_line, _invoke, _no_partial, env, runner  # noqa: F401
from tests.test_safety_flags import _convert, no_work  # noqa: F401

WNIDS = [f"n0{i:07d}" for i in range(10)]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
         "cock", "hen", "ostrich"]


def classes_tsv(path: Path, order=range(10)) -> Path:
    """An ImageNet-style classes.tsv (index, wnid, name), rows in ``order``."""
    path.write_text("index\twnid\tname\n" + "".join(f"{i}\t{WNIDS[i]}\t{NAMES[i]}\n" for i in order))
    return path


# -- reading the file ---------------------------------------------------------------------------------

def test_one_name_per_line(tmp_path):
    from edgeres.model.labels import read_labels

    path = tmp_path / "names.txt"
    path.write_text("".join(f"{n}\r\n" for n in NAMES))
    got = read_labels(path)
    assert got.names == tuple(NAMES) and got.keys is None


def test_tsv_with_index_column_is_ordered_by_index_and_keeps_the_other_columns_as_keys(tmp_path):
    from edgeres.model.labels import read_labels

    got = read_labels(classes_tsv(tmp_path / "classes.tsv", order=[3, 1, 0, 2, 9, 8, 7, 6, 5, 4]))
    assert got.names == tuple(NAMES)
    assert got.keys == tuple((w,) for w in WNIDS)


def test_csv_without_header_takes_a_numeric_first_column_as_the_index(tmp_path):
    from edgeres.model.labels import read_labels

    path = tmp_path / "classes.csv"
    path.write_text("".join(f'{i},{WNIDS[i]},"{NAMES[i]}, the fish"\n' for i in reversed(range(10))))
    got = read_labels(path)
    assert got.names[0] == "tench, the fish" and got.keys[9] == (WNIDS[9],)


def test_the_real_imagenet_classes_tsv_reads_as_1000_names_with_wnids():
    from edgeres.model.labels import read_labels

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet" / "classes.tsv"
    if not path.is_file():
        path = Path("/work/shared/data/imagenet/classes.tsv")
    if not path.is_file():
        pytest.skip("../shared/data/imagenet/classes.tsv is not here")
    got = read_labels(path)
    assert len(got.names) == 1000 and got.names[0] == "tench" and got.keys[0] == ("n01440764",)


BAD_FILES = [
    ("control.txt", "".join(f"{n}\n" for n in NAMES[:4]) + "ham\x1b[2Jmer\n" + "".join(f"{n}\n" for n in NAMES[5:]),
     r"class name 4 \(ham\\x1b\[2Jmer\) contains the control character U\+001B"),
    ("blank.txt", "a\n\nb\n", "line 2 is empty"),
    ("dup.tsv", "index\tname\n0\ta\n0\tb\n", "index 0 appears twice"),
    ("gap.tsv", "index\tname\n0\ta\n2\tb\n", "index 1 is missing"),
    ("ragged.tsv", "index\tname\n0\ta\n1\n", "line 3 has 1 column"),
    ("latin1.txt", "caf\xe9\n", "is not UTF-8 text"),
]


@pytest.mark.parametrize("name,text,expect", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_labels_file_is_refused_in_one_line_naming_the_line_or_index(env, tmp_path, no_work, name, text, expect):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1") if name.startswith("latin1") else text.encode())
    code, _, stderr = _invoke(_convert(tmp_path, env, "--labels", path))
    _assert_one_line(code, stderr, Case(name, None, f"--labels {path}: .*{expect}"))
    assert not (tmp_path / "bundle").exists()
    _no_partial(tmp_path)


def test_a_labels_file_with_another_class_count_is_refused_before_the_build(env, tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("".join(f"{n}\n" for n in NAMES[:9]))
    code, _, stderr = _invoke(_convert(tmp_path, env, "--labels", path))
    _assert_one_line(code, stderr, Case("count", None, "holds 9 class names but the model has 10 classes"))
    assert not (tmp_path / "bundle").exists()


# -- labels from other routes (issue 33 item 8) -----------------------------------------------------------

@pytest.mark.parametrize("labels,expect", [
    (list(range(10)), r"label 0 is 0 \(int\), not a string"),
    ([None] * 10, r"label 0 is None \(NoneType\), not a string"),
    ([*NAMES[:3], "two\nlines", *NAMES[4:]], "label 3 .* contains the control character U\\+000A"),
    ("airplane", "labels are str, not a list of names"),
])
def test_a_checkpoint_with_unusable_labels_is_refused_by_inspect_and_convert(tmp_path, tiny_model, labels, expect):
    import torch

    from edgeres.sources.loading import SPEC_KEY

    spec, model = tiny_model
    record = spec.to_dict()
    record["labels"] = labels
    path = tmp_path / "odd.pt"
    torch.save({SPEC_KEY: record, "state_dict": model.state_dict()}, path)
    for command in (["inspect", path], ["convert", path, "--targets", "onnx", "--precision", "fp32",
                                        "--no-bench", "--out", tmp_path / "bundle"]):
        code, _, stderr = _invoke(command)
        _assert_one_line(code, stderr, Case("labels", None, expect))
    assert not (tmp_path / "bundle").exists()


# -- names travel; folders named by any column map to their index ----------------------------------------

@pytest.fixture(scope="module")
def wnid_folder(tmp_path_factory):
    """Class folders named by wnid, for 4 of the 10 classes (so sorting the folders would misnumber them)."""
    root = tmp_path_factory.mktemp("wnids")
    x, _ = make_images(8, 16, seed=3)
    for i, img in enumerate(x):
        cls = (2, 5, 7, 9)[i % 4]
        (root / WNIDS[cls]).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / WNIDS[cls] / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled_bundle(tmp_path_factory, tiny_checkpoint, tiny_npz):
    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("labelled")
    out = tmp / "bundle"
    r = run_cli("convert", tiny_checkpoint, "--calib", tiny_npz, "--targets", "onnx", "--precision", "fp32,int8",
                "--labels", classes_tsv(tmp / "classes.tsv"), "--no-bench", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_names_reach_the_manifest_and_the_onnx_metadata(labelled_bundle):
    import onnx

    manifest = json.loads((labelled_bundle / "manifest.json").read_text())
    assert manifest["labels"] == NAMES and manifest["arch"]["labels"] == NAMES
    assert manifest["arch"]["label_keys"] == [[w] for w in WNIDS]
    for artifact in manifest["artifacts"]:
        props = {p.key: p.value for p in onnx.load(labelled_bundle / artifact["file"]).metadata_props}
        assert json.loads(props["edgeres.labels"]) == NAMES


def test_predict_prints_the_names(labelled_bundle, wnid_folder):
    from edgeres import cli

    r = runner.invoke(cli.app, ["predict", str(labelled_bundle), str(next(wnid_folder.rglob("*.png"))), "--json"])
    assert r.exit_code == 0, r.output
    assert {t["label"] for t in json.loads(r.stdout)["predictions"][0]["top"]} <= set(NAMES)


def test_eval_numbers_wnid_folders_by_the_recorded_keys(labelled_bundle, wnid_folder):
    from edgeres.calibration import open_dataset
    from edgeres.measure.evaluate import check_labels

    manifest = json.loads((labelled_bundle / "manifest.json").read_text())
    ds = open_dataset(wnid_folder)
    check_labels(ds, 10, manifest["arch"]["labels"], manifest["arch"]["label_keys"])
    assert sorted(set(ds.labels.tolist())) == [2, 5, 7, 9]
    from edgeres import cli

    r = runner.invoke(cli.app, ["eval", str(labelled_bundle), "--data", str(wnid_folder), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 8


def test_folders_named_by_class_name_map_too(labelled_bundle, tmp_path):
    from edgeres.calibration import open_dataset
    from edgeres.measure.evaluate import check_labels

    for name in ("Hen", "tench"):
        (tmp_path / name).mkdir()
        Image.fromarray(make_images(1, 16)[0][0]).save(tmp_path / name / "a.png")
    ds = open_dataset(tmp_path)
    check_labels(ds, 10, NAMES, [[w] for w in WNIDS])
    assert ds.labels.tolist() == [8, 0]


def test_calibration_takes_a_folder_of_unlabelled_images(env, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(make_images(12, 16, seed=4)[0]):
        Image.fromarray(img).save(folder / f"{i}.jpg")
    code, _, stderr = _invoke(["convert", env["checkpoint"], "--targets", "onnx", "--precision", "int8",
                               "--calib", folder, "--no-bench", "--out", tmp_path / "bundle"])
    assert code == 0, stderr
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["artifacts"][0]["status"] == "ok"


def test_inspect_and_the_report_show_the_names_and_the_preprocessing(labelled_bundle):
    from edgeres import cli

    shown = runner.invoke(cli.app, ["inspect", str(labelled_bundle)])
    assert shown.exit_code == 0, shown.output
    assert "labels           tench, goldfish, great white shark, … (10 names)" in shown.stdout, shown.stdout
    report = runner.invoke(cli.app, ["report", str(labelled_bundle)])
    assert report.exit_code == 0, report.output
    assert "Preprocessing: 16×16 as is (no resize); RGB" in report.stdout, report.stdout
    assert "classes: tench, goldfish, great white shark, … (10 names)" in report.stdout
