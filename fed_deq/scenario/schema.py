"""The scenario schema: frozen, strict pydantic models, one per YAML section. The contract is docs/design.md.

Every key has a default (except a tier's ``name`` and an adversaries entry's ``tier``/``attack``), so a minimal
file works. Types are strict (``2.0`` is not an integer, ``"10"`` not a number; an integer is accepted for a
number), unknown keys are errors, ranges are field constraints, named choices are checked against their
registries (choices.py) and rules spanning keys are model validators (checks.py).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from fed_deq.profiles import profile_figures
from fed_deq.scenario import checks
from fed_deq.scenario.choices import Choice
from fed_deq.scenario.messages import failure, type_name

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
# A name must hold something besides blanks.
Name = Annotated[str, Field(min_length=1, pattern=r"\S")]


class Section(BaseModel):
    """A scenario section: strict types, no unknown keys, immutable; ``key:`` with nothing below means defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data

    def to_dict(self) -> dict[str, Any]:
        """Plain dict/list/scalar form, suitable for YAML and JSON."""
        return self.model_dump(mode="json")


class _OneOf(Section):
    """A section where one key of ``_pair`` is used and the other is derived or unused: a dump leaves out the
    second when the first is given, so a dumped file reads like a hand-written one and parses back the same.
    Keys in ``_unset_if_none`` are left out of a dump while they are None (their default)."""

    _pair: ClassVar[tuple[str, str]] = ("count", "share")
    _unset_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_the_other(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._unset_if_none:
            if data.get(key, 0) is None:
                del data[key]
        first, second = self._pair
        if data.get(first) is not None and second in data:
            del data[second]
        if data.get(first) is None:
            del data[first]
        return data


def _list_of(value: Any, what: str) -> tuple:
    """YAML lists become tuples (immutable); anything else is an error naming what the list holds."""
    if not isinstance(value, (list, tuple)):
        raise failure("", f"must be a list of {what}, got {value!r} ({type_name(value)})")
    return tuple(value)


class PartitionConfig(Section):
    """How the training set is split across clients."""

    kind: Annotated[str, Choice("partition")] = "iid"
    alpha: Positive = 0.5
    """dirichlet: concentration of the per-class label shares (small = very non-IID)"""
    min_partition_size: Count = 10
    """dirichlet: resample until every client has this many samples"""
    classes_per_client: AtLeastOne = 2
    """pathological: classes each client holds"""


class DatasetConfig(Section):
    """Which data, how much, and how it is split."""

    name: str = "mnist1d"
    """mnist1d, digits, or a Hugging Face hub dataset name"""
    num_samples: AtLeastOne = 5000
    """mnist1d: samples to generate"""
    # A test set is needed for the server-side evaluation, so 0 is impossible here.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    validation_fraction: Fraction = 0.1
    server_validation_samples: Count = 500
    """training samples the server holds back from every partition, the test set and the probe set; tuning
    scores trials on them (``server_val_accuracy``), never on the test set"""
    image_key: str | None = None
    label_key: str | None = None
    partition: PartitionConfig = Field(default_factory=PartitionConfig)


class ModelConfig(Section):
    """The classifier (the DEQ, or a fixed-depth baseline) and its solver settings."""

    kind: Annotated[str, Choice("model_kind")] = "deq"
    """deq (a fixed point within each device's budget) | weight_tied (the cell unrolled model.depth times) |
    explicit (model.depth untied cells); the fixed-depth kinds ignore solver, backward and budgets"""
    cell: Annotated[str, Choice("cell")] = "conv1d"
    width: AtLeastOne = 32
    contraction: Annotated[str, Choice("contraction")] = "spectral"
    spectral_gain: Positive = 0.9
    solver: Annotated[str, Choice("solver")] = "anderson"
    tol: Positive = 1.0e-3
    backward: Annotated[str, Choice("backward")] = "one-step"
    backward_iterations: AtLeastOne = 4
    eval_iterations: AtLeastOne = 30
    depth: AtLeastOne = 8
    """weight_tied, explicit: layers unrolled; every device runs all of them (a slow one straggles)"""
    sparse_masks: bool = False
    """weight_tied: each layer applies the weights through its own fixed random sparse mask (Song et al.)"""
    mask_density: Annotated[float, Field(gt=0, le=1)] = 0.5
    """sparse_masks: share of each weight's entries a layer keeps"""

    @model_validator(mode="after")
    def _masks_fit_the_kind(self) -> ModelConfig:
        checks.check_model(self)
        return self


class TierConfig(_OneOf):
    """A class of devices: how many (``count``, or ``share`` of fleet.num_clients), how fast, how reliable.

    ``profile`` names a device in fed_deq.profiles.PROFILES (docs/devices.md); its figures fill the keys the
    tier leaves out, and a key given here wins. A parsed tier holds the resolved figures, so a dump reads the
    same whatever the table says later.
    """

    _unset_if_none: ClassVar[tuple[str, ...]] = ("profile",)

    name: Name
    profile: Annotated[str, Choice("profile")] | None = None
    """a named device whose measured figures fill the keys this tier does not give (docs/devices.md)"""
    count: Annotated[int | None, Field(ge=0)] = None
    share: Annotated[float | None, Field(ge=0, le=1)] = None
    compute_gflops: Positive = 1.0
    bandwidth_mbps: Positive = 10.0
    availability: Annotated[float, Field(gt=0, le=1)] = 1.0
    dropout: Probability = 0.0
    straggler_prob: Probability = 0.0
    # A slowdown below 1 would be a speed-up, which the straggler model does not mean.
    straggler_slowdown: Annotated[float, Field(ge=1)] = 1.0

    @model_validator(mode="before")
    @classmethod
    def _profile_fills_the_rest(cls, data: Any) -> Any:
        # Keys given in the tier win over the profile's; an unknown name fills nothing and its Choice reports it.
        if isinstance(data, dict) and data.get("profile") is not None:
            return {**profile_figures(data["profile"]), **data}
        return data

    @model_validator(mode="after")
    def _count_or_share(self) -> TierConfig:
        if (self.count is None) == (self.share is None):
            raise failure("", f"needs exactly one of count or share (tier {self.name!r})")
        return self


def _default_tiers() -> tuple[TierConfig, ...]:
    return (TierConfig(name="device", share=1.0),)


class FleetConfig(Section):
    """The simulated devices. In a parsed scenario ``num_clients`` is always the fleet size."""

    num_clients: Annotated[int | None, Field(ge=1)] = 10
    """fleet size: required with shares; with counts it is their sum"""
    tiers: tuple[TierConfig, ...] = Field(default_factory=_default_tiers, min_length=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_list(cls, value: Any) -> tuple:
        tiers = _list_of(value, "tiers")
        if not tiers:
            raise failure("", "must list at least one tier")
        return tiers

    @model_validator(mode="after")
    def _tiers_make_a_fleet(self) -> FleetConfig:
        checks.check_fleet(self)
        return self


class AdversarialTrainConfig(Section):
    """Adversarial training on the clients: every batch is replaced by PGD examples made at the client's own
    budgets, and with ``intermediate_states`` the loss also takes the head on a random intermediate state of
    the solver's dynamics (Yang et al.). The attack's work is charged to the client's clock and budget."""

    eps: Positive
    """attack radius in input units"""
    steps: AtLeastOne = 3
    norm: Literal["linf", "l2"] = "linf"
    step_size: Positive | None = None
    """per step; default 2.5 * eps / steps"""
    intermediate_states: bool = False
    """also a loss on a random intermediate state z_k of z <- f(z, x) from 0 (DEQ models only)"""


class TrainingConfig(_OneOf):
    """Rounds, sampling, local optimisation and the per-round deadline."""

    _pair: ClassVar[tuple[str, str]] = ("fraction_per_round", "clients_per_round")

    rounds: AtLeastOne = 15
    clients_per_round: AtLeastOne = 8
    """clients sampled per round (a count, at most the fleet size; left out: 8, capped at the fleet size)"""
    fraction_per_round: Annotated[float | None, Field(gt=0, le=1)] = None
    """clients sampled per round as a fraction of the fleet (instead of clients_per_round)"""
    local_epochs: AtLeastOne = 1
    batch_size: AtLeastOne = 32
    learning_rate: Positive = 0.05
    optimizer: Annotated[str, Choice("optimizer")] = "sgd"
    momentum: Fraction = 0.9
    deadline_s: Positive = 10.0
    """simulated seconds a round waits for replies"""
    min_iterations: AtLeastOne = 2
    max_iterations: AtLeastOne = 30
    warm_start: bool = True
    upload: Annotated[str, Choice("upload")] = "float32"
    """how clients encode the model they send back: float32 | float16 | int8 (fed_deq/quantize.py)"""
    adversarial: AdversarialTrainConfig | None = None
    """adversarial training on PGD examples (default: none); its work is charged to the clock and budget"""

    @field_validator("clients_per_round", mode="before")
    @classmethod
    def _a_count(cls, value: Any) -> Any:
        # Before, 1 meant one client and 1.0 the whole fleet; a fraction now has its own key.
        if isinstance(value, float):
            raise failure("", f"must be an integer (a count of clients), got {value}; "
                              f"for a fraction of the fleet use training.fraction_per_round")
        return value

    @model_validator(mode="after")
    def _count_or_fraction(self) -> TrainingConfig:
        if self.fraction_per_round is not None and "clients_per_round" in self.model_fields_set:
            raise failure("fraction_per_round", "give training.clients_per_round (a count) or "
                                                "training.fraction_per_round (a fraction of the fleet), not both")
        return self


class FusionConfig(Section):
    """How the server fuses client models."""

    rule: Annotated[str, Choice("rule")] = "quality"
    # Measured best over 5 seeds on default.yaml and heterogeneous-fleet.yaml (docs/benchmarks.md).
    score: Annotated[str, Choice("score")] = "probe"
    size_exponent: NonNegative = 1.0
    quality_exponent: NonNegative = 1.0
    beta: NonNegative = 1.0
    floor: Fraction = 0.05
    proximal_mu: NonNegative = 0.01
    # Trimming half or more from each side leaves nothing to average.
    trim_beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    krum_malicious: Count = 1
    # A ratio below 1 would reject the median update itself.
    max_norm_ratio: Annotated[float, Field(ge=1)] = 10.0
    probe_samples: Count = 256
    """samples the server keeps out of every partition (and the test set) to score client models with"""
    tier_weights: dict[str, float] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": {"type": "number", "minimum": 0}})
    """quality rule: a multiplier per tier name on its clients' weights (a tier not named: 1)"""

    @field_validator("tier_weights", mode="after")
    @classmethod
    def _multipliers(cls, weights: dict[str, float]) -> dict[str, float]:
        # Checked here, not by a value constraint, so the message names the tier and reads like the others.
        for name, weight in weights.items():
            if weight < 0:
                raise failure(name, f"must be a number >= 0, got {float(weight)}")
        return weights


class SimulationConfig(Section):
    """Ray resources, and how long (wall seconds) the server waits for a round's replies."""

    cpus_per_client: Positive = 1.0
    num_cpus: Annotated[int | None, Field(ge=1)] = None
    ray_address: str | None = None
    round_timeout_s: Positive = 600.0
    """wall seconds before a round closes without the missing replies (a dead worker must not stall a run)"""


class AdversarialEvalConfig(Section):
    """Robust accuracy of the final global model under input attacks, through the solver (fed_deq/adversarial.py)."""

    attack: Literal["pgd"] = "pgd"
    """projected gradient ascent on the loss (with ``intermediate``: also Yang et al.'s intermediate-state attack)"""
    norm: Literal["linf", "l2"] = "linf"
    eps: tuple[NonNegative, ...] = (0.0, 0.05, 0.1, 0.2)
    """attack radii in input units; 0 gives the clean accuracy"""
    steps: AtLeastOne = 10
    step_size: Positive | None = None
    """per step; default 2.5 * eps / steps"""
    samples: AtLeastOne = 512
    """test samples attacked (the first ones of the shuffled test set)"""
    intermediate: bool = True
    """also attack random intermediate states of the solver's dynamics (Yang et al.; DEQ models only)"""
    adjoint_iterations: AtLeastOne = 30
    """vector-Jacobian products of the implicit gradient the attacker takes through the solve"""
    every_round: bool = False
    """attack every round's model, not only the final one"""

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_list(cls, value: Any) -> tuple:
        values = _list_of(value, "radii")
        if not values:
            raise failure("", "must list at least one radius")
        return values

    @field_validator("eps", mode="after")
    @classmethod
    def _distinct(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(value)) != len(value):
            raise failure("", f"lists a radius more than once: {list(value)}")
        return value


class EvaluationConfig(Section):
    """What the server measures on the global model besides its test accuracy."""

    adversarial: AdversarialEvalConfig | None = None
    """robust accuracy under attack at the evaluation budget and each tier's (default: not measured)"""


class AdversaryConfig(_OneOf):
    """Misbehaving clients: ``count`` (or ``share``) devices of ``tier`` mount ``attack`` every round.

    An attack takes at most one parameter (fed_deq/adversary.py says which, and its default): ``sigma``
    (gaussian), ``factor`` (scale), ``z`` (alie; unset: Baruch et al.'s value for the round), ``epsilon`` (ipm).
    """

    tier: Name
    attack: Annotated[str, Choice("attack")]
    count: Annotated[int | None, Field(ge=0)] = None
    share: Annotated[float | None, Field(ge=0, le=1)] = None
    sigma: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """gaussian: standard deviation of the noise sent in place of the update"""
    factor: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """scale: the update is multiplied by it (model replacement)"""
    z: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """alie: standard deviations below the colluders' mean"""
    epsilon: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """ipm: the colluders send −epsilon times their mean update"""

    @model_validator(mode="after")
    def _count_or_share(self) -> AdversaryConfig:
        if (self.count is None) == (self.share is None):
            raise failure("", f"needs exactly one of count or share (attack {self.attack!r})")
        return self


class Scenario(Section):
    """A whole experiment: everything a run needs besides the output directory."""

    seed: Count = 0
    """every random draw of a run derives from it (numpy's SeedSequence needs it >= 0)"""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig, validate_default=True)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    adversaries: tuple[AdversaryConfig, ...] = ()

    @field_validator("fleet", mode="after")
    @classmethod
    def _fleet_size(cls, fleet: FleetConfig) -> FleetConfig:
        size = checks.fleet_size(fleet)
        return fleet if fleet.num_clients == size else fleet.model_copy(update={"num_clients": size})

    @field_validator("training", mode="after")
    @classmethod
    def _clients_per_round(cls, training: TrainingConfig, info: ValidationInfo) -> TrainingConfig:
        fleet = info.data.get("fleet")
        if fleet is None:
            return training  # the fleet is broken, and reported
        count = checks.resolve_clients_per_round(training, int(fleet.num_clients))
        return training if count == training.clients_per_round else training.model_copy(
            update={"clients_per_round": count})

    @field_validator("adversaries", mode="before")
    @classmethod
    def _entry_list(cls, value: Any) -> tuple:
        return () if value is None else _list_of(value, "entries")  # "adversaries:" alone: an honest fleet

    @model_validator(mode="after")
    def _sections_agree(self) -> Scenario:
        checks.check_scenario(self)
        return self
