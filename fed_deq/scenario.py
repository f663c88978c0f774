"""Strict scenario schema: YAML file -> frozen dataclasses.

Every key has a default (except a tier's ``name`` and its ``count``/``share``), so a minimal file works.
Anything unknown, misspelt, mistyped or impossible is an ``InputError`` with one line naming the file and
the dotted key path, e.g. ``scenarios/x.yaml: training.rounds: must be an integer >= 1, got -3``.

Pure python + yaml: importable without Flower or torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from fed_deq.errors import InputError

PARTITION_KINDS = ("iid", "dirichlet", "pathological")
CELLS = ("mlp", "conv1d", "conv2d")
CONTRACTIONS = ("none", "spectral", "monotone")
SOLVERS = ("picard", "anderson", "broyden")
BACKWARDS = ("one-step", "implicit", "phantom")
OPTIMIZERS = ("sgd", "adam")
FUSION_RULES = ("quality", "fedavg", "fednova", "fedprox", "fedmedian", "fedtrimmedavg", "krum")
QUALITY_SCORES = ("budget", "residual", "accuracy", "product", "probe")
#: Misbehaving clients a scenario can plant (fed_deq/adversary.py says what each does).
ATTACKS = ("inflate_examples", "fake_residual", "fake_accuracy", "fake_time", "fake_steps", "negative_metric",
           "nan_update", "wrong_shape", "crash", "silent")

# Sizes of the built-in datasets, for the "enough samples for every client" check; hub datasets are unknown.
_DIGITS_SAMPLES = 1797
_BUILTIN_NUM_CLASSES = 10
_SHARE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------------
# Value constraints, kept next to the fields they constrain (dataclass field metadata).


@dataclass(frozen=True)
class _Range:
    """A numeric interval; ``text`` reads like the error message wants it (">= 1", "in (0, 1]")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        """True when ``value`` lies inside the interval."""
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    @property
    def text(self) -> str:
        """Human form of the interval."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(value: float | None) -> str:
    """Print 1.0 as 1 in messages."""
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


POSITIVE = _Range(0, lo_open=True)
NON_NEGATIVE = _Range(0)
AT_LEAST_ONE = _Range(1)
PROBABILITY = _Range(0, 1)
FRACTION = _Range(0, 1, hi_open=True)
OPEN_FRACTION = _Range(0, 1, lo_open=True, hi_open=True)
AVAILABILITY = _Range(0, 1, lo_open=True)


def _key(default: Any = None, *, within: _Range | None = None, choices: tuple[str, ...] | None = None,
         required: bool = False, factory: Any = None) -> Any:
    """A dataclass field carrying its validation rule in metadata."""
    meta = {"within": within, "choices": choices, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------
# The schema. Sections and keys are the contract in docs/design.md.


class _Section:
    """Mixin: plain-dict conversion shared by every section."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict/list/scalar form, suitable for YAML and JSON."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class PartitionConfig(_Section):
    """How the training set is split across clients."""

    kind: str = _key("iid", choices=PARTITION_KINDS)
    alpha: float = _key(0.5, within=POSITIVE)                     # dirichlet concentration
    min_partition_size: int = _key(10, within=NON_NEGATIVE)       # dirichlet: resample until every client has this many
    classes_per_client: int = _key(2, within=AT_LEAST_ONE)        # pathological


@dataclass(frozen=True)
class DatasetConfig(_Section):
    """Which data, how much, and how it is split."""

    name: str = _key("mnist1d")
    num_samples: int = _key(5000, within=AT_LEAST_ONE)
    # A test set is needed for the server-side evaluation, so 0 is impossible here.
    test_fraction: float = _key(0.2, within=OPEN_FRACTION)
    validation_fraction: float = _key(0.1, within=FRACTION)
    image_key: str | None = _key(None)
    label_key: str | None = _key(None)
    partition: PartitionConfig = _key(factory=PartitionConfig)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The DEQ classifier and its solver settings."""

    cell: str = _key("conv1d", choices=CELLS)
    width: int = _key(32, within=AT_LEAST_ONE)
    contraction: str = _key("spectral", choices=CONTRACTIONS)
    spectral_gain: float = _key(0.9, within=POSITIVE)
    solver: str = _key("anderson", choices=SOLVERS)
    tol: float = _key(1.0e-3, within=POSITIVE)
    backward: str = _key("one-step", choices=BACKWARDS)
    backward_iterations: int = _key(4, within=AT_LEAST_ONE)
    eval_iterations: int = _key(30, within=AT_LEAST_ONE)


class _CountOrShare(_Section):
    """Mixin for sections sized by ``count`` or ``share``: the unused one is left out of the plain form, so a
    dumped file reads like a hand-written one."""

    def to_dict(self) -> dict[str, Any]:
        """Plain form without the unused one of count/share."""
        data = super().to_dict()
        for key in ("count", "share"):
            if data[key] is None:
                del data[key]
        return data


@dataclass(frozen=True)
class TierConfig(_CountOrShare):
    """A class of devices: how many, how fast, how reliable."""

    name: str = _key("", required=True)
    count: int | None = _key(None, within=NON_NEGATIVE)
    share: float | None = _key(None, within=PROBABILITY)
    compute_gflops: float = _key(1.0, within=POSITIVE)
    bandwidth_mbps: float = _key(10.0, within=POSITIVE)
    availability: float = _key(1.0, within=AVAILABILITY)
    dropout: float = _key(0.0, within=PROBABILITY)
    straggler_prob: float = _key(0.0, within=PROBABILITY)
    # A slowdown below 1 would be a speed-up, which the straggler model does not mean.
    straggler_slowdown: float = _key(1.0, within=AT_LEAST_ONE)



def _default_tiers() -> tuple[TierConfig, ...]:
    return (TierConfig(name="device", share=1.0),)


@dataclass(frozen=True)
class FleetConfig(_Section):
    """The simulated devices. ``num_clients`` is always resolved (an int) after parsing."""

    num_clients: int | None = _key(10, within=AT_LEAST_ONE)
    tiers: tuple[TierConfig, ...] = _key(factory=_default_tiers)


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """Rounds, sampling, local optimisation and the per-round deadline."""

    rounds: int = _key(15, within=AT_LEAST_ONE)
    clients_per_round: int | float = _key(8)                     # checked against the fleet size
    local_epochs: int = _key(1, within=AT_LEAST_ONE)
    batch_size: int = _key(32, within=AT_LEAST_ONE)
    learning_rate: float = _key(0.05, within=POSITIVE)
    optimizer: str = _key("sgd", choices=OPTIMIZERS)
    momentum: float = _key(0.9, within=FRACTION)
    deadline_s: float = _key(10.0, within=POSITIVE)
    min_iterations: int = _key(2, within=AT_LEAST_ONE)
    max_iterations: int = _key(30, within=AT_LEAST_ONE)
    warm_start: bool = _key(True)


@dataclass(frozen=True)
class FusionConfig(_Section):
    """How the server fuses client models."""

    rule: str = _key("quality", choices=FUSION_RULES)
    # Measured best over 5 seeds on default.yaml and heterogeneous-fleet.yaml (docs/benchmarks.md).
    score: str = _key("probe", choices=QUALITY_SCORES)
    size_exponent: float = _key(1.0, within=NON_NEGATIVE)
    quality_exponent: float = _key(1.0, within=NON_NEGATIVE)
    beta: float = _key(1.0, within=NON_NEGATIVE)
    floor: float = _key(0.05, within=FRACTION)
    proximal_mu: float = _key(0.01, within=NON_NEGATIVE)
    # Trimming half or more from each side leaves nothing to average.
    trim_beta: float = _key(0.2, within=_Range(0, 0.5, hi_open=True))
    krum_malicious: int = _key(1, within=NON_NEGATIVE)
    # A ratio below 1 would reject the median update itself.
    max_norm_ratio: float = _key(10.0, within=AT_LEAST_ONE)
    # Samples the server keeps out of every partition (and the test set) to score client models with.
    probe_samples: int = _key(256, within=NON_NEGATIVE)


@dataclass(frozen=True)
class SimulationConfig(_Section):
    """Ray resources, and how long (wall seconds) the server waits for a round's replies."""

    cpus_per_client: float = _key(1.0, within=POSITIVE)
    num_cpus: int | None = _key(None, within=AT_LEAST_ONE)
    ray_address: str | None = _key(None)
    # A reply that never comes (a dead worker or node) must not stall the run: past this, the round closes
    # with whoever answered and the missing clients count as dropped.
    round_timeout_s: float = _key(600.0, within=POSITIVE)


@dataclass(frozen=True)
class AdversaryConfig(_CountOrShare):
    """Misbehaving clients: ``count`` (or ``share``) devices of ``tier`` mount ``attack`` every round."""

    tier: str = _key("", required=True)
    attack: str = _key("", required=True, choices=ATTACKS)
    count: int | None = _key(None, within=NON_NEGATIVE)
    share: float | None = _key(None, within=PROBABILITY)



@dataclass(frozen=True)
class Scenario(_Section):
    """A whole experiment: everything a run needs besides the output directory."""

    seed: int = _key(0, within=NON_NEGATIVE)                      # numpy SeedSequence needs seed >= 0
    dataset: DatasetConfig = _key(factory=DatasetConfig)
    model: ModelConfig = _key(factory=ModelConfig)
    fleet: FleetConfig = _key(factory=FleetConfig)
    training: TrainingConfig = _key(factory=TrainingConfig)
    fusion: FusionConfig = _key(factory=FusionConfig)
    simulation: SimulationConfig = _key(factory=SimulationConfig)
    adversaries: tuple[AdversaryConfig, ...] = _key(factory=tuple)


# --------------------------------------------------------------------------------------------------------
# Reading YAML strictly.


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 would read it as text)."""


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(text: str, source: str) -> Any:
    """Parse YAML text, rejecting duplicate keys; errors carry the line number."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)
        if root is None:
            return None
        _reject_duplicate_keys(root, "", source)
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise InputError(f"{source}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None


def _reject_duplicate_keys(node: yaml.Node, path: str, source: str) -> None:
    # safe_load silently keeps the last of two equal keys; a strict config must not.
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = _join(path, key)
            if key in seen:
                raise InputError(f"{source}: line {key_node.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(key)
            _reject_duplicate_keys(value_node, dotted, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, _join(path, str(index)), source)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------------------------------------
# Public API.


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Read, override (``"dotted.key=value"`` strings from ``--set``) and validate a scenario file."""
    source = str(path)
    data = _read_file(Path(path), source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{source}: top level must be a mapping of sections, got {_type_name(data)}")
    for item in overrides:
        _apply_override(data, item, source)
    return parse_scenario(data, source)


def validate_file(path: str | Path) -> Scenario:
    """Check a scenario file; returns the parsed scenario or raises InputError."""
    return load_scenario(path)


def parse_scenario(data: Mapping[str, Any] | None, source: str) -> Scenario:
    """Validate an already-loaded mapping; ``source`` names it in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: top level must be a mapping of sections, got {_type_name(data)}")
    scenario = _parse_section(Scenario, data, "", source)
    scenario = _default_clients_per_round(scenario, data)
    _check_cross_section(scenario, source)
    return scenario


def parse_scenario_text(text: str, source: str = "scenario text") -> Scenario:
    """Validate scenario YAML text (e.g. the resolved scenario a server sends its clients)."""
    data = _read_yaml(text, source)
    if data is not None and not isinstance(data, dict):
        raise InputError(f"{source}: top level must be a mapping of sections, got {_type_name(data)}")
    return parse_scenario(data, source)


def dump_scenario(scenario: Scenario, path: str | Path | None = None) -> str:
    """YAML text that ``parse_scenario``/``load_scenario`` turn back into an equal Scenario.

    When ``path`` is given the text is also written there.
    """
    text = yaml.safe_dump(scenario.to_dict(), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def tier_names(scenario: Scenario) -> list[str]:
    """Tier names in file order."""
    return [tier.name for tier in scenario.fleet.tiers]


def num_clients(scenario: Scenario) -> int:
    """Fleet size (resolved from counts, or given with shares)."""
    return sum(tier_counts(scenario).values())


def tier_counts(scenario: Scenario) -> dict[str, int]:
    """Devices per tier; shares become counts by largest remainder, so they sum exactly to num_clients."""
    tiers = scenario.fleet.tiers
    if all(tier.count is not None for tier in tiers):
        return {tier.name: int(tier.count) for tier in tiers}  # type: ignore[arg-type]
    total = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    exact = [float(tier.share) * total for tier in tiers]  # type: ignore[arg-type]
    counts = [math.floor(value) for value in exact]
    missing = max(0, total - sum(counts))
    # Ties go to the earlier tier: sorted() is stable.
    by_remainder = sorted(range(len(tiers)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:missing]:
        counts[i] += 1
    return {tier.name: count for tier, count in zip(tiers, counts)}


def resolve_tier(scenario: Scenario, name: str, *, source: str = "node-config", key: str = "tier") -> TierConfig:
    """The tier called ``name``; an unknown name is an InputError naming ``source: key`` and the valid tiers."""
    for tier in scenario.fleet.tiers:
        if tier.name == name:
            return tier
    valid = tier_names(scenario)
    raise InputError(f"{source}: {key}: unknown tier {name!r}{_did_you_mean(str(name), valid)}; "
                     f"valid tiers: {', '.join(valid)}")


def resolve_clients_per_round(value: int | float, fleet_size: int) -> int:
    """Clients to sample per round: an int is a count, a float in (0, 1] a fraction of the fleet (>= 1)."""
    if isinstance(value, bool):
        raise ValueError(f"clients_per_round must be an int or a float, got {value!r}")
    if isinstance(value, int):
        return min(value, fleet_size)
    return max(1, min(fleet_size, int(value * fleet_size + 0.5)))


# --------------------------------------------------------------------------------------------------------
# Files and overrides.


def _read_file(path: Path, source: str) -> Any:
    if not path.exists():
        raise InputError(f"{source}: no such file")
    if path.is_dir():
        raise InputError(f"{source}: is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read: {exc.strerror or exc}") from None
    return _read_yaml(text, source)


def _apply_override(data: dict[str, Any], item: str, source: str) -> None:
    """Set one ``dotted.key=value`` in the raw mapping, checking the key path against the schema."""
    key, sep, text = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"{source}: --set {item!r}: expected dotted.key=value")
    where = f"{source}: --set {key}"
    value = _read_yaml(text, f"{where}: value") if text.strip() else None
    parts = key.split(".")
    node: Any = data
    schema: Any = Scenario
    done = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if _is_tier_list(schema):
            position = _tier_position(node, part, f"{where}: {_join(done, part)}")
            done = _join(done, part)
            if last:
                node[position] = value
                return
            node, schema = node[position], typing.get_args(schema)[0]
        else:
            hints = _hints(schema)
            if part not in hints:
                raise InputError(f"{where}: unknown key {_join(done, part)}"
                                 f"{_suggest_key(part, list(hints), done)}")
            done = _join(done, part)
            if last:
                node[part] = value
                return
            child_schema = hints[part]
            if not (dataclasses.is_dataclass(child_schema) or _is_tier_list(child_schema)):
                raise InputError(f"{where}: {done} has no sub-keys")
            if node.get(part) is None:
                node[part] = _default_raw(schema, part, node)
            node, schema = node[part], child_schema
        expected = list if _is_tier_list(schema) else dict
        if not isinstance(node, expected):
            raise InputError(f"{source}: {done}: must be a {'list' if expected is list else 'mapping'}, "
                             f"got {_type_name(node)}")


def _default_raw(schema: type, name: str, node: dict[str, Any]) -> Any:
    """Raw (dict/list) default of a section, so an override can reach into a section the file leaves out."""
    default = {f.name: f for f in dataclasses.fields(schema)}[name].default_factory()  # type: ignore[misc]
    if isinstance(default, tuple) and not default:
        return []
    if schema is FleetConfig and name == "tiers":
        # The default tiers use a share, which needs the (otherwise defaulted) fleet size spelled out.
        node.setdefault("num_clients", FleetConfig().num_clients)
        return [tier.to_dict() for tier in default]
    return {}


def _tier_position(tiers: list[Any], part: str, where: str) -> int:
    """List items are addressed by index (``fleet.tiers.0``); tiers also by name (``fleet.tiers.phone``)."""
    names = [tier.get("name") if isinstance(tier, dict) else None for tier in tiers]
    if part in names:
        return names.index(part)
    if part.isdigit() and int(part) < len(tiers):
        return int(part)
    valid = [str(name) for name in names if name is not None]
    if not valid:
        raise InputError(f"{where}: no entry {part!r}; use an index below {len(tiers)}")
    raise InputError(f"{where}: unknown tier {part!r}{_did_you_mean(part, valid)}; valid tiers: "
                     f"{', '.join(valid) or '(none)'} or an index below {len(tiers)}")


# --------------------------------------------------------------------------------------------------------
# Generic section parsing: unknown keys, types, per-key ranges and choices.


def _parse_section(cls: type, data: Any, path: str, source: str) -> Any:
    if data is None:
        data = {}  # "model:" with nothing below it means all defaults
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: {path or 'top level'}: must be a mapping, got {_type_name(data)}")
    hints = _hints(cls)
    for key in data:
        if not isinstance(key, str) or key not in hints:
            raise InputError(f"{source}: {_join(path, str(key))}: unknown key"
                             f"{_suggest_key(str(key), list(hints), path)}")
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        key_path = _join(path, spec.name)
        if spec.name not in data:
            if spec.metadata.get("required"):
                raise InputError(f"{source}: {key_path}: missing (required)")
            continue
        value = _coerce(data[spec.name], hints[spec.name], key_path, source)
        _check_value(value, spec, key_path, source)
        values[spec.name] = value
    section = cls(**values)
    if cls is FleetConfig:
        section = _resolve_fleet(section, data, path, source)
    return section


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check the YAML value's type against the annotation; ints are accepted (and converted) for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if set(options) == {int, float}:
            if _is_int(value) or isinstance(value, float):
                return _finite(value, path, source, "a number")
            _type_error(value, "an integer or a number", path, source)
        return _coerce_optional(value, options[0], path, source, nullable=len(options) < len(typing.get_args(hint)))
    if origin is tuple:
        return _coerce_list(value, typing.get_args(hint)[0], path, source)
    if dataclasses.is_dataclass(hint):
        return _parse_section(hint, value, path, source)
    return _coerce_optional(value, hint, path, source, nullable=False)


def _coerce_optional(value: Any, hint: type, path: str, source: str, *, nullable: bool) -> Any:
    suffix = " or null" if nullable else ""
    if hint is bool:
        if not isinstance(value, bool):
            _type_error(value, "true or false" + suffix, path, source)
        return value
    if hint is int:
        if not _is_int(value):
            _type_error(value, "an integer" + suffix, path, source)
        return int(value)
    if hint is float:
        if not (_is_int(value) or isinstance(value, float)):
            _type_error(value, "a number" + suffix, path, source)
        return float(_finite(value, path, source, "a number"))
    if hint is str:
        if not isinstance(value, str):
            _type_error(value, "a string" + suffix, path, source)
        return value
    raise TypeError(f"unsupported schema type {hint!r} at {path}")  # a bug in the schema, not user input


def _coerce_list(value: Any, item_cls: type, path: str, source: str) -> tuple[Any, ...]:
    if item_cls is AdversaryConfig and value is None:
        return ()  # "adversaries:" with nothing below it: an honest fleet
    what = "tiers" if item_cls is TierConfig else "entries"
    if not isinstance(value, list):
        _type_error(value, f"a list of {what}", path, source)
    if not value and item_cls is TierConfig:
        raise InputError(f"{source}: {path}: must list at least one tier")
    return tuple(_parse_section(item_cls, item, _join(path, str(i)), source) for i, item in enumerate(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any, path: str, source: str, what: str) -> Any:
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise InputError(f"{source}: {path}: must be {what} (finite), got {value!r}")
    return value


def _type_error(value: Any, expected: str, path: str, source: str) -> typing.NoReturn:
    raise InputError(f"{source}: {path}: must be {expected}, got {_show(value)} ({_type_name(value)})")


def _check_value(value: Any, spec: dataclasses.Field, path: str, source: str) -> None:
    if value is None:
        return
    choices = spec.metadata.get("choices")
    if choices is not None and value not in choices:
        raise InputError(f"{source}: {path}: must be one of {', '.join(choices)}, got {value!r}"
                         f"{_did_you_mean(value, list(choices))}")
    within: _Range | None = spec.metadata.get("within")
    if within is not None and not within.contains(value):
        kind = "an integer" if _is_int(value) else "a number"
        raise InputError(f"{source}: {path}: must be {kind} {within.text}, got {_show(value)}")
    if spec.metadata.get("required") and isinstance(value, str) and not value.strip():
        raise InputError(f"{source}: {path}: must be a non-empty string, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Rules that span keys or sections.


def _resolve_fleet(fleet: FleetConfig, data: Mapping[str, Any], path: str, source: str) -> FleetConfig:
    """Check tiers (names, count/share) and pin ``num_clients`` to an int."""
    tiers_path = _join(path, "tiers")
    seen: set[str] = set()
    for i, tier in enumerate(fleet.tiers):
        where = f"{source}: {tiers_path}.{i}"
        if tier.name in seen:
            raise InputError(f"{where}.name: duplicate tier name {tier.name!r}")
        seen.add(tier.name)
        if (tier.count is None) == (tier.share is None):
            raise InputError(f"{where}: needs exactly one of count or share (tier {tier.name!r})")
    uses_count = [tier.count is not None for tier in fleet.tiers]
    if any(uses_count) and not all(uses_count):
        raise InputError(f"{source}: {tiers_path}: mixes count and share; give every tier a count, "
                         f"or every tier a share")
    size_path = _join(path, "num_clients")
    # Without a tiers key the default single tier is sized by num_clients, given or defaulted.
    given = fleet.num_clients if ("num_clients" in data or "tiers" not in data) else None
    if all(uses_count):
        total = sum(int(tier.count) for tier in fleet.tiers)  # type: ignore[arg-type]
        if given is not None and given != total:
            raise InputError(f"{source}: {size_path}: is {given} but the tier counts sum to {total}")
        if total < 1:
            raise InputError(f"{source}: {tiers_path}: tier counts sum to 0; the fleet needs a device")
        return dataclasses.replace(fleet, num_clients=total)
    if given is None:
        raise InputError(f"{source}: {size_path}: required when tiers use share")
    share_sum = sum(float(tier.share) for tier in fleet.tiers)  # type: ignore[arg-type]
    if abs(share_sum - 1.0) > _SHARE_TOLERANCE:
        raise InputError(f"{source}: {tiers_path}: shares must sum to 1, got {share_sum:g}")
    return dataclasses.replace(fleet, num_clients=int(given))


def _default_clients_per_round(scenario: Scenario, data: Mapping[str, Any]) -> Scenario:
    """The default count (8) must not make a small fleet, which never mentioned it, an error."""
    training = data.get("training")
    if isinstance(training, Mapping) and "clients_per_round" in training:
        return scenario
    size = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    if scenario.training.clients_per_round <= size:
        return scenario
    return dataclasses.replace(scenario, training=dataclasses.replace(scenario.training, clients_per_round=size))


def _check_cross_section(scenario: Scenario, source: str) -> None:
    _check_clients_per_round(scenario, source)
    _check_iterations(scenario, source)
    _check_dataset_size(scenario, source)
    _check_fusion(scenario, source)
    _check_simulation(scenario, source)
    _check_adversaries(scenario, source)


def _check_clients_per_round(scenario: Scenario, source: str) -> None:
    value = scenario.training.clients_per_round
    size = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    ok = (1 <= value <= size) if isinstance(value, int) else (0 < value <= 1)
    if not ok:
        raise InputError(f"{source}: training.clients_per_round: must be an integer in [1, {size}] "
                         f"(fleet.num_clients) or a fraction in (0, 1], got {_show(value)}")


def _check_iterations(scenario: Scenario, source: str) -> None:
    training = scenario.training
    if training.max_iterations < training.min_iterations:
        raise InputError(f"{source}: training.max_iterations: must be >= training.min_iterations "
                         f"({training.min_iterations}), got {training.max_iterations}")
    if training.min_iterations < 2:
        # Every backward mode needs at least one forward and one backward iteration: a budget of 1 cannot
        # hold both, and the weakest clients would fail every round.
        raise InputError(f"{source}: training.min_iterations: must be >= 2 with model.backward "
                         f"{scenario.model.backward} (1 forward + at least 1 backward iteration), "
                         f"got {training.min_iterations}")


def _check_dataset_size(scenario: Scenario, source: str) -> None:
    dataset = scenario.dataset
    total = {"mnist1d": dataset.num_samples, "digits": _DIGITS_SAMPLES}.get(dataset.name)
    if total is None:
        return  # hub datasets: size unknown until download
    clients = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    train = int(total * (1 - dataset.test_fraction)) - scenario.fusion.probe_samples
    per_client = dataset.partition.min_partition_size if dataset.partition.kind == "dirichlet" else 1
    needed = clients * max(1, per_client)
    if train < needed:
        if dataset.name == "mnist1d":
            raise InputError(f"{source}: dataset.num_samples: must leave at least {needed} training samples "
                             f"({max(1, per_client)} for each of {clients} clients), got {total} ({train} for training)")
        raise InputError(f"{source}: fleet.num_clients: {dataset.name} has {train} training samples, too few for "
                         f"{max(1, per_client)} per client, got {clients} clients")
    if dataset.partition.kind == "pathological" and dataset.partition.classes_per_client > _BUILTIN_NUM_CLASSES:
        raise InputError(f"{source}: dataset.partition.classes_per_client: must be <= {_BUILTIN_NUM_CLASSES} "
                         f"for {dataset.name}, got {dataset.partition.classes_per_client}")


def _check_fusion(scenario: Scenario, source: str) -> None:
    fusion = scenario.fusion
    if fusion.rule == "quality" and fusion.score == "probe" and fusion.probe_samples < 1:
        raise InputError(f"{source}: fusion.probe_samples: must be >= 1 with fusion.score probe, "
                         f"got {fusion.probe_samples}")
    if fusion.rule != "krum":
        return
    sampled = resolve_clients_per_round(scenario.training.clients_per_round,
                                        int(scenario.fleet.num_clients))  # type: ignore[arg-type]
    # Krum scores each update by its n - f - 2 nearest neighbours, so it needs n >= 2f + 3.
    if sampled < 2 * fusion.krum_malicious + 3:
        raise InputError(f"{source}: fusion.krum_malicious: krum needs clients per round >= 2f + 3, "
                         f"got f={fusion.krum_malicious} with {sampled} clients per round")


def _check_simulation(scenario: Scenario, source: str) -> None:
    sim = scenario.simulation
    if sim.num_cpus is not None and sim.num_cpus < sim.cpus_per_client:
        raise InputError(f"{source}: simulation.num_cpus: must be >= simulation.cpus_per_client "
                         f"({_num(sim.cpus_per_client)}), got {sim.num_cpus}")


def _check_adversaries(scenario: Scenario, source: str) -> None:
    """Known tier, exactly one of count/share, and never more adversaries in a tier than it has devices."""
    counts = tier_counts(scenario)
    planted: dict[str, int] = {}
    for i, entry in enumerate(scenario.adversaries):
        where = f"{source}: adversaries.{i}"
        if entry.tier not in counts:
            valid = list(counts)
            raise InputError(f"{where}.tier: unknown tier {entry.tier!r}{_did_you_mean(entry.tier, valid)}; "
                             f"valid tiers: {', '.join(valid)}")
        if (entry.count is None) == (entry.share is None):
            raise InputError(f"{where}: needs exactly one of count or share (attack {entry.attack!r})")
        planted[entry.tier] = planted.get(entry.tier, 0) + adversary_count(entry, counts[entry.tier])
        if planted[entry.tier] > counts[entry.tier]:
            raise InputError(f"{where}.count: {planted[entry.tier]} adversaries planted in tier {entry.tier!r}, "
                             f"which has {counts[entry.tier]} devices")


def adversary_count(entry: AdversaryConfig, tier_size: int) -> int:
    """Devices an adversaries entry plants: its count, or its share of the tier rounded half up."""
    if entry.count is not None:
        return int(entry.count)
    return int(math.floor(float(entry.share) * tier_size + 0.5))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Message helpers.


def _did_you_mean(word: str, choices: list[str]) -> str:
    """'; did you mean 'x'?' for a misspelt value or tier name, else ''."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _suggest_key(word: str, valid: list[str], prefix: str) -> str:
    """Closest valid key in the same section, else the same key in another section, else the valid keys."""
    match = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if match:
        return f"; did you mean {_join(prefix, match[0])}?"
    elsewhere = [path for path in _key_paths(Scenario, "") if path.rsplit(".", 1)[-1] == word]
    if elsewhere:
        # A key put in the wrong section ('rounds' at top level) is pointed to where it belongs.
        return f"; did you mean {elsewhere[0]}?"
    return f" (valid keys: {', '.join(valid)})"


def _key_paths(cls: type, prefix: str) -> list[str]:
    paths = []
    for name, hint in _hints(cls).items():
        path = _join(prefix, name)
        paths.append(path)
        if dataclasses.is_dataclass(hint):
            paths.extend(_key_paths(hint, path))
        elif _is_tier_list(hint):
            item = typing.get_args(hint)[0]
            paths.extend(_key_paths(item, f"{path}.<{'tier' if item is TierConfig else 'index'}>"))
    return paths


def _is_tier_list(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
