"""One trial: the task a backend runs, its result, and the context model code sees.

:func:`run_trial` is what executes inside a worker process. It rebuilds the trial's plugins from
the task (plain data, so it pickles to any backend), binds the trial's hyperparameters into the
``framework``, ``data`` and ``model`` sections, and hands a :class:`TrialContext` to the
framework plugin, which owns the training loop.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlk.errors import MlkError, UserError

if TYPE_CHECKING:
    from mlk.distributed import Distributed


@dataclass
class TrialTask:
    """Everything a worker needs to run one request of one trial; plain data."""

    run_id: str
    trial_id: int
    hparams: dict[str, Any]
    seed: int
    target: int
    spec: dict[str, Any]
    home: str
    parent: int | None = None
    threads: int = 1
    attempt: int = 0


@dataclass
class TrialResult:
    """What came of a :class:`TrialTask`: the resource reached and the last metrics, or an error."""

    trial_id: int
    resource: int
    metrics: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    error: str | None = None
    user_error: bool = False
    seconds: float = 0.0


_DATASETS: dict[str, Any] = {}
_FLAGS_RECORDED: set[tuple[str, ...]] = set()
_driver_gone = threading.Event()
_busy = threading.Event()


def watch_driver(pid: int, interval: float = 1.0) -> None:
    """In a worker process: when the driver ``pid`` dies, ask the running trial to stop after its
    epoch (:meth:`TrialContext.should_stop`), then exit once no trial runs. Without this, workers
    of a SIGKILLed driver would wait for work forever."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _driver_gone.set()
            if _driver_gone.is_set() and not _busy.is_set():
                os._exit(0)

    threading.Thread(target=watch, name="mlk-driver-watch", daemon=True).start()


def derive_seed(base: int, *parts: object) -> int:
    """A 31-bit seed derived from ``base`` and ``parts``; the same inputs give the same seed everywhere."""
    text = ":".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def checkpoint_prefix(run_id: str, trial_id: int, resource: int) -> str:
    return f"runs/{run_id}/trials/{trial_id}/ckpt-{resource:06d}"


class TrialContext:
    """The small world a trial's code sees.

    Attributes:
        run_id, trial_id: where this trial belongs.
        hparams: this trial's hyperparameters.
        seed: this trial's seed; :meth:`epoch_seed` derives one per epoch, so a resumed trial
            draws exactly what an uninterrupted one would.
        target: the resource (epochs, cumulative) to train up to in this request.
        framework, data, model: the spec's sections with ``${hp.*}`` bound to ``hparams``.
        threads: the CPU threads this trial may use.
        deterministic: whether the spec asks for bit-exact reproducibility.
        distributed: None for a single-process trial; with ``resources.slots_per_trial: N > 1``, a
            :class:`mlk.distributed.Distributed` (rank, world_size, addr, port, worker_ports,
            backend) saying where this process sits among the trial's N. Every rank reports and
            saves as usual; only rank 0's reports and checkpoints are recorded (:attr:`is_main`).
    """

    def __init__(self, task: TrialTask, store: Any, storage: Any, hooks: Any,
                 distributed: Distributed | None = None) -> None:
        from mlk.sections import StorageConfig
        from mlk.spec import bind_hparams

        self.task = task
        self.run_id = task.run_id
        self.trial_id = task.trial_id
        self.hparams = dict(task.hparams)
        self.seed = task.seed
        self.target = task.target
        self.parent = task.parent
        self.threads = task.threads
        self.spec = task.spec
        self.deterministic = bool(task.spec.get("reproducibility", {}).get("deterministic", False))
        self.framework = bind_hparams(task.spec["framework"], self.hparams, "framework")
        self.data = bind_hparams(task.spec.get("data"), self.hparams, "data")
        self.model = bind_hparams(task.spec.get("model"), self.hparams, "model")
        self.metric = task.spec["searcher"]["metric"]
        self.mode = task.spec["searcher"].get("mode", "min")
        storage_spec = task.spec.get("storage", {})
        self.keep = storage_spec.get("keep", {})
        default_every = StorageConfig.model_fields["checkpoint_every_s"].default  # for specs recorded before it
        self.checkpoint_every_s = float(storage_spec.get("checkpoint_every_s", default_every))
        self._last_save = time.monotonic()  # the request's start counts as the last save
        self.store = store
        self.storage = storage
        self.hooks = hooks
        self.last_resource = 0
        self.last_metrics: dict[str, Any] = {}
        self._stop = False
        self._dataset: Any = None
        self.distributed = distributed

    @property
    def is_main(self) -> bool:
        """True in a single-process trial and on rank 0 of a data-parallel one: the process whose
        reports and checkpoints are recorded."""
        return self.distributed is None or self.distributed.rank == 0

    # -- seeds and control ------------------------------------------------------------------

    def epoch_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "epoch", epoch)

    def should_stop(self) -> bool:
        """True once the kernel asked this trial to stop (SIGTERM), or the driver that started this
        worker is gone (killed); save and return soon."""
        return self._stop or _driver_gone.is_set()

    def request_stop(self) -> None:
        self._stop = True

    # -- data and model -----------------------------------------------------------------------

    def load_data(self) -> Any:
        """The dataset's :class:`mlk.datasets.DataSplits` (loaded once per process per config)."""
        if self.data is None:
            raise UserError("this trial loads data, but the spec has no `data` section", where="data",
                            hint="add e.g. data: {name: digits}")
        if self._dataset is None:
            import json

            from mlk.registry import registry

            key = json.dumps(self.data, sort_keys=True, default=str)
            if key not in _DATASETS:  # a worker keeps its last dataset for the next trial's request
                _DATASETS.clear()
                _DATASETS[key] = load_dataset(registry(), self.data)
            self._dataset = _DATASETS[key]
        return self._dataset

    def build_model(self, framework: str) -> Any:
        """The spec's model for ``framework``: a builtin by ``name`` or any ``_target_`` callable."""
        from mlk.registry import registry

        if self.model is None:
            raise UserError("this trial builds a model, but the spec has no `model` section", where="model",
                            hint="add e.g. model: {name: digits_mlp}")
        meta = self.load_data().meta
        return build_model(registry(), self.model, framework, meta)

    # -- reporting ----------------------------------------------------------------------------

    def report(self, resource: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (floats) reached at ``resource`` epochs; must include the searcher metric."""
        clean = {k: float(v) for k, v in metrics.items()}
        if self.metric not in clean:
            raise UserError(
                f"trial {self.trial_id} reported {sorted(clean)} but not the searcher metric '{self.metric}'",
                where="searcher.metric", choices=clean, got=self.metric,
            )
        value = clean[self.metric]
        if not self.is_main:  # the other ranks of a data-parallel trial: rank 0 records
            self.last_resource, self.last_metrics = resource, clean
            return
        self.store.record_metrics(self.run_id, self.trial_id, resource, clean, value)
        self.last_resource = resource
        self.last_metrics = clean
        self.hooks.mlk_trial_reported(run_id=self.run_id, trial_id=self.trial_id, resource=resource,
                                      metrics=clean)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether the loop should save a checkpoint after ``epoch``: at the request's target (the
        searcher continues or promotes from there), when asked to stop, and otherwise once
        ``storage.checkpoint_every_s`` seconds have passed since the last save (0: every epoch).

        A crash loses at most that many seconds of training. Ranks of a data-parallel trial may see
        different clocks: agree on the answer across ranks (any rank due) before saving.
        """
        if epoch >= self.target or self.should_stop() or self.checkpoint_every_s <= 0:
            return True
        return time.monotonic() - self._last_save >= self.checkpoint_every_s

    @contextmanager
    def save_checkpoint(self, resource: int, meta: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield an empty folder; what is written there becomes this trial's checkpoint at ``resource``.

        Files are uploaded with sha256 checksums when the block ends without error; then the
        retention policy (``storage.keep``) deletes older checkpoints of this trial. On ranks other
        than 0 of a data-parallel trial the folder is discarded (the replicas are identical).
        """
        from mlk.storage import put_dir

        tmp = Path(tempfile.mkdtemp(prefix=f"mlk-ckpt-{self.trial_id}-"))
        try:
            folder = tmp / "ckpt"
            folder.mkdir()
            yield folder
            if not self.is_main:
                return
            prefix = checkpoint_prefix(self.run_id, self.trial_id, resource)
            info = {"trial_id": self.trial_id, "resource": resource, "hparams": self.hparams, **(meta or {})}
            manifest = put_dir(self.storage, folder, prefix, info)
            value = self.last_metrics.get(self.metric) if self.last_resource == resource else None
            self.store.add_checkpoint(self.run_id, self.trial_id, resource, self.storage.uri(prefix), manifest, value)
            self.hooks.mlk_checkpoint_saved(run_id=self.run_id, trial_id=self.trial_id, resource=resource,
                                            uri=self.storage.uri(prefix))
            self._apply_retention()
        finally:
            self._last_save = time.monotonic()
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def restore_checkpoint(self, resource: int | None = None) -> Iterator[tuple[Path, int] | None]:
        """Yield ``(folder, resource)`` of this trial's latest checkpoint (or the one at ``resource``),
        or of ``parent``'s for a new trial that starts from another; None when there is none."""
        from mlk.storage import get_dir

        ckpts = self.store.checkpoints(self.run_id, self.trial_id)
        if not ckpts and self.parent is not None:
            ckpts = self.store.checkpoints(self.run_id, self.parent)
        if resource is not None:
            ckpts = [c for c in ckpts if c["resource"] == resource]
        if not ckpts:
            yield None
            return
        latest = ckpts[-1]
        tmp = Path(tempfile.mkdtemp(prefix=f"mlk-restore-{self.trial_id}-"))
        try:
            prefix = checkpoint_prefix(self.run_id, latest["trial_id"], latest["resource"])
            get_dir(self.storage, prefix, latest["manifest"], tmp)
            yield tmp, int(latest["resource"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _apply_retention(self) -> None:
        ckpts = self.store.checkpoints(self.run_id, self.trial_id)
        n_latest = max(1, int(self.keep.get("trial_latest", 1)))  # the latest is needed to resume
        n_best = int(self.keep.get("trial_best", 1))
        keep = {c["resource"] for c in ckpts[-n_latest:]}
        sign = 1.0 if self.mode == "min" else -1.0
        scored = sorted((c for c in ckpts if c["value"] is not None), key=lambda c: sign * c["value"])
        keep |= {c["resource"] for c in scored[:n_best]}
        for c in ckpts:
            if c["resource"] not in keep:
                self.storage.delete_prefix(checkpoint_prefix(self.run_id, self.trial_id, c["resource"]))
                self.store.mark_checkpoint_deleted(self.run_id, self.trial_id, c["resource"])


def load_dataset(reg: Any, data: dict[str, Any]) -> Any:
    """Validate ``data`` with its plugin's Config and load it."""
    cls = reg.get("datasets", data["name"], where="data.name")
    cls.ensure_available()
    from mlk.spec import validate_section

    return cls(validate_section(cls.Config, data, "data")).load()


def build_model(reg: Any, model: dict[str, Any], framework: str, meta: dict[str, Any]) -> Any:
    """Build the ``model:`` section for ``framework``."""
    from mlk.spec import validate_section

    options = {k: v for k, v in model.items() if k not in ("name", "_target_")}
    if model.get("_target_"):
        from mlk.imports import import_object

        factory = import_object(model["_target_"], where="model._target_")
        try:
            wants_meta = "meta" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            wants_meta = False
        return factory(**options, meta=meta) if wants_meta else factory(**options)
    cls = reg.get("models", model["name"], where="model.name")
    cls.ensure_available()
    plugin = cls(validate_section(cls.Config, options, "model"))
    if framework not in cls.frameworks:
        raise plugin.unsupported(framework)
    return plugin.build(framework, meta)


def run_trial(task: TrialTask, distributed: Distributed | None = None) -> TrialResult:
    """Run one trial request to completion; never raises.

    With ``resources.slots_per_trial: N > 1`` this process supervises N rank processes
    (:func:`mlk.distributed.run_distributed`), each of which calls ``run_trial`` with its
    ``distributed`` place; otherwise it trains here.
    """
    slots = int((task.spec.get("resources") or {}).get("slots_per_trial", 1))
    if slots > 1 and distributed is None:
        return _supervise(task, slots)
    started = time.time()
    store = None
    _busy.set()
    try:
        from mlk.registry import registry
        from mlk.spec import validate_section
        from mlk.store import RunStore

        store = RunStore(Path(task.home))
        reg = registry()
        storage_cls = reg.get("storage", task.spec["storage"]["name"], where="storage.name")
        storage = storage_cls(validate_section(storage_cls.Config, task.spec["storage"], "storage"), Path(task.home))
        ctx = TrialContext(task, store, storage, reg.hooks, distributed)
        fw_cls = reg.get("frameworks", ctx.framework["name"], where="framework.name")
        fw_cls.ensure_available()
        framework = fw_cls(validate_section(fw_cls.Config, ctx.framework, "framework"))
        with _on_sigterm(lambda *_: ctx.request_stop()):
            framework.train(ctx)
        flags = framework.determinism(ctx.deterministic)  # idempotent: reads back what training used
        if flags and ctx.is_main:
            _record_flags(store, task, fw_cls.name, flags)
        if not ctx.last_metrics:
            # Nothing left to train (the trial already reached its target before a restart): its
            # result is what it reported then.
            earlier = [m for m in store.metrics(task.run_id, task.trial_id) if m["resource"] <= task.target]
            if earlier:
                ctx.last_resource, ctx.last_metrics = earlier[-1]["resource"], earlier[-1]["metrics"]
        return TrialResult(task.trial_id, ctx.last_resource, ctx.last_metrics, ctx.last_metrics.get(ctx.metric),
                           seconds=time.time() - started)
    except UserError as e:
        return TrialResult(task.trial_id, 0, error=e.render(), user_error=True, seconds=time.time() - started)
    except MlkError as e:
        return TrialResult(task.trial_id, 0, error=str(e), seconds=time.time() - started)
    except Exception:
        return TrialResult(task.trial_id, 0, error=traceback.format_exc(), seconds=time.time() - started)
    finally:
        _busy.clear()
        if store is not None:
            store.close()


@contextmanager
def _on_sigterm(handler: Any) -> Iterator[None]:
    """SIGTERM calls ``handler`` while the block runs. Only the main thread may set signal handlers: a
    trial run from another thread (a notebook's, a benchmark's) keeps the process's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record_flags(store: Any, task: TrialTask, framework: str, flags: dict[str, Any]) -> None:
    """Record the framework's determinism flags in the run's provenance: once per run, framework and
    flags in each process, not once per request (a write the next request would wait for)."""
    import json

    key = (task.home, task.run_id, framework, json.dumps(flags, sort_keys=True, default=str))
    if key in _FLAGS_RECORDED:
        return
    store.add_event(task.run_id, "framework_flags", {"trial_id": task.trial_id, "framework": framework,
                                                     "flags": flags})
    _FLAGS_RECORDED.add(key)


def _supervise(task: TrialTask, slots: int) -> TrialResult:
    """Run ``task`` data-parallel on ``slots`` rank processes; SIGTERM and the driver's death reach
    every rank as a stop request."""
    from mlk.distributed import run_distributed

    stop = threading.Event()
    _busy.set()
    try:
        with _on_sigterm(lambda *_: stop.set()):
            return run_distributed(task, slots, should_stop=lambda: stop.is_set() or _driver_gone.is_set())
    finally:
        _busy.clear()
