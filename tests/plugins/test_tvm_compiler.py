"""The tvm compiler on a tiny ONNX conv net built here: default schedules, fixed and symbolic batch,
the DLPack runner, target resolution, and MetaSchedule tuning (or its clear refusal where the installed
TVM cannot tune). Every library is checked against ONNX Runtime on the same inputs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlk.compiler import Artifact, CompileInputs, Unavailable
from mlk_plugins.compilers.tvm import (
    TvmCompiler,
    _tuning_problem,
    aligned,
    next_round_size,
    parse_target,
    resolve_target,
    round_plan,
    round_size,
    run_reporting,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

TOLERANCE = 1e-4
INPUT = [2, 6, 6]


def _tiny_conv_net(path: Path) -> None:
    """x[b,2,6,6] -> conv 3x3 (4 channels, pad 1) -> relu -> flatten -> dense 144x5: random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
               numpy_helper.from_array(rng.standard_normal((144, 5)).astype(np.float32) * 0.1, "wd"),
               numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bd")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *INPUT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    folder = tmp_path_factory.mktemp("onnx")
    _tiny_conv_net(folder / "model.onnx")
    artifact = Artifact("onnx", folder, {"file": "model.onnx", "steps": ["tiny conv net"], "input_shape": INPUT,
                                         "num_classes": 5, "input_name": "x"})
    artifact.save_meta()
    return artifact


def _expected(source: Artifact, x: np.ndarray) -> Any:
    session = ort.InferenceSession(str(source.file), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT)).astype(np.float32)


def _compile(source: Artifact, out: Path, lines: list[str] | None = None,
             **config: Any) -> tuple[TvmCompiler, Artifact]:
    compiler = TvmCompiler(TvmCompiler.Config.model_validate({"name": "tvm", **config}))
    out.mkdir(parents=True)
    inputs = CompileInputs(calibration=None, data=None, threads=2, seed=0,
                           report=(lines.append if lines is not None else lambda line: None))
    return compiler, compiler.compile(source, out, inputs)


def _check_against_ort(compiler: TvmCompiler, artifact: Artifact, source: Artifact, sizes: tuple[int, ...]) -> None:
    run = compiler.runner(artifact, 2)
    for n in sizes:
        x = _inputs(n, seed=n)
        got = run(x)
        assert got.shape == (n, 5)
        assert float(np.abs(got - _expected(source, x)).max()) <= TOLERANCE, n


def test_default_schedules_symbolic_batch_match_ort(source: Artifact, tmp_path: Path) -> None:
    compiler, artifact = _compile(source, tmp_path / "out", target="llvm -mcpu=native")
    assert artifact.file.name == "model.so" and artifact.file.stat().st_size > 0
    assert artifact.meta["schedule"] == "default" and artifact.meta["tuning"] is None
    assert artifact.meta["batch_size"] is None
    assert artifact.meta["steps"] == ["tiny conv net", "tvm llvm, default schedules"]
    assert artifact.meta["target"] == {"kind": "llvm", "mcpu": "native"}
    assert artifact.meta["target_resolved"]["mcpu"] not in ("native", "")
    assert Artifact.load(artifact.path).meta["schedule"] == "default"
    _check_against_ort(compiler, artifact, source, (1, 3, 16))


def test_fixed_batch_runs_other_sizes_in_chunks(source: Artifact, tmp_path: Path) -> None:
    compiler, artifact = _compile(source, tmp_path / "out", batch_size=4)
    assert artifact.meta["batch_size"] == 4 and artifact.meta["steps"][-1] == "tvm llvm batch 4, default schedules"
    _check_against_ort(compiler, artifact, source, (1, 4, 9))


def test_runner_takes_strided_and_misaligned_inputs(source: Artifact, tmp_path: Path) -> None:
    compiler, artifact = _compile(source, tmp_path / "out")
    run = compiler.runner(artifact, 1)
    x = _inputs(8)
    want = _expected(source, x)
    strided = np.concatenate([x, x])[::2]  # not contiguous
    assert not strided.flags["C_CONTIGUOUS"]
    assert float(np.abs(run(strided) - _expected(source, np.ascontiguousarray(strided))).max()) <= TOLERANCE
    raw = np.empty(x.nbytes + 4, dtype=np.uint8)
    start = 4 if raw.ctypes.data % 64 == 0 else 0
    shifted = raw[start:start + x.nbytes].view(np.float32).reshape(x.shape)
    shifted[...] = x
    if shifted.ctypes.data % 64 == 0:  # the allocator handed out a 60-byte offset: shift once more
        shifted = np.empty(x.nbytes + 8, dtype=np.uint8)[4:4 + x.nbytes].view(np.float32).reshape(x.shape)
        shifted[...] = x
    assert shifted.ctypes.data % 64 != 0
    assert float(np.abs(run(shifted) - want).max()) <= TOLERANCE


def test_results_outlive_later_calls_and_threads(source: Artifact, tmp_path: Path) -> None:
    """The runner stages inputs in arrays it reuses: a result must not change when the next call runs, in
    this thread or another."""
    import threading

    compiler, artifact = _compile(source, tmp_path / "out")
    run = compiler.runner(artifact, 1)
    first_x, second_x = _inputs(3, seed=5), _inputs(3, seed=6)
    first = run(first_x)
    kept = first.copy()
    run(second_x)
    assert np.array_equal(first, kept)
    results: dict[int, np.ndarray] = {}

    def worker(seed: int) -> None:
        for _ in range(20):
            results[seed] = run(_inputs(3, seed=seed))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, got in results.items():
        assert float(np.abs(got - _expected(source, _inputs(3, seed=seed))).max()) <= TOLERANCE


def test_identity_graph_returns_its_own_array(tmp_path: Path) -> None:
    """A graph whose output is its input (TVM's VM hands back the input tensor): the runner must not return
    its staging array, which the next call overwrites."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, *INPUT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, *INPUT])])
    folder = tmp_path / "onnx"
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    source = Artifact("onnx", folder, {"file": "model.onnx", "steps": ["identity"], "input_shape": INPUT,
                                       "input_name": "x"})
    compiler, artifact = _compile(source, tmp_path / "out")
    run = compiler.runner(artifact, 1)
    x = _inputs(3)
    first = run(x)
    run(_inputs(3, seed=9))
    assert np.array_equal(first, x)


def test_aligned_copies_only_when_needed() -> None:
    x = aligned(np.arange(12, dtype=np.float64).reshape(3, 4))
    assert x.dtype == np.float32 and x.ctypes.data % 64 == 0 and x.flags["C_CONTIGUOUS"]
    assert aligned(x) is x
    odd = np.empty(4 * 12 + 4, dtype=np.uint8)[4:].view(np.float32).reshape(3, 4)
    odd[...] = x
    again = aligned(odd)
    assert again.ctypes.data % 64 == 0 and np.array_equal(again, x)


def test_native_cpu_is_resolved() -> None:
    resolved = resolve_target(tvm, parse_target("llvm -mcpu=native -num-cores=2"))
    assert resolved["mcpu"] == str(tvm.target.codegen.llvm_get_system_cpu()) != "native"
    assert resolved["num-cores"] == 2
    assert resolve_target(tvm, {"kind": "llvm", "mcpu": "skylake"}) == {"kind": "llvm", "mcpu": "skylake"}


def test_tuning_config_rules() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TvmCompiler.Config.model_validate({"name": "tvm", "tuning_trials": 4})
    with pytest.raises(ValueError):
        TvmCompiler.Config.model_validate({"name": "tvm", "tuning_trials": 4, "batch_size": 2, "tuning_budget_s": 0})
    c = TvmCompiler(TvmCompiler.Config.model_validate({"name": "tvm", "tuning_trials": 4, "batch_size": 2,
                                                       "tuning_budget_s": 90}))
    assert c.describe("onnx") == "tvm: onnx -> tvm (llvm, batch 2, tuned: 4 trials within 90 s)"


def test_tuning_rounds_start_small_and_double() -> None:
    # every operator gets a few candidates first, so none waits on plain loops behind a long first round
    assert round_plan(4000, 18) == [(8, 144), (16, 288), (32, 576), (64, 1152), (64, 1152), (38, 684), (1, 4)]
    assert round_plan(2, 1) == [(2, 2)]  # never more per operator than an even share of the trials
    assert round_plan(20, 2) == [(8, 16), (2, 4)]
    # each round gives every operator the same number; a rest below one per operator is one each, up to it
    assert round_plan(3, 2) == [(1, 2), (1, 1)] and round_plan(2, 3) == [(1, 2)]
    assert sum(n for _, n in round_plan(777, 9)) == 777
    assert round_plan(0, 3) == [] and round_plan(5, 0) == []


def test_rounds_grow_until_the_search_takes_at_most_a_third() -> None:
    # the search costs the same per operator whatever a round measures: when it is dear, rounds grow faster
    assert next_round_size(8, search_s=0.5, candidate_s=0.5) == 16  # a cheap search: twice as many
    assert next_round_size(8, search_s=17.0, candidate_s=0.6) == 57  # 17 s of search, 2 x 17 s of candidates
    assert next_round_size(8, search_s=100.0, candidate_s=0.1) == 64  # never past the cap
    assert next_round_size(64, search_s=0.0, candidate_s=0.0) == 64
    assert round_size(100, 18, 57) == (5, 90) and round_size(2000, 18, 57) == (57, 1026)


def test_child_progress_is_reported_as_it_comes(tmp_path: Path) -> None:
    script = ("import sys, time\n"
              "print('mlk-progress: round 1/2', flush=True)\n"
              "print('a TVM log line', file=sys.stderr, flush=True)\n"
              "time.sleep(0.5)\n"
              "print('mlk-progress: round 2/2', flush=True)\n"
              "sys.exit(3)\n")
    seen: list[tuple[str, float]] = []
    start = time.monotonic()
    done = run_reporting([sys.executable, "-c", script], env={}, limit_s=60,
                         report=lambda line: seen.append((line, time.monotonic() - start)))
    assert done is not None and done.returncode == 3
    assert [line for line, _ in seen] == ["round 1/2", "round 2/2"]
    assert seen[1][1] - seen[0][1] >= 0.4, "each line is passed on when the child prints it, not at its end"
    assert done.stderr == "a TVM log line\n"  # the rest is kept for the error message


def test_child_past_its_limit_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    script = f"import time, pathlib\ntime.sleep(5)\npathlib.Path({str(marker)!r}).write_text('x')\n"
    # None: killed at the limit; the call returns only once the child is gone, before it could write
    assert run_reporting([sys.executable, "-c", script], env={}, limit_s=0.5, report=lambda line: None) is None
    assert not marker.exists()


needs_tuning = pytest.mark.skipif(_tuning_problem() is not None, reason="MetaSchedule cannot work with the "
                                  "installed TVM (see test_tuning_refusal_names_the_cause)")


def test_tuning_refusal_names_the_cause(source: Artifact, tmp_path: Path) -> None:
    """Where the installed TVM cannot tune, the step is unavailable with the versions and the fix; where it
    can, the probe passes and the tuned tests below run."""
    if _tuning_problem() is None:
        pytest.skip("MetaSchedule works here; the tuned tests cover it")
    with pytest.raises(Unavailable) as caught:
        _compile(source, tmp_path / "out", batch_size=2, tuning_trials=2)
    message = str(caught.value)
    assert "apache-tvm-ffi" in message and "0.1.14.post1" in message and "tuning_trials: 0" in message
    assert not (tmp_path / "out" / "model.so").exists()


@needs_tuning
@pytest.mark.slow
def test_tuned_library_matches_ort(source: Artifact, tmp_path: Path) -> None:
    lines: list[str] = []
    compiler, artifact = _compile(source, tmp_path / "out", lines, batch_size=2, tuning_trials=2, tuning_budget_s=600)
    tuning = artifact.meta["tuning"]
    assert artifact.meta["schedule"] == "metaschedule" and artifact.meta["tuning_trials"] == 2
    assert tuning["tasks"] >= 1 and 1 <= tuning["trials_measured"] <= 2 and not tuning["budget_reached"]
    assert tuning["tasks_tuned"] == len(tuning["best_us"]) >= 1
    # every operator with a measured schedule is built with it (the records are found again at build time)
    assert set(tuning["tasks_applied"]) == set(tuning["best_us"])
    assert all(v > 0 for v in tuning["best_us"].values())
    # the model's time in its tuned operators counts each as often as the model calls it
    calls = tuning["calls_per_run"]
    assert set(calls) >= set(tuning["best_us"]) and all(n >= 1 for n in calls.values())
    assert tuning["tuned_ms_per_run"] == pytest.approx(
        sum(us * calls[k] for k, us in tuning["best_us"].items()) / 1e3, rel=1e-3, abs=1e-4)
    assert "tuned: " in artifact.meta["steps"][-1] and "trials measured" in artifact.meta["steps"][-1]
    _check_against_ort(compiler, artifact, source, (1, 2, 5))
    # progress as the child goes: what it tunes, each round, then the build
    assert lines[0].startswith(f"tuning {tuning['tasks']} operators: up to 2 candidates")
    assert any(line.startswith(f"round {tuning['rounds']} (") for line in lines)
    assert lines[-1] == "building the library with the tuned schedules"


@needs_tuning
@pytest.mark.slow
def test_prepacked_weights_match_ort(source: Artifact, tmp_path: Path) -> None:
    # the schedules may read weights in their own layout; the library holds them repacked, same results
    compiler, artifact = _compile(source, tmp_path / "out", batch_size=2, tuning_trials=6, tuning_budget_s=600,
                                  weight_prepack=True)
    tuning = artifact.meta["tuning"]
    assert tuning["tasks_tuned"] >= 1 and set(tuning["tasks_applied"]) == set(tuning["best_us"])
    _check_against_ort(compiler, artifact, source, (1, 2, 5))


@needs_tuning
@pytest.mark.slow
def test_budget_ends_a_round_that_has_started(source: Artifact, tmp_path: Path) -> None:
    # 4000 candidates cannot be measured in 30 s: the budget ends the search inside a round (no operator
    # searches after it), and what the round measured is kept and built in
    lines: list[str] = []
    compiler, artifact = _compile(source, tmp_path / "out", lines, batch_size=2, tuning_trials=4000,
                                  tuning_budget_s=30)
    tuning = artifact.meta["tuning"]
    assert tuning["budget_reached"] and 0 < tuning["trials_measured"] < 4000 and tuning["rounds"] >= 1
    assert tuning["tasks_tuned"] >= 1 and set(tuning["tasks_applied"]) == set(tuning["best_us"])
    assert any("(budget reached)" in line for line in lines)
    _check_against_ort(compiler, artifact, source, (2, 3))


@needs_tuning
@pytest.mark.slow
def test_tuning_budget_stops_measuring(source: Artifact, tmp_path: Path) -> None:
    compiler, artifact = _compile(source, tmp_path / "out", batch_size=2, tuning_trials=2, tuning_budget_s=1e-6)
    tuning = artifact.meta["tuning"]
    assert tuning["budget_reached"] and tuning["trials_measured"] == 0 and tuning["rounds"] == 0
    assert "(budget reached)" in artifact.meta["steps"][-1]
    _check_against_ort(compiler, artifact, source, (2,))  # untuned operators keep the default schedules
