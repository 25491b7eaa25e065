"""Search benchmarks of issue 3: multi-fidelity searchers replayed on recorded digits learning curves
and on a multi-fidelity Hartmann-6, side by side with Optuna and Ray Tune, plus a live run.

    python -m benchmarks.search.curves          # once: records the learning-curve table (committed)
    python -m benchmarks.search.run [--quick]   # replay + Hartmann + live; writes results.json
"""
