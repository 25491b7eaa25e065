"""A closed-loop load generator: ``concurrency`` clients, each sending its next request as soon as the
last one is answered, for ``seconds`` after ``warmup`` seconds. Runs in its own process (aiohttp on one
event loop), so its GIL is not the server's.

    python -m benchmarks.serve.load URL BODIES.json CONCURRENCY SECONDS WARMUP

``BODIES.json`` is a list of request bodies (strings) sent round-robin. Prints one JSON object:
``ok``, ``errors`` (count by status or exception), ``seconds``, ``throughput`` (answers per second) and
latency percentiles in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from typing import Any


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))] * 1000.0  # nearest rank

    return {"p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": s[-1] * 1000.0,
            "mean_ms": sum(s) / len(s) * 1000.0}


async def run(url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    import aiohttp

    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ok = 0
    send_headers = {"Content-Type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(i: int) -> None:
            nonlocal ok
            k = i
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                body = bodies[k % len(bodies)]
                k += concurrency
                try:
                    async with session.post(url, data=body, headers=send_headers) as r:
                        await r.read()
                        status = r.status
                except Exception as e:  # counted, not raised: a closed loop keeps going
                    status, t1 = -1, time.perf_counter()
                    if t0 >= measure_from and t1 <= end:
                        errors[type(e).__name__] += 1
                    continue
                t1 = time.perf_counter()
                if t0 < measure_from or t1 > end:
                    continue
                if status == 200:
                    ok += 1
                    latencies.append(t1 - t0)
                else:
                    errors[str(status)] += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"concurrency": concurrency, "ok": ok, "errors": dict(errors), "seconds": seconds,
            "throughput": ok / seconds, **percentiles(latencies)}


def main(argv: list[str]) -> int:
    url, bodies_file, concurrency, seconds, warmup = argv[:5]
    bodies = [b.encode() for b in json.loads(open(bodies_file).read())]
    result = asyncio.run(run(url, bodies, int(concurrency), float(seconds), float(warmup)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
