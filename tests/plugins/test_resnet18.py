"""The resnet18 model plugin: the ResNet-18 of He et al. (2016), built for torch from a dataset's meta."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from mlk.errors import UserError  # noqa: E402
from mlk.models import Model  # noqa: E402
from mlk.spec import validate_section  # noqa: E402
from mlk_plugins.compilers import passes  # noqa: E402
from mlk_plugins.models._resnet import BasicBlock  # noqa: E402
from mlk_plugins.models.resnet18 import ResNet18, ResNet18Config  # noqa: E402

CIFAR_META = {"input_shape": [3, 32, 32], "num_classes": 10, "layout": "nchw"}
DIGITS_IMAGES = {"input_shape": [1, 8, 8], "num_classes": 10, "layout": "nchw"}
BLOCKS = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: these small models gain nothing from a second one and slow down many times
    over when the other core is busy (OpenMP threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(meta: dict[str, Any], framework: str = "torch", **options: Any) -> Any:
    torch.manual_seed(0)
    return ResNet18(validate_section(ResNet18Config, options, "model")).build(framework, meta)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), bunch.target.astype(np.int64)


def test_the_plugin_declares_its_contract() -> None:
    assert issubclass(ResNet18, Model) and ResNet18.name == "resnet18"
    assert ResNet18.frameworks == ("torch",) and ResNet18.extra == "torch" and "torch" in ResNet18.requires
    assert ResNet18.Config is ResNet18Config and ResNet18Config.model_config["extra"] == "forbid"
    assert [n for n, f in ResNet18Config.model_fields.items() if not f.description] == []
    defaults = validate_section(ResNet18Config, {}, "model")
    assert defaults.width == 64 and defaults.small_input is True


@pytest.mark.parametrize("options", [{"width": 0}, {"depth": 34}, {"small_input": "maybe"}])
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        build(CIFAR_META, **options)


def test_other_frameworks_and_flat_inputs_are_refused() -> None:
    with pytest.raises(UserError, match=r"model 'resnet18' has no keras implementation"):
        build(CIFAR_META, framework="keras")
    with pytest.raises(UserError, match=r"needs images \(layout nchw") as err:
        build({"input_shape": [64], "num_classes": 10, "layout": "flat"})
    assert "layout 'flat'" in str(err.value) and "digits_mlp" in str(err.value)
    with pytest.raises(UserError, match="layout nchw"):
        build({"input_shape": [8, 8, 1], "num_classes": 10, "layout": "nhwc"})


def test_resnet18_has_the_standard_size() -> None:
    # 11,173,962 for the CIFAR variant with 10 classes; the ImageNet model (7x7 stem, 1000 classes)
    # has the paper's 11.69M.
    cifar = parameters(build(CIFAR_META))
    assert abs(cifar - 11.17e6) / 11.17e6 < 0.01
    assert cifar == 11_173_962
    imagenet = build({"input_shape": [3, 224, 224], "num_classes": 1000, "layout": "nchw"}, small_input=False)
    assert parameters(imagenet) == 11_689_512


def test_four_stages_of_two_basic_blocks_with_projection_shortcuts_where_the_shape_changes() -> None:
    model = build(CIFAR_META, width=8)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, BasicBlock)}
    assert list(blocks) == BLOCKS
    widths = [blocks[b].conv2.out_channels for b in BLOCKS]
    assert widths == [8, 8, 16, 16, 32, 32, 64, 64]
    strides = [blocks[b].conv1.stride for b in BLOCKS]
    assert strides == [(1, 1), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    projections = [b for b in BLOCKS if not isinstance(blocks[b].shortcut, nn.Identity)]
    assert projections == ["layer2.0", "layer3.0", "layer4.0"]
    shortcut = blocks["layer3.0"].shortcut
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].kernel_size == (1, 1) and shortcut[0].stride == (2, 2)
    assert isinstance(shortcut[1], nn.BatchNorm2d)
    # 18 weighted layers on the main path: the stem, 16 convolutions in blocks and the classifier.
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 18
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    assert all(isinstance(m, nn.BatchNorm2d) for n, m in model.named_modules() if n.endswith(("bn1", "bn2")))


@pytest.mark.parametrize(("small_input", "stem_size", "last_size"), [(True, 32, 4), (False, 8, 1)])
def test_forward_shapes_for_both_stems(small_input: bool, stem_size: int, last_size: int) -> None:
    model = build(CIFAR_META, width=8, small_input=small_input).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.stem(x)
        last = model.layer4(model.layer3(model.layer2(model.layer1(stem))))
        out = model(x)
    assert stem.shape == (2, 8, stem_size, stem_size)
    assert last.shape == (2, 64, last_size, last_size)
    assert out.shape == (2, 10)
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == ((3, 3) if small_input else (7, 7))
    assert stem_conv.stride == ((1, 1) if small_input else (2, 2)) and stem_conv.bias is None
    assert any(isinstance(m, nn.MaxPool2d) for m in model.stem) is (not small_input)


@pytest.mark.parametrize("small_input", [True, False])
def test_input_channels_and_classes_come_from_the_meta(small_input: bool) -> None:
    model = build({"input_shape": [1, 8, 8], "num_classes": 7, "layout": "nchw"}, width=4, small_input=small_input)
    assert model.stem[0].in_channels == 1
    assert model.eval()(torch.rand(3, 1, 8, 8)).shape == (3, 7)


def test_a_block_adds_its_input_back() -> None:
    block = BasicBlock(4, 4, 1).eval()
    with torch.no_grad():
        block.conv2.weight.zero_()  # the residual branch now adds bn2(0) = 0
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(x))
    projecting = BasicBlock(4, 8, 2)
    assert projecting(x).shape == (2, 8, 3, 3)


def test_resnet18_trains_one_epoch_on_a_tiny_batch(digit_images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digit_images[0][:16], digit_images[1][:16]
    model = build(DIGITS_IMAGES)  # the standard width, 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passes.finetune(model, x, y, epochs=1, lr=1e-3, batch_size=8, seed=0)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])
    assert int(after["layer1.0.bn1.num_batches_tracked"]) == 2


def test_a_narrow_resnet18_learns_digits(digit_images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digit_images
    model = build(DIGITS_IMAGES, width=8)
    start = passes.evaluate(model, x[1200:], y[1200:])["accuracy"]
    passes.finetune(model, x[:1200], y[:1200], epochs=3, lr=3e-3, batch_size=64, seed=0)
    assert passes.evaluate(model, x[1200:], y[1200:])["accuracy"] > max(0.8, start + 0.5)
