"""Drift monitoring: how far live inputs and predictions have moved from the training data.

At deploy time a target records :func:`reference_stats` of the training inputs and the model's
predictions on them. A server keeps a :class:`DriftWindow` of the last N requests and compares it
with the reference by the population stability index (PSI) and the Kullback-Leibler divergence
(:func:`drift_scores`).

What is compared:

- tabular inputs (2-D, or layout ``flat``): each feature, binned at the reference's quantiles;
- images (layout ``nchw``/``nhwc``, or any input with more than two axes): each channel's per-image
  mean, binned at the reference's quantiles, so brightness or colour shifts show per channel;
- outputs: the distribution of predicted classes (the argmax of the logits).

Input scores are the worst feature's (or channel's): one feature gone wrong is a drift. Proportions
are floored at a small epsilon so a bin that is empty on one side gives a large, finite score.
The reference is plain JSON; numpy is imported inside the functions (kernel rule).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

#: Floor of every bin proportion in PSI and KL (an empty bin would make both infinite).
EPSILON = 1e-4
#: Version of the reference format, stored in it.
FORMAT = 1


def _layout(inputs: Any, layout: str | None) -> str:
    """``flat``, ``nchw`` or ``nhwc`` for this batch (a 4-D input without a layout is taken as NCHW)."""
    lay = (layout or "").lower()
    if inputs.ndim <= 2 or lay == "flat":
        return "flat"
    if lay in ("nchw", "nhwc"):
        return lay
    if inputs.ndim == 4:
        return "nchw"
    return "flat"


def _statistics(inputs: Any, layout: str) -> Any:
    """The per-example values that are binned: features (flat) or per-channel means (images)."""
    import numpy as np

    x = np.asarray(inputs, dtype=np.float64)
    if layout == "flat":
        return x.reshape(len(x), -1)
    if layout == "nhwc":
        return x.reshape(len(x), -1, x.shape[-1]).mean(axis=1)
    return x.reshape(len(x), x.shape[1], -1).mean(axis=2)


def _classes(outputs: Any) -> Any:
    """Predicted class per example: the argmax of logits, or the outputs themselves when 1-D."""
    import numpy as np

    y = np.asarray(outputs)
    if y.ndim == 1:
        return y.astype(np.int64)
    return y.reshape(len(y), -1).argmax(axis=1)


def _bin_index(edges: Any, column: Any) -> Any:
    import numpy as np

    return np.searchsorted(np.asarray(edges, dtype=np.float64), column, side="right")


def _proportions(index: Any, size: int) -> Any:
    import numpy as np

    counts = np.bincount(np.clip(index, 0, size - 1), minlength=size).astype(np.float64)
    return counts / max(1.0, counts.sum())


def reference_stats(inputs: Any, outputs: Any, *, layout: str | None = None, bins: int = 10) -> dict[str, Any]:
    """The reference distributions of ``inputs`` (a batch, batch first) and ``outputs`` (logits or
    class ids), as JSON-able data for :func:`drift_scores` and :class:`DriftWindow`.

    Args:
        inputs: training (or validation) inputs the model was fit on.
        outputs: the model's outputs on ``inputs``: logits ``(N, K)`` or class ids ``(N,)``.
        layout: ``flat``, ``nchw`` or ``nhwc`` (the dataset's layout); None guesses from the shape.
        bins: quantile bins per feature or channel (ties merge bins, so a feature may have fewer).
    """
    import numpy as np

    x = np.asarray(inputs)
    if len(x) == 0:
        raise ValueError("reference_stats needs at least one input")
    if bins < 2:
        raise ValueError(f"bins must be at least 2, not {bins}")
    lay = _layout(x, layout)
    stats = _statistics(x, lay)
    quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    columns = []
    for j in range(stats.shape[1]):
        edges = np.unique(np.quantile(stats[:, j], quantiles))
        p = _proportions(_bin_index(edges, stats[:, j]), len(edges) + 1)
        columns.append({"edges": edges.tolist(), "p": p.tolist()})
    y = np.asarray(outputs)
    classes = _classes(y)
    num_classes = int(y.reshape(len(y), -1).shape[1]) if y.ndim > 1 else int(classes.max()) + 1
    return {
        "format": FORMAT,
        "kind": "features" if lay == "flat" else "channels",
        "layout": lay,
        "bins": bins,
        "examples": len(x),
        "input": columns,
        "output": {"num_classes": num_classes, "p": _proportions(classes, num_classes).tolist()},
    }


def _psi_kl(live: Any, ref: Any) -> tuple[float, float]:
    """PSI and KL(live || reference) of two proportion vectors, floored at :data:`EPSILON`."""
    import numpy as np

    p = np.maximum(np.asarray(live, dtype=np.float64), EPSILON)
    q = np.maximum(np.asarray(ref, dtype=np.float64), EPSILON)
    p, q = p / p.sum(), q / q.sum()
    log = np.log(p / q)
    return float(((p - q) * log).sum()), float((p * log).sum())


def _scores(reference: dict[str, Any], stats: Any, classes: Any) -> dict[str, float]:
    psi, kl = 0.0, 0.0
    for j, column in enumerate(reference["input"]):
        size = len(column["p"])
        live = _proportions(_bin_index(column["edges"], stats[:, j]), size)
        a, b = _psi_kl(live, column["p"])
        psi, kl = max(psi, a), max(kl, b)
    out = reference["output"]
    o_psi, o_kl = _psi_kl(_proportions(classes, len(out["p"])), out["p"])
    return {"input_psi": psi, "input_kl": kl, "output_psi": o_psi, "output_kl": o_kl}


def _check_width(reference: dict[str, Any], stats: Any) -> None:
    if stats.shape[1] != len(reference["input"]):
        what = "features" if reference["kind"] == "features" else "channels"
        raise ValueError(f"inputs have {stats.shape[1]} {what}; the drift reference has {len(reference['input'])}")


def drift_scores(reference: dict[str, Any], inputs: Any, outputs: Any) -> dict[str, float]:
    """Drift of a batch of live ``inputs`` and ``outputs`` from ``reference`` (:func:`reference_stats`).

    Returns ``input_psi`` and ``input_kl`` (the largest over features or channels), ``output_psi`` and
    ``output_kl`` (predicted-class distribution). About 0 when nothing moved; PSI above ~0.2 is usually
    read as a significant shift. An empty batch gives an empty mapping.
    """
    import numpy as np

    x = np.asarray(inputs)
    if len(x) == 0:
        return {}
    stats = _statistics(x, reference["layout"])
    _check_width(reference, stats)
    return _scores(reference, stats, _classes(outputs))


class DriftWindow:
    """The last ``size`` live examples and predictions, and their drift from ``reference``.

    ``add`` and ``scores`` may be called from any thread. Only the binned statistics are kept (one
    row of features or channel means per example), so a window of images stays small.
    """

    def __init__(self, reference: dict[str, Any], size: int = 1000, min_examples: int = 50) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, not {size}")
        self.reference = reference
        self.size = size
        self.min_examples = min(min_examples, size)
        self._stats: deque[Any] = deque(maxlen=size)
        self._classes: deque[int] = deque(maxlen=size)
        self._seen = 0
        self._lock = threading.Lock()

    def add(self, inputs: Any, outputs: Any) -> None:
        """Record a batch of inputs and the model's outputs for them."""
        import numpy as np

        x = np.asarray(inputs)
        if len(x) == 0:
            return
        stats = _statistics(x, self.reference["layout"])
        _check_width(self.reference, stats)
        classes = _classes(outputs)
        with self._lock:
            self._stats.extend(stats)
            self._classes.extend(int(c) for c in classes)
            self._seen += len(x)

    def __len__(self) -> int:
        with self._lock:
            return len(self._stats)

    @property
    def seen(self) -> int:
        """Examples added since the window was made (not only those still in it)."""
        with self._lock:
            return self._seen

    def scores(self) -> dict[str, float]:
        """Drift of the examples in the window; empty until it holds ``min_examples``."""
        import numpy as np

        with self._lock:
            if len(self._stats) < self.min_examples:
                return {}
            stats = np.stack(list(self._stats))
            classes = np.fromiter(self._classes, dtype=np.int64, count=len(self._classes))
        return _scores(self.reference, stats, classes)


def worst(scores: dict[str, float]) -> float:
    """The largest PSI in ``scores`` (what an alert threshold is compared with); 0 when empty."""
    values = [v for k, v in scores.items() if k.endswith("_psi") and not math.isnan(v)]
    return max(values, default=0.0)
