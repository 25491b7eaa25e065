"""What a run records about where it ran, so it can be reproduced and compared.

The kernel's part (via the ``mlk_provenance`` default): Python, every installed package and its
version, git commit and dirty state of the working directory, hardware and thread settings.
The runner adds the resolved spec's hash, the seeds and the plugin set; the data node adds the
data's fingerprint; plugins add their own facts through the same hook.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED",
               "CUBLAS_WORKSPACE_CONFIG")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"repository": False}
    status = _git("status", "--porcelain") or ""
    return {"repository": True, "commit": commit, "dirty": bool(status),
            "changed_files": [ln[3:] for ln in status.splitlines()][:200]}


def hardware() -> dict[str, Any]:
    cpu_model = None
    mem_total = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            mem_total = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")), None)
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"machine": platform.machine(), "processor": cpu_model, "cpu_count": os.cpu_count(),
            "usable_cpus": affinity, "memory": mem_total, "node": platform.node()}


def environment() -> dict[str, Any]:
    packages = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name.lower()] = dist.version
    return {
        "python": {"version": sys.version.split()[0], "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "packages": dict(sorted(packages.items())),
        "git": git_state(),
        "cwd": os.getcwd(),
        "hardware": hardware(),
        "threads": {k: os.environ.get(k) for k in THREAD_VARS},
    }


def collect_provenance(spec: Any, reg: Any) -> dict[str, Any]:
    """The full provenance record of a new run of ``spec``."""
    from mlk.trial import derive_seed

    record: dict[str, Any] = {}
    for part in reversed(reg.hooks.mlk_provenance(spec=spec)):  # the trylast default first
        if part:
            record.update(part)
    record["spec"] = {"name": spec.name, "file": str(spec.file), "hash": spec.hash}
    record["seeds"] = {
        "seed": spec["seed"],
        "searcher": derive_seed(spec["seed"], "searcher"),
        "trial_rule": "derive_seed(seed, 'trial', trial_id); epoch e: derive_seed(trial_seed, 'epoch', e)",
    }
    record["plugins"] = [
        {"plugin": e.key, "distribution": e.distribution, "version": e.version, "value": e.value}
        for e in reg.entries() if reg.allowed(e)
    ]
    record["reproducibility"] = spec["reproducibility"]
    return record
