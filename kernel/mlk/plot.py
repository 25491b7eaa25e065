"""``mlk runs plot RUN``: PNG figures of a run's search (needs matplotlib: ``mlk-kernel[plot]``).

- ``learning_curves.png``: the searcher metric of every trial against epochs, one colour per
  bracket (or per trial lineage for searchers without brackets); promotions show as a curve
  that goes on, stops as one that ends.
- ``best_so_far.png``: the best metric so far against cumulative epochs trained, the measure of
  how fast a search finds good models.
- ``artifacts.png`` (runs with a ``compile`` section): accuracy against p50 latency at batch 1 for
  every validated artifact, the marker's area proportional to its size on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlk.errors import UserError
from mlk.report import run_details
from mlk.store import RunStore


def best_so_far(reports: list[dict[str, Any]], metric: str, mode: str) -> tuple[list[int], list[float]]:
    """Cumulative epochs and best-so-far metric, in the order reports were written."""
    sign = 1.0 if mode == "min" else -1.0
    xs, ys = [], []
    spent, best = 0, None
    reached: dict[int, int] = {}
    for r in sorted(reports, key=lambda r: r["time"]):
        spent += max(0, r["resource"] - reached.get(r["trial_id"], 0))
        reached[r["trial_id"]] = max(reached.get(r["trial_id"], 0), r["resource"])
        value = r["metrics"].get(metric)
        if value is None or value != value:
            continue
        if best is None or sign * value < sign * best:
            best = value
        xs.append(spent)
        ys.append(best)
    return xs, ys


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_ref: str, out: Path | None = None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib", hint='install it with: pip install "mlk-kernel[plot]"') from None
    store = RunStore()
    d = run_details(store, run_ref)
    metric, mode = d["spec"]["searcher"]["metric"], d["spec"]["searcher"]["mode"]
    rows = store.db.execute("SELECT trial_id, resource, metrics_json, time FROM metrics WHERE run_id = ?",
                            (d["search_run"],)).fetchall()
    import json

    reports = [{"trial_id": r["trial_id"], "resource": r["resource"], "metrics": json.loads(r["metrics_json"]),
                "time": r["time"]} for r in rows]
    if not reports:
        raise UserError(f"run {d['id']} has no reported metrics to plot")
    out = out or store.home / "plots" / d["id"]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    info = {t["trial_id"]: t["searcher"] for t in d["trials"]}
    groups = sorted({str(i.get("bracket", "-")) for i in info.values()})
    cmap = plt.get_cmap("viridis", max(2, len(groups)))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    seen_labels = set()
    for tid in sorted({r["trial_id"] for r in reports}):
        pts = sorted((r["resource"], r["metrics"].get(metric)) for r in reports if r["trial_id"] == tid)
        pts = [(x, y) for x, y in pts if y is not None]
        group = str(info.get(tid, {}).get("bracket", "-"))
        label = f"bracket {group}" if group != "-" else None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1, alpha=0.7,
                color=cmap(groups.index(group)), label=label if label not in seen_labels else None)
        seen_labels.add(label)
    ax.set_xlabel("epochs")
    ax.set_ylabel(metric)
    if max(r["resource"] for r in reports) > 9:
        ax.set_xscale("log", base=3)
    ax.set_title(f"learning curves of run {d['id']}")
    if any(g != "-" for g in groups):
        ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(plt, fig, out / "learning_curves.png"))

    xs, ys = best_so_far(reports, metric, mode)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.step(xs, ys, where="post")
    ax.set_xlabel("cumulative epochs trained")
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title(f"best so far, run {d['id']} ({d['spec']['searcher']['name']})")
    ax.grid(alpha=0.3)
    written.append(_save(plt, fig, out / "best_so_far.png"))

    if d["validation"]:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        largest = max(r["size_bytes"] for r in d["validation"])
        for r in d["validation"]:
            latency = r["latency"].get("1", r["latency"][min(r["latency"], key=int)])["p50_ms"]
            ax.scatter([latency], [r["accuracy"]], s=40 + 600 * r["size_bytes"] / largest, alpha=0.6)
            ax.annotate(f"{r['artifact'].removeprefix('compile/')}\n{r['size_bytes'] / 1e6:.2f} MB",
                        (latency, r["accuracy"]), fontsize=8, xytext=(6, 4), textcoords="offset points")
        first = d["validation"][0]
        ref_latency = first["reference_latency"].get("1", first["reference_latency"][min(first["reference_latency"],
                                                                                             key=int)])["p50_ms"]
        ax.scatter([ref_latency], [first["reference_accuracy"]], marker="x", color="black", s=60,
                   label=f"trained model ({first['reference_size_bytes'] / 1e6:.2f} MB, framework eager)")
        ax.axhline(first["reference_accuracy"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"p50 latency at batch 1 (ms, {d['validation'][0]['threads']} thread(s))")
        ax.set_ylabel(f"accuracy ({d['validation'][0]['split']} split)")
        ax.set_title(f"artifacts of run {d['id']}: accuracy, latency, size")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "artifacts.png"))
    return written
