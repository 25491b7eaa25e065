"""Optimisation passes on a trained torch model, before export.

- :func:`fold_batchnorm`: batch norm folded into the convolution or dense layer in front of it;
- :func:`prune_magnitude`: magnitude pruning, unstructured (masks) or by whole channels (smaller
  tensors), followed by a short :func:`finetune` and :func:`make_permanent`;
- :func:`distill`: knowledge distillation of a smaller student from a teacher;
- :func:`evaluate`, :func:`measure_latency` and size helpers (:func:`count_parameters`,
  :func:`count_nonzero`, :func:`state_dict_bytes`, :func:`size_facts`) for the passes' reports;
- :func:`load_resized`: load a state dict written after folding or channel pruning into a model
  freshly built from its spec.

Reports are plain JSON-able dicts. The functions work on any ``torch.nn.Module``; torch is imported
inside them, so this module loads without torch.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from mlk.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

Report = dict[str, Any]

# -- sizes --------------------------------------------------------------------------------------------


def _pruned_names(state: dict[str, Any]) -> set[str]:
    """Names ``x`` for which ``state`` holds a pruning re-parametrisation ``x_orig`` + ``x_mask``."""
    return {k[:-5] for k in state if k.endswith("_orig") and k[:-5] + "_mask" in state}


def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as it will be after :func:`make_permanent`: a weight still under a pruning
    mask appears once, under its own name, as ``weight_orig * weight_mask``."""
    state = model.state_dict()
    pruned = _pruned_names(state)
    out = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[:-5] in pruned:
            continue
        if key.endswith("_orig") and key[:-5] in pruned:
            out[key[:-5]] = value * state[key[:-5] + "_mask"]
        else:
            out[key] = value
    return out


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of ``model``'s (effective) state dict: parameters and buffers, stored dense."""
    return sum(t.numel() * t.element_size() for t in effective_state_dict(model).values())


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (a weight under a pruning mask counts in full)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero parameter elements, pruning masks applied."""
    import torch

    state = effective_state_dict(model)
    buffers = {n for n, _ in model.named_buffers()}
    names = {n[:-5] if n.endswith("_orig") and n[:-5] + "_mask" in buffers else n for n, _ in model.named_parameters()}
    return sum(int(torch.count_nonzero(state[n])) for n in names if n in state)


def size_facts(model: nn.Module) -> dict[str, int]:
    """``parameters``, ``nonzero`` (parameters) and ``state_dict_bytes`` of ``model``."""
    return {"parameters": count_parameters(model), "nonzero": count_nonzero(model),
            "state_dict_bytes": state_dict_bytes(model)}


def _with_change(report: Report, before: dict[str, Any], after: dict[str, Any]) -> Report:
    for key, value in before.items():
        report[f"{key}_before"] = value
        report[f"{key}_after"] = after[key]
    return report


def measure_latency(model: nn.Module, example: Any, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Wall-clock time of one forward pass of ``example`` (a batch) in eval mode, without autograd:
    ``latency_ms`` (median of ``repeats`` runs after ``warmup``) and ``latency_ms_min``.

    Timings on a shared CPU are noisy; compare medians of the same batch on the same machine.
    """
    import torch

    x = torch.as_tensor(example, dtype=torch.float32)
    was_training = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(max(0, warmup) + max(1, repeats)):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    model.train(was_training)
    return {"latency_ms": statistics.median(times), "latency_ms_min": min(times)}


# -- the graph ------------------------------------------------------------------------------------------


def _trace(model: nn.Module) -> tuple[fx.Graph | None, str | None]:
    """``model``'s torch.fx graph (standard ``torch.nn`` layers stay single ``call_module`` nodes), or
    ``None`` and why tracing failed (e.g. control flow that depends on the input's values)."""
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model).graph, None
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first_line[:300]}"


def _call_counts(model: nn.Module, graph: fx.Graph) -> Counter[int]:
    """How often each module (by identity) is called in ``graph``; a module called twice is shared."""
    return Counter(id(model.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _refuse_masked(model: nn.Module, what: str) -> None:
    from torch.nn.utils import prune

    if prune.is_pruned(model):
        raise UserError(f"{what} needs a model without pruning masks",
                        hint="call make_permanent(model) after pruning and fine-tuning")


def _as_parameter(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    from torch import nn

    return nn.Parameter(value.detach().clone(), requires_grad=True if like is None else like.requires_grad)


# -- batch-norm folding ---------------------------------------------------------------------------------


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether eval-mode ``bn`` applied to ``layer``'s output is a per-output-channel affine map of it."""
    from torch import nn

    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return False
    if bn.running_mean is None or bn.running_var is None:  # no running statistics: eval uses batch statistics
        return False
    kinds = ((nn.Linear, nn.BatchNorm1d), (nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
             (nn.Conv3d, nn.BatchNorm3d))
    if not any(isinstance(layer, lk) and isinstance(bn, bk) for lk, bk in kinds):
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return channels == bn.num_features


def _graph_bn_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(layer, batch norm) names where the batch norm's only input is the layer's output, that output
    goes nowhere else, and neither module is called anywhere else."""
    import torch.fx

    calls = _call_counts(model, graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if calls[id(layer)] == 1 and calls[id(bn)] == 1 and _foldable(layer, bn):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _sequential_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, batch norm) names adjacent in an ``nn.Sequential``; the fallback when tracing fails."""
    from torch import nn

    pairs, seen = [], set()
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a, layer), (b, bn) in itertools.pairwise(children):
            if _foldable(layer, bn) and id(layer) not in seen and id(bn) not in seen:
                seen.update((id(layer), id(bn)))
                pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    return pairs


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Make ``layer`` compute ``bn(layer(x))`` (eval mode): scale each output channel's weights by
    ``gamma / sqrt(var + eps)`` and set the bias to ``(bias - mean) * scale + beta``."""
    import torch

    weight = layer.weight
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
        new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (bias - mean) * scale + beta
        weight.copy_(new_weight.to(weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
        else:
            layer.bias = _as_parameter(new_bias.to(dtype=weight.dtype, device=weight.device), weight)


def fold_batchnorm(model: nn.Module, example: Any = None) -> tuple[nn.Module, Report]:
    """A copy of ``model`` (in eval mode) with every batch norm that directly follows a convolution or
    dense layer folded into that layer's weight and bias and replaced by ``nn.Identity``; and a report.

    Pairs are found by tracing the model with ``torch.fx`` and following the graph, so a batch norm
    after a convolution inside a residual block is found wherever the modules are declared. A pair
    is folded only when the layer (``Linear``, ``Conv1d/2d/3d``) feeds nothing but the batch norm
    (``BatchNorm1d/2d/3d`` with running statistics and as many features as the layer has outputs),
    and neither module is called at a second place. If the model cannot be traced, only pairs
    adjacent inside an ``nn.Sequential`` are folded (``method: "sequential"`` in the report).

    The copy computes what ``model`` computes in eval mode (to float rounding, the fold is done in
    float64); training it further no longer normalises by batch statistics. Batch norm through
    ``torch.nn.functional.batch_norm`` is not seen. A dense layer followed by ``BatchNorm1d`` is
    assumed to see 2-D inputs (features on dimension 1). The model's class is kept, so its
    ``forward`` still runs; its state dict loses the folded batch norms' entries and gains biases
    (load such a state dict into a freshly built model with :func:`load_resized`).

    The report: ``pairs_folded``, ``pairs`` (``layer``, ``batchnorm`` names), ``batchnorms_left``,
    ``method`` (``fx`` or ``sequential``, with ``trace_error``), ``parameters``, ``nonzero`` and
    ``state_dict_bytes`` before and after, and with ``example`` (an input batch) ``latency_ms``
    before and after.
    """
    from torch import nn

    _refuse_masked(model, "fold_batchnorm")
    folded = copy.deepcopy(model).eval()
    graph, error = _trace(folded)
    pairs = _graph_bn_pairs(folded, graph) if graph is not None else _sequential_bn_pairs(folded)
    for layer_name, bn_name in pairs:
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        _set_submodule(folded, bn_name, nn.Identity())
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    report: Report = {
        "pass": "fold_batchnorm",
        "method": "fx" if graph is not None else "sequential",
        "trace_error": error,
        "pairs_folded": len(pairs),
        "pairs": [{"layer": a, "batchnorm": b} for a, b in pairs],
        "batchnorms_left": sum(isinstance(m, batchnorms) for m in folded.modules()),
    }
    before, after = size_facts(model), size_facts(folded)
    if example is not None:
        before.update(measure_latency(model, example))
        after.update(measure_latency(folded, example))
    return folded, _with_change(report, before, after)


# -- pruning ----------------------------------------------------------------------------------------------


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` re-parametrisation from ``model`` (in place): each pruned
    weight becomes an ordinary parameter holding its zeros; the state dict loses ``*_orig`` and
    ``*_mask``. Returns ``model``."""
    from torch.nn.utils import prune

    for module in model.modules():
        names = [hook._tensor_name for hook in list(module._forward_pre_hooks.values())
                 if isinstance(hook, prune.BasePruningMethod)]
        for name in names:
            prune.remove(module, name)
    return model


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def _prune_unstructured(model: nn.Module, amount: float, scope: str) -> list[dict[str, Any]]:
    import torch
    from torch import nn
    from torch.nn.utils import prune

    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    weights = [_effective_weight(m) for _, m in layers]
    masks = []
    if scope == "global" and layers:
        flat = torch.cat([w.abs().flatten().float() for w in weights])
        mask = torch.ones_like(flat)
        k = round(amount * flat.numel())
        if k:
            mask[torch.topk(flat, k, largest=False).indices] = 0.0
        masks = [m.view_as(w).to(w.dtype) for m, w in zip(mask.split([w.numel() for w in weights]), weights)]
    else:
        for w in weights:
            flat = w.abs().flatten()
            mask = torch.ones_like(flat)
            k = round(amount * flat.numel())
            if k:
                mask[torch.topk(flat, k, largest=False).indices] = 0.0
            masks.append(mask.view_as(w))
    out = []
    for (name, module), mask in zip(layers, masks):
        prune.custom_from_mask(module, "weight", mask)
        weight = _effective_weight(module)
        out.append({"layer": name, "weights": weight.numel(), "zeros": int((weight == 0).sum())})
    return out


def _flatten_dims(node: fx.Node, module: nn.Module | None) -> tuple[int, int] | None:
    """(start_dim, end_dim) when ``node`` is a flatten (module, ``torch.flatten`` or ``.flatten()``)."""
    import torch
    from torch import nn

    if module is not None:
        return (module.start_dim, module.end_dim) if isinstance(module, nn.Flatten) else None
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return int(start), int(end)
    return None


def _passthrough(node: fx.Node, module: nn.Module | None) -> str | None:
    """``"elementwise"`` or ``"pool"`` when ``node`` keeps channels apart (an activation, dropout or
    a pooling), else None."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    elementwise_modules = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                           nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity,
                           nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    pool_modules = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    if module is not None:
        if isinstance(module, elementwise_modules):
            return "elementwise"
        if isinstance(module, pool_modules) and not getattr(module, "return_indices", False):
            return "pool"
        return None
    if node.op == "call_function":
        elementwise = {torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.leaky_relu, F.elu,
                       F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
                       F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
        pools = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                 F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
        if node.target in elementwise:
            return "elementwise"
        if node.target in pools and not node.kwargs.get("return_indices") and len(node.args) < 7:
            return "pool"
        return None
    if node.op == "call_method" and node.target in {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
                                                    "contiguous", "clone"}:
        return "elementwise"
    return None


def _follow_channels(model: nn.Module, node: fx.Node, calls: Counter[int]) -> dict[str, Any] | str:
    """Where the output channels of the layer called at ``node`` go: the batch norms to shrink and the
    layer whose inputs they are, or why removing some of them is not safe."""
    from torch import nn

    layer = model.get_submodule(node.target)
    conv = isinstance(layer, nn.Conv2d)
    channels = layer.out_channels if conv else layer.out_features
    plan: dict[str, Any] = {"layer": str(node.target), "batchnorms": [], "bn_direct": False, "spread": 1}
    flattened, cur = False, node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return ("its output is used in several places (e.g. a residual add)" if users
                    else "its output is not used")
        nxt = users[0]
        if nxt.op == "output":
            return "its output is the model's output"
        if nxt.all_input_nodes != [cur] or not nxt.args or nxt.args[0] is not cur:
            return f"its output is combined with other tensors at '{nxt.name}'"
        module = model.get_submodule(nxt.target) if nxt.op == "call_module" else None
        shared = module is not None and calls[id(module)] != 1
        batchnorm = nn.BatchNorm2d if conv else nn.BatchNorm1d
        if isinstance(module, batchnorm) and not flattened and module.num_features == channels and not shared:
            plan["batchnorms"].append(str(nxt.target))
            plan["bn_direct"] = plan["bn_direct"] or cur is node
        elif (kind := _passthrough(nxt, module)) is not None and (kind == "elementwise" or (conv and not flattened)):
            pass
        elif conv and not flattened and _flatten_dims(nxt, module) in ((1, -1), (1, 3)):
            flattened = True
        elif (isinstance(module, nn.Conv2d) and conv and not flattened and not shared and module.groups == 1
              and module.in_channels == channels):
            return {**plan, "next": str(nxt.target)}
        elif isinstance(module, nn.Linear) and not shared and (
                (not conv and module.in_features == channels)
                or (conv and flattened and module.in_features % channels == 0)):
            return {**plan, "next": str(nxt.target), "spread": module.in_features // channels}
        else:
            target = getattr(nxt.target, "__name__", nxt.target)
            what = type(module).__name__ if module is not None else f"{nxt.op} {target}"
            return f"its channels cannot be followed through '{nxt.name}' ({what})"
        cur = nxt


def _keep_channels(layer: nn.Module, bn: nn.Module | None, amount: float) -> torch.Tensor:
    """Indices (ascending) of the output channels to keep: all but the ``round(amount * n)`` (at most
    ``n - 1``) of smallest L1 norm, the norm of the filter as folded with ``bn`` when one follows."""
    import torch

    importance = layer.weight.detach().abs().flatten(1).sum(1)
    if bn is not None and bn.running_var is not None:
        gamma = bn.weight.detach().abs() if bn.weight is not None else 1.0
        importance = importance * gamma / torch.sqrt(bn.running_var + bn.eps)
    n = importance.numel()
    remove = min(round(amount * n), n - 1)
    return torch.topk(importance, n - remove).indices.sort().values


def _shrink(model: nn.Module, plan: dict[str, Any], keep: torch.Tensor) -> None:
    """Keep only channels ``keep`` of ``plan``'s layer outputs, its batch norms and the next layer's inputs."""
    import torch
    from torch import nn

    layer = model.get_submodule(plan["layer"])
    layer.weight = _as_parameter(layer.weight[keep], layer.weight)
    if layer.bias is not None:
        layer.bias = _as_parameter(layer.bias[keep], layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(keep)
    else:
        layer.out_features = len(keep)
    for name in plan["batchnorms"]:
        bn = model.get_submodule(name)
        if bn.weight is not None:
            bn.weight = _as_parameter(bn.weight[keep], bn.weight)
            bn.bias = _as_parameter(bn.bias[keep], bn.bias)
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[keep].clone()
            bn.running_var = bn.running_var[keep].clone()
        bn.num_features = len(keep)
    nxt = model.get_submodule(plan["next"])
    spread = plan["spread"]
    # A dense layer after a flatten sees channel c as features c * spread ... c * spread + spread - 1.
    columns = keep if spread == 1 else (keep[:, None] * spread + torch.arange(spread)).flatten()
    nxt.weight = _as_parameter(nxt.weight[:, columns], nxt.weight)
    if isinstance(nxt, nn.Conv2d):
        nxt.in_channels = len(keep)
    else:
        nxt.in_features = len(columns)


def _prune_channels(model: nn.Module, amount: float) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    from torch import nn

    graph, error = _trace(model)
    if graph is None:
        raise UserError("channel pruning needs a model torch.fx can trace, to know where each channel goes; "
                        f"tracing failed: {error}", hint="use unstructured pruning (structured: false)")
    calls = _call_counts(model, graph)
    plans, skipped = [], []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        layer = model.get_submodule(node.target)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if calls[id(layer)] != 1:
            reason: dict[str, Any] | str = "the layer is called in several places"
        elif isinstance(layer, nn.Conv2d) and layer.groups != 1:
            reason = "grouped convolution"
        else:
            reason = _follow_channels(model, node, calls)
        if isinstance(reason, str):
            skipped.append({"layer": str(node.target), "reason": reason})
        else:
            plans.append(reason)
    layers = []
    for plan in plans:
        layer = model.get_submodule(plan["layer"])
        bn = model.get_submodule(plan["batchnorms"][0]) if plan["bn_direct"] else None
        before = layer.weight.shape[0]
        keep = _keep_channels(layer, bn, amount)
        _shrink(model, plan, keep)
        layers.append({"layer": plan["layer"], "channels_before": before, "channels_after": len(keep),
                       "batchnorms": plan["batchnorms"], "next": plan["next"]})
    return layers, skipped


def prune_magnitude(model: nn.Module, amount: float, structured: bool = False, *, scope: str = "layer",
                    example: Any = None) -> Report:
    """Prune ``model`` in place by weight magnitude; return a report.

    Unstructured (``structured=False``): in every ``Linear`` and ``Conv1d/2d/3d``, the ``amount``
    fraction of weights of smallest absolute value is set to zero through a
    ``torch.nn.utils.prune`` mask, so the model keeps computing with them at zero through any
    training (:func:`finetune`) until :func:`make_permanent`. ``scope="layer"`` (default) prunes
    each layer to exactly ``amount``, so no layer is emptied; ``scope="global"`` ranks all these
    weights together (layers of small weights lose more; a small layer may be emptied). Biases are
    not pruned. Calling it again prunes to the new ``amount`` on top of the existing masks. Dense
    storage and dense kernels do not get smaller or faster: ``state_dict_bytes`` is unchanged and
    the gain shows in ``nonzero`` (and in what a sparse format or compression would store).

    Structured (``structured=True``, "channel"): in each ``Conv2d`` (not grouped) and ``Linear``
    whose output channels (features) are safe to remove, the ``round(amount * n)`` channels of
    smallest L1 norm (of the filter scaled by ``|gamma| / sqrt(var + eps)`` when a batch norm
    directly follows, i.e. the folded filter; at least one channel is kept) are removed for real:
    the layer's weight and bias, the batch norms on the way and the next layer's input channels
    (for a dense layer after a flatten, the block of features of each channel) shrink, so the model
    gets smaller and faster. Removing is safe when the traced graph shows the output going, through
    nothing but batch norms, activations, dropout, pooling and (conv to dense) a flatten, into
    exactly one ``Conv2d`` or ``Linear``; a layer whose output meets a residual add, a
    concatenation, several users or the model's output keeps its channels (listed under
    ``skipped`` with the reason). In a ResNet this leaves exactly the first convolution of each
    basic block; the classifier never loses classes. Parameters are replaced, so an optimiser made
    before is stale; the model no longer matches a freshly built one (see :func:`load_resized`).
    Needs a model ``torch.fx`` can trace and without pruning masks.

    The report: ``method``, ``amount``, ``scope``, ``sparsity`` (unstructured: the fraction of zero
    weights in the pruned layers; structured: the fraction of output channels removed from the
    layers that could lose some), ``layers`` (per layer), ``skipped`` (structured), and
    ``parameters``, ``nonzero``, ``state_dict_bytes`` (and with ``example``, an input batch,
    ``latency_ms``) before and after.
    """
    if not 0.0 <= float(amount) < 1.0:
        raise UserError(f"the pruning amount must be in [0, 1), got {amount}", where="amount")
    if scope not in ("layer", "global"):
        raise UserError(f"unknown pruning scope '{scope}'", where="scope", choices=("layer", "global"), got=scope)
    before = size_facts(model)
    if example is not None:
        before.update(measure_latency(model, example))
    report: Report = {"pass": "prune_magnitude", "method": "channel" if structured else "unstructured",
                      "amount": float(amount)}
    if structured:
        _refuse_masked(model, "channel pruning")
        layers, skipped = _prune_channels(model, float(amount))
        total = sum(row["channels_before"] for row in layers)
        removed = total - sum(row["channels_after"] for row in layers)
        report.update(sparsity=removed / total if total else 0.0, layers=layers, skipped=skipped)
    else:
        layers = _prune_unstructured(model, float(amount), scope)
        total = sum(row["weights"] for row in layers)
        report.update(scope=scope, sparsity=sum(row["zeros"] for row in layers) / total if total else 0.0,
                      layers=layers)
    after = size_facts(model)
    if example is not None:
        after.update(measure_latency(model, example))
    return _with_change(report, before, after)


# -- training -----------------------------------------------------------------------------------------------


def _tensors(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    inputs = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    targets = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if len(inputs) != len(targets):
        raise UserError(f"{len(inputs)} inputs but {len(targets)} targets")
    return inputs.to(torch.float32), targets.to(torch.int64)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` cut into batches of ``batch_size``; a last batch of one joins the one before (batch
    norm cannot train on a single example)."""
    batches = list(order.split(max(1, int(batch_size))))
    if len(batches) > 1 and len(batches[-1]) == 1:
        import torch

        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model``'s outputs for ``x`` in eval mode, without autograd (training mode restored)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else None
    model.train(was_training)
    return out


def evaluate(model: nn.Module, x: Any, y: Any, batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (argmax of the outputs) of ``model`` on ``(x, y)``,
    in eval mode (the model's mode is restored after)."""
    import torch.nn.functional as F

    inputs, targets = _tensors(x, y)
    if not len(targets):
        return {"loss": float("nan"), "accuracy": float("nan")}
    outputs = _predict(model, inputs, batch_size)
    return {"loss": float(F.cross_entropy(outputs, targets)),
            "accuracy": float((outputs.argmax(dim=1) == targets).float().mean())}


def finetune(model: nn.Module, train_x: Any, train_y: Any, epochs: int = 1, lr: float = 1e-3,
             batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Train ``model`` in place for ``epochs`` with Adam (``lr``) on cross entropy, in shuffled batches
    of ``batch_size``; return it, in eval mode.

    Deterministic from ``seed`` (shuffle order and dropout; the caller's random state is left as it
    was) for a given thread count. Weights under pruning masks (:func:`prune_magnitude`) stay zero:
    the optimiser updates ``weight_orig`` and the mask is applied at every forward pass.
    """
    import torch
    import torch.nn.functional as F

    x, y = _tensors(train_x, train_y)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(int(epochs)):
            for idx in _batches(torch.randperm(len(y), generator=generator), batch_size):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
    return model.eval()


def distill(teacher: nn.Module, student: nn.Module, train_x: Any, train_y: Any, val_x: Any, val_y: Any,
            epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, temperature: float = 2.0,
            alpha: float = 0.5, seed: int = 0) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``student`` (in place) to imitate ``teacher`` by knowledge distillation (Hinton, Vinyals
    and Dean, 2015); return it (eval mode) and its history.

    The loss of a batch with student logits ``s``, teacher logits ``t`` and labels ``y`` is
    ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``: the student's
    softened distribution is pulled towards the teacher's (the KL divergence of the student's from
    the teacher's, averaged over the batch, which has the same gradient as Hinton's cross entropy
    with soft targets), and ``T^2`` keeps its gradients on the scale of the hard-label term.
    Teacher logits are computed once, in eval mode. Adam with ``lr``, shuffled batches of
    ``batch_size``, deterministic from ``seed`` like :func:`finetune`.

    A high temperature softens the targets so much that a short run learns slowly: on digits
    (teacher MLP 128 hidden, student 16), after 6 epochs ``T = 4, alpha = 0.7`` trailed training on
    labels alone by 3-8 points; after 10 epochs it was within 1 point, and ``T = 2, alpha = 0.5``
    (the defaults) level or better.

    The history has one row per epoch: ``epoch``, ``train_loss`` (the distillation loss),
    ``val_loss`` (cross entropy) and ``val_accuracy``.
    """
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise UserError(f"the distillation temperature must be positive, got {temperature}", where="temperature")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"the distillation weight alpha must be in [0, 1], got {alpha}", where="alpha")
    x, y = _tensors(train_x, train_y)
    soft_targets = F.log_softmax(_predict(teacher, x) / temperature, dim=1)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(1, int(epochs) + 1):
            student.train()
            total = 0.0
            for idx in _batches(torch.randperm(len(y), generator=generator), batch_size):
                optimizer.zero_grad(set_to_none=True)
                logits = student(x[idx])
                soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets[idx],
                                reduction="batchmean", log_target=True)
                loss = alpha * temperature ** 2 * soft + (1.0 - alpha) * F.cross_entropy(logits, y[idx])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            metrics = evaluate(student, val_x, val_y)
            history.append({"epoch": epoch, "train_loss": total / max(1, len(y)),
                            "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]})
    return student.eval(), history


# -- reloading --------------------------------------------------------------------------------------------


def load_resized(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict written after :func:`fold_batchnorm` or channel pruning into ``model`` (freshly
    built from the same spec), reshaping it first (in place; returned).

    ``Conv1d/2d/3d``, ``Linear`` and batch-norm layers take the shapes of their saved tensors (a bias
    missing from the model is added); a batch norm whose entries are all missing from
    ``state_dict`` was folded and becomes ``nn.Identity``. Then the state dict is loaded strictly.
    """
    import torch
    from torch import nn

    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, batchnorms):
            if module.state_dict() and not any(k.startswith(prefix) for k in state_dict):
                _set_submodule(model, name, nn.Identity())
                continue
            if prefix + "running_mean" in state_dict:
                module.running_mean = torch.empty_like(state_dict[prefix + "running_mean"])
                module.running_var = torch.empty_like(state_dict[prefix + "running_var"])
            if module.weight is not None and prefix + "weight" in state_dict:
                module.weight = _as_parameter(torch.empty_like(state_dict[prefix + "weight"]), module.weight)
                module.bias = _as_parameter(torch.empty_like(state_dict[prefix + "bias"]), module.bias)
            if prefix + "running_mean" in state_dict or prefix + "weight" in state_dict:
                key = prefix + ("running_mean" if prefix + "running_mean" in state_dict else "weight")
                module.num_features = state_dict[key].shape[0]
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and prefix + "weight" in state_dict:
            shape = state_dict[prefix + "weight"].shape
            module.weight = _as_parameter(torch.empty(shape, dtype=module.weight.dtype), module.weight)
            if prefix + "bias" in state_dict:
                module.bias = _as_parameter(torch.empty_like(state_dict[prefix + "bias"]), module.bias)
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = int(shape[0]), int(shape[1])
            else:
                module.out_channels, module.in_channels = int(shape[0]), int(shape[1]) * module.groups
    model.load_state_dict(state_dict)
    return model


__all__ = [
    "count_nonzero", "count_parameters", "distill", "effective_state_dict", "evaluate", "finetune",
    "fold_batchnorm", "load_resized", "make_permanent", "measure_latency", "prune_magnitude", "size_facts",
    "state_dict_bytes",
]
