"""Composing and validating specs: overrides, hyperparameter binding, and errors that teach."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlk.errors import UserError
from mlk.spec import bind_hparams, load_spec
from tests.conftest import mlk


def test_builtin_spec_composes_with_overrides(workdir: Path) -> None:
    spec = load_spec(["+spec=digits_random", "searcher.max_trials=3", "seed=7"])
    assert spec.name == "digits_random"
    assert spec["searcher"]["max_trials"] == 3 and spec["seed"] == 7
    assert spec["framework"]["lr"] == "${hp.lr}"  # bound per trial, not at compose time
    assert spec.space.names() == ["lr", "hidden", "dropout", "batch_size"]
    assert spec["storage"]["keep"] == {"trial_best": 1, "trial_latest": 1}


def test_working_directory_specs_shadow_builtin_ones(workdir: Path, quad_spec: Path) -> None:
    (workdir / "specs" / "digits_random.yaml").write_text(quad_spec.read_text())
    assert load_spec(["+spec=digits_random"])["framework"]["name"] == "python"


def test_spec_path_env_and_defaults_list(workdir: Path, tmp_path_factory: pytest.TempPathFactory,
                                         monkeypatch: pytest.MonkeyPatch, quad_spec: Path) -> None:
    other = tmp_path_factory.mktemp("more")
    (other / "quad_long.yaml").write_text("defaults:\n  - quad\n  - _self_\nsearcher:\n  max_resource: 9\n")
    monkeypatch.setenv("MLK_SPEC_PATH", str(other))
    spec = load_spec(["+spec=quad_long"])
    assert spec["searcher"]["max_resource"] == 9 and spec["framework"]["name"] == "python"


def test_spec_by_file_path(workdir: Path, quad_spec: Path) -> None:
    assert load_spec([f"+spec={quad_spec}"]).name == "quad"


def test_bind_hparams_keeps_types() -> None:
    section = {"lr": "${hp.lr}", "nested": {"sizes": ["${hp.n}", 3]}, "plain": 1}
    assert bind_hparams(section, {"lr": 0.5, "n": 4}, "framework") == {
        "lr": 0.5, "nested": {"sizes": [4, 3]}, "plain": 1}


def test_bind_hparams_inside_text_and_values_are_copies() -> None:
    hparams = {"act": "relu", "flip": True, "sizes": [8, 4]}
    section = {"name": "net_${hp.act}_${hp.flip}", "sizes": "${hp.sizes}", "esc": "$5"}
    bound = bind_hparams(section, hparams, "model")
    assert bound == {"name": "net_relu_True", "sizes": [8, 4], "esc": "$5"}
    bound["sizes"].append(2)
    assert hparams["sizes"] == [8, 4] and section["sizes"] == "${hp.sizes}"


def _error(args: list[str]) -> str:
    with pytest.raises(UserError) as info:
        load_spec(args)
    return info.value.render()


def test_misspelled_top_level_key(workdir: Path, quad_spec: Path) -> None:
    quad_spec.write_text(quad_spec.read_text() + "searchr: {}\n")
    msg = _error(["+spec=quad"])
    assert "quad.yaml" in msg and "searchr: unknown key" in msg and "did you mean 'searcher'" in msg


def test_misspelled_plugin_key_names_path_and_choices(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "searcher.max_trails=3"])
    assert "searcher.max_trails: unknown key" in msg and "did you mean 'max_trials'" in msg


def test_wrong_type(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "searcher.max_trials=many"])
    assert "searcher.max_trials" in msg and "many" in msg


def test_unknown_plugin_name_did_you_mean(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "searcher.name=randon"])
    assert "searcher.name: unknown searcher 'randon'" in msg
    assert "valid choices: asha, grid, hyperband, nevergrad, pbt, random, single" in msg
    assert "did you mean 'random'" in msg


def test_invalid_search_space(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "hyperparameters.x.minval=2"])
    assert "hyperparameters.x" in msg and "must be below maxval" in msg
    msg = _error(["+spec=quad", "hyperparameters.x.type=loggy"])
    assert "hyperparameters.x" in msg and "loggy" in msg


def test_grid_without_counts(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "searcher.name=grid"])
    assert "hyperparameters.x.count" in msg


def test_unknown_hyperparameter_reference(workdir: Path) -> None:
    msg = _error(["+spec=digits_random", "model.hidden=${hp.hiden}"])
    assert "model" in msg and "'hiden'" in msg and "did you mean 'hidden'" in msg


def test_unknown_spec_name(workdir: Path) -> None:
    msg = _error(["+spec=digits_randm"])
    assert "no spec named 'digits_randm'" in msg and "did you mean 'digits_random'" in msg


def test_no_spec_given(workdir: Path) -> None:
    assert "+spec=NAME" in _error([])


def test_plain_override_sets_defaulted_keys_and_rejects_unknown_ones(workdir: Path, quad_spec: Path) -> None:
    assert load_spec(["+spec=quad", "resources.max_restarts=3"])["resources"]["max_restarts"] == 3
    msg = _error(["+spec=quad", "searcher.max_trails=1"])
    assert "searcher.max_trails: unknown key" in msg and "did you mean 'max_trials'" in msg


def test_hydra_override_grammar_error_teaches(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "+seed=4"])
    assert "seed" in msg and "overrides look like" in msg


def test_cli_user_error_is_one_message_exit_2(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("run", "+spec=quad", "searcher.name=randon", cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mlk: error:") and "Traceback" not in proc.stderr
    assert "did you mean 'random'" in proc.stderr
    full = mlk("run", "+spec=quad", "searcher.name=randon", cwd=workdir, env={"MLK_FULL_ERROR": "1"})
    assert "Traceback" in full.stderr


def test_missing_dataset_is_a_user_error(workdir: Path) -> None:
    proc = mlk("run", "+spec=cifar_random", f"data.path={workdir}/nowhere", "data.download=false", cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nowhere" in proc.stderr


def test_schema_includes_plugin_sections(workdir: Path) -> None:
    import json

    proc = mlk("spec", "schema", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    text = json.dumps(schema)
    for field in ("max_trials", "max_concurrent_trials", "trial_best", "batch_size", "function", "deterministic"):
        assert field in text


def test_slots_beyond_the_framework_are_refused(workdir: Path, quad_spec: Path) -> None:
    msg = _error(["+spec=quad", "resources.slots_per_trial=2"])
    assert "resources.slots_per_trial" in msg and "framework 'python'" in msg


def test_overrides_may_delete_or_copy_hyperparameter_references(workdir: Path, quad_spec: Path) -> None:
    spec = load_spec(["+spec=digits_random", "~model.dropout", "framework.lr=${hp.lr}"])
    assert spec["model"]["dropout"] == 0.0 and spec["framework"]["lr"] == "${hp.lr}"  # the model's default
    (workdir / "specs" / "child.yaml").write_text("defaults:\n  - digits_random\n  - _self_\nseed: 5\n")
    spec = load_spec(["+spec=child", "~model.hidden"])  # the reference lives in the parent file
    assert spec["seed"] == 5 and spec["model"] == {"name": "digits_mlp", "hidden": 64, "dropout": "${hp.dropout}"}


def test_invalid_yaml_is_a_user_error(workdir: Path) -> None:
    (workdir / "specs" / "broken.yaml").write_text("seed: 1\nseed: 2\nsearcher: {name: random\n")
    msg = _error(["+spec=broken"])
    assert "broken.yaml" in msg and "not valid YAML" in msg
