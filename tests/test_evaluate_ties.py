"""top-1 in eval.json counts the same class as agreement and correct_bits: on tied scores (int8 outputs of a
model ending in softmax tie often) the first class, as argmax picks. Found on the ImageNet ResNet-50: an int8
artifact's top-1 read 89.00 % while its correct_bits held 88.25 %."""

import numpy as np
import pytest

from edgeres.measure.evaluate import compare_to_reference, top1_class, top_classes, topk_accuracy
from edgeres.measure.paired import paired_counts


def test_top1_on_tied_scores_is_the_argmax_class():
    rng = np.random.default_rng(0)
    logits = np.round(rng.random((500, 40)) * 4) / 4  # coarse steps: many rows have tied maxima
    labels = rng.integers(0, 40, 500)
    assert (logits == logits.max(1, keepdims=True)).sum(1).max() > 1
    assert topk_accuracy(logits, labels)["top1"] == round(float((logits.argmax(1) == labels).mean() * 100), 4)


def test_top1_equals_the_share_of_correct_bits():
    rng = np.random.default_rng(1)
    reference = rng.random((400, 10))
    logits = np.round(rng.random((400, 10)) * 3) / 3
    labels = rng.integers(0, 10, 400)
    row = compare_to_reference(logits, reference, labels)
    counts = paired_counts(reference.argmax(1) == labels, logits.argmax(1) == labels).to_dict()
    assert row["top1"] == round((counts["both_right"] + counts["artifact_only"]) / 4, 4)


def _int8_like(rng, n: int, classes: int) -> np.ndarray:
    """Logits on a coarse int8-like grid: many images have two or more classes at the top score."""
    return np.round(rng.normal(size=(n, classes)) * 2) / 2


def test_top1_agreement_and_correct_bits_pick_the_same_class_on_ties():
    # the case: an artifact identical to its reference agrees 100 %, so its top-1 and drop must match too
    rng = np.random.default_rng(2)
    reference = _int8_like(rng, 200, 10)
    labels = rng.integers(0, 10, 200)
    row = compare_to_reference(reference.copy(), reference, labels)
    assert row["top1_tied_images"] > 20
    assert row["agreement_pct"] == 100.0 and row["top1_drop_pp"] == 0.0
    assert row["paired"]["reference_only"] == row["paired"]["artifact_only"] == 0


def test_the_tie_rule_is_the_lowest_class_index_among_the_tied_maxima():
    logits = np.array([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 0.0, 5.0]])
    assert top_classes(logits, 3).tolist() == [[1, 3, 2], [0, 1, 2], [3, 0, 1]]
    assert top1_class(logits).tolist() == [1, 0, 3]
    assert topk_accuracy(logits, np.array([3, 1, 3]))["top1"] == round(100 / 3, 4)  # only the third is right


def test_the_eval_record_counts_images_whose_top_score_is_tied():
    logits = np.array([[0.0, 2.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0]])
    reference = np.eye(4, 3)
    assert topk_accuracy(logits, np.zeros(4, int))["top1_tied_images"] == 2
    assert compare_to_reference(logits, reference, np.zeros(4, int))["top1_tied_images"] == 2
    assert compare_to_reference(logits, reference, None)["top1_tied_images"] == 2  # unlabelled data too
    assert topk_accuracy(reference, np.zeros(4, int))["top1_tied_images"] == 1  # the all-zero row


def test_eval_table_names_the_tie_counts(capsys):
    from edgeres.tables import print_eval

    result = {"images": 200, "reference": {"top1": 39.0, "top5": 60.0, "top1_tied_images": 0},
              "artifacts": [{"target": "onnx", "precision": "int8", "top1": 39.0, "top1_drop_pp": 0.0,
                             "agreement_pct": 100.0, "max_abs_logit_err": 0.1, "top1_tied_images": 71},
                            {"target": "onnx", "precision": "fp32", "top1": 39.0, "top1_drop_pp": 0.0,
                             "agreement_pct": 100.0, "max_abs_logit_err": 0.0, "top1_tied_images": 0}]}
    print_eval(result)
    out = capsys.readouterr().out
    assert "top score tied (top-1 = the lowest tied class index) on onnx int8 71 of 200 images" in out
    assert "reference fp32" not in out and "fp32 0" not in out


def test_class_indices_pack_and_unpack_at_either_width():
    from edgeres.measure.paired import pack_classes, unpack_classes

    for classes in (np.array([0, 999, 7, 65535]), np.array([3, 70000, 0, 12])):
        assert unpack_classes(pack_classes(classes), 4).tolist() == classes.tolist()
    with pytest.raises(ValueError, match="6 bytes of classes for 4 images"):
        unpack_classes(pack_classes(np.arange(3)), 4)


def test_eval_keeps_the_references_top1_class_of_every_image(onnx_bundle, tiny_npz, tmp_path):
    """What another framework fed the same pixels is compared with (the ImageNet Keras check does)."""
    from edgeres.bundle import read_manifest, reference_path
    from edgeres.calibration import Preprocess, open_dataset
    from edgeres.measure.bundle_eval import evaluate_bundle
    from edgeres.measure.paired import unpack_classes
    from edgeres.targets import get_target
    from tests.handmade_bundle import copy_bundle

    bundle = copy_bundle(onnx_bundle, tmp_path / "b")
    data = open_dataset(tiny_npz)
    doc = evaluate_bundle(bundle, data, limit=40)
    manifest = read_manifest(bundle)
    run = get_target("onnx").load_runner(reference_path(bundle, manifest))
    x, _ = next(data.batches(Preprocess.from_dict(manifest["preprocess"]), 40, 40))
    expected = top1_class(np.asarray(run(x)))
    assert len(set(expected.tolist())) > 1  # the classes differ, so the order is checked too
    assert unpack_classes(doc["reference"]["top1_classes"], doc["images"]).tolist() == expected.tolist()
