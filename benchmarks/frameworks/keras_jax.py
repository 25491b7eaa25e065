"""Epoch time of the keras and jax frameworks through mlk against each framework's idiomatic loop.

For each framework and model (the digits MLP on sklearn's digits; the CIFAR CNN on a small real
image set in CIFAR-10's format, made from the digits by :mod:`benchmarks.frameworks.cifar_format`)
it trains the same model, data, batch size and optimiser for ``EPOCHS`` epochs:

- **mlk**: a trial through ``mlk.trial.run_trial`` (:func:`benchmarks.frameworks.run.through_mlk`:
  the framework plugin's loop, reporting to the run store every epoch and checkpointing when
  ``ctx.checkpoint_due``, with the default policy once, at the request's target);
- **idiomatic**: ``model.fit`` on numpy arrays and ``model.fit`` on a ``tf.data`` pipeline
  (slices, shuffle, batch, prefetch), with ``validation_data`` (keras); a plain loop over a
  ``jax.jit`` train step fed host batches, evaluating on val each epoch (jax). The ratio is taken
  against the fastest of a framework's loops.

Each own loop runs in lockstep with its own mlk trial (:mod:`benchmarks.frameworks.lockstep`: an
mlk epoch, then an epoch of the own loop, ..., the sides swapping places every repeat),
``REPEATS[model]`` times; an epoch's time is from
its side's turn to its end, the first epoch (which compiles) left out. Reported as in
:mod:`benchmarks.frameworks.run`: medians, their ratio, and the paired ratio over every epoch pair,
on which the goal is judged. One thread for both sides.
Run: ``python -m benchmarks.frameworks.keras_jax`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.frameworks.run import (
    BATCH,
    EPOCHS,
    LR,
    REPEATS,
    THREADS,
    Stamp,
    build,
    compare,
    in_lockstep,
    load,
    summary,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_keras_jax.json"


def configure() -> None:
    """One thread for TensorFlow and XLA, before either starts."""
    from mlk_plugins.frameworks.jax._env import configure_threads

    configure_threads(THREADS)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# -- the frameworks' own loops --------------------------------------------------------------------


def keras_compiled(model: str, splits: Any) -> Any:
    """The keras build of ``model``, seeded and compiled as mlk's keras trial compiles it."""
    import keras

    keras.utils.set_random_seed(0)
    net = build("keras", model, splits.meta)
    net.compile(optimizer=keras.optimizers.Adam(LR),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return net


def timed_fit(net: Any, *args: Any, stamp: Stamp, **kwargs: Any) -> dict[str, Any]:
    """``net.fit(*args, **kwargs)`` calling ``stamp`` at each epoch's end."""
    import keras

    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: stamp())
    history = net.fit(*args, callbacks=[callback], verbose=0, **kwargs)
    return {"val_accuracy": float(history.history["val_accuracy"][-1])}


def keras_fit(model: str, data: dict[str, Any], epochs: int, stamp: Stamp) -> dict[str, Any]:
    """``model.fit`` on numpy arrays."""
    splits = load(data)
    return timed_fit(keras_compiled(model, splits), *splits.train, stamp=stamp, batch_size=BATCH, epochs=epochs,
                     validation_data=splits.val, validation_batch_size=512, shuffle=True)


def keras_fit_dataset(model: str, data: dict[str, Any], epochs: int, stamp: Stamp) -> dict[str, Any]:
    """``model.fit`` on the usual ``tf.data`` pipeline (slices, shuffle each epoch, batch, prefetch)."""
    import tensorflow as tf

    splits = load(data)
    net = keras_compiled(model, splits)
    n = len(splits.train[1])
    train = tf.data.Dataset.from_tensor_slices(splits.train).shuffle(n, seed=0).batch(BATCH).prefetch(tf.data.AUTOTUNE)
    val = tf.data.Dataset.from_tensor_slices(splits.val).batch(512)
    return timed_fit(net, train, stamp=stamp, epochs=epochs, validation_data=val)


def jax_loop(model: str, data: dict[str, Any], epochs: int, stamp: Stamp) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    splits = load(data)
    net = build("jax", model, splits.meta)
    x, y = splits.train
    xv, yv = splits.val
    params = net.init(jax.random.key(0), jnp.zeros((1, *x.shape[1:])), train=False)["params"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params: Any, opt_state: Any, xb: Any, yb: Any, key: Any) -> Any:
        def loss_fn(p: Any) -> Any:
            logits = net.apply({"params": p}, xb, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def correct(params: Any, xb: Any, yb: Any) -> Any:
        return (net.apply({"params": params}, xb, train=False).argmax(1) == yb).sum()

    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    accuracy = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH):
            idx = order[start:start + BATCH]
            key, sub = jax.random.split(key)
            params, opt_state, _ = train_step(params, opt_state, x[idx], y[idx], sub)
        accuracy = sum(int(correct(params, xv[i:i + 512], yv[i:i + 512])) for i in range(0, len(yv), 512)) / len(yv)
        stamp()
    return {"val_accuracy": accuracy}


#: Each framework's own loops; the fastest one is the reference of the ratio.
IDIOMATIC: dict[str, dict[str, Any]] = {
    "keras": {"model.fit(numpy)": keras_fit, "model.fit(tf.data)": keras_fit_dataset},
    "jax": {"plain jax.jit loop": jax_loop},
}


# -- the benchmark ----------------------------------------------------------------------------------


def cases(root: Path, quick: bool,
          frameworks: tuple[str, ...] = ("keras", "jax")) -> list[tuple[str, str, dict[str, Any], int]]:
    from benchmarks.frameworks.cifar_format import write_archive

    archive = write_archive(root / "cifar" / "cifar-10-python.tar.gz", per_batch=100 if quick else 250)
    cifar = {"name": "cifar10", "path": str(archive.parent)}
    out = []
    for framework in frameworks:
        out.append((framework, "digits_mlp", {"name": "digits"}, 3 if quick else EPOCHS["digits_mlp"]))
        out.append((framework, "cifar_cnn", cifar, 3 if quick else EPOCHS["cifar_cnn"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, three epochs, a smaller image set")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--frameworks", nargs="+", choices=["keras", "jax"], default=["keras", "jax"],
                        help="which frameworks to measure (default both)")
    args = parser.parse_args(argv)
    configure()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlk-bench-data-") as tmp:
        for framework, model, data, epochs in cases(Path(tmp), args.quick, tuple(args.frameworks)):
            loops = IDIOMATIC[framework]
            repeats = 1 if args.quick else REPEATS[model]
            # One mlk trial in lockstep with each own loop per repeat.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loops}
            mlk_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loops}
            for repeat in range(repeats):  # the sides swap places every repeat
                for name, loop in loops.items():
                    mlk_run, own_run = in_lockstep(framework, model, data, epochs, loop, repeat % 2 == 0)
                    mlk_runs[name].append(mlk_run)
                    runs[name].append(own_run)
            medians = {name: statistics.median(r["epoch_s"] for r in rs) for name, rs in runs.items()}
            label = min(medians, key=lambda name: medians[name])
            row = {"framework": framework, "model": model, "dataset": data["name"], "idiomatic": label,
                   "epochs": epochs, "repeats": repeats, "batch_size": BATCH, "threads": THREADS,
                   **compare(mlk_runs[label], runs[label]), "idiomatic_epoch_s_each": medians,
                   "runs": {**{f"mlk with {name}": r for name, r in mlk_runs.items()}, **runs}}
            rows.append(row)
            print(f"{framework:5s} {model:10s} {summary(row)}", flush=True)
    result = {
        "command": " ".join(["python -m benchmarks.frameworks.keras_jax",
                             *(argv if argv is not None else sys.argv[1:])]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("tensorflow-cpu", "keras", "jax", "jaxlib", "flax", "optax"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


if __name__ == "__main__":
    sys.exit(main())
