"""Scores of models that output probabilities (a head ending in a softmax, as every Keras classifier): ``predict``
and the exported app show the model's own probabilities, not a second softmax of them (which flattens a
1000-class ImageNet model's scores to ~0.001)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeres import cli
from tests.conftest import make_images, tiny_spec
from tests.handmade_bundle import build_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def softmax_bundle(tmp_path_factory):
    """A handmade ONNX bundle of the tiny ResNet whose head ends in a softmax, and three photos."""
    import torch

    from edgeres.model.torch_model import build_torch, randomize_bn
    from edgeres.model.zoo import Head

    torch.manual_seed(0)
    spec = dataclasses.replace(tiny_spec(), head_layers=Head(softmax=True))
    model = randomize_bn(build_torch(spec))
    with torch.no_grad():  # a confident model: a wide spread of logits, so its probabilities are far from uniform
        model.linear.weight.mul_(25.0)
    root = tmp_path_factory.mktemp("softmax")
    build_bundle(root / "bundle", spec, model, targets=("onnx",))
    x, _ = make_images(3, 16, seed=3)
    photos = root / "photos"
    photos.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(photos / f"p{i}.png")
    return root / "bundle", photos


def _model_outputs(bundle, photos):
    from edgeres.calibration import Preprocess
    from edgeres.calibration.readers import read_image
    from edgeres.targets import get_target

    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocess.from_dict(manifest["preprocess"]).with_layout("NCHW")
    run = get_target("onnx").load_runner(bundle / "onnx" / "model.fp32.onnx")
    return {p.name: np.asarray(run(pre(read_image(str(p))[None])))[0] for p in sorted(photos.iterdir())}


def test_predict_scores_are_the_models_own_probabilities(softmax_bundle):
    bundle, photos = softmax_bundle
    expected = _model_outputs(bundle, photos)
    r = runner.invoke(cli.app, ["predict", str(bundle), str(photos), "--top", "10", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert "own probabilities" in doc["scores"]
    for p in doc["predictions"]:
        probs = expected[p["file"].rsplit("/", 1)[-1]]
        assert probs.max() > 0.3  # far from uniform (1/10): a second softmax would give < 0.25 here
        assert [t["index"] for t in p["top"]] == list(np.argsort(-probs, kind="stable")[:10])
        assert [t["score"] for t in p["top"]] == pytest.approx(np.sort(probs)[::-1], abs=1e-5)
        assert sum(t["score"] for t in p["top"]) == pytest.approx(1.0, abs=1e-4)


def test_logit_models_still_get_the_softmax_of_their_logits(app_bundle, tmp_path):
    x, _ = make_images(1, 16, seed=4)
    Image.fromarray(x[0]).save(tmp_path / "a.png")
    r = runner.invoke(cli.app, ["predict", str(app_bundle), str(tmp_path / "a.png"), "--top", "10", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["scores"] == "softmax of the model's logits"
    assert sum(t["score"] for t in doc["predictions"][0]["top"]) == pytest.approx(1.0, abs=1e-4)


def test_the_python_app_shows_the_same_scores_as_predict(softmax_bundle, tmp_path, capsys):
    bundle, photos = softmax_bundle
    out = tmp_path / "app"
    r = runner.invoke(cli.app, ["export-app", str(bundle), "--kind", "python", "--target", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    spec = importlib.util.spec_from_file_location("classify_softmax", out / "classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.CONFIG["output"]["probabilities"] is True
    capsys.readouterr()
    code = module.main([str(photos), "--top", "3", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    theirs = json.loads(out.out)
    r = runner.invoke(cli.app, ["predict", str(bundle), str(photos), "--top", "3", "--json"])
    ours = json.loads(r.stdout)
    by_file = {p["file"].rsplit("/", 1)[-1]: p["top"] for p in ours["predictions"]}
    for p in theirs["predictions"]:
        mine = by_file[p["file"].rsplit("/", 1)[-1]]
        assert [t["index"] for t in p["top"]] == [t["index"] for t in mine]
        assert [t["score"] for t in p["top"]] == pytest.approx([t["score"] for t in mine], abs=1e-5)
