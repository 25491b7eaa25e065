"""The torch framework plugin: real training on real data through the kernel's TrialContext.

The context is the kernel's own (``mlk.trial.TrialContext``) over a real ``RunStore`` in a temporary
folder, a minimal folder storage defined here and pluggy hooks built from ``mlk.hookspecs``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

from safetensors.torch import load_file, save_file  # noqa: E402

import mlk.hookspecs  # noqa: E402
from mlk.errors import UserError  # noqa: E402
from mlk.registry import PluginEntry, registry  # noqa: E402
from mlk.sections import StorageConfig  # noqa: E402
from mlk.spec import validate_section  # noqa: E402
from mlk.storage import Storage  # noqa: E402
from mlk.store import RunStore  # noqa: E402
from mlk.trial import TrialContext, TrialTask  # noqa: E402
from mlk_plugins.frameworks.torch import TorchFramework, TorchTrial  # noqa: E402
from mlk_plugins.frameworks.torch._impl import (  # noqa: E402
    augment_images,
    flatten_state,
    shift_images,
    trial_for,
    unflatten_state,
)

REPO = Path(__file__).resolve().parents[2]
#: What pyproject.toml declares; registered by hand when the distribution is not installed.
ENTRY_POINTS = {
    ("frameworks", "torch"): "mlk_plugins.frameworks.torch:TorchFramework",
    ("datasets", "digits"): "mlk_plugins.datasets.digits:DigitsDataset",
    ("datasets", "cifar10"): "mlk_plugins.datasets.cifar10:Cifar10Dataset",
    ("models", "digits_mlp"): "mlk_plugins.models.digits_mlp:DigitsMLP",
    ("models", "cifar_cnn"): "mlk_plugins.models.cifar_cnn:CifarCNN",
}
PLUGIN_MODULES = (
    "mlk_plugins.frameworks.torch",
    "mlk_plugins.datasets.digits",
    "mlk_plugins.datasets.cifar10",
    "mlk_plugins.models.digits_mlp",
    "mlk_plugins.models.cifar_cnn",
)


# -- a real context, minus the parts still being written ---------------------------------------------


class FolderStorage(Storage):
    """The smallest storage plugin: keys are files below ``<home>/storage``."""

    name = "test-folder"

    def __init__(self, home: Path) -> None:
        super().__init__(StorageConfig(), home)
        self.root = home / "storage"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, src: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def get_file(self, key: str, dest: Path) -> None:
        if not self._path(key).is_file():
            raise FileNotFoundError(key)
        shutil.copyfile(self._path(key), dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(f"{prefix}/{p.relative_to(base).as_posix()}" for p in base.rglob("*") if p.is_file())


class EventLog:
    """Hook implementations recording the events a trial fires."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    @mlk.hookspecs.hookimpl
    def mlk_trial_reported(self, run_id: str, trial_id: int, resource: int, metrics: dict[str, Any]) -> None:
        self.events.append(("reported", trial_id, resource))

    @mlk.hookspecs.hookimpl
    def mlk_checkpoint_saved(self, run_id: str, trial_id: int, resource: int, uri: str) -> None:
        self.events.append(("checkpoint", trial_id, resource))


@pytest.fixture
def plugins_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the builtin datasets and models findable by name, installed or not (PYTHONPATH checkout)."""
    reg = registry()
    for (group, name), value in ENTRY_POINTS.items():
        if name not in reg.groups[group]:
            monkeypatch.setitem(reg.groups[group], name, PluginEntry(group, name, value, "mlk-kernel", "0"))


class Harness:
    """Builds TrialContexts sharing one home folder, run store and storage."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.store = RunStore(home)
        self.storage = FolderStorage(home)
        self.log = EventLog()
        pm = pluggy.PluginManager(mlk.hookspecs.PROJECT)
        pm.add_hookspecs(mlk.hookspecs)
        pm.register(self.log)
        self.hooks = pm.hook

    def context(self, *, target: int, run_id: str = "run", trial_id: int = 0, seed: int = 1234,
                hparams: dict[str, Any] | None = None, framework: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                deterministic: bool = True, parent: int | None = None,
                metric: str = "val_loss") -> TrialContext:
        spec = {
            "framework": {"name": "torch", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 32,
                          **(framework or {})},
            "data": data or {"name": "digits"},
            "model": model or {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.2},
            "searcher": {"name": "single", "metric": metric, "mode": "min"},
            "storage": {"name": "test-folder", "keep": {"trial_latest": 1, "trial_best": 1}},
            "reproducibility": {"deterministic": deterministic},
        }
        hp = {"lr": 0.01, "hidden": 32, **(hparams or {})}
        task = TrialTask(run_id=run_id, trial_id=trial_id, hparams=hp, seed=seed, target=target, spec=spec,
                         home=str(self.home), parent=parent)
        return TrialContext(task, self.store, self.storage, self.hooks)

    def framework(self, ctx: TrialContext) -> TorchFramework:
        # As the kernel's run_trial does: validate the hyperparameter-bound section with the Config.
        return TorchFramework(validate_section(TorchFramework.Config, ctx.framework, "framework"))

    def train(self, ctx: TrialContext) -> None:
        self.framework(ctx).train(ctx)

    def metrics(self, run_id: str, trial_id: int = 0) -> dict[int, dict[str, float]]:
        return {m["resource"]: m["metrics"] for m in self.store.metrics(run_id, trial_id)}

    def model_sha(self, run_id: str, trial_id: int = 0) -> str:
        latest = self.store.checkpoints(run_id, trial_id)[-1]
        return latest["manifest"]["files"]["model.safetensors"]["sha256"]


@pytest.fixture
def harness(tmp_path: Path, plugins_registered: None) -> Any:
    h = Harness(tmp_path / "home")
    yield h
    h.store.close()


# -- contract ------------------------------------------------------------------------------------------


def test_plugin_modules_import_without_heavy_frameworks() -> None:
    code = (
        "import sys\n"
        f"for m in {PLUGIN_MODULES!r}: __import__(m)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'safetensors') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_framework_declares_its_contract() -> None:
    text = (REPO / "pyproject.toml").read_text()
    for (group, name), value in ENTRY_POINTS.items():
        section = text.split(f'[project.entry-points."mlk.{group}"]', 1)[1].split("\n[", 1)[0]
        assert f'{name} = "{value}"' in section
    assert TorchFramework.name == "torch"
    assert TorchFramework.extra == "torch"
    assert set(TorchFramework.requires) == {"torch", "safetensors", "numpy"}
    assert TorchFramework.Config.model_config["extra"] == "forbid"
    undocumented = [n for n, f in TorchFramework.Config.model_fields.items() if not f.description]
    assert undocumented == []


def test_config_errors_name_the_key() -> None:
    with pytest.raises(UserError, match=r"framework\.lr"):
        validate_section(TorchFramework.Config, {"name": "torch", "lr": 0}, "framework")
    with pytest.raises(UserError, match=r"framework\.optimiser: unknown key.*did you mean 'optimizer'"):
        validate_section(TorchFramework.Config, {"name": "torch", "optimiser": "sgd"}, "framework")


def test_determinism_returns_the_flags_it_set() -> None:
    fw = TorchFramework(TorchFramework.Config(name="torch"))
    try:
        flags = fw.determinism(True)
        assert flags["torch.use_deterministic_algorithms"] is True
        assert torch.are_deterministic_algorithms_enabled()
        assert flags["torch.num_threads"] == torch.get_num_threads()
    finally:
        fw.determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


# -- training ----------------------------------------------------------------------------------------


def test_training_on_digits_learns(harness: Harness) -> None:
    ctx = harness.context(target=3)
    harness.train(ctx)
    metrics = harness.metrics("run")
    assert sorted(metrics) == [1, 2, 3]
    assert set(metrics[3]) == {"train_loss", "val_loss", "val_accuracy"}
    assert metrics[3]["val_accuracy"] > 0.85  # chance is 0.1
    assert metrics[3]["val_loss"] < metrics[1]["val_loss"]
    assert ctx.last_resource == 3
    assert torch.get_num_threads() == ctx.threads
    # Every epoch reported; the checkpoint was due at the target only (storage.checkpoint_every_s).
    assert harness.log.events == [("reported", 0, 1), ("reported", 0, 2), ("reported", 0, 3), ("checkpoint", 0, 3)]
    assert [c["resource"] for c in harness.store.checkpoints("run", 0)] == [3]
    files = set(harness.store.checkpoints("run", 0)[0]["manifest"]["files"])
    assert files == {"model.safetensors", "optimizer.safetensors"}


def test_resumed_trial_is_bit_identical(harness: Harness) -> None:
    harness.train(harness.context(target=2, run_id="split"))
    resumed = harness.context(target=4, run_id="split")
    harness.train(resumed)
    harness.train(harness.context(target=4, run_id="straight"))
    split, straight = harness.metrics("split"), harness.metrics("straight")
    assert sorted(split) == [1, 2, 3, 4]
    assert split == straight
    assert harness.model_sha("split") == harness.model_sha("straight")


def test_checkpoint_of_an_earlier_version_still_loads(harness: Harness, tmp_path: Path) -> None:
    """Earlier versions kept the optimiser skeleton and the trial info in optimizer.json and trial.json."""
    from safetensors import safe_open

    ctx = harness.context(target=2, trial_id=0)
    harness.train(ctx)
    with ctx.restore_checkpoint() as found:
        assert found is not None
        folder, _ = found
        new = tmp_path / "new"
        shutil.copytree(folder, new)
    old = tmp_path / "old"
    old.mkdir()
    for name, key, legacy in (("model.safetensors", "mlk.trial", "trial.json"),
                              ("optimizer.safetensors", "mlk.optimizer", "optimizer.json")):
        with safe_open(str(new / name), framework="pt") as f:
            (old / legacy).write_text(f.metadata()[key])
        save_file(load_file(str(new / name)), str(old / name))  # without the metadata

    def loaded(folder: Path, trial_id: int, lr: float) -> Any:
        other = harness.context(target=3, trial_id=trial_id, hparams={"lr": lr})
        trial = trial_for(other, harness.framework(other).config)
        trial.setup()
        trial.load(folder)
        return trial

    for trial_id, lr in ((0, 0.01), (5, 0.002)):  # same trial: its own settings; another: keeps its lr
        a, b = loaded(new, trial_id, lr), loaded(old, trial_id, lr)
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"] == lr
        assert a.optimizer.state and len(a.optimizer.state) == len(b.optimizer.state)
        for pa, pb in zip(a.module.state_dict().values(), b.module.state_dict().values()):
            assert torch.equal(pa, pb)
        for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deterministic_runs_repeat_and_seeds_matter(harness: Harness) -> None:
    for run_id, seed in (("a", 7), ("b", 7), ("c", 8)):
        harness.train(harness.context(target=2, run_id=run_id, seed=seed))
    assert harness.metrics("a") == harness.metrics("b")
    assert harness.model_sha("a") == harness.model_sha("b")
    assert harness.metrics("a") != harness.metrics("c")


def test_retry_at_target_trains_nothing(harness: Harness) -> None:
    harness.train(harness.context(target=2))
    before, events = harness.metrics("run"), list(harness.log.events)
    harness.train(harness.context(target=2))
    assert harness.metrics("run") == before
    assert harness.log.events == events


def test_stop_request_ends_after_a_saved_epoch(harness: Harness) -> None:
    ctx = harness.context(target=5)
    ctx.request_stop()
    harness.train(ctx)
    assert ctx.last_resource == 1
    assert [c["resource"] for c in harness.store.checkpoints("run", 0)] == [1]


def test_child_trial_starts_from_parent_with_its_own_lr(harness: Harness) -> None:
    harness.train(harness.context(target=1, trial_id=0, hparams={"lr": 0.01}))
    child_ctx = harness.context(target=2, trial_id=1, parent=0, hparams={"lr": 0.002})
    trial = trial_for(child_ctx, harness.framework(child_ctx).config)
    trial.setup()
    assert trial.restore() == 1
    assert trial.optimizer.param_groups[0]["lr"] == 0.002
    assert trial.optimizer.state  # the parent's Adam moments came along
    harness.train(harness.context(target=2, trial_id=1, parent=0, hparams={"lr": 0.002}))
    assert sorted(harness.metrics("run", 1)) == [2]


def test_evaluate_test_split_only_when_asked(harness: Harness) -> None:
    ctx = harness.context(target=2)
    fw = harness.framework(ctx)
    with pytest.raises(UserError, match="no checkpoint"):
        fw.evaluate(ctx, "test")
    fw.train(ctx)
    assert not any(k.startswith("test_") for k in harness.metrics("run")[2])
    test = fw.evaluate(harness.context(target=2), "test")
    assert set(test) == {"test_loss", "test_accuracy"}
    assert test["test_accuracy"] > 0.8


def test_nondeterministic_mode_still_trains(harness: Harness) -> None:
    sgd = {"optimizer": "sgd", "momentum": 0.9}
    harness.train(harness.context(target=1, deterministic=False, framework=sgd))
    assert not torch.are_deterministic_algorithms_enabled()
    assert harness.metrics("run")[1]["val_accuracy"] > 0.3


# -- a user's trial class --------------------------------------------------------------------------


class SmoothedSGDTrial(TorchTrial):
    """A custom loop: SGD, label smoothing, a counted train step and an extra metric."""

    instances: list[SmoothedSGDTrial] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0
        self.instances.append(self)

    def build_model(self) -> Any:
        model = super().build_model()
        model.custom = True
        return model

    def build_optimizer(self, model: Any) -> Any:
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss(self, outputs: Any, targets: Any) -> Any:
        return torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)

    def train_batch(self, inputs: Any, targets: Any) -> float:
        self.steps += 1
        return super().train_batch(inputs, targets)

    def evaluate(self, loader: Any) -> dict[str, float]:
        batches = list(loader)
        metrics = super().evaluate(batches)
        with torch.no_grad():
            hits = [(self.model(x).topk(2, dim=1).indices == y[:, None]).any(1) for x, y in batches]
        top2 = sum(int(h.sum()) for h in hits)
        return {**metrics, "top2": top2 / sum(len(y) for _, y in batches)}


def test_user_trial_class_overrides_the_loop(harness: Harness) -> None:
    SmoothedSGDTrial.instances.clear()
    ctx = harness.context(target=2, framework={"trial": f"{__name__}:SmoothedSGDTrial"})
    harness.train(ctx)
    (trial,) = SmoothedSGDTrial.instances
    assert trial.model.custom is True
    assert isinstance(trial.optimizer, torch.optim.SGD)
    n_train = len(ctx.load_data().train[1])
    assert trial.steps == 2 * math.ceil(n_train / 32)
    metrics = harness.metrics("run")[2]
    assert set(metrics) == {"train_loss", "val_loss", "val_accuracy", "val_top2"}
    assert metrics["val_top2"] >= metrics["val_accuracy"] > 0.8


def test_trial_must_name_a_torch_trial_subclass(harness: Harness) -> None:
    ctx = harness.context(target=1, framework={"trial": "json:dumps"})
    with pytest.raises(UserError, match=r"not a subclass of .*TorchTrial"):
        harness.train(ctx)
    ctx = harness.context(target=1, framework={"trial": "no_such_module_xyz:Trial"})
    with pytest.raises(UserError, match=r"framework\.trial: cannot import module"):
        harness.train(ctx)


# -- CIFAR-shaped data and the CNN -------------------------------------------------------------------


def write_tiny_cifar(folder: Path, per_batch: int = 20) -> None:
    """An extracted ``cifar-10-batches-py`` folder in the official format, with random images."""
    import numpy as np

    rng = np.random.RandomState(0)
    folder.mkdir(parents=True)
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {b"batch_label": name.encode(), b"labels": rng.randint(0, 10, per_batch).tolist(),
                 b"data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar_cnn_trains_an_epoch_with_augmentation(harness: Harness, tmp_path: Path) -> None:
    write_tiny_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    augment = {"width_shift": 0.125, "height_shift": 0.125, "horizontal_flip": True}
    ctx = harness.context(
        target=1, framework={"batch_size": 16, "lr": 0.001},
        data={"name": "cifar10", "path": str(tmp_path / "cifar"), "download": False, "augment": augment},
        model={"name": "cifar_cnn"},
    )
    harness.train(ctx)
    metrics = harness.metrics("run")[1]
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    # With augmentation on, a repeat is still bit-identical.
    harness.train(harness.context(
        target=1, run_id="again", framework={"batch_size": 16, "lr": 0.001},
        data={"name": "cifar10", "path": str(tmp_path / "cifar"), "download": False, "augment": augment},
        model={"name": "cifar_cnn"},
    ))
    assert harness.metrics("again")[1] == metrics


def test_augmentation_needs_images(harness: Harness) -> None:
    ctx = harness.context(target=1)
    ctx.load_data()
    ctx.data = {"name": "digits", "augment": {"horizontal_flip": True}}  # as if a flat dataset took the key
    with pytest.raises(UserError, match=r"data\.augment: augmentation needs images"):
        trial_for(ctx, harness.framework(ctx).config).setup()


# -- augmentation ------------------------------------------------------------------------------------


def test_shift_images_moves_content_and_fills_zeros() -> None:
    img = torch.arange(1, 13, dtype=torch.float32).reshape(1, 1, 3, 4)  # rows [1..4], [5..8], [9..12]
    right = shift_images(img, torch.tensor([1]), torch.tensor([0]))
    assert right[0, 0].tolist() == [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]]
    up_left = shift_images(img, torch.tensor([-2]), torch.tensor([-1]))
    assert up_left[0, 0].tolist() == [[7, 8, 0, 0], [11, 12, 0, 0], [0, 0, 0, 0]]
    # Per-image shifts, every channel moved alike.
    two = torch.cat([img, img * 10]).expand(2, 3, 3, 4).contiguous()
    out = shift_images(two, torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert out.shape == (2, 3, 3, 4)
    assert torch.equal(out[0, 2], torch.tensor([[0.0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]))
    assert torch.equal(out[1, 1], right[0, 0] * 10)


def test_augment_images_draws_flips_and_bounded_shifts() -> None:
    images = torch.rand(64, 3, 8, 8)
    same = augment_images(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, images)

    flipped = augment_images(images, horizontal_flip=True, generator=torch.Generator().manual_seed(0))
    is_flip = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)]
    assert all(torch.equal(f, i) or fl for f, i, fl in zip(flipped, images, is_flip))
    assert 10 < sum(is_flip) < 54

    shift = {"width_shift": 0.25, "height_shift": 0.125}
    shifted = augment_images(images, **shift, generator=torch.Generator().manual_seed(1))
    offsets = set()
    for out, img in zip(shifted, images):
        found = [(dx, dy) for dx in range(-2, 3) for dy in range(-1, 2)
                 if torch.equal(out, shift_images(img[None], torch.tensor([dx]), torch.tensor([dy]))[0])]
        assert found, "each output is the input shifted by at most 2 pixels across and 1 down/up"
        offsets.add(found[0])
    assert len(offsets) > 5
    again = augment_images(images, **shift, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, shifted)


# -- optimiser state without pickle --------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95)),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["adam", "sgd", "adamw"])
def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path, make: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = make(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    state = opt.state_dict()
    tensors, skeleton = flatten_state(state)
    assert all("/" in k for k in tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(skeleton))
    loaded = load_file(str(tmp_path / "o.safetensors"))
    back = unflatten_state(json.loads((tmp_path / "o.json").read_text()), loaded)

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return (type(b) is dict and list(a) == list(b)
                    and all(type(k) is type(kb) for k, kb in zip(a, b)) and all(same(a[k], b[k]) for k in a))
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    assert same(state, back)
    fresh = make(model.parameters())
    fresh.load_state_dict(back)
    assert same(fresh.state_dict(), state)


def test_flatten_state_handles_odd_keys_and_refuses_objects() -> None:
    state = {"a": (1, 2.5, None), 3: [torch.ones(2)], (1, "x"): "t", "__tuple__": True}
    tensors, skeleton = flatten_state(state)
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["a"] == (1, 2.5, None) and back[(1, "x")] == "t" and back["__tuple__"] is True
    assert torch.equal(back[3][0], torch.ones(2))
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"bad": object()})


def test_a_trial_runs_from_a_thread_other_than_the_main_one(tmp_path: Path) -> None:
    # Only the main thread may set signal handlers: a trial started from another thread (a notebook's,
    # a benchmark's) trains without installing its SIGTERM handler, and the process's stays in place.
    import signal
    import threading

    from tests.plugins.digits_trials import digits_task

    from mlk.trial import run_trial

    task, store = digits_task(tmp_path, "threaded", framework="torch", slots=1, target=2)
    before = signal.getsignal(signal.SIGTERM)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(run_trial(task)))
    worker.start()
    worker.join()
    (result,) = results
    assert result.error is None and result.resource == 2
    assert [m["resource"] for m in store.metrics("threaded", 1)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is before
