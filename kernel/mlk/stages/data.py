"""The ``data`` node: load the dataset once in the driver, fingerprint it, record its sizes.

It is volatile (always runs), so a missing dataset is reported before any trial starts, and
changed data changes every downstream key.
"""

from __future__ import annotations

from typing import Any

from mlk.graph import Node
from mlk.spec import bind_hparams
from mlk.trial import load_dataset


def run(node: Node, ctx: Any) -> dict[str, Any]:
    data = bind_hparams(ctx.spec["data"], ctx.spec.space.probe(), "data")
    splits = load_dataset(ctx.registry, data)
    fingerprint = splits.fingerprint()
    outputs = {"fingerprint": fingerprint, "sizes": splits.sizes(), "meta": splits.meta, "planned_key": node.key}
    run = ctx.store.run(ctx.run_id)
    provenance = run["provenance"] or {}
    provenance["data"] = {"name": data["name"], "fingerprint": fingerprint, "sizes": splits.sizes()}
    ctx.store.update_run(ctx.run_id, provenance_json=provenance)
    ctx.say(f"data: {data['name']} {splits.sizes()} sha256 {fingerprint[:12]}")
    return outputs
