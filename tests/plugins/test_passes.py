"""The torch optimisation passes (mlk_plugins.compilers.passes) on networks trained here on real digits.

Batch-norm folding must not change what a model computes; pruning must reach the sparsity asked for,
channel pruning must really shrink the network, and both must keep the accuracy after a short
fine-tune; a distilled student must do about as well as the same student trained on labels alone.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mlk.errors import UserError  # noqa: E402
from mlk.spec import validate_section  # noqa: E402
from mlk_plugins.compilers import passes  # noqa: E402
from mlk_plugins.models.cifar_cnn import CifarCNN  # noqa: E402
from mlk_plugins.models.digits_mlp import DigitsMLP  # noqa: E402
from mlk_plugins.models.resnet18 import ResNet18  # noqa: E402

FLAT_META = {"input_shape": [64], "num_classes": 10, "layout": "flat"}
IMAGE_META = {"input_shape": [1, 8, 8], "num_classes": 10, "layout": "nchw"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: these small models gain nothing from a second one and slow down many times
    over when the other core is busy (OpenMP threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """scikit-learn's digits in [0, 1], shuffled once: 1200 train, 300 val, 297 test; flat and as 1x8x8."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.RandomState(0).permutation(len(bunch.target))
    x = (bunch.data[order] / 16.0).astype(np.float32)
    y = bunch.target[order].astype(np.int64)
    parts = {"train": slice(0, 1200), "val": slice(1200, 1500), "test": slice(1500, None)}
    out = {}
    for split, part in parts.items():
        out[f"{split}_x"], out[f"{split}_y"] = x[part], y[part]
        out[f"{split}_img"] = x[part].reshape(-1, 1, 8, 8)
    return out


def build(cls: Any, meta: dict[str, Any], **options: Any) -> nn.Module:
    torch.manual_seed(0)
    return cls(validate_section(cls.Config, options, "model")).build("torch", meta)


def max_diff(a: nn.Module, b: nn.Module, x: np.ndarray) -> float:
    inputs = torch.as_tensor(x)
    with torch.no_grad():
        return float((a.eval()(inputs) - b.eval()(inputs)).abs().max())


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return passes.evaluate(model, x, y)["accuracy"]


# -- networks with batch norm ----------------------------------------------------------------------------


class BNMLP(nn.Module):
    """digits_mlp with batch norm: Linear - BatchNorm1d - ReLU - Linear."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(torch.flatten(x, 1)))))


class BNCNN(nn.Module):
    """A cifar_cnn-like network with batch norm: one conv-BN pair adjacent in a Sequential, one only
    connected in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(F.relu(self.bn(self.conv(x))))


class Branchy(nn.Module):
    """A convolution whose output feeds its batch norm and also a residual add: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        return self.fc(torch.flatten(self.bn(c) + c, 1))


class Untraceable(nn.Module):
    """Control flow on the input's values, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.sum() > 0:
            h = h * 1.0
        return self.fc(h)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def trained_bnmlp(digits: dict[str, np.ndarray]) -> nn.Module:
    torch.manual_seed(0)
    return passes.finetune(BNMLP(), digits["train_x"], digits["train_y"], epochs=3, lr=1e-2, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def trained_resnet(digits: dict[str, np.ndarray]) -> nn.Module:
    model = build(ResNet18, IMAGE_META, width=8)
    return passes.finetune(model, digits["train_img"], digits["train_y"], epochs=1, lr=3e-3, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def trained_mlp(digits: dict[str, np.ndarray]) -> nn.Module:
    model = build(DigitsMLP, FLAT_META, hidden=64)
    return passes.finetune(model, digits["train_x"], digits["train_y"], epochs=8, lr=1e-2, batch_size=64, seed=0)


# -- helpers ------------------------------------------------------------------------------------------------


def test_the_module_loads_without_torch() -> None:
    code = "import sys, mlk_plugins.compilers.passes; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr


def test_size_helpers_count_parameters_nonzeros_and_bytes() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0] = 1.0
    assert passes.count_parameters(model) == 4 * 3 + 3 + 3 + 3
    # weight[0, 0], the dense bias (random) and the batch norm's scales (ones; its shifts are zeros).
    assert passes.count_nonzero(model) == 1 + 3 + 3
    # 21 float32 parameters, running mean and var (6 float32) and num_batches_tracked (one int64).
    assert passes.state_dict_bytes(model) == (21 + 6) * 4 + 8
    assert passes.size_facts(model) == {"parameters": 21, "nonzero": 7, "state_dict_bytes": 116}


def test_evaluate_is_cross_entropy_and_argmax_accuracy(trained_mlp: nn.Module, digits: dict) -> None:
    x, y = torch.as_tensor(digits["val_x"]), torch.as_tensor(digits["val_y"])
    with torch.no_grad():
        out = trained_mlp.eval()(x)
    metrics = passes.evaluate(trained_mlp, digits["val_x"], digits["val_y"])
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert metrics["accuracy"] > 0.9  # eight short epochs on digits


def test_finetune_is_deterministic_from_its_seed_and_leaves_the_global_rng_alone(digits: dict) -> None:
    results = []
    for _ in range(2):
        model = build(DigitsMLP, FLAT_META, hidden=16, dropout=0.3)
        state = torch.get_rng_state()
        passes.finetune(model, digits["train_x"][:300], digits["train_y"][:300], epochs=2, batch_size=32, seed=7)
        assert torch.equal(torch.get_rng_state(), state)
        assert not model.training
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    other = build(DigitsMLP, FLAT_META, hidden=16, dropout=0.3)
    passes.finetune(other, digits["train_x"][:300], digits["train_y"][:300], epochs=2, batch_size=32, seed=8)
    assert not torch.equal(other.state_dict()["fc1.weight"], results[0]["fc1.weight"])


def test_a_last_batch_of_one_example_joins_the_previous_batch(digits: dict) -> None:
    # 65 examples in batches of 64 would leave one example alone, which batch norm cannot train on.
    model = BNMLP(8)
    passes.finetune(model, digits["train_x"][:65], digits["train_y"][:65], epochs=1, batch_size=64)


# -- batch-norm folding ------------------------------------------------------------------------------------


def test_folding_a_dense_layer_and_its_batch_norm_keeps_the_outputs(trained_bnmlp: nn.Module, digits: dict) -> None:
    trained_bnmlp.train()
    folded, report = passes.fold_batchnorm(trained_bnmlp)
    assert trained_bnmlp.training and isinstance(trained_bnmlp.bn, nn.BatchNorm1d)  # the original is untouched
    assert not folded.training and isinstance(folded.bn, nn.Identity) and type(folded) is BNMLP
    assert report["pairs"] == [{"layer": "fc1", "batchnorm": "bn"}] and report["pairs_folded"] == 1
    assert report["method"] == "fx" and report["batchnorms_left"] == 0
    assert report["parameters_before"] - report["parameters_after"] == 2 * 32  # BN's gamma and beta
    # ... and its running mean, var (32 floats each) and num_batches_tracked.
    assert report["state_dict_bytes_before"] - report["state_dict_bytes_after"] == 4 * 4 * 32 + 8
    assert max_diff(trained_bnmlp, folded, digits["test_x"]) < 1e-5
    assert accuracy(folded, digits["test_x"], digits["test_y"]) == accuracy(trained_bnmlp, digits["test_x"],
                                                                            digits["test_y"])


def test_folding_the_cifar_cnn_without_batch_norm_changes_nothing(digits: dict) -> None:
    model = build(CifarCNN, IMAGE_META)
    folded, report = passes.fold_batchnorm(model)
    assert report["pairs_folded"] == 0 and report["parameters_after"] == report["parameters_before"]
    assert max_diff(model, folded, digits["test_img"]) == 0.0


def test_folding_finds_pairs_inside_and_outside_sequentials(digits: dict) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(BNCNN())
    passes.finetune(model, digits["train_img"][:256], digits["train_y"][:256], epochs=1, batch_size=64)
    folded, report = passes.fold_batchnorm(model, example=digits["test_img"][:32])
    assert {(p["layer"], p["batchnorm"]) for p in report["pairs"]} == {("features.0", "features.1"), ("conv", "bn")}
    assert folded.conv.bias is not None and folded.conv.bias.shape == (32,)  # a bias-free conv gains one
    assert max_diff(model, folded, digits["test_img"]) < 1e-5
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0


def test_a_batch_norm_whose_input_is_used_elsewhere_is_not_folded(digits: dict) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(Branchy())
    folded, report = passes.fold_batchnorm(model)
    assert report["pairs_folded"] == 0 and report["batchnorms_left"] == 1
    assert max_diff(model, folded, digits["test_img"]) == 0.0


def test_an_untraceable_model_falls_back_to_sequential_neighbours(digits: dict) -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(Untraceable())
    folded, report = passes.fold_batchnorm(model)
    assert report["method"] == "sequential" and "TraceError" in report["trace_error"]
    assert report["pairs"] == [{"layer": "body.0", "batchnorm": "body.1"}]
    assert max_diff(model, folded, digits["test_x"]) < 1e-5


def test_folding_resnet18_folds_all_twenty_batch_norms(trained_resnet: nn.Module, digits: dict) -> None:
    folded, report = passes.fold_batchnorm(trained_resnet)
    # Stem, two per block (8 blocks) and the three projection shortcuts.
    assert report["pairs_folded"] == 1 + 2 * 8 + 3 == 20 and report["batchnorms_left"] == 0
    assert {"layer": "layer2.0.shortcut.0", "batchnorm": "layer2.0.shortcut.1"} in report["pairs"]
    assert report["parameters_after"] < report["parameters_before"]
    assert max_diff(trained_resnet, folded, digits["test_img"]) < 1e-5
    # Random statistics too, on a fresh copy (the trained ones are near their initial values).
    model = randomise_batchnorm(copy.deepcopy(trained_resnet), seed=3)
    assert max_diff(model, passes.fold_batchnorm(model)[0], digits["test_img"]) < 1e-5


def test_a_folded_state_dict_loads_into_a_freshly_built_model(trained_resnet: nn.Module, digits: dict) -> None:
    folded, _ = passes.fold_batchnorm(trained_resnet)
    fresh = passes.load_resized(build(ResNet18, IMAGE_META, width=8), folded.state_dict())
    assert max_diff(folded, fresh, digits["test_img"]) == 0.0


# -- pruning ---------------------------------------------------------------------------------------------------


def test_unstructured_pruning_reaches_the_sparsity_and_survives_a_finetune(trained_mlp: nn.Module,
                                                                          digits: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    base = accuracy(model, digits["test_x"], digits["test_y"])
    report = passes.prune_magnitude(model, 0.8, structured=False)
    assert report["method"] == "unstructured" and report["scope"] == "layer"
    rows = {row["layer"]: row for row in report["layers"]}
    assert rows == {"fc1": {"layer": "fc1", "weights": 4096, "zeros": round(0.8 * 4096)},
                    "fc2": {"layer": "fc2", "weights": 640, "zeros": 512}}
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert report["nonzero_after"] == report["nonzero_before"] - round(0.8 * 4096) - 512
    assert report["parameters_after"] == report["parameters_before"]
    assert report["state_dict_bytes_after"] == report["state_dict_bytes_before"]  # dense storage
    # The smallest weights went: every kept weight is at least as large as every pruned one.
    weight, mask = trained_mlp.fc1.weight.detach().abs(), model.fc1.weight_mask.bool()
    assert weight[~mask].max() <= weight[mask].min()
    zeros = model.fc1.weight == 0
    passes.finetune(model, digits["train_x"], digits["train_y"], epochs=3, lr=3e-3, seed=1)
    assert torch.equal(model.fc1.weight == 0, zeros)  # the mask held through training
    passes.make_permanent(model)
    assert set(model.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert passes.count_nonzero(model) == report["nonzero_after"]
    assert accuracy(model, digits["test_x"], digits["test_y"]) >= base - 0.04


def test_global_unstructured_pruning_ranks_all_layers_together(trained_mlp: nn.Module) -> None:
    model = copy.deepcopy(trained_mlp)
    report = passes.prune_magnitude(model, 0.5, scope="global")
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    kept = torch.cat([model.fc1.weight[model.fc1.weight != 0], model.fc2.weight[model.fc2.weight != 0]]).abs()
    gone = torch.cat([trained_mlp.fc1.weight[model.fc1.weight == 0], trained_mlp.fc2.weight[model.fc2.weight == 0]])
    assert gone.abs().max() <= kept.min()
    # Pruning again to a higher amount builds on the masks in place.
    assert passes.prune_magnitude(model, 0.7)["sparsity"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"amount": 1.0}, r"amount must be in \[0, 1\)"),
    ({"amount": -0.1}, r"amount must be in \[0, 1\)"),
    ({"amount": 0.5, "scope": "model"}, "unknown pruning scope"),
])
def test_bad_pruning_options_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        passes.prune_magnitude(nn.Linear(2, 2), **kwargs)


def test_masked_models_must_be_made_permanent_before_folding_or_channel_pruning() -> None:
    model = BNMLP(4)
    passes.prune_magnitude(model, 0.5)
    with pytest.raises(UserError, match="make_permanent"):
        passes.fold_batchnorm(model)
    with pytest.raises(UserError, match="make_permanent"):
        passes.prune_magnitude(model, 0.5, structured=True)
    passes.make_permanent(model)
    assert passes.fold_batchnorm(model)[1]["pairs_folded"] == 1


def test_channel_pruning_shrinks_the_cifar_cnn_and_keeps_its_accuracy(digits: dict) -> None:
    model = build(CifarCNN, IMAGE_META, dropout1=0.0, dropout2=0.0, dropout3=0.0)
    passes.finetune(model, digits["train_img"], digits["train_y"], epochs=4, lr=2e-3, batch_size=64, seed=0)
    base = accuracy(model, digits["test_img"], digits["test_y"])
    assert base > 0.85
    report = passes.prune_magnitude(model, 0.5, structured=True, example=digits["test_img"][:64])
    rows = {row["layer"]: (row["channels_before"], row["channels_after"], row["next"]) for row in report["layers"]}
    assert rows == {
        "features.0.0": (32, 16, "features.0.2"), "features.0.2": (32, 16, "features.1.0"),
        "features.1.0": (64, 32, "features.1.2"), "features.1.2": (64, 32, "classifier.1"),
        "classifier.1": (512, 256, "classifier.4"),
    }
    assert report["skipped"] == [{"layer": "classifier.4", "reason": "its output is the model's output"}]
    assert report["sparsity"] == 0.5
    assert model.features[1][0].weight.shape == (32, 16, 3, 3) and model.features[1][2].weight.shape == (32, 32, 3, 3)
    assert model.classifier[1].weight.shape == (256, 32 * 2 * 2)  # the flatten's feature blocks followed
    assert report["parameters_after"] < 0.3 * report["parameters_before"]
    assert report["state_dict_bytes_after"] < 0.3 * report["state_dict_bytes_before"]
    assert "latency_ms_after" in report
    passes.finetune(model, digits["train_img"], digits["train_y"], epochs=2, lr=1e-3, batch_size=64, seed=1)
    assert accuracy(model, digits["test_img"], digits["test_y"]) >= base - 0.04


def test_channel_pruning_keeps_exactly_the_kept_channels(digits: dict) -> None:
    """Dead channels (all-zero filters whose batch norm and ReLU output zero) are the ones to go, and
    removing them leaves the outputs unchanged."""
    torch.manual_seed(0)
    model = randomise_batchnorm(BNCNN()).eval()
    with torch.no_grad():
        for conv, bn in ((model.features[0], model.features[1]), (model.conv, model.bn)):
            conv.weight[::2] = 0.0  # half the output channels dead
            if conv.bias is not None:
                conv.bias[::2] = 0.0
            bn.running_mean[::2] = 0.0
            bn.bias[::2] = -1.0  # relu(BN(0)) = relu(-1) = 0: these channels contribute nothing
    before = copy.deepcopy(model)
    report = passes.prune_magnitude(model, 0.5, structured=True)
    row = next(r for r in report["layers"] if r["layer"] == "conv")
    assert row == {"layer": "conv", "channels_before": 32, "channels_after": 16, "batchnorms": ["bn"],
                   "next": "head.2"}
    assert model.bn.num_features == 16 and model.head[2].in_features == 16 * 16
    assert torch.equal(model.conv.weight, before.conv.weight[1::2, 1::2])
    assert torch.equal(model.features[0].weight, before.features[0].weight[1::2])
    assert max_diff(model, before, digits["test_img"]) < 1e-5


def test_channel_pruning_a_resnet_prunes_only_inside_blocks(trained_resnet: nn.Module, digits: dict) -> None:
    model = copy.deepcopy(trained_resnet)
    report = passes.prune_magnitude(model, 0.5, structured=True)
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [row["layer"] for row in report["layers"]] == [f"{b}.conv1" for b in blocks]
    for row, block in zip(report["layers"], blocks):
        assert row["batchnorms"] == [f"{block}.bn1"] and row["next"] == f"{block}.conv2"
        assert row["channels_after"] == row["channels_before"] // 2
    skipped = {row["layer"] for row in report["skipped"]}
    assert skipped == {"stem.0", "fc", *(f"{b}.conv2" for b in blocks),
                       *(f"layer{s}.0.shortcut.0" for s in range(2, 5))}
    assert report["parameters_after"] < 0.6 * report["parameters_before"]
    assert model.layer3[0].conv1.weight.shape == (16, 16, 3, 3)  # layer3 has 4 * 8 channels, conv1 keeps half
    assert model.layer3[0].bn1.num_features == 16 and model.layer3[0].conv2.weight.shape == (32, 16, 3, 3)
    assert model(torch.as_tensor(digits["test_img"][:4])).shape == (4, 10)
    # The pruned state dict loads into a freshly built model, which then computes the same.
    fresh = passes.load_resized(build(ResNet18, IMAGE_META, width=8), model.state_dict())
    assert max_diff(model, fresh, digits["test_img"]) == 0.0


def test_channel_pruning_needs_a_traceable_model() -> None:
    with pytest.raises(UserError, match=r"torch\.fx can trace"):
        passes.prune_magnitude(Untraceable(), 0.5, structured=True)


def test_channel_pruning_a_digits_mlp_removes_hidden_units(trained_mlp: nn.Module, digits: dict) -> None:
    model = copy.deepcopy(trained_mlp)
    report = passes.prune_magnitude(model, 0.25, structured=True)
    assert report["layers"] == [{"layer": "fc1", "channels_before": 64, "channels_after": 48, "batchnorms": [],
                                 "next": "fc2"}]
    assert report["parameters_after"] == 64 * 48 + 48 + 48 * 10 + 10
    assert accuracy(model, digits["test_x"], digits["test_y"]) > 0.5


# -- distillation ------------------------------------------------------------------------------------------------


def test_a_distilled_student_does_about_as_well_as_one_trained_on_labels(digits: dict) -> None:
    teacher = build(DigitsMLP, FLAT_META, hidden=128)
    passes.finetune(teacher, digits["train_x"], digits["train_y"], epochs=6, lr=5e-3, batch_size=64, seed=0)
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = build(DigitsMLP, FLAT_META, hidden=16)
    alone = copy.deepcopy(student)
    options = {"epochs": 10, "lr": 5e-3, "batch_size": 64, "seed": 1}
    passes.finetune(alone, digits["train_x"], digits["train_y"], **options)
    distilled, history = passes.distill(teacher, student, digits["train_x"], digits["train_y"], digits["val_x"],
                                        digits["val_y"], temperature=2.0, alpha=0.5, **options)
    assert distilled is student and not student.training
    assert [row["epoch"] for row in history] == list(range(1, 11))
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy"}
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"] - 0.02
    assert history[-1]["val_accuracy"] == passes.evaluate(student, digits["val_x"], digits["val_y"])["accuracy"]
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # the teacher is unchanged
    teacher_acc = accuracy(teacher, digits["test_x"], digits["test_y"])
    alone_acc = accuracy(alone, digits["test_x"], digits["test_y"])
    student_acc = accuracy(student, digits["test_x"], digits["test_y"])
    assert teacher_acc > 0.9
    assert student_acc >= alone_acc - 0.05, (teacher_acc, alone_acc, student_acc)


def test_distillation_with_alpha_zero_is_training_on_labels(digits: dict) -> None:
    teacher = build(DigitsMLP, FLAT_META, hidden=8)
    student = build(DigitsMLP, FLAT_META, hidden=8)
    alone = copy.deepcopy(student)
    x, y = digits["train_x"][:200], digits["train_y"][:200]
    passes.distill(teacher, student, x, y, x, y, epochs=1, alpha=0.0, seed=3)
    passes.finetune(alone, x, y, epochs=1, seed=3)
    for key, value in alone.state_dict().items():
        assert torch.allclose(student.state_dict()[key], value, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha")])
def test_bad_distillation_options_are_user_errors(kwargs: dict, message: str) -> None:
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    with pytest.raises(UserError, match=message):
        passes.distill(nn.Linear(64, 10), nn.Linear(64, 10), x, y, x, y, **kwargs)
