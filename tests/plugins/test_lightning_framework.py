"""The lightning framework: real Trainer runs on digits through the kernel's ``run_trial``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")

import pytorch_lightning as pl  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tests.conftest import mlk  # noqa: E402

from mlk.compiler import Artifact  # noqa: E402
from mlk.registry import registry  # noqa: E402
from mlk.store import RunStore  # noqa: E402
from mlk.testing import build_spec  # noqa: E402
from mlk.testing.framework import FrameworkContract  # noqa: E402
from mlk.trial import TrialContext, TrialResult, TrialTask, run_trial  # noqa: E402
from mlk_plugins.frameworks.lightning import LightningFramework  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DIGITS = {
    "framework": {"name": "lightning", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 64},
    "data": {"name": "digits"},
    "model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.1},
    "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -2},
                        "hidden": {"type": "int", "minval": 16, "maxval": 32}},
    "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
}


class TestLightningContract(FrameworkContract):
    plugin = "lightning"
    sections = DIGITS
    hparams = {"lr": 0.005, "hidden": 24}
    distributed_tolerance = 1e-5
    distributed_sections = {"model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.0}}


# -- a user's own LightningModule (model._target_) --------------------------------------------------------


class TinyClassifier(pl.LightningModule):
    """A user's module: its own loss, optimiser (SGD) and logged metric names."""

    def __init__(self, width: int, meta: dict[str, Any]) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(meta["input_shape"][0], width),
                                       torch.nn.Tanh(), torch.nn.Linear(width, meta["num_classes"]))

    def forward(self, x: Any) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y, label_smoothing=0.05)
        self.log("fit_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(out, y), on_epoch=True)
        self.log("val_acc", (out.argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def tiny_classifier(width: int = 16, meta: dict[str, Any] | None = None) -> TinyClassifier:
    assert meta is not None
    return TinyClassifier(width, meta)


# -- helpers --------------------------------------------------------------------------------------------------


def train(home: Path, run_id: str, target: int, *, framework: dict[str, Any] | None = None,
          model: dict[str, Any] | None = None, trial_id: int = 1, parent: int | None = None,
          hparams: dict[str, Any] | None = None) -> tuple[TrialResult, RunStore]:
    spec = build_spec({
        "framework": {"name": "lightning", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 32,
                      **(framework or {})},
        "data": {"name": "digits", "subset": 500},
        "model": model or {"name": "digits_mlp", "hidden": 32, "dropout": 0.2},
        "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -1}},
        "searcher": {"name": "single", "metric": "val_loss", "max_resource": 4},
        "reproducibility": {"deterministic": True},
    }, home)
    store = RunStore(home)
    if not any(r["id"] == run_id for r in store.runs()):
        store.create_run(run_id, "lightning", spec.hash, spec.data)
    hp = {"lr": 0.01, **(hparams or {})}
    store.upsert_trial(run_id, trial_id, hp, 99, "running", target, parent)
    task = TrialTask(run_id=run_id, trial_id=trial_id, hparams=hp, seed=99, target=target, spec=spec.data,
                     home=str(home), parent=parent, threads=1)
    result = run_trial(task)
    assert result.error is None, result.error
    return result, store


def metrics(store: RunStore, run_id: str, trial_id: int = 1) -> dict[int, dict[str, float]]:
    return {m["resource"]: m["metrics"] for m in store.metrics(run_id, trial_id)}


def checkpoint_folder(store: RunStore, run_id: str, trial_id: int = 1) -> Path:
    return Path(store.checkpoints(run_id, trial_id)[-1]["uri"].removeprefix("file://"))


def context(home: Path, store: RunStore, run_id: str, target: int, trial_id: int = 1) -> TrialContext:
    spec = build_spec({"framework": {"name": "lightning", "lr": 0.01, "batch_size": 32},
                       "data": {"name": "digits", "subset": 500},
                       "model": {"name": "digits_mlp", "hidden": 32, "dropout": 0.2},
                       "searcher": {"name": "single", "metric": "val_loss", "max_resource": 4}}, home)
    reg = registry()
    storage_cls = reg.get("storage", "local", where="storage.name")
    storage = storage_cls(storage_cls.Config.model_validate(spec.data["storage"]), home)
    task = TrialTask(run_id=run_id, trial_id=trial_id, hparams={"lr": 0.01}, seed=99, target=target,
                     spec=spec.data, home=str(home), threads=1)
    return TrialContext(task, store, storage, reg.hooks)


# -- the plugin ------------------------------------------------------------------------------------------------


def test_importing_the_plugin_loads_neither_torch_nor_lightning() -> None:
    code = ("import sys, mlk_plugins.frameworks.lightning\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning_fabric') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_declares_its_contract() -> None:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."mlk.frameworks"]', 1)[1].split("\n[", 1)[0]
    assert 'lightning = "mlk_plugins.frameworks.lightning:LightningFramework"' in section
    assert registry().get("frameworks", "lightning", where="framework.name") is LightningFramework
    assert LightningFramework.extra == "lightning" and "pytorch_lightning" in LightningFramework.requires
    assert LightningFramework.export_format == "torch" and LightningFramework.max_slots > 1
    assert [n for n, f in LightningFramework.Config.model_fields.items() if not f.description] == []


def test_determinism_names_lightning_and_torch_flags() -> None:
    fw = LightningFramework(LightningFramework.Config(name="lightning"))
    try:
        flags = fw.determinism(True)
        assert flags["lightning.Trainer.deterministic"] is True
        assert flags["torch.use_deterministic_algorithms"] is True and torch.are_deterministic_algorithms_enabled()
        assert flags["bit_exact"] == "yes (CPU)" and flags["pytorch_lightning.version"] == pl.__version__
    finally:
        fw.determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


# -- training ----------------------------------------------------------------------------------------------------


def test_same_numbers_as_the_torch_framework(tmp_path: Path) -> None:
    """The wrapper draws batches, dropout and initial weights exactly as the torch loop does."""
    train(tmp_path, "lightning", 2)
    _, store = train(tmp_path, "torch", 2, framework={"name": "torch"})
    assert metrics(store, "lightning") == metrics(store, "torch")
    ours = load_file(str(checkpoint_folder(store, "lightning") / "lightning" / "checkpoint.safetensors"))
    theirs = load_file(str(checkpoint_folder(store, "torch") / "model.safetensors"))
    for name, tensor in theirs.items():
        assert torch.equal(ours[f"state_dict/model.{name}"], tensor), name


def test_checkpoint_is_safetensors_and_json_with_optimizer_and_loop_state(tmp_path: Path) -> None:
    result, store = train(tmp_path, "run", 2)
    assert result.resource == 2 and result.metrics["val_accuracy"] > 0.6
    folder = checkpoint_folder(store, "run")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {"MANIFEST.json", "trial.json", "lightning/checkpoint.safetensors", "lightning/checkpoint.json"}
    skeleton = json.loads((folder / "lightning" / "checkpoint.json").read_text())
    assert skeleton["epoch"] == 1  # Lightning counts from 0: the second epoch
    assert skeleton["loops"]["fit_loop"]["state_dict"] is not None
    tensors = load_file(str(folder / "lightning" / "checkpoint.safetensors"))
    assert any(k.startswith("optimizer_states/0/state/") and k.endswith("exp_avg") for k in tensors)
    assert json.loads((folder / "trial.json").read_text())["trial_id"] == 1


def test_resume_is_bit_identical_and_a_retry_at_target_trains_nothing(tmp_path: Path) -> None:
    train(tmp_path, "split", 1)
    train(tmp_path, "split", 3)
    _, store = train(tmp_path, "whole", 3)
    assert sorted(metrics(store, "split")) == [1, 2, 3]
    assert metrics(store, "split") == metrics(store, "whole")
    before = metrics(store, "whole")
    again, store = train(tmp_path, "whole", 3)
    assert metrics(store, "whole") == before and again.resource == 3


def test_child_trial_starts_from_parent_with_its_own_lr(tmp_path: Path) -> None:
    train(tmp_path, "pbt", 1, trial_id=1, hparams={"lr": 0.01})
    _, store = train(tmp_path, "pbt", 2, trial_id=2, parent=1, hparams={"lr": 0.002})
    assert sorted(metrics(store, "pbt", 2)) == [2]
    skeleton = json.loads((checkpoint_folder(store, "pbt", 2) / "lightning" / "checkpoint.json").read_text())
    group = skeleton["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 0.002


def test_stop_request_ends_after_a_saved_epoch(tmp_path: Path) -> None:
    home = tmp_path
    store = RunStore(home)
    spec_ctx = context(home, store, "stop", target=4)
    store.create_run("stop", "lightning", "x", spec_ctx.spec)
    store.upsert_trial("stop", 1, {"lr": 0.01}, 99, "running", 4)
    spec_ctx.request_stop()
    LightningFramework(LightningFramework.Config.model_validate(spec_ctx.framework)).train(spec_ctx)
    assert spec_ctx.last_resource == 1
    assert [c["resource"] for c in store.checkpoints("stop", 1)] == [1]


def test_users_lightning_module_trains_and_resumes(tmp_path: Path) -> None:
    model = {"_target_": f"{__name__}:tiny_classifier", "width": 24}
    train(tmp_path, "user-split", 1, model=model)
    train(tmp_path, "user-split", 2, model=model)
    _, store = train(tmp_path, "user", 2, model=model)
    got = metrics(store, "user")
    assert set(got[2]) == {"fit_loss", "val_loss", "val_acc"}
    assert got[2]["val_acc"] > 0.7
    assert metrics(store, "user-split") == got


def test_export_is_a_torch_artifact_every_compiler_takes(tmp_path: Path) -> None:
    _, store = train(tmp_path, "exp", 2)
    ctx = context(tmp_path, store, "exp", target=2)
    fw = LightningFramework(LightningFramework.Config.model_validate(ctx.framework))
    out = tmp_path / "artifact"
    out.mkdir()
    artifact = fw.export(ctx, 2, out)
    assert artifact.format == "torch" and artifact.meta["num_classes"] == 10
    assert {"model.pt2", "model.safetensors", "module.json"} <= {p.name for p in out.iterdir()}
    from mlk_plugins.frameworks.torch.artifacts import load_module

    x = ctx.load_data().val[0][:16]
    logits = fw.runner(Artifact.load(out), threads=1)(x)
    rebuilt = load_module(artifact)
    with torch.no_grad():
        again = rebuilt(torch.as_tensor(x)).numpy()
    assert logits.shape == (16, 10)
    assert abs(logits - again).max() < 1e-5
    weights = load_file(str(out / "model.safetensors"))
    saved = load_file(str(checkpoint_folder(store, "exp") / "lightning" / "checkpoint.safetensors"))
    assert all(torch.equal(saved[f"state_dict/model.{k}"], v) for k, v in weights.items())


@pytest.mark.slow
def test_digits_hb_runs_with_lightning(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_hb", "framework.name=lightning", "searcher.max_resource=3", "~compile",
               "~validate", "~deploy", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)
    show = json.loads(mlk("runs", "show", runs[0]["id"], "--json", cwd=workdir).stdout)
    assert {t["status"] for t in show["trials"]} <= {"completed", "stopped"}
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.8
    assert show["framework_flags"]["flags"]["lightning.Trainer.deterministic"] is True
