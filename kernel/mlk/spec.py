"""The spec: composed by Hydra, validated by pydantic, the kernel owning the top level and each
plugin its own section.

A spec named NAME is the file ``NAME.yaml`` found first in: ``./specs`` of the working
directory, each folder of ``MLK_SPEC_PATH`` (``os.pathsep``-separated), the packages of the
``mlk.specs`` entry-point group, then mlk's builtin specs. ``+spec=NAME`` (or a path to a YAML
file) picks it; every other argument is a Hydra override (``searcher.max_trials=8``). A plain
``key=value`` sets the key whether or not the file mentions it (validation rejects keys that do
not exist); ``+key=value`` and ``~key`` keep Hydra's meaning. Spec files may extend others with a Hydra defaults list.

Values may refer to the trial's hyperparameters as ``${hp.NAME}`` in the ``framework``, ``data``
and ``model`` sections; those are bound per trial (:func:`bind_hparams`). Plugin sections are
checked before anything runs by binding a probe configuration from the search space.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlk.errors import UserError, did_you_mean
from mlk.hyperparameters import SearchSpace, parse_hyperparameter
from mlk.sections import ResourcesConfig, SearcherConfig, StorageConfig, ValidateConfig

HP_PATTERN = re.compile(r"\$\{hp\.([A-Za-z_][\w]*)\}")
BOUND_SECTIONS = ("framework", "data", "model")
PLAIN_KEY = re.compile(r"^[A-Za-z_][\w.]*$")


class PluginsPolicy(BaseModel):
    """``plugins:``: which plugins this spec may load."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] | None = Field(
        None, description="'group/name' patterns (fnmatch) of plugins that may load, e.g. 'searchers/*'"
    )
    lock: str | None = Field(None, description="a file written by `mlk plugins lock`; the installed set must match it")


class ReproducibilityConfig(BaseModel):
    """``reproducibility:``."""

    model_config = ConfigDict(extra="forbid")

    deterministic: bool = Field(
        False, description="deterministic algorithms and fixed threads: two runs give bit-identical metrics on CPU"
    )


class TopLevel(BaseModel):
    """The top level of a spec. Plugin sections are mappings here; their plugins validate them."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    description: str = Field("", description="free text shown by `mlk runs list`")
    seed: int = Field(0, ge=0, description="the root of every seed the run derives")
    framework: dict[str, Any] = Field(description="training framework (a plugin of mlk.frameworks) and its options")
    data: dict[str, Any] | None = Field(None, description="dataset (a plugin of mlk.datasets) and its options")
    model: dict[str, Any] | None = Field(
        None, description="model: `name` of a plugin of mlk.models, or `_target_`, and options")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="the search space")
    searcher: dict[str, Any] = Field(description="search algorithm (a plugin of mlk.searchers) and budget")
    resources: dict[str, Any] = Field(default_factory=dict, description="backend and concurrency")
    storage: dict[str, Any] = Field(default_factory=lambda: {"name": "local"},
                                    description="checkpoint store (a plugin of mlk.storage) and retention")
    reproducibility: ReproducibilityConfig = Field(default_factory=lambda: ReproducibilityConfig(),
                                                   description="bit-exact reproducibility switches")
    plugins: PluginsPolicy = Field(default_factory=lambda: PluginsPolicy(), description="which plugins may load")
    compile: list[dict[str, Any]] = Field(
        default_factory=list, description="compile and optimisation steps (plugins of mlk.compilers), in order")
    validation: ValidateConfig = Field(default_factory=lambda: ValidateConfig(), alias="validate",
                                       description="how compiled artifacts are validated, and their gates")
    deploy: list[dict[str, Any]] = Field(
        default_factory=list, description="deploy targets (plugins of mlk.targets): each builds a bundle from the "
                                          "validated artifacts and registers it as a version of a model")


@dataclass
class Spec:
    """A composed, fully validated spec."""

    name: str
    file: Path
    data: dict[str, Any]
    space: SearchSpace
    searcher: SearcherConfig
    resources: ResourcesConfig
    storage: StorageConfig

    @property
    def hash(self) -> str:
        return spec_hash(self.data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def spec_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# -- finding and composing ---------------------------------------------------------------------


def builtin_spec_dir() -> Path:
    """mlk's own specs: inside the wheel (``mlk/_specs``) or, from a source checkout, ``specs/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "_specs"
    return packaged if packaged.is_dir() else here.parents[1] / "specs"


def spec_dirs() -> list[Path]:
    """Where specs are looked for, first match wins."""
    from mlk.registry import registry

    dirs = [Path.cwd() / "specs"]
    dirs += [Path(p) for p in os.environ.get("MLK_SPEC_PATH", "").split(os.pathsep) if p]
    dirs += registry().spec_dirs()
    dirs.append(builtin_spec_dir())
    seen: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d.is_dir() and d not in seen:
            seen.append(d)
    return seen


def available_specs() -> list[str]:
    return sorted({p.stem for d in spec_dirs() for p in d.glob("*.yaml")})


def split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Separate ``+spec=NAME`` (or ``spec=NAME``) from the other overrides."""
    name = None
    rest = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") == "spec":
            name = value
        elif eq and PLAIN_KEY.match(key) and not key.startswith("hydra."):
            # `a.b=c` may set a key the file leaves at its default: validation, not Hydra, rejects
            # keys that do not exist (with the valid keys and a did-you-mean).
            rest.append("++" + arg)
        else:
            rest.append(arg)
    return name, rest


def find_spec_file(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if path.is_file():
            return path.resolve()
        raise UserError(f"spec file '{name}' does not exist", where="+spec")
    for d in spec_dirs():
        candidate = d / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"no spec named '{name}'", where="+spec", choices=available_specs(), got=name,
                    hint="specs are looked for in ./specs, $MLK_SPEC_PATH, plugin packages and mlk's builtin specs")


def _quote(path: Path) -> str:
    return "'file://" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(args: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """Compose the spec named in ``args`` with the other overrides; return its file and content.

    ``${hp.*}`` references are left in place for the trial; every other interpolation is resolved.
    """
    name, overrides = split_args(args)
    if not name:
        raise UserError("no spec chosen", where="command line", choices=available_specs(),
                        hint="pick one with +spec=NAME, e.g. `mlk run +spec=digits_random`")
    path = find_spec_file(name)
    import yaml
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    others = [d for d in spec_dirs() if d != path.parent]
    search = [f"hydra.searchpath=[{','.join(_quote(d) for d in others)}]"] if others else []
    # `${hp.NAME}` must resolve during composition too (an override may delete or copy such a
    # value): each NAME is given a node holding the escaped text, which resolves to itself.
    names = set(HP_PATTERN.findall(path.read_text() + " ".join(overrides)))
    try:
        try:
            cfg = _hydra_compose(path, [*search, *overrides], names)
        except (HydraException, OmegaConfBaseException) as e:
            if not _mentions_hp(e):
                raise
            # A ${hp.*} reference from a file the defaults list pulled in: learn the names, retry.
            names |= set(HP_PATTERN.findall(OmegaConf.to_yaml(_hydra_compose(path, search, names))))
            cfg = _hydra_compose(path, [*search, *overrides], names)
        OmegaConf.set_struct(cfg, False)
        for section in BOUND_SECTIONS:
            if section in cfg:
                names |= set(HP_PATTERN.findall(OmegaConf.to_yaml(cfg[section])))
        cfg["hp"] = {n: "\\${hp." + n + "}" for n in names}
        data = OmegaConf.to_container(cfg, resolve=True)
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {e}", where=str(path)) from None
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
        raise UserError(str(e).strip() + cause, where=str(path),
                        hint="overrides look like key=value, +new_key=value to add, ~key to delete") from e
    assert isinstance(data, dict)
    data.pop("hp", None)
    data.pop("hydra", None)
    return path, {str(k): v for k, v in data.items()}


def _hydra_compose(path: Path, overrides: list[str], hp_names: set[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    pre = [f"++hp.{n}='\\${{hp.{n}}}'" for n in sorted(hp_names)]
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
        return hydra_compose(path.stem, overrides=[*pre, *overrides])


def _mentions_hp(e: BaseException | None) -> bool:
    while e is not None:
        if "hp" in str(e) and "nterpolation" in f"{type(e).__name__} {e}":
            return True
        e = e.__cause__
    return False


# -- binding hyperparameters ---------------------------------------------------------------------


def bind_hparams(section: Any, hparams: dict[str, Any], where: str) -> Any:
    """``section`` with each ``${hp.NAME}`` replaced by the trial's value.

    A string that is exactly one reference takes the value itself (its type kept: ``"${hp.lr}"``
    becomes ``0.01``); a reference inside a longer string is replaced by the value's text. Runs
    once per trial request in the worker, so it is a plain walk over the section.
    """
    text = json.dumps(section)
    refs = set(HP_PATTERN.findall(text))
    if not refs:
        return section
    unknown = sorted(refs - set(hparams))
    if unknown:
        raise UserError(f"refers to hyperparameter '{unknown[0]}', which `hyperparameters` does not define",
                        where=where, choices=hparams, got=unknown[0])
    return _bind(section, hparams)


def _bind(value: Any, hparams: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _bind(v, hparams) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind(v, hparams) for v in value]
    if isinstance(value, str) and "${hp." in value:
        whole = HP_PATTERN.fullmatch(value)
        if whole:
            return copy.deepcopy(hparams[whole.group(1)])
        return HP_PATTERN.sub(lambda m: str(hparams[m.group(1)]), value)
    return value


def _restore_templates(validated: Any, original: Any) -> Any:
    """Put ``${hp.*}`` templates of ``original`` back into the validated (bound) data."""
    if isinstance(original, str) and HP_PATTERN.search(original):
        return original
    if isinstance(original, dict) and isinstance(validated, dict):
        return {k: _restore_templates(v, original.get(k)) for k, v in validated.items()}
    if isinstance(original, list) and isinstance(validated, list) and len(original) == len(validated):
        return [_restore_templates(v, o) for v, o in zip(validated, original)]
    return validated


# -- validation ----------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            fields = _fields_at(model, e["loc"][:-1]) if model else []
            near = did_you_mean(str(e["loc"][-1]), fields)
            if fields:
                msg += f" (valid keys: {', '.join(fields)})"
            if near:
                msg += f"; did you mean '{near}'?"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"{loc}: {msg}")
    return "\n  ".join(lines)


def _fields_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    for part in loc:
        if model is None:
            return []
        info = model.model_fields.get(str(part))
        ann = getattr(info, "annotation", None) if info else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return []
    return sorted((f.alias or n) for n, f in model.model_fields.items())


def validate_section(config_cls: type[BaseModel], data: Any, where: str) -> Any:
    """``config_cls`` validated from ``data``; a :class:`UserError` naming each bad key path."""
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise UserError("invalid section:\n  " + format_validation_error(e, where, config_cls)) from None


def _check_plugin_section(reg: Any, group: str, section: dict[str, Any], where: str,
                          probe: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if "name" not in section:
        raise UserError("missing key 'name'", where=f"{where}.name", choices=reg.names(group))
    cls = reg.get(group, section["name"], where=f"{where}.name")
    bound = bind_hparams(section, probe, where)
    config = validate_section(cls.Config, bound, where)
    return config, _restore_templates(config.model_dump(by_alias=True, mode="json"), section)


def load_spec(args: Sequence[str]) -> Spec:
    """Compose and validate the spec named in ``args``; apply its plugin policy."""
    path, raw = compose(args)
    return validate_spec(raw, path)


def validate_spec(raw: dict[str, Any], path: Path) -> Spec:
    from mlk.lock import enforce_lock
    from mlk.registry import registry

    where = str(path)
    try:
        top = TopLevel.model_validate(raw)
    except ValidationError as e:
        raise UserError("invalid spec:\n  " + format_validation_error(e, "", TopLevel), where=where) from None
    reg = registry()
    reg.allow = top.plugins.allow
    lock = top.plugins.lock or os.environ.get("MLK_PLUGINS_LOCK")
    if lock:
        lock_path = Path(lock) if Path(lock).is_absolute() else (path.parent / lock if top.plugins.lock else Path(lock))
        enforce_lock(reg, lock_path)

    params = {}
    for hp_name, hp_raw in top.hyperparameters.items():
        try:
            params[hp_name] = parse_hyperparameter(hp_raw)
        except ValidationError as e:
            raise UserError("invalid hyperparameter:\n  " + format_validation_error(e, f"hyperparameters.{hp_name}"),
                            where=where,
                            hint="types: const (val), int/double (minval, maxval), log (minval, maxval exponents, "
                                 "base), categorical (vals)") from None
    space = SearchSpace(params)
    probe = space.probe()

    data = top.model_dump(by_alias=True, mode="json")
    try:
        framework, data["framework"] = _check_plugin_section(reg, "frameworks", top.framework, "framework", probe)
        if top.data is not None:
            _, data["data"] = _check_plugin_section(reg, "datasets", top.data, "data", probe)
        if top.model is not None:
            data["model"] = _check_model(reg, top.model, probe)
        searcher, data["searcher"] = _check_plugin_section(reg, "searchers", top.searcher, "searcher", probe)
        resources_raw = {"backend": "local", **top.resources}
        backend_cls = reg.get("backends", resources_raw["backend"], where="resources.backend")
        resources = validate_section(backend_cls.Config, resources_raw, "resources")
        data["resources"] = resources.model_dump(mode="json")
        fw_cls = reg.get("frameworks", framework.name, where="framework.name")
        if resources.slots_per_trial > fw_cls.max_slots:
            raise UserError(f"framework '{framework.name}' runs a trial on at most {fw_cls.max_slots} worker(s); "
                            f"slots_per_trial={resources.slots_per_trial} is not supported by it",
                            where="resources.slots_per_trial")
        storage, data["storage"] = _check_plugin_section(reg, "storage", {"name": "local", **top.storage},
                                                         "storage", probe)
        reg.get("searchers", searcher.name, where="searcher.name").check_space(searcher, space)
        data["compile"] = _check_compile(reg, top.compile)
        data["deploy"] = _check_deploy(reg, top.deploy, path.stem)
        for section in ("compile", "deploy"):
            if data[section] and not fw_cls.export_format:
                raise UserError(f"framework '{framework.name}' cannot export a model, so nothing can be "
                                f"{'compiled' if section == 'compile' else 'deployed'}", where=section)
    except UserError as e:
        e.where = f"{where}: {e.where}" if e.where else where
        raise UserError(e.message, where=e.where, choices=e.choices, got=e.got, hint=e.hint) from None
    return Spec(path.stem, path, data, space, searcher, resources, storage)


def _check_compile(reg: Any, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, seen = [], set()
    for i, step in enumerate(steps):
        where = f"compile[{i}]"
        if "name" not in step:
            raise UserError("missing key 'name'", where=f"{where}.name", choices=reg.names("compilers"))
        cls = reg.get("compilers", step["name"], where=f"{where}.name")
        config = validate_section(cls.Config, step, where)
        step_id = config.id or config.name
        if step_id in seen:
            raise UserError(f"two compile steps have the id '{step_id}'", where=f"{where}.id",
                            hint="give one of them an `id:` of its own")
        seen.add(step_id)
        out.append(config.model_dump(mode="json"))
    return out


def _check_deploy(reg: Any, entries: list[dict[str, Any]], spec_name: str) -> list[dict[str, Any]]:
    from mlk.deployments import check_model_name

    out, seen = [], set()
    models: dict[str, tuple[str, str]] = {}
    for i, entry in enumerate(entries):
        where = f"deploy[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError("missing key 'name'", where=f"{where}.name", choices=reg.names("targets"))
        cls = reg.get("targets", entry["name"], where=f"{where}.name")
        config = validate_section(cls.Config, entry, where)
        node_id = config.id or config.name
        if node_id in seen:
            raise UserError(f"two deploy entries have the id '{node_id}'", where=f"{where}.id",
                            hint="give one of them an `id:` of its own")
        seen.add(node_id)
        if config.model is not None:
            check_model_name(config.model, f"{where}.model")
        model = config.model or spec_name
        other = models.setdefault(model, (where, config.name))
        if other[1] != config.name:
            raise UserError(f"model '{model}' is also deployed by {other[0]} (target {other[1]}); the versions of a "
                            "model come from one target", where=f"{where}.model",
                            hint=f"give this entry a model of its own, e.g. `model: {model}-{config.name}`")
        out.append(config.model_dump(mode="json"))
    return out


def _check_model(reg: Any, model: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    if bool(model.get("name")) == bool(model.get("_target_")):
        raise UserError("give exactly one of `name` (a builtin model) or `_target_` (an importable callable)",
                        where="model", choices=reg.names("models"))
    if model.get("_target_"):
        return model
    cls = reg.get("models", model["name"], where="model.name")
    options = {k: v for k, v in model.items() if k != "name"}
    config = validate_section(cls.Config, bind_hparams(options, probe, "model"), "model")
    dumped = _restore_templates(config.model_dump(mode="json"), options)
    return {"name": model["name"], **dumped}


def recorded_spec_path(run: dict[str, Any]) -> Path:
    """The spec file a recorded run was composed from (its name, when the record lacks the file)."""
    return Path((run.get("provenance") or {}).get("spec", {}).get("file") or f"{run['spec_name']}.yaml")


# -- changes between two specs -------------------------------------------------------------------

#: Top-level key paths a resumed run may change without invalidating its trials.
SAFE_CHANGES = ("description", "resources.", "storage.keep.", "storage.checkpoint_every_s", "compile", "deploy",
                "plugins.")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def spec_changes(old: dict[str, Any], new: dict[str, Any], extendable: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(safe, unsafe)`` descriptions of what changed from ``old`` to ``new``. Safe changes keep a
    search's trials valid (more trials, more concurrency); unsafe ones (search space, metric,
    model, data, seed...) do not."""
    a, b = _flatten(old), _flatten(new)
    safe: list[str] = []
    unsafe: list[str] = []
    allowed = (*SAFE_CHANGES, *(f"searcher.{k}" for k in extendable))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            text = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            (safe if any(key == p or key.startswith(p) for p in allowed) else unsafe).append(text)
    return safe, unsafe


# -- schema --------------------------------------------------------------------------------------


def spec_schema() -> dict[str, Any]:
    """JSON schema of a spec, with each plugin section a union of the installed plugins' Configs."""
    from typing import Annotated, Literal, Optional, Union

    from pydantic import create_model

    from mlk.hyperparameters import Hyperparameter
    from mlk.registry import registry

    reg = registry()

    def union(group: str) -> Any:
        members = []
        for entry in reg.entries(group):
            try:
                cls = entry.load()
            except Exception:
                continue  # a broken plugin is reported by `mlk plugins list`, not here
            members.append(create_model(f"{group}_{entry.name}", __base__=cls.Config,
                                        name=(Literal[entry.name], ...)))  # type: ignore[call-overload,arg-type]
        if not members:
            return dict[str, Any]
        if len(members) == 1:
            return members[0]
        return Annotated[Union[tuple(members)], Field(discriminator="name")]  # noqa: UP007

    backends = [e.load().Config for e in reg.entries("backends")]
    model = create_model(
        "MlkSpec",
        __base__=TopLevel,
        framework=(union("frameworks"), ...),
        data=(Optional[union("datasets")], None),  # type: ignore[arg-type,maybe-unrecognized-str-typeform]  # noqa: UP045
        searcher=(union("searchers"), ...),
        storage=(union("storage"), None),
        resources=(backends[0] if len(backends) == 1 else dict[str, Any], None),
        hyperparameters=(dict[str, Hyperparameter], None),
        compile=(list[union("compilers")], None),  # type: ignore[arg-type,misc,maybe-unrecognized-str-typeform]
        deploy=(list[union("targets")], None),  # type: ignore[arg-type,misc,maybe-unrecognized-str-typeform]
    )
    return model.model_json_schema()
