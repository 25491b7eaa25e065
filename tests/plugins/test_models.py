"""The model plugins: digits_mlp and cifar_cnn, built for torch from a dataset's meta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from mlk.errors import UserError  # noqa: E402
from mlk.imports import import_object  # noqa: E402
from mlk.models import Model  # noqa: E402
from mlk.spec import validate_section  # noqa: E402
from mlk_plugins.models.cifar_cnn import CifarCNN  # noqa: E402
from mlk_plugins.models.digits_mlp import DigitsMLP  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {
    "digits_mlp": "mlk_plugins.models.digits_mlp:DigitsMLP",
    "resnet18": "mlk_plugins.models.resnet18:ResNet18",
    "cifar_cnn": "mlk_plugins.models.cifar_cnn:CifarCNN",
}
DIGITS_META = {"input_shape": [64], "num_classes": 10, "layout": "flat", "classes": list("0123456789")}
CIFAR_META = {"input_shape": [3, 32, 32], "num_classes": 10, "layout": "nchw", "classes": list("abcdefghij")}


def declares(group: str, name: str, value: str) -> bool:
    """Whether pyproject.toml declares ``name = "value"`` in the entry-point group ``mlk.<group>``."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split(f'[project.entry-points."mlk.{group}"]', 1)[1].split("\n[", 1)[0]
    return f'{name} = "{value}"' in section


def build(cls: type[Model], meta: dict[str, Any], framework: str = "torch", **options: Any) -> Any:
    return cls(validate_section(cls.Config, options, "model")).build(framework, meta)


@pytest.mark.parametrize("name", ["digits_mlp", "cifar_cnn"])
def test_model_plugins_declare_their_contract(name: str) -> None:
    assert declares("models", name, ENTRY_POINTS[name])
    cls = import_object(ENTRY_POINTS[name], where="test")
    assert issubclass(cls, Model) and cls.name == name
    assert cls.frameworks == ("torch", "keras", "jax") and cls.extra == "torch" and "torch" in cls.requires
    assert cls.Config.model_config["extra"] == "forbid"
    assert [n for n, f in cls.Config.model_fields.items() if not f.description] == []


@pytest.mark.parametrize("cls", [DigitsMLP, CifarCNN])
def test_other_frameworks_are_refused_with_the_choices(cls: type[Model]) -> None:
    with pytest.raises(UserError, match=rf"model '{cls.name}' has no mxnet implementation") as err:
        build(cls, CIFAR_META, framework="mxnet")
    assert "valid choices: jax, keras, torch" in str(err.value)


def test_resnet18_is_torch_only_and_says_so() -> None:
    from mlk_plugins.models.resnet18 import ResNet18

    with pytest.raises(UserError, match="model 'resnet18' has no keras implementation") as err:
        build(ResNet18, CIFAR_META, framework="keras")
    assert "valid choices: torch" in str(err.value)


# -- digits_mlp ----------------------------------------------------------------------------------------


def test_digits_mlp_is_linear_relu_dropout_linear() -> None:
    model = build(DigitsMLP, DIGITS_META, hidden=16, dropout=0.3)
    assert isinstance(model, nn.Module)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 10)]
    (dropout,) = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropout.p == 0.3
    assert sum(p.numel() for p in model.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
    model.eval()
    x = torch.rand(5, 64)
    out = model(x)
    assert out.shape == (5, 10)
    expected = linears[1](torch.relu(linears[0](x)))
    assert torch.allclose(out, expected)
    # Image-shaped inputs are flattened.
    assert build(DigitsMLP, {**CIFAR_META, "input_shape": [1, 8, 8]})(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_digits_mlp_defaults_and_validation() -> None:
    model = build(DigitsMLP, DIGITS_META)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [64, 10]
    with pytest.raises(UserError, match=r"model\.hidden"):
        build(DigitsMLP, DIGITS_META, hidden=0)
    with pytest.raises(UserError, match=r"model\.dropout"):
        build(DigitsMLP, DIGITS_META, dropout=1.0)
    with pytest.raises(UserError, match=r"model\.hiden: unknown key.*did you mean 'hidden'"):
        build(DigitsMLP, DIGITS_META, hiden=8)


def test_models_are_seeded_by_torch() -> None:
    torch.manual_seed(3)
    a = build(DigitsMLP, DIGITS_META, hidden=8)
    torch.manual_seed(3)
    b = build(DigitsMLP, DIGITS_META, hidden=8)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# -- cifar_cnn -----------------------------------------------------------------------------------------


def test_cifar_cnn_layers_and_forward_shape() -> None:
    model = build(CifarCNN, CIFAR_META, dropout1=0.1, dropout2=0.2, dropout3=0.3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 32), (32, 64), (64, 64)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert len([m for m in model.modules() if isinstance(m, nn.MaxPool2d)]) == 2
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 8 * 8, 512), (512, 10)]
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)


def test_cifar_cnn_follows_the_meta() -> None:
    model = build(CifarCNN, {**CIFAR_META, "input_shape": [1, 16, 16], "num_classes": 4})
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25, 0.5]
    model.eval()
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def test_cifar_cnn_needs_images() -> None:
    with pytest.raises(UserError, match=r"needs images.*layout 'flat'"):
        build(CifarCNN, DIGITS_META)
    with pytest.raises(UserError, match=r"model\.dropout3"):
        build(CifarCNN, CIFAR_META, dropout3=-0.1)


def test_cifar_cnn_can_fit_a_batch() -> None:
    torch.manual_seed(0)
    meta = {**CIFAR_META, "input_shape": [3, 16, 16]}
    model = build(CifarCNN, meta, dropout1=0.0, dropout2=0.0, dropout3=0.0)
    x, y = torch.rand(10, 3, 16, 16), torch.arange(10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
