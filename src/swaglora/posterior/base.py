"""The one posterior interface, and saving/loading posteriors as safetensors + JSON.

A saved posterior is a directory holding exactly two files:

* ``posterior_config.json``: ``format_version``, ``method``, ``hparams``, ``n_collected``
  (when meaningful), ``parameters`` ({name: shape}), ``parameter_order`` (names in the order
  of the flat vectors), caller ``metadata``, ``library_version`` and a ``save_id``;
* ``posterior.safetensors``: the tensors of ``state_dict()`` (its header repeats ``save_id``,
  so a tensors file from another, e.g. interrupted, save is detected).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from swaglora._version import __version__
from swaglora.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from swaglora.params import Shapes, check_same_shapes, numel, parameter_shapes, trainable_parameters

if TYPE_CHECKING:
    from swaglora.config import RunConfig

FORMAT_VERSION = 1
CONFIG_NAME = "posterior_config.json"
TENSORS_NAME = "posterior.safetensors"


def make_generator(generator: torch.Generator | None) -> torch.Generator:
    """The given generator, or a fresh non-deterministically seeded one (never the global RNG)."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


def check_state_shapes(expected: Shapes, state: Mapping[str, Tensor], what: str) -> None:
    """Strict ``load_state_dict`` check: same keys and same shapes, else ValueError."""
    check_same_shapes(expected, parameter_shapes(state), f"{what} state", "given state_dict")


@dataclass(frozen=True)
class Row:
    """One row of the results table, declared by the posterior class it is built from (``Posterior.rows``).

    The row's predictive is the BMA of the saved posterior of one member, or the equal-weight mixture of every
    member's (``all_members``: MultiSWAG, deep ensembles).
    """

    name: str  # the row's name in --methods and in the tables
    order: float  # position in tables (ascending)
    help: str = ""
    all_members: bool = False  # True: equal-weight ensemble over every member
    scale: float | None = None  # covariance scale override (0 = the mean)
    sampled: bool = True  # False: one draw (a point estimate)
    linearized: bool = False  # True: average through the linearised model (GLM predictive) instead of weight draws
    default: bool = False  # True: in the table when --methods is 'default' (the SWAG comparison)
    before_training: bool = False  # True: the posterior built at a member's initial weights (the base model); in every table
    reference: bool = False  # True: the fine-tuned point estimate: post-hoc methods are fitted at its weights, and
    # the report's paired differences are taken to it
    method: str = ""  # the registry name of the declaring class (filled in by ``register``)

    @property
    def saved(self) -> str:
        """The directory under ``members/<i>/posteriors/`` holding the posterior the row uses."""
        return "init" if self.before_training else self.method


class Posterior(ABC):
    """A distribution over a model's trainable parameters."""

    name: ClassVar[str]  # registry key
    stochastic_forward: ClassVar[bool] = False  # MC dropout: keep dropout active while predicting
    # True: collect(model) is called along the training trajectory (SWAG); False: collect and fit
    # are called once, on the MAP weights at the end of the MAP phase (MAP, dropout, Laplace)
    trajectory: ClassVar[bool] = False
    # covariance scale a draw uses when none is given (None: nothing to scale); an instance may override it
    default_scale: ClassVar[float | None] = None
    # True: the run's ``swag.scale`` (``--swag-scale``), when the user sets it, replaces the default scale
    takes_swag_scale: ClassVar[bool] = False
    # True: the class implements linearization(), linearization_point() and logit_covariance()
    linearized_predictive: ClassVar[bool] = False
    # True: not collected along the MAP/SWAG trajectory: each member is trained again for this method, from a fresh
    # LoRA init with the member's seed, with the training hooks of member_training() (BLoB)
    trains_own_member: ClassVar[bool] = False
    # post hoc only: the saved posterior (method name) of the member whose point estimate, ``sample(scale=0)``, the
    # fit starts from; None = the reference row's (the MAP weights). TFB on a BLoB member's mean sets "blob".
    fitted_at: ClassVar[str | None] = None
    # the results-table rows this method provides (read from the class itself, not inherited)
    rows: ClassVar[tuple[Row, ...]] = ()

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        """The hyper-parameters a run's config decides: ``{hparams key: (value, config key)}``, the values as the
        saved ``hparams()`` records them. A saved posterior with other values was made under other settings:
        ``evaluate`` refuses to reuse it (:func:`swaglora.members.saved_settings_differ`)."""
        return {}

    @classmethod
    def build(cls, model: nn.Module, cfg: RunConfig) -> Posterior:
        """A new posterior over ``model``'s trainable weights with the settings of a run's config."""
        return cls(model, **{k: v for k, (v, _) in cls.settings(cfg).items()})

    @classmethod
    def samples_for(cls, cfg: RunConfig, row: Row) -> int:
        """How many draws the BMA of ``row`` averages over."""
        return cfg.posterior.samples if row.sampled else 1

    def __init__(self, model: nn.Module | Shapes, **hparams: Any) -> None:
        """Record names/shapes of ``model``'s trainable parameters (or take a ``{name: shape}`` map)."""
        if isinstance(model, nn.Module):
            shapes = parameter_shapes(trainable_parameters(model))
        else:
            shapes = {str(n): tuple(int(d) for d in s) for n, s in model.items()}
        if not shapes:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
        self.parameter_shapes: dict[str, tuple[int, ...]] = shapes
        self.num_params = numel(shapes)

    def _read(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's trainable parameters in recorded order; they must match the recorded ones."""
        params = trainable_parameters(model)
        check_same_shapes(self.parameter_shapes, parameter_shapes(params), "posterior", "model's trainable parameters")
        return {n: params[n] for n in self.parameter_shapes}

    def collect(self, model: nn.Module) -> None:
        """Add a snapshot of the model's current trainable weights (default: nothing)."""

    def fit(self, model: nn.Module, batches: Any, loss_fn: Any, *, validation: Any = None,
            generator: torch.Generator | None = None) -> None:
        """Post-hoc fitting at the model's current weights; default: nothing.

        ``batches``: the training data; ``validation``: held-out batches (TFB's search); ``generator``: seeds any
        weight draws the fit makes. ``loss_fn(model, batch) -> (logits [B, C], labels [B])``. A method ignores
        what it does not use.
        """

    @classmethod
    def member_config(cls, cfg: RunConfig) -> RunConfig:
        """For ``trains_own_member`` methods: the settings of the member's own training (default: the run's MAP
        phase alone, no collection phase)."""
        return replace(cfg, swag=replace(cfg.swag, epochs=0))

    def member_training(self, model: nn.Module, cfg: RunConfig, n_train: int, seed: int) -> Any:
        """For ``trains_own_member`` methods: the training hook that :func:`swaglora.train.fit` installs (see its
        ``hooks``); ``collect(model)`` after that training completes the posterior."""
        raise NotImplementedError(f"{type(self).__name__} is not trained as its own member")

    @abstractmethod
    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        """One draw ``{name: tensor}`` (``scale`` multiplies the covariance where meaningful)."""

    def draws(
        self, n_samples: int, generator: torch.Generator | None = None, scale: float | None = None
    ) -> list[dict[str, Tensor]]:
        """Weights to average predictions over: ``n_samples`` draws (a point mass gives one)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if self.is_point_mass and not self.stochastic_forward:
            n_samples = 1
        generator = make_generator(generator)
        return [self.sample(generator, scale) for _ in range(n_samples)]

    @property
    def is_point_mass(self) -> bool:
        return False

    # -------------------------------------------------- linearised (GLM) predictive, optional
    def linearization(self) -> tuple[list[tuple[str, str | None]], list[str]] | None:
        """For the linearised predictive: the parameters whose per-example Jacobians
        :meth:`logit_covariance` needs, as (linear weight, bias or None) pairs and other names.
        ``None`` (the default): this method has no linearised predictive."""
        return None

    def linearization_point(self) -> dict[str, Tensor]:
        """Weights to linearise the model around (the posterior mean)."""
        raise NotImplementedError(f"{type(self).__name__} has no linearised predictive")

    def logit_covariance(self, jacobians: Mapping[str, Tensor], scale: float | None = None) -> Tensor:
        """``J Sigma J^T`` per example, ``[B, C, C]``, from Jacobians ``{name: [B, C, *shape]}``."""
        raise NotImplementedError(f"{type(self).__name__} has no linearised predictive")

    @property
    def n_collected(self) -> int | None:
        return None

    def hparams(self) -> dict[str, Any]:
        """JSON-able hyper-parameters: ``type(self)(shapes, **hparams())`` rebuilds an empty copy."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Strict: names, shapes and rank must match, else ValueError saying what differs."""

    @classmethod
    def from_config(
        cls, parameters: Shapes, hparams: Mapping[str, Any], state: Mapping[str, Tensor], device: str = "cpu"
    ) -> Posterior:
        post = cls(parameters, device=device, **hparams)
        post.load_state_dict(state)
        return post

    def save(self, directory: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``posterior_config.json`` + ``posterior.safetensors`` into ``directory`` (created)."""
        try:
            metadata = json.loads(json.dumps(dict(metadata or {})))
        except TypeError as e:
            raise ValueError(f"posterior metadata must be JSON-serialisable: {e}") from e
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex
        config = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "hparams": self.hparams(),
            "parameters": {n: list(s) for n, s in self.parameter_shapes.items()},
            "parameter_order": list(self.parameter_shapes),
            "metadata": metadata,
            "library_version": __version__,
            "save_id": save_id,
        }
        if self.n_collected is not None:
            config["n_collected"] = self.n_collected
        atomic_save_safetensors(directory / TENSORS_NAME, self.state_dict(), {"method": self.name, "save_id": save_id})
        atomic_write_json(directory / CONFIG_NAME, config)  # last: a complete config marks a complete save
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None, expected_metadata: Mapping[str, Any] | None = None) -> Posterior:
        """Like :func:`load_posterior`, refusing a directory saved by another method."""
        return load_posterior(directory, model, expected_metadata, expected_method=cls.name)


#: registry name -> Posterior subclass (filled by :func:`swaglora.posterior.registry.register`); here, so that
#: loading a saved posterior by its method name needs no import of the registry
METHODS: dict[str, type[Posterior]] = {}


class UnknownMethodError(KeyError, ValueError):
    """Raised by :func:`get_method`; a KeyError and a ValueError, with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_method(name: str) -> type[Posterior]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"Unknown method {name!r}. Available: {', '.join(sorted(METHODS))}") from None


def _differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    expected = json.loads(json.dumps(dict(expected)))  # tuples -> lists, as they were saved
    return [
        f"{key}: saved={saved.get(key, '<missing>')!r}, expected={value!r}"
        for key, value in expected.items()
        if key not in saved or saved[key] != value
    ]


def _saved_parameters(config: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    params, order = config.get("parameters"), config.get("parameter_order")
    if not isinstance(params, dict) or not isinstance(order, list) or sorted(order) != sorted(params):
        raise ValueError(f"{path}: 'parameters' and 'parameter_order' are missing or inconsistent")
    return {n: tuple(params[n]) for n in order}


def load_posterior(
    directory: str | Path,
    model: nn.Module | None = None,
    expected_metadata: Mapping[str, Any] | None = None,
    *,
    expected_method: str | None = None,
    expected_hparams: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> Posterior:
    """Load a saved posterior, strictly.

    With ``model``, the saved parameter names/shapes must equal the model's trainable ones;
    every key of ``expected_metadata`` / ``expected_hparams`` must equal the saved value;
    ``expected_method`` must equal the saved method. Any difference raises ValueError.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = read_json(config_path)
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{config_path}: not a swaglora posterior config (format_version={version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {version}, but swaglora {__version__} reads up to "
            f"format_version {FORMAT_VERSION}; upgrade swaglora to load it"
        )
    method = config.get("method")
    if expected_method is not None and method != expected_method:
        raise ValueError(f"{config_path}: saved posterior method is {method!r}, expected {expected_method!r}")
    cls = get_method(method)
    shapes = _saved_parameters(config, config_path)
    if model is not None:
        model_shapes = parameter_shapes(trainable_parameters(model))
        if not model_shapes:
            raise ValueError(
                f"cannot check {directory} against a model without trainable parameters (a PEFT adapter "
                "loaded for inference? load it with is_trainable=True, or pass model=None)"
            )
        check_same_shapes(shapes, model_shapes, f"saved posterior {directory}", "model's trainable parameters")
    for label, saved, expected in (("metadata", config.get("metadata", {}), expected_metadata), ("hparams", config.get("hparams", {}), expected_hparams)):
        problems = _differences(saved, expected) if expected else []
        if problems:
            raise ValueError(f"{config_path}: saved {label} differ from expected: " + "; ".join(problems))
    tensors, header = load_safetensors(directory / TENSORS_NAME, with_metadata=True)
    if header.get("save_id") != config.get("save_id"):
        raise ValueError(f"{directory}: {TENSORS_NAME} and {CONFIG_NAME} come from different saves (interrupted save?)")
    try:
        return cls.from_config(shapes, config.get("hparams", {}), tensors, device=device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory}: saved {method!r} posterior cannot be loaded: {e}") from e
