"""The keras framework plugin: real training on sklearn's digits through the kernel, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("sklearn")

from mlk.compiler import CompileInputs
from mlk.registry import registry
from mlk.testing.framework import FrameworkContract
from mlk.trial import TrialContext, TrialTask

SECTIONS = {
    "framework": {"name": "keras", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 64},
    "data": {"name": "digits"},
    "model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.1},
    "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -2},
                        "hidden": {"type": "int", "minval": 16, "maxval": 32}},
    "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
}
HPARAMS = {"lr": 0.005, "hidden": 24}
REPO = Path(__file__).resolve().parents[2]
#: Relative difference allowed between two ranks and one process on the same global batch: only the
#: order of floating-point sums differs (each rank's shard, then the ring all-reduce). Dropout is off
#: for the comparison: each rank draws its own masks for its shard.
TOLERANCE = 1e-5


class TestKerasFramework(FrameworkContract):
    plugin = "keras"
    sections = SECTIONS
    hparams = HPARAMS
    distributed_tolerance = TOLERANCE
    distributed_sections = {"model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.0}}


def trained(tmp_path: Path, epochs: int = 2) -> tuple[TrialContext, Any]:
    """A digits trial trained ``epochs`` epochs through ``run_trial``, and a context over it."""
    contract = TestKerasFramework()
    _, store = contract.run(tmp_path, "t", target=epochs)
    reg = registry()
    run = store.runs()[0]
    storage_cls = reg.get("storage", "local", where="storage")
    storage = storage_cls(storage_cls.Config.model_validate(run["spec"]["storage"]), tmp_path)
    task = TrialTask(run_id="t", trial_id=1, hparams=HPARAMS, seed=1234, target=epochs, spec=run["spec"],
                     home=str(tmp_path))
    return TrialContext(task, store, storage, reg.hooks), store


def test_reports_learning_on_digits(tmp_path: Path) -> None:
    _, store = TestKerasFramework().run(tmp_path, "learn", target=3)
    reports = [r["metrics"] for r in store.metrics("learn", 1)]
    assert reports[-1]["val_loss"] < reports[0]["val_loss"]
    assert reports[-1]["val_accuracy"] > 0.8  # chance is 0.1
    flags = [e for e in store.events("learn") if e["kind"] == "framework_flags"]
    assert flags and flags[-1]["payload"]["flags"]["tf.config.experimental.enable_op_determinism"] is True


def test_checkpoint_is_npz_without_pickle(tmp_path: Path) -> None:
    ctx, _ = trained(tmp_path, epochs=1)
    with ctx.restore_checkpoint() as found:
        assert found is not None
        folder, resource = found
        names = sorted(p.name for p in folder.iterdir())
        assert resource == 1 and {"model.npz", "optimizer.npz", "keras.json"} <= set(names)
        with np.load(folder / "optimizer.npz", allow_pickle=False) as opt:
            iterations = opt["v000"]  # Adam's step counter comes first
        info = json.loads((folder / "keras.json").read_text())
    steps = -(-1078 // 64)  # digits train split, batch 64
    assert int(iterations) == steps and info["optimizer"][0][0].endswith("iteration")
    assert [p for p, _ in info["model"]] == ["fc1/kernel", "fc1/bias", "logits/kernel", "logits/bias"]


def test_augmentation_shifts_and_flips_like_torch() -> None:
    import tensorflow as tf

    from mlk_plugins.frameworks.keras._impl import augment_images

    images = np.arange(2 * 3 * 6 * 8, dtype=np.float32).reshape(2, 3, 6, 8) + 1
    seed = tf.constant([7, 3], tf.int32)
    shifted = augment_images(tf.constant(images), seed, width_shift=0.25, height_shift=0.2).numpy()
    assert np.array_equal(shifted, augment_images(tf.constant(images), seed, width_shift=0.25,
                                                  height_shift=0.2).numpy())
    for original, out in zip(images, shifted):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-1, 2)
                   if np.array_equal(out, _shift(original, dx, dy))]
        assert matches, "every image is its original shifted by at most 2 columns and 1 row, zero filled"
    flipped = [augment_images(tf.constant(images), tf.constant([s, 0], tf.int32), horizontal_flip=True).numpy()
               for s in range(8)]
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
        plugin = "keras"
        sections = {
            "framework": {"name": "keras", "optimizer": "adam", "lr": 0.002, "batch_size": 32},
            "data": {"name": "cifar10", "path": str(archive.parent),
                     "augment": {"width_shift": 0.1, "height_shift": 0.1, "horizontal_flip": True}},
            "model": {"name": "cifar_cnn"},
            "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
        }

    Cifar().test_resume_continues_from_checkpoint_bit_identically(tmp_path / "resume")


@pytest.mark.slow
def test_export_onnx_and_tflite_match_keras(tmp_path: Path) -> None:
    from mlk_plugins.compilers.keras_export import KerasOnnx, KerasTflite
    from mlk_plugins.compilers.tflite import TfliteCompiler
    from mlk_plugins.frameworks.keras import KerasConfig, KerasFramework

    ctx, _ = trained(tmp_path, epochs=2)
    framework = KerasFramework(KerasConfig.model_validate(ctx.framework))
    (tmp_path / "export").mkdir()
    artifact = framework.export(ctx, 2, tmp_path / "export")
    assert artifact.format == "keras" and artifact.file.is_file()
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

    onnx, got = build(KerasOnnx, "onnx")
    assert onnx.format == "onnx" and onnx.meta["input_name"] == "x" and onnx.meta["batch_size"] is None
    np.testing.assert_allclose(got, reference, atol=1e-5)
    tflite, got = build(KerasTflite, "tflite")
    assert tflite.format == "tflite" and tflite.meta["tflite"]["input_nhwc"] is False
    np.testing.assert_allclose(got, reference, atol=1e-5)
    _, got = build(KerasTflite, "tflite_int8", quantize="int8")
    assert float((got.argmax(1) == reference.argmax(1)).mean()) > 0.9
    _, got = build(TfliteCompiler, "onnx2tf")  # the tflite compiler's route, from keras_onnx's artifact
    np.testing.assert_allclose(got, reference, atol=1e-4)


@pytest.mark.slow
def test_two_processes_with_one_seed_report_identical_metrics(tmp_path: Path) -> None:
    outputs = []
    for name in ("one", "two"):
        script = (
            "import json, sys; from pathlib import Path\n"
            "sys.path.insert(0, 'tests/plugins')\n"
            "from test_keras_framework import TestKerasFramework\n"
            f"_, store = TestKerasFramework().run(Path({str(tmp_path / name)!r}), 'r', target=2)\n"
            "print(json.dumps([m['metrics'] for m in store.metrics('r', 1)]))\n"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


# -- data parallel: resources.slots_per_trial ------------------------------------------------------------

RANK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from mlk.distributed import Distributed
from mlk.trial import TrialTask, run_trial
from mlk_plugins.frameworks.keras import _impl

task_file, place, out = sys.argv[1:]
train = _impl.KerasTrial.run

def run_and_dump(self):  # this rank's replica after training, for the test to compare
    train(self)
    np.savez(Path(out) / f"rank{self.parallel.rank}.npz", *[v.numpy() for v in self.model.weights])

_impl.KerasTrial.run = run_and_dump
result = run_trial(TrialTask(**json.loads(Path(task_file).read_text())), Distributed.from_dict(json.loads(place)))
if result.error is not None:
    sys.exit(result.error)
"""


def slots_task(home: Path, run_id: str, slots: int) -> tuple[TrialTask, Any]:
    """Two epochs of the digits MLP (no dropout) with a global batch of 32 on ``slots`` processes."""
    from tests.plugins.digits_trials import digits_task

    return digits_task(home, run_id, framework="keras", slots=slots, target=2)


def run_ranks(task: TrialTask, folder: Path) -> list[dict[str, np.ndarray]]:
    """``task`` on two rank processes started here (as the kernel's supervisor does), each saving its
    replica's weights after training; returns them by rank."""
    from dataclasses import asdict

    from mlk.distributed import layout

    (folder / "task.json").write_text(json.dumps(asdict(task), default=str))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(folder / "task.json"),
                               json.dumps(place.to_dict()), str(folder)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for place in layout(2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    weights = []
    for rank in range(2):
        with np.load(folder / f"rank{rank}.npz", allow_pickle=False) as saved:
            weights.append({k: saved[k] for k in saved.files})
    return weights


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    from mlk.trial import run_trial

    task, store = slots_task(tmp_path, "one", slots=1)
    one = run_trial(task)
    assert one.error is None, one.error
    task, store = slots_task(tmp_path, "two", slots=2)
    (tmp_path / "ranks").mkdir()
    replicas = run_ranks(task, tmp_path / "ranks")
    single = {m["resource"]: m["metrics"] for m in store.metrics("one", 1)}
    ranks = {m["resource"]: m["metrics"] for m in store.metrics("two", 1)}
    assert sorted(single) == sorted(ranks) == [1, 2]  # rank 0 alone recorded, once per epoch
    for epoch in (1, 2):
        for key, value in single[epoch].items():
            assert ranks[epoch][key] == pytest.approx(value, rel=TOLERANCE), (epoch, key)
    assert ranks[2]["val_accuracy"] > 0.5  # it learned (chance: 0.1)
    for name, value in replicas[0].items():  # the replicas are the same model, bit for bit
        np.testing.assert_array_equal(replicas[1][name], value)
    checkpoints = []
    for run_id in ("one", "two"):
        folder = Path(store.checkpoints(run_id, 1)[-1]["uri"].removeprefix("file://"))
        with np.load(folder / "model.npz", allow_pickle=False) as saved:
            checkpoints.append({k: saved[k] for k in saved.files})
    assert sorted(checkpoints[1]) == sorted(checkpoints[0])  # one checkpoint format for both
    for i, name in enumerate(sorted(checkpoints[0])):
        np.testing.assert_array_equal(checkpoints[1][name], replicas[0][f"arr_{i}"])  # rank 0 saved its own
        np.testing.assert_allclose(checkpoints[1][name], checkpoints[0][name], rtol=TOLERANCE, atol=1e-6)
