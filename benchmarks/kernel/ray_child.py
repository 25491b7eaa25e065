"""The Ray Tune side of the per-trial benchmark, run in its own process by ``benchmarks.kernel.run``.

``python -m benchmarks.kernel.ray_child CONFIG=TRIALS ...`` with CONFIG ``default`` (Tune as the
brief describes it: function trainable, BasicVariantGenerator, ``max_concurrent_trials=2``) or
``reuse`` (the same with ``reuse_actors=True``). The parent sets ``RAY_TMPDIR`` to a folder of
its own (and ``HOME`` to it, where Ray 2.60 writes the ``~/.ray/auth_token`` it generates for a
new local cluster), so everything Ray writes lands there; it then removes that folder and stops
any process left behind.

Output on stdout, one line each: ``progress: ...`` while it runs, then ``result: {json}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def say(message: str) -> None:
    print(f"progress: {message}", flush=True)


def trainable(config: dict[str, Any]) -> None:
    """Reports once and returns, like ``benchmarks.kernel.trials.noop``."""
    from ray import tune

    tune.report({"loss": float(config["x"])})


def fit(label: str, trials: int, storage: str, reuse_actors: bool) -> dict[str, Any]:
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self, total: int) -> None:
            self.done = 0
            self.total = total
            self.step = max(1, total // 5)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.done += 1
            if self.done % self.step == 0 or self.done == self.total:
                say(f"ray tune ({label}): {self.done}/{self.total} trials done")

    started = time.perf_counter()
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=trials, max_concurrent_trials=2,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=f"bench-{label}", storage_path=storage, verbose=0,
                                  callbacks=[Progress(trials)]),
    )
    results = tuner.fit()
    seconds = time.perf_counter() - started
    return {"trials": trials, "completed": len(results) - results.num_errors, "errors": results.num_errors,
            "reuse_actors": reuse_actors, "seconds": seconds, "per_trial_s": seconds / trials}


def main(argv: list[str]) -> int:
    plan = [(label, int(n)) for label, _, n in (arg.partition("=") for arg in argv)]
    out: dict[str, Any] = {"configs": {}}
    t0 = time.perf_counter()
    import ray
    import ray.tune  # part of what a Tune user pays at import

    out["import_s"] = time.perf_counter() - t0
    say(f"ray imported in {out['import_s']:.2f}s; ray.init(num_cpus=2, include_dashboard=False) ...")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out["init_s"] = time.perf_counter() - t0
    out["node_ip"] = ray.util.get_node_ip_address()
    say(f"ray.init took {out['init_s']:.2f}s (node ip {out['node_ip']})")
    storage = os.path.join(os.environ["RAY_TMPDIR"], "tune-results")
    try:
        for label, trials in plan:
            say(f"ray tune ({label}): {trials} trials, 2 at a time ...")
            out["configs"][label] = fit(label, trials, storage, reuse_actors=label == "reuse")
            say(f"ray tune ({label}): {out['configs'][label]['per_trial_s'] * 1000:.1f} ms/trial")
    finally:
        t0 = time.perf_counter()
        ray.shutdown()
        out["shutdown_s"] = time.perf_counter() - t0
    print("result: " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
