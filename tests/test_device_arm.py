"""The ARM side without a device: doctor reading an aarch64 /proc/cpuinfo, the Pi profiles' int8 recipe,
the runner's emulation check, and the runner's eval mode (the logits a device sends back)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeres.device.doctor import cpu_info, suggest_profile
from edgeres.measure import bench_runner
from tests.handmade_bundle import shared_bundle

# as a Raspberry Pi 5 (Cortex-A76) and a Pi 4 (Cortex-A72) print them
PI5_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
PI4_FEATURES = "fp asimd evtstrm crc32 cpuid"
X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse avx2 fma\n"


def _cpuinfo(tmp_path, features: str, name: str = "cpuinfo"):
    path = tmp_path / name
    path.write_text("".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                            f"CPU part\t: 0xd0b\n\n" for i in range(4)) + "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    return str(path)


def test_doctor_reads_the_aarch64_features_line_and_suggests_a_pi5_for_dot_product(tmp_path):
    cpu = cpu_info(_cpuinfo(tmp_path, PI5_FEATURES), machine="aarch64")
    assert {"neon", "dotprod"} <= set(cpu["features"]) and "i8mm" not in cpu["features"]
    assert cpu["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert suggest_profile(cpu, model_file=str(tmp_path / "none"), android_marker=str(tmp_path / "none")) == "rpi5"


def test_doctor_suggests_a_pi4_without_dot_product_and_android_on_android(tmp_path):
    cpu = cpu_info(_cpuinfo(tmp_path, PI4_FEATURES), machine="aarch64")
    assert cpu["features"] == ["neon"]
    assert suggest_profile(cpu, model_file=str(tmp_path / "none"), android_marker=str(tmp_path / "none")) == "rpi4"
    (tmp_path / "build.prop").write_text("ro.product.cpu.abi=arm64-v8a\n")
    with_dot = cpu_info(_cpuinfo(tmp_path, PI5_FEATURES + " i8mm"), machine="aarch64")
    assert "i8mm" in with_dot["features"]
    assert suggest_profile(with_dot, model_file=str(tmp_path / "none"),
                           android_marker=str(tmp_path / "build.prop")) == "android-arm64"


def test_the_board_name_wins_over_the_features(tmp_path):
    board = tmp_path / "model"
    board.write_text("Raspberry Pi 4 Model B Rev 1.4\x00")
    cpu = cpu_info(_cpuinfo(tmp_path, PI5_FEATURES), machine="aarch64")
    assert suggest_profile(cpu, model_file=str(board), android_marker=str(tmp_path / "none")) == "rpi4"


@pytest.mark.parametrize("profile", ["rpi4", "rpi5"])
def test_the_pi_profiles_quantise_onnx_s8s8_whatever_cpu_builds_them(profile):
    from edgeres.calibration.cpu import CpuFeatures
    from edgeres.device.profiles import load_profile
    from edgeres.int8 import choose_recipe
    from edgeres.targets.onnx import INFO

    options = load_profile(profile).options["int8"]
    recipe = choose_recipe(INFO, CpuFeatures("x86", ("avx2",)), options)  # built on an x86 host without VNNI
    assert recipe["activation_type"] == "int8" and recipe["weight_type"] == "int8" and not recipe["reduce_range"]
    on_arm = choose_recipe(INFO, CpuFeatures("arm", ("asimd", "asimddp")))  # what a Pi would choose for itself
    assert {k: recipe[k] for k in ("activation_type", "weight_type", "per_channel", "reduce_range")} == \
        {k: on_arm[k] for k in ("activation_type", "weight_type", "per_channel", "reduce_range")}


def test_the_runner_calls_aarch64_code_under_an_x86_kernel_emulated(monkeypatch):
    monkeypatch.setattr(bench_runner.platform, "machine", lambda: "aarch64")
    found = bench_runner.emulation(cpuinfo=X86_CPUINFO)
    assert found["emulated"] and "x86" in found["evidence"][-1]


def test_the_runner_does_not_call_a_native_machine_emulated(monkeypatch, tmp_path):
    assert not bench_runner.emulation()["emulated"]  # this x86 process on its own kernel
    monkeypatch.setattr(bench_runner.platform, "machine", lambda: "aarch64")
    pi5 = open(_cpuinfo(tmp_path, PI5_FEATURES)).read()
    assert not bench_runner.emulation(cpuinfo=pi5)["emulated"]  # a Pi's own cpuinfo, a native executable
    assert bench_runner.cpu_features(pi5)["features"] == ["asimd", "asimddp"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model):
    return shared_bundle(tmp_path_factory, tiny_model)


@pytest.mark.parametrize("target", ["onnx", "tflite", "openvino"])
def test_runner_eval_mode_gives_the_same_logits_as_the_host_runners(bundle, tmp_path, target):
    from edgeres import targets

    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == target and a["status"] == "ok")
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, str(bench_runner.__file__), "--artifact", str(bundle / artifact["file"]),
                          "--eval-inputs", str(tmp_path / "x.npy"), "--logits-out", str(tmp_path / "y.npy"),
                          "--batch", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == "ok" and doc["images"] == 7 and doc["emulated"] is False
    expected = targets.get_target(target).load_runner(bundle / artifact["file"])(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_runner_eval_mode_refuses_inputs_of_the_wrong_kind(bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 16, 3), np.uint8))
    out = subprocess.run([sys.executable, str(bench_runner.__file__), "--artifact", str(bundle / "model.fp32.onnx"),
                          "--eval-inputs", str(tmp_path / "x.npy"), "--logits-out", str(tmp_path / "y.npy"), "--json"],
                         capture_output=True, text=True, timeout=120)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 3 and doc["status"] == "failed" and "float32" in doc["error"]
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_runner_eval_mode_feeds_pixels_to_a_tflite_that_normalises_itself(app_bundle, tmp_path, precision):
    """A converted .tflite takes pixels; the runner reads how it normalises them from the model and
    turns the normalised inputs remote eval sends back into pixels."""
    from edgeres import targets

    manifest = json.loads((app_bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["precision"] == precision)
    path = app_bundle / artifact["file"]
    from edgeres.targets.tflite import embedded_normalization

    assert embedded_normalization(path) == bench_runner.litert_embedded_normalization(str(path)) is not None
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, str(bench_runner.__file__), "--artifact", str(path),
                          "--eval-inputs", str(tmp_path / "x.npy"), "--logits-out", str(tmp_path / "y.npy"),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = targets.get_target("tflite").load_runner(path)(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-4)
