"""Replay searchers against recorded learning curves or a multi-fidelity function, counting epochs.

Nothing trains here: a request for configuration c up to resource r is answered from the table
(the value c reached after r epochs) or from f(x, r). What is measured is how many epochs each
method spends before it finds a good configuration.

**Problems.** :class:`CurveTable` wraps the digits table of :mod:`benchmarks.search.curves`. A
searcher proposes points of the digits search space (its own sampler, exactly as in a real run);
each point is answered by its nearest table row with the same batch size. Distance is measured in
the unit cube of the space: lr on its log scale, hidden and dropout linearly. The rows are a
uniform sample of the same space, so a uniform proposal lands on a near-uniformly chosen row. The
same mapping serves every method, Optuna's TPE included. :class:`HartmannProblem` answers
f(x, r) of :mod:`benchmarks.search.hartmann`.

**Workers.** :func:`simulate` runs a discrete-event simulation of 2 workers (real runs use
``max_concurrent_trials: 2``). Each worker trains its job epoch by epoch; every epoch takes a
seeded random time, uniform in [0.8, 1.2], so results come back in a seeded, realistic order. A
job runs a configuration from the epoch it already reached up to its target. A trial that a
searcher continues (promotes) resumes from its checkpoint, so it only costs the added epochs:
1 epoch, then a promotion to 3, costs 3 epochs in all.

**Anytime curve.** Every trained epoch reports the metric, as the torch framework does, and the
kernel's ``select`` node picks the best report of the whole run. So on the table the best-so-far
after E epochs is the lowest ``val_loss`` among all epochs trained so far. On Hartmann only
full-fidelity values count, f(x, R) = h6(x): the low fidelities are a different function. Regret
is best-so-far minus the problem's optimum. For the table, that optimum is the lowest val_loss
of any row at any epoch.

**Methods.** All of them use the same R (max resource), eta = 3, grace (min resource) = 1 and
epoch budget:

- mlk searchers (``random``, ``hyperband``, ``asha``), instantiated through the plugin registry
  from a ``searcher:`` mapping, as a spec would, and driven by ``ask`` / ``tell``.
- Optuna: ``HyperbandPruner(min_resource=1, max_resource=R, reduction_factor=3)`` with the TPE or
  the random sampler. Each trial reports every epoch and stops when ``should_prune()`` says so.
- Ray Tune: ``ASHAScheduler(max_t=R, grace_period=1, reduction_factor=3)`` and
  ``HyperBandScheduler(max_t=R, reduction_factor=3)``, driven without a Ray cluster. A small fake
  controller holds the trials and calls the scheduler's ``on_trial_add``, ``on_trial_result``,
  ``choose_trial_to_run``, ``on_trial_complete`` and ``on_trial_remove`` as Tune's
  ``TuneController`` does. It obeys CONTINUE / PAUSE / STOP; a paused trial resumes from its
  checkpoint. Like Tune's default for a random search (``BasicVariantGenerator``), it keeps up to
  200 pending trials, each a configuration drawn from the same search space. It starts the trial
  that ``choose_trial_to_run`` returns, or else the oldest pending one, and ends every trial at
  ``max_t``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TABLE = HERE / "data" / "digits_curves.npz"
BASE_SPEC = REPO / "specs" / "digits_base.yaml"

EPSILON_TIME = 0.2  # epoch durations are uniform in [1 - EPSILON_TIME, 1 + EPSILON_TIME]


# -- problems ---------------------------------------------------------------------------------------


def digits_space() -> Any:
    """The ``hyperparameters:`` of specs/digits_base.yaml as an mlk :class:`SearchSpace`."""
    import yaml

    from mlk.hyperparameters import SearchSpace, parse_hyperparameter

    raw = yaml.safe_load(BASE_SPEC.read_text())["hyperparameters"]
    return SearchSpace({k: parse_hyperparameter(v) for k, v in raw.items()})


def load_table(path: Path = TABLE) -> dict[str, np.ndarray]:
    """The arrays of a table written by :mod:`benchmarks.search.curves`, plus ``val_error``: the
    classification error 1 - val_accuracy (the papers' "validation error"; steps of 1/359 on digits)."""
    with np.load(path) as z:
        table = {k: z[k] for k in z.files}
    if "val_accuracy" in table:
        table["val_error"] = 1.0 - table["val_accuracy"].astype(np.float64)
    return table


class Problem:
    """What a replay asks: the value of configuration ``key`` after ``epoch`` epochs."""

    name = "problem"
    metric = "loss"
    max_resource = 1
    optimum = 0.0
    space: Any = None

    def locate(self, hparams: dict[str, Any]) -> Any:
        raise NotImplementedError

    def value(self, key: Any, epoch: int) -> float:
        raise NotImplementedError

    def quality(self, key: Any, epoch: int, value: float) -> float | None:
        """What this report contributes to the anytime best-so-far (None: nothing)."""
        return None if value != value else value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "max_resource": self.max_resource, "optimum": self.optimum}


def unit_coordinates(space: Any, hparams: dict[str, Any]) -> tuple[tuple[Any, ...], list[float]]:
    """(categorical values, numeric coordinates in [0, 1]) of a configuration of ``space``."""
    from mlk.hyperparameters import Categorical, Const, Log

    cats: list[Any] = []
    coords: list[float] = []
    for name, hp in space.params.items():
        v = hparams[name]
        if isinstance(hp, Categorical):
            cats.append(v)
        elif isinstance(hp, Const):
            continue
        elif isinstance(hp, Log):
            coords.append((math.log(float(v), hp.base) - hp.minval) / (hp.maxval - hp.minval))
        else:
            coords.append((float(v) - hp.minval) / (hp.maxval - hp.minval))
    return tuple(cats), coords


class CurveTable(Problem):
    """Learning curves (rows x epochs) with the configuration of each row; see the module docstring."""

    def __init__(self, table: dict[str, np.ndarray], space: Any, metric: str = "val_loss",
                 rows: int | None = None, name: str = "digits") -> None:
        self.name = name
        self.metric = metric
        n = len(table[metric]) if rows is None else min(rows, len(table[metric]))
        self.values = np.asarray(table[metric][:n], dtype=np.float64)
        self.max_resource = int(self.values.shape[1])
        self.space = space
        self.optimum = float(np.nanmin(self.values))
        self.rows = n
        names = list(space.params)
        groups: dict[tuple[Any, ...], tuple[list[int], list[list[float]]]] = {}
        for i in range(n):
            hp = {k: _item(table[k][i]) for k in names}
            cats, coords = unit_coordinates(space, hp)
            idx, pts = groups.setdefault(cats, ([], []))
            idx.append(i)
            pts.append(coords)
        self.groups = {k: (np.array(idx), np.array(pts)) for k, (idx, pts) in groups.items()}

    def locate(self, hparams: dict[str, Any]) -> int:
        cats, coords = unit_coordinates(self.space, hparams)
        idx, pts = self.groups[cats]
        d = ((pts - np.asarray(coords)) ** 2).sum(axis=1)
        return int(idx[int(np.argmin(d))])

    def value(self, key: int, epoch: int) -> float:
        return float(self.values[key, epoch - 1])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rows": self.rows}


def _item(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


class HartmannProblem(Problem):
    """f(x, r) of :mod:`benchmarks.search.hartmann` over the unit cube; only f(x, R) counts as quality."""

    metric = "f"

    def __init__(self, variant: str, max_resource: int = 81, seed: int = 0) -> None:
        from benchmarks.search.hartmann import F_STAR, NAMES, MultiFidelityHartmann
        from mlk.hyperparameters import SearchSpace, parse_hyperparameter

        self.name = f"hartmann6-{variant}"
        self.variant = variant
        self.fn = MultiFidelityHartmann(variant, max_resource, seed)
        self.max_resource = max_resource
        self.optimum = F_STAR
        self.space = SearchSpace({n: parse_hyperparameter({"type": "double", "minval": 0.0, "maxval": 1.0})
                                  for n in NAMES})
        self.names = NAMES

    def locate(self, hparams: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(hparams[n]) for n in self.names)

    def value(self, key: tuple[float, ...], epoch: int) -> float:
        return self.fn(key, epoch)

    def quality(self, key: Any, epoch: int, value: float) -> float | None:
        return value if epoch == self.max_resource else None


# -- the simulation ---------------------------------------------------------------------------------


@dataclass
class Job:
    """Train configuration ``key`` from epoch ``start`` (its checkpoint) up to ``target``."""

    handle: Any
    key: Any
    start: int
    target: int


class Method:
    """A search method as the simulation drives it."""

    label = "method"

    def next_job(self) -> Job | None:
        """The next job to run on a free worker, or None when nothing can start now."""
        raise NotImplementedError

    def on_epoch(self, job: Job, epoch: int, value: float) -> bool:
        """A job reported ``value`` after ``epoch``; False stops it there."""
        return True

    def on_job_end(self, job: Job, epoch: int, value: float) -> None:
        """A job ended at ``epoch`` (its target, or stopped by :meth:`on_epoch`)."""

    def finished(self) -> bool:
        return False

    def configurations(self) -> int:
        return 0


@dataclass
class Trace:
    """The anytime curve of one replay: ``best[i]`` holds from ``epochs[i]`` cumulative epochs on.

    ``best`` counts every epoch's report (what the ``select`` node sees); ``best_told`` only the
    value at the end of each job (what the searcher is told), a stricter view kept for comparison.
    """

    label: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    epochs_told: list[int] = field(default_factory=list)
    best_told: list[float] = field(default_factory=list)
    total_epochs: int = 0
    clock: float = 0.0
    configurations: int = 0
    jobs: int = 0
    finished: bool = False
    stalled: bool = False
    idle: float = 0.0

    def _curve(self, curve: str) -> tuple[list[int], list[float]]:
        return (self.epochs, self.best) if curve == "all" else (self.epochs_told, self.best_told)

    def best_at(self, budget: float, curve: str = "all") -> float:
        """The best-so-far after ``budget`` epochs (inf before the first report that counts)."""
        epochs, best = self._curve(curve)
        i = bisect.bisect_right(epochs, budget) - 1
        return best[i] if i >= 0 else math.inf

    def epochs_to(self, target: float, curve: str = "all") -> float:
        """Cumulative epochs when the best-so-far first reached ``target`` or better (inf: never)."""
        for e, b in zip(*self._curve(curve)):
            if b <= target:
                return float(e)
        return math.inf

    def final(self, curve: str = "all") -> float:
        best = self._curve(curve)[1]
        return best[-1] if best else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "epochs": self.epochs, "best": self.best,
                "epochs_told": self.epochs_told, "best_told": self.best_told,
                "total_epochs": self.total_epochs, "clock": round(self.clock, 3),
                "configurations": self.configurations, "jobs": self.jobs, "finished": self.finished,
                "stalled": self.stalled, "idle": round(self.idle, 5)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        return cls(**d)


def simulate(problem: Problem, method: Method, budget: int, seed: int, workers: int = 2,
             stop_at: float | None = None) -> Trace:
    """Run ``method`` on ``problem`` with ``workers`` simulated workers until ``budget`` epochs are spent,
    the method has nothing more to run, or (with ``stop_at``) the best-so-far reaches ``stop_at``;
    see the module docstring."""
    rng = random.Random(seed)

    def duration() -> float:
        return 1.0 + EPSILON_TIME * (2.0 * rng.random() - 1.0)

    trace = Trace(method.label, seed)
    running: list[list[Any]] = []  # [end of the epoch in progress, tie-break, job, epochs reached, its duration]
    clock = busy = 0.0
    used = 0
    best = best_told = math.inf
    while used < budget:
        while len(running) < workers:
            job = method.next_job()
            if job is None:
                break
            trace.jobs += 1
            if job.target <= job.start:  # nothing to train: the checkpoint is already there
                method.on_job_end(job, job.target, problem.value(job.key, job.target))
                continue
            d = duration()
            running.append([clock + d, rng.random(), job, job.start, d])
        if not running:
            trace.finished = method.finished()
            trace.stalled = not trace.finished
            break
        entry = min(running, key=lambda e: (e[0], e[1]))
        clock = entry[0]
        busy += entry[4]
        entry[3] += 1
        job, epoch = entry[2], entry[3]
        used += 1
        value = problem.value(job.key, epoch)
        go_on = method.on_epoch(job, epoch, value)
        ending = epoch >= job.target or not go_on
        q = problem.quality(job.key, epoch, value)
        if q is not None and ending and q < best_told:
            best_told = q
            trace.epochs_told.append(used)
            trace.best_told.append(q)
        if q is not None and q < best:
            best = q
            trace.epochs.append(used)
            trace.best.append(best)
            if stop_at is not None and best <= stop_at:
                break
        if ending:
            running.remove(entry)
            method.on_job_end(job, epoch, value)
        else:
            d = duration()
            entry[0], entry[1], entry[4] = clock + d, rng.random(), d
    trace.total_epochs = used
    trace.clock = clock
    trace.idle = 1.0 - busy / (workers * clock) if clock else 0.0
    trace.configurations = method.configurations()
    return trace


# -- mlk searchers --------------------------------------------------------------------------------


class MlkMethod(Method):
    """An mlk searcher from the registry, driven by ask/tell; records every ask and tell in ``log``."""

    def __init__(self, problem: Problem, name: str, options: dict[str, Any], seed: int, workers: int = 2,
                 label: str | None = None) -> None:
        from mlk.registry import registry

        cls = registry().get("searchers", name, where="searcher.name")
        cfg = cls.Config.model_validate({"name": name, "metric": problem.metric, "mode": "min",
                                         "max_resource": problem.max_resource, **options})
        cls.check_space(cfg, problem.space)
        self.searcher = cls(cfg, problem.space, seed)
        self.searcher.concurrency = workers
        self.problem = problem
        self.label = label or f"mlk {name}"
        self.keys: dict[int, Any] = {}
        self.reached: dict[int, int] = {}
        self.log: list[tuple[str, int, int, Any]] = []  # ("ask", trial, resource, start) / ("tell", ..., value)

    def next_job(self) -> Job | None:
        req = self.searcher.ask()
        if req is None:
            return None
        if req.parent is not None:
            raise NotImplementedError("the replay answers from fixed curves: a trial cannot start from "
                                      "another trial's checkpoint (PBT)")
        if req.trial_id not in self.keys:
            self.keys[req.trial_id] = self.problem.locate(req.hparams)
        start = self.reached.get(req.trial_id, 0)
        self.log.append(("ask", req.trial_id, req.resource, start))
        return Job(req, self.keys[req.trial_id], start, req.resource)

    def on_job_end(self, job: Job, epoch: int, value: float) -> None:
        req = job.handle
        self.reached[req.trial_id] = epoch
        self.log.append(("tell", req.trial_id, req.resource, value))
        self.searcher.tell(req.trial_id, req.resource, value)

    def finished(self) -> bool:
        return self.searcher.is_finished()

    def configurations(self) -> int:
        return len(self.keys)


# -- Optuna ---------------------------------------------------------------------------------------


def optuna_suggest(trial: Any, space: Any) -> dict[str, Any]:
    """Suggest every hyperparameter of an mlk search space through an Optuna trial."""
    from mlk.hyperparameters import Categorical, Const, Double, Int, Log

    out: dict[str, Any] = {}
    for name, hp in space.params.items():
        if isinstance(hp, Const):
            out[name] = hp.val
        elif isinstance(hp, Categorical):
            out[name] = trial.suggest_categorical(name, hp.vals)
        elif isinstance(hp, Log):
            out[name] = trial.suggest_float(name, hp.base**hp.minval, hp.base**hp.maxval, log=True)
        elif isinstance(hp, Int):
            out[name] = trial.suggest_int(name, hp.minval, hp.maxval)
        elif isinstance(hp, Double):
            out[name] = trial.suggest_float(name, hp.minval, hp.maxval)
        else:
            raise TypeError(f"cannot suggest {type(hp).__name__}")
    return out


class OptunaMethod(Method):
    """An Optuna study with ``HyperbandPruner``; a trial reports every epoch and stops when pruned."""

    def __init__(self, problem: Problem, sampler: str, seed: int, eta: int = 3, min_resource: int = 1) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        pruner = optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=problem.max_resource,
                                                reduction_factor=eta)
        # the pruner assigns trials to brackets by a hash of the study name: name it per seed
        self.study = optuna.create_study(study_name=f"mlk-bench-{seed}", direction="minimize",
                                         sampler=samplers[sampler](seed=seed), pruner=pruner)
        self.problem = problem
        self.label = f"optuna {sampler} + HyperbandPruner"
        self.started = 0
        self._pruned = optuna.trial.TrialState.PRUNED

    def next_job(self) -> Job | None:
        trial = self.study.ask()
        self.started += 1
        hparams = optuna_suggest(trial, self.problem.space)
        return Job(trial, self.problem.locate(hparams), 0, self.problem.max_resource)

    def on_epoch(self, job: Job, epoch: int, value: float) -> bool:
        job.handle.report(value, epoch)
        if epoch >= job.target:
            return True
        return not job.handle.should_prune()

    def on_job_end(self, job: Job, epoch: int, value: float) -> None:
        if epoch >= job.target:
            self.study.tell(job.handle, value)
        else:
            self.study.tell(job.handle, state=self._pruned)

    def configurations(self) -> int:
        return self.started


# -- Ray Tune schedulers, without a cluster ----------------------------------------------------------


class FakeTrial:
    """What Ray Tune's schedulers read from a ``Trial``: ``trial_id``, ``status``, ``is_saving``..."""

    def __init__(self, trial_id: str, key: Any) -> None:
        from ray.tune.experiment import Trial

        self.trial_id = trial_id
        self.key = key
        self.status = Trial.PENDING
        self.is_saving = False
        self.last_result: dict[str, Any] = {}
        self.epochs = 0

    def __repr__(self) -> str:
        return f"FakeTrial({self.trial_id}, {self.status}, {self.epochs})"


class RayMethod(Method):
    """A Ray Tune trial scheduler driven by a fake controller; see the module docstring."""

    MAX_PENDING = 200  # Tune's default for BasicVariantGenerator on a small cluster

    def __init__(self, problem: Problem, scheduler: str, seed: int, eta: int = 3, grace: int = 1) -> None:
        from ray.tune.experiment import Trial
        from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, TrialScheduler

        self.T = Trial
        self.TS = TrialScheduler
        big_r = problem.max_resource
        if scheduler == "asha":
            self.scheduler: Any = ASHAScheduler(metric=problem.metric, mode="min", max_t=big_r,
                                                grace_period=grace, reduction_factor=eta)
        elif scheduler == "hyperband":
            self.scheduler = HyperBandScheduler(metric=problem.metric, mode="min", max_t=big_r,
                                                reduction_factor=eta)
        else:
            raise ValueError(scheduler)
        self.label = f"ray {scheduler}"
        self.problem = problem
        self.rng = random.Random(seed)
        self.np_state = np.random.RandomState(seed)  # ASHAScheduler draws brackets from np.random
        self.trials: list[FakeTrial] = []
        self.pending = 0

    # what the schedulers call on the controller
    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        if trial.status in (self.T.TERMINATED, self.T.ERROR):
            return
        if trial.status in (self.T.PENDING, self.T.PAUSED):
            if trial.status == self.T.PENDING:
                self.pending -= 1
            self.scheduler.on_trial_remove(self, trial)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        trial.status = self.T.TERMINATED

    def pause_trial(self, trial: FakeTrial, should_checkpoint: bool = True) -> None:
        trial.status = self.T.PAUSED

    def _add_trials(self) -> None:
        while self.pending < self.MAX_PENDING:
            hparams = self.problem.space.sample(self.rng)
            trial = FakeTrial(f"{len(self.trials):05d}", self.problem.locate(hparams))
            self.trials.append(trial)
            self.pending += 1
            self._with_np(lambda t=trial: self.scheduler.on_trial_add(self, t))

    def _with_np(self, fn: Callable[[], Any]) -> Any:
        saved = np.random.get_state()
        np.random.set_state(self.np_state.get_state())
        try:
            return fn()
        finally:
            self.np_state.set_state(np.random.get_state())
            np.random.set_state(saved)

    def next_job(self) -> Job | None:
        self._add_trials()
        trial = self.scheduler.choose_trial_to_run(self)
        if trial is None:
            trial = next((t for t in self.trials if t.status == self.T.PENDING), None)
        if trial is None:
            return None
        if trial.status == self.T.PENDING:
            self.pending -= 1
        trial.status = self.T.RUNNING
        return Job(trial, trial.key, trial.epochs, self.problem.max_resource)

    def on_epoch(self, job: Job, epoch: int, value: float) -> bool:
        trial: FakeTrial = job.handle
        trial.epochs = epoch
        result = {"training_iteration": epoch, self.problem.metric: value, "trial_id": trial.trial_id}
        trial.last_result = result
        decision = self.scheduler.on_trial_result(self, trial, result)
        if epoch >= job.target:  # the trainable's loop ends at max_t: the trial completes
            if trial.status == self.T.RUNNING:
                self.stop_trial(trial)
            return False
        if decision == self.TS.CONTINUE:
            return True
        if decision == self.TS.PAUSE:
            self.pause_trial(trial)
        else:
            self.stop_trial(trial)
        return False

    def configurations(self) -> int:
        return sum(1 for t in self.trials if t.epochs > 0)


# -- method table and running many seeds --------------------------------------------------------------


def hyperband_epochs(max_resource: int, eta: int) -> int:
    """Epochs of one Hyperband iteration (all brackets), counting continued trials once."""
    s_max = math.floor(math.log(max_resource) / math.log(eta) + 1e-9)
    total = 0
    for s in range(s_max, -1, -1):
        n = math.ceil((s_max + 1) / (s + 1) * eta**s)
        prev = 0
        for i in range(s + 1):
            r = max(1, round(max_resource * eta ** (i - s)))
            total += math.floor(n * eta**-i) * (r - prev)
            prev = r
    return total


def make_method(kind: str, problem: Problem, seed: int, budget: int, eta: int = 3, workers: int = 2) -> Method:
    """One of :data:`METHODS` for ``problem`` and ``seed``, sized to fill ``budget`` epochs."""
    big_r = problem.max_resource
    if kind == "mlk-random":
        return MlkMethod(problem, "random", {"max_trials": max(1, budget // big_r)}, seed, workers)
    if kind == "mlk-hyperband":
        iterations = budget // hyperband_epochs(big_r, eta) + 1
        return MlkMethod(problem, "hyperband", {"eta": eta, "iterations": iterations}, seed, workers)
    if kind == "mlk-asha":
        return MlkMethod(problem, "asha", {"eta": eta, "min_resource": 1, "max_trials": budget}, seed, workers)
    if kind == "optuna-tpe":
        return OptunaMethod(problem, "tpe", seed, eta)
    if kind == "optuna-random":
        return OptunaMethod(problem, "random", seed, eta)
    if kind == "ray-asha":
        return RayMethod(problem, "asha", seed, eta)
    if kind == "ray-hyperband":
        return RayMethod(problem, "hyperband", seed, eta)
    raise ValueError(f"unknown method {kind!r}")


METHODS = ("mlk-random", "mlk-hyperband", "mlk-asha", "optuna-tpe", "optuna-random", "ray-asha", "ray-hyperband")
LABELS = {
    "mlk-random": "mlk random", "mlk-hyperband": "mlk hyperband", "mlk-asha": "mlk asha",
    "optuna-tpe": "Optuna TPE + HyperbandPruner", "optuna-random": "Optuna random + HyperbandPruner",
    "ray-asha": "Ray Tune ASHAScheduler", "ray-hyperband": "Ray Tune HyperBandScheduler",
}


def run_one(problem: Problem, kind: str, seed: int, budget: int, workers: int = 2,
            stop_at: float | None = None) -> Trace:
    """One replay of method ``kind`` with ``seed`` (the searcher's seed; the workers' timing seed is
    derived from it)."""
    method = make_method(kind, problem, seed, budget, workers=workers)
    trace = simulate(problem, method, budget, seed=10_000 + seed, workers=workers, stop_at=stop_at)
    trace.label = kind
    return trace


# -- conformance with the papers --------------------------------------------------------------------


def check_hyperband(problem: Problem, seed: int, eta: int = 3, workers: int = 2) -> dict[str, Any]:
    """One full Hyperband iteration (no budget cut) checked against Li et al. (2018): in bracket s, rung i
    trains floor(n * eta^-i) configurations to R * eta^(i - s), and the ones continued are the best
    floor(n * eta^-(i+1)) of the rung. Returns the expected and observed counts and any mismatch."""
    method = MlkMethod(problem, "hyperband", {"eta": eta, "iterations": 1}, seed, workers)
    trace = simulate(problem, method, 10**9, seed=seed, workers=workers)
    searcher = method.searcher
    big_r = problem.max_resource
    s_max = searcher.s_max
    observed: dict[int, dict[int, int]] = {}
    asked: dict[tuple[int, int], set[int]] = {}    # (bracket, resource) -> trials asked to reach it
    told: dict[tuple[int, int], list[tuple[float, int]]] = {}  # (bracket, resource) -> (value, trial)
    problems: list[str] = []
    for kind, tid, resource, extra in method.log:
        s = searcher.trial_info(tid)["bracket"]
        if kind == "ask":
            observed.setdefault(s, {}).setdefault(resource, 0)
            observed[s][resource] += 1
            asked.setdefault((s, resource), set()).add(tid)
        else:
            told.setdefault((s, resource), []).append((extra, tid))
    expected: dict[int, dict[int, int]] = {}
    for s in range(s_max, -1, -1):
        n = math.ceil((s_max + 1) / (s + 1) * eta**s)
        expected[s] = {max(1, round(big_r * eta ** (i - s))): math.floor(n * eta**-i) for i in range(s + 1)}
        if observed.get(s) != expected[s]:
            problems.append(f"bracket {s}: expected {expected[s]}, observed {observed.get(s)}")
        # the trials continued to the next rung are the best of their rung
        rungs = list(expected[s])
        for here, nxt in itertools.pairwise(rungs):
            best = {tid for _, tid in sorted(told.get((s, here), []))[: expected[s][nxt]]}
            if asked.get((s, nxt), set()) != best:
                problems.append(f"bracket {s}: continued {sorted(asked.get((s, nxt), set()))} from rung {here}, "
                                f"but its best {expected[s][nxt]} are {sorted(best)}")
    return {"seed": seed, "expected": {str(s): {str(r): c for r, c in v.items()} for s, v in expected.items()},
            "observed": {str(s): {str(r): c for r, c in v.items()} for s, v in observed.items()},
            "epochs": trace.total_epochs, "expected_epochs": hyperband_epochs(big_r, eta),
            "searcher_budget": searcher.budget(), "finished": trace.finished, "problems": problems}


def check_asha(problem: Problem, seed: int, budget: int, eta: int = 3, workers: int = 2) -> dict[str, Any]:
    """ASHA (Li et al., 2020, Algorithm 2) checked ask by ask: a free worker gets a promotion whenever
    some rung k holds a configuration in its top floor(n_k / eta) not yet promoted (from the highest
    such rung), and a new configuration at the lowest rung only when there is none."""
    method = MlkMethod(problem, "asha", {"eta": eta, "min_resource": 1, "max_trials": budget}, seed, workers)
    trace = simulate(problem, method, budget, seed=seed, workers=workers)
    rungs = method.searcher.rungs[0]
    level = {r: k for k, r in enumerate(rungs)}
    results: dict[int, dict[int, float]] = {}
    promoted: set[tuple[int, int]] = set()
    problems: list[str] = []
    promotions = new = 0
    for kind, tid, resource, extra in method.log:
        if kind == "tell":
            results.setdefault(tid, {})[level[resource]] = extra
            continue
        candidates: dict[int, set[int]] = {}
        for k in range(len(rungs) - 1):
            at_k = sorted((v[k], t) for t, v in results.items() if k in v)
            top = [t for _, t in at_k[: len(at_k) // eta] if (t, k) not in promoted]
            if top:
                candidates[k] = set(top)
        if tid in results:  # a promotion
            promotions += 1
            k = level[resource] - 1
            if not candidates:
                problems.append(f"trial {tid} promoted to {resource} although nothing was promotable")
            elif k != max(candidates) or tid not in candidates[k]:
                problems.append(f"trial {tid} promoted from rung {rungs[k]}; expected one of "
                                f"{sorted(candidates[max(candidates)])} from rung {rungs[max(candidates)]}")
            promoted.add((tid, k))
            if extra != rungs[k]:
                problems.append(f"trial {tid} resumed at {extra}, not at its rung {rungs[k]}")
        else:
            new += 1
            if candidates:
                problems.append(f"new trial {tid} started although rung(s) {sorted(candidates)} had promotable "
                                "configurations")
            if resource != rungs[0] or extra != 0:
                problems.append(f"new trial {tid} asked for {resource} from {extra}")
    return {"seed": seed, "rungs": rungs, "asks": promotions + new, "promotions": promotions,
            "new_trials": new, "epochs": trace.total_epochs, "problems": problems[:20],
            "problem_count": len(problems)}


# -- summaries ------------------------------------------------------------------------------------


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (inclusive method) of ``values``; inf allowed."""
    v = sorted(values)
    if len(v) == 1:
        return {"median": v[0], "q25": v[0], "q75": v[0]}
    q = statistics.quantiles(v, n=4, method="inclusive") if all(math.isfinite(x) for x in v) else _qinf(v)
    return {"median": statistics.median(v), "q25": q[0], "q75": q[2]}


def _qinf(v: list[float]) -> list[float]:
    """Quartiles of sorted values that may contain inf (linear interpolation, inf absorbs)."""
    out = []
    for p in (0.25, 0.5, 0.75):
        pos = p * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        a, b = v[lo], v[hi]
        out.append(a if lo == hi else (math.inf if math.inf in (a, b) else a + (b - a) * (pos - lo)))
    return out


def summarize(traces: dict[str, list[Trace]], optimum: float, budgets: Sequence[int], reference: str,
              reference_budget: int, curve: str = "all") -> dict[str, Any]:
    """Per method: regret at each budget, final best, epochs to reach the reference's median final
    best (at ``reference_budget``), and the speedup ``reference_budget / median epochs``. ``curve``:
    ``all`` (every epoch's report counts) or ``told`` (only values at the end of each job)."""
    ref_finals = [t.best_at(reference_budget, curve) for t in traces[reference]]
    target = statistics.median(ref_finals)
    out: dict[str, Any] = {"curve": curve, "target": target, "target_regret": target - optimum,
                           "reference": reference, "reference_budget": reference_budget, "optimum": optimum,
                           "methods": {}}
    for kind, ts in traces.items():
        reach = [t.epochs_to(target, curve) for t in ts]
        med = quantiles(reach)
        entry = {
            "seeds": len(ts),
            "regret": {str(b): quantiles([t.best_at(b, curve) - optimum for t in ts]) for b in budgets},
            "final_best": quantiles([t.final(curve) for t in ts]),
            "epochs_to_target": med,
            "reached": sum(math.isfinite(x) for x in reach),
            "speedup": reference_budget / med["median"] if med["median"] > 0 else math.inf,
            "total_epochs": quantiles([float(t.total_epochs) for t in ts]),
            "configurations": quantiles([float(t.configurations) for t in ts]),
            "idle_fraction": quantiles([t.idle for t in ts]),
            "stalled": sum(t.stalled for t in ts),
            "finished_early": sum(t.finished and t.total_epochs < reference_budget for t in ts),
        }
        out["methods"][kind] = entry
    return out
