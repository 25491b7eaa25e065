"""The jax framework plugin: real training on sklearn's digits through the kernel, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

from mlk.compiler import CompileInputs
from mlk.registry import registry
from mlk.testing.framework import FrameworkContract
from mlk.trial import TrialContext, TrialTask

SECTIONS = {
    "framework": {"name": "jax", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 64},
    "data": {"name": "digits"},
    "model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.1},
    "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -2},
                        "hidden": {"type": "int", "minval": 16, "maxval": 32}},
    "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
}
HPARAMS = {"lr": 0.005, "hidden": 24}
REPO = Path(__file__).resolve().parents[2]
#: Relative difference allowed between two ranks and one process on the same global batch: only the
#: order of floating-point sums differs (XLA's all-reduce against one device's reduction); dropout
#: masks are the same (partitionable threefry), so dropout stays on.
TOLERANCE = 1e-4


class TestJaxFramework(FrameworkContract):
    plugin = "jax"
    sections = SECTIONS
    hparams = HPARAMS
    distributed_tolerance = TOLERANCE


def trained(tmp_path: Path, epochs: int = 2) -> tuple[TrialContext, Any]:
    """A digits trial trained ``epochs`` epochs through ``run_trial``, and a context over it."""
    _, store = TestJaxFramework().run(tmp_path, "t", target=epochs)
    reg = registry()
    run = store.runs()[0]
    storage_cls = reg.get("storage", "local", where="storage")
    storage = storage_cls(storage_cls.Config.model_validate(run["spec"]["storage"]), tmp_path)
    task = TrialTask(run_id="t", trial_id=1, hparams=HPARAMS, seed=1234, target=epochs, spec=run["spec"],
                     home=str(tmp_path))
    return TrialContext(task, store, storage, reg.hooks), store


def test_reports_learning_on_digits_and_records_flags(tmp_path: Path) -> None:
    _, store = TestJaxFramework().run(tmp_path, "learn", target=3)
    reports = [r["metrics"] for r in store.metrics("learn", 1)]
    assert reports[-1]["val_loss"] < reports[0]["val_loss"]
    assert reports[-1]["val_accuracy"] > 0.8  # chance is 0.1
    flags = [e for e in store.events("learn") if e["kind"] == "framework_flags"][-1]["payload"]["flags"]
    assert flags["deterministic"] is True and flags["jax_default_prng_impl"] == "threefry2x32"


def test_checkpoint_is_npz_of_the_pytrees(tmp_path: Path) -> None:
    ctx, _ = trained(tmp_path, epochs=1)
    with ctx.restore_checkpoint() as found:
        assert found is not None
        folder, resource = found
        info = json.loads((folder / "jax.json").read_text())
        with np.load(folder / "params.npz", allow_pickle=False) as params:
            shapes = [list(params[f"v{i:03d}"].shape) for i in range(len(params.files))]
        with np.load(folder / "optimizer.npz", allow_pickle=False) as opt:
            count = int(opt["v000"])  # Adam's step counter comes first
    assert resource == 1 and count == -(-1078 // 64)  # digits train split, batch 64 (last batch padded)
    assert [p for p, _ in info["params"]] == ["fc1/bias", "fc1/kernel", "logits/bias", "logits/kernel"]
    assert shapes == [[24], [64, 24], [10], [24, 10]]


def test_padded_batches_cover_every_example_once() -> None:
    from mlk_plugins.frameworks.jax._impl import padded_batches

    batches = padded_batches(np.arange(10, dtype=np.int32), 4)
    assert [len(i) for i, _ in batches] == [4, 4, 4]
    real = np.concatenate([i[m > 0] for i, m in batches])
    assert sorted(real.tolist()) == list(range(10)) and batches[-1][1].tolist() == [1, 1, 0, 0]
    unpadded = padded_batches(np.arange(10, dtype=np.int32), 4, pad=False)
    assert [i.tolist() for i, _ in unpadded] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(m is None for _, m in unpadded)


def test_augmentation_shifts_and_flips_like_torch() -> None:
    import jax

    from mlk_plugins.frameworks.jax._impl import augment_images

    images = np.arange(2 * 3 * 6 * 8, dtype=np.float32).reshape(2, 3, 6, 8) + 1
    key = jax.random.key(7)
    shifted = np.asarray(augment_images(images, key, width_shift=0.25, height_shift=0.2))
    assert np.array_equal(shifted, np.asarray(augment_images(images, key, width_shift=0.25, height_shift=0.2)))
    for original, out in zip(images, shifted):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-1, 2)
                   if np.array_equal(out, _shift(original, dx, dy))]
        assert matches, "every image is its original shifted by at most 2 columns and 1 row, zero filled"
    flipped = [np.asarray(augment_images(images, jax.random.key(s), horizontal_flip=True)) for s in range(8)]
    for out in flipped:
        for original, image in zip(images, out):
            assert np.array_equal(image, original) or np.array_equal(image, original[..., ::-1])
    assert any(not np.array_equal(out, images) for out in flipped)


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(image)
    _, h, w = image.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = image[:, i - dy, j - dx]
    return out


@pytest.mark.slow
def test_cifar_cnn_trains_with_augmentation(tmp_path: Path) -> None:
    from benchmarks.frameworks.cifar_format import write_archive

    archive = write_archive(tmp_path / "cifar" / "cifar-10-python.tar.gz", per_batch=60)

    class Cifar(FrameworkContract):
        plugin = "jax"
        sections = {
            "framework": {"name": "jax", "optimizer": "adam", "lr": 0.002, "batch_size": 32},
            "data": {"name": "cifar10", "path": str(archive.parent),
                     "augment": {"width_shift": 0.1, "height_shift": 0.1, "horizontal_flip": True}},
            "model": {"name": "cifar_cnn"},
            "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
        }

    Cifar().test_resume_continues_from_checkpoint_bit_identically(tmp_path / "resume")


@pytest.mark.slow
def test_export_tflite_and_onnx_match_jax(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from mlk_plugins.compilers.jax_export import JaxOnnx, JaxTflite
    from mlk_plugins.compilers.tflite import TfliteCompiler
    from mlk_plugins.frameworks.jax import JaxConfig, JaxFramework

    ctx, _ = trained(tmp_path, epochs=2)
    framework = JaxFramework(JaxConfig.model_validate(ctx.framework))
    (tmp_path / "export").mkdir()
    artifact = framework.export(ctx, 2, tmp_path / "export")
    assert artifact.format == "jax" and artifact.file.is_file()
    x, y = ctx.load_data().test
    reference = framework.runner(artifact, 1)(x)
    assert float((reference.argmax(1) == y).mean()) > 0.5  # chance is 0.1
    inputs = CompileInputs(calibration=ctx.load_data().train[0][:100], data=None, threads=1, seed=0)

    def build(cls: Any, name: str, **options: Any) -> Any:
        (tmp_path / name).mkdir()
        compiler = cls(cls.Config.model_validate({"name": cls.name, **options}))
        source = onnx if cls is TfliteCompiler else artifact
        made = compiler.compile(source, tmp_path / name, inputs)
        return made, compiler.runner(made, 1)(x)

    tflite, got = build(JaxTflite, "tflite")
    assert tflite.format == "tflite" and tflite.meta["tflite"]["input"]["shape"] == [-1, 64]
    np.testing.assert_allclose(got, reference, atol=1e-5)
    _, got = build(JaxTflite, "tflite_dynamic", quantize="dynamic")
    assert float((got.argmax(1) == reference.argmax(1)).mean()) > 0.9
    onnx, got = build(JaxOnnx, "onnx")
    assert onnx.format == "onnx" and onnx.meta["input_name"] == "x"
    np.testing.assert_allclose(got, reference, atol=1e-5)
    _, got = build(TfliteCompiler, "onnx2tf")  # the tflite compiler's route, from jax_onnx's artifact
    np.testing.assert_allclose(got, reference, atol=1e-4)


@pytest.mark.slow
def test_two_processes_with_one_seed_report_identical_metrics(tmp_path: Path) -> None:
    outputs = []
    for name in ("one", "two"):
        script = (
            "import json, sys; from pathlib import Path\n"
            "sys.path.insert(0, 'tests/plugins')\n"
            "from test_jax_framework import TestJaxFramework\n"
            f"_, store = TestJaxFramework().run(Path({str(tmp_path / name)!r}), 'r', target=2)\n"
            "print(json.dumps([m['metrics'] for m in store.metrics('r', 1)]))\n"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


# -- data parallel: resources.slots_per_trial ------------------------------------------------------------


def run_slots(home: Path, run_id: str, slots: int) -> tuple[Any, Any]:
    """Two epochs of the digits MLP (dropout on) with a global batch of 32 on ``slots`` rank processes."""
    from tests.plugins.digits_trials import digits_task

    from mlk.trial import run_trial

    task, store = digits_task(home, run_id, framework="jax", slots=slots, target=2, dropout=0.2)
    return run_trial(task), store


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    one, store = run_slots(tmp_path, "one", slots=1)
    two, store = run_slots(tmp_path, "two", slots=2)
    assert one.error is None and two.error is None, (one.error, two.error)
    single = {m["resource"]: m["metrics"] for m in store.metrics("one", 1)}
    ranks = {m["resource"]: m["metrics"] for m in store.metrics("two", 1)}
    assert sorted(single) == sorted(ranks) == [1, 2]  # rank 0 alone recorded, once per epoch
    for epoch in (1, 2):
        for key, value in single[epoch].items():
            assert ranks[epoch][key] == pytest.approx(value, rel=TOLERANCE), (epoch, key)
    assert ranks[2]["val_accuracy"] > 0.5  # it learned (chance: 0.1)
    weights = []
    for run_id in ("one", "two"):
        folder = Path(store.checkpoints(run_id, 1)[-1]["uri"].removeprefix("file://"))
        with np.load(folder / "params.npz", allow_pickle=False) as params:
            weights.append({k: params[k] for k in params.files})
    for name, value in weights[0].items():
        np.testing.assert_allclose(weights[1][name], value, rtol=TOLERANCE, atol=1e-6)


def test_jax_onnx_without_a_keras_twin_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from mlk.compiler import Artifact, Unavailable
    from mlk_plugins.compilers.jax_export import keras_twin

    recipe = {"model": {"name": "resnet18", "width": 4}, "meta": {"input_shape": [3, 8, 8], "num_classes": 10,
                                                                  "layout": "nchw"}, "params": []}
    (tmp_path / "module.json").write_text(json.dumps(recipe))
    artifact = Artifact("jax", tmp_path, {"input_shape": [3, 8, 8], "file": "params.npz"})
    with pytest.raises(Unavailable, match="no keras implementation"):
        keras_twin(artifact, None)
