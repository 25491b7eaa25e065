"""Drift scores (``mlk.drift``) on real data: held-out digits look like the training split, shifted
ones do not; the same for image channels; the sliding window forgets old examples."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from mlk.drift import DriftWindow, drift_scores, reference_stats, worst
from mlk_plugins.datasets.digits import DigitsDataset


@pytest.fixture(scope="module")
def digits():
    splits = DigitsDataset(DigitsDataset.Config(name="digits")).load()
    (x, y), (xt, _) = splits.train, splits.test
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(10)])

    def logits(batch):  # a nearest-centroid classifier fit on the training split: a real model
        return -((batch[:, None, :] - centroids[None]) ** 2).sum(axis=2)

    return x, xt, logits


def test_held_out_digits_do_not_drift(digits):
    x, xt, logits = digits
    ref = reference_stats(x, logits(x))
    json.dumps(ref)  # stored in a bundle: must be plain JSON
    assert ref["kind"] == "features" and len(ref["input"]) == 64 and ref["output"]["num_classes"] == 10
    scores = drift_scores(ref, xt, logits(xt))
    assert set(scores) == {"input_psi", "input_kl", "output_psi", "output_kl"}
    assert scores["output_psi"] < 0.05, scores
    assert scores["input_psi"] < 0.2, scores


def test_shifted_digits_drift(digits):
    x, xt, logits = digits
    ref = reference_stats(x, logits(x))
    held = drift_scores(ref, xt, logits(xt))
    brighter = np.clip(xt + 0.3, 0, 1)
    shifted = drift_scores(ref, brighter, logits(brighter))
    assert shifted["input_psi"] > 1.0 and shifted["input_psi"] > 10 * held["input_psi"], (held, shifted)
    assert shifted["input_kl"] > 10 * held["input_kl"]
    # only the inputs of one class: inputs and the predicted-class distribution both move
    ones = xt[logits(xt).argmax(1) == 1]
    one_class = drift_scores(ref, ones, logits(ones))
    assert one_class["output_psi"] > 1.0 and one_class["output_kl"] > 1.0, one_class
    assert worst(one_class) >= one_class["output_psi"]


def test_image_channels(digits):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(600, 3, 8, 8)).astype(np.float32) * np.array([1.0, 0.5, 0.2])[None, :, None, None]
    ref = reference_stats(images[:400], rng.normal(size=(400, 5)), layout="nchw")
    assert ref["kind"] == "channels" and len(ref["input"]) == 3
    same = drift_scores(ref, images[400:], rng.normal(size=(200, 5)))
    dark_blue = images[400:].copy()
    dark_blue[:, 2] *= 0.5
    shifted = drift_scores(ref, dark_blue, rng.normal(size=(200, 5)))
    assert same["input_psi"] < 0.25 and shifted["input_psi"] > 2.0, (same, shifted)
    # channels last: the same numbers from the transposed batch
    ref_hwc = reference_stats(images[:400].transpose(0, 2, 3, 1), rng.normal(size=(400, 5)), layout="nhwc")
    assert ref_hwc["input"] == ref["input"]


def test_window_slides_and_is_thread_safe(digits):
    x, xt, logits = digits
    window = DriftWindow(reference_stats(x, logits(x)), size=300, min_examples=50)
    assert window.scores() == {}
    bright = np.clip(xt + 0.3, 0, 1)
    threads = [threading.Thread(target=lambda i=i: window.add(bright[i::4], logits(bright[i::4]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert window.seen == len(xt) and len(window) == 300
    assert window.scores()["input_psi"] > 1.0
    for start in range(0, len(xt), 40):  # held-out inputs push the shifted ones out of the window
        window.add(xt[start:start + 40], logits(xt[start:start + 40]))
    assert window.scores()["input_psi"] < 0.25


def test_mismatched_reference(digits):
    x, _, logits = digits
    ref = reference_stats(x, logits(x))
    with pytest.raises(ValueError, match="10 features; the drift reference has 64"):
        drift_scores(ref, x[:, :10], logits(x))
    assert drift_scores(ref, x[:0], logits(x)[:0]) == {}
