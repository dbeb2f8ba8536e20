"""The registry of posterior methods and of the results-table rows they declare.

A method is one ``Posterior`` subclass and one :func:`register` call: the class says how it is built from a run's
config (:meth:`Posterior.build`), whether it is collected along the training trajectory or fitted post hoc
(``trajectory``), its default scale and sample count, whether it has a linearised predictive, and its table rows
(``rows``). The pipeline, the report and the command line ask this module; none of them names a method.
"""

from __future__ import annotations

from dataclasses import replace

from swaglora.posterior.base import METHODS, Posterior, Row, UnknownMethodError, get_method

__all__ = ["METHODS", "ROWS", "UnknownMethodError", "register", "method_names", "get_method", "rows", "row",
           "row_names", "default_rows", "expand_rows", "base_rows", "reference_row"]

#: table-row name -> Row (with ``method`` filled in), in registration order; :func:`rows` sorts by ``order``
ROWS: dict[str, Row] = {}


def register(cls: type[Posterior]) -> type[Posterior]:
    """Add a Posterior subclass under ``cls.name``, and the table rows it declares (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Posterior)):
        raise TypeError(f"register() expects a Posterior subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no 'name' to register under")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
    declared = [replace(r, method=name) for r in vars(cls).get("rows", ())]  # a subclass does not inherit rows
    for r in declared:
        if ROWS.get(r.name, r) != r:
            raise ValueError(f"table row {r.name!r} is already declared by {ROWS[r.name].method!r}")
        if r.linearized and not cls.linearized_predictive:
            raise ValueError(f"row {r.name!r} is linearised but {cls.__name__} has no linearised predictive")
        if r.linearized and r.all_members:
            raise ValueError(f"row {r.name!r}: a mixture of members (an Ensemble) has no linearised predictive")
    METHODS[name] = cls
    ROWS.update((r.name, r) for r in declared)
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def rows() -> list[Row]:
    """Every declared table row, in display order."""
    return sorted(ROWS.values(), key=lambda r: r.order)


def row_names() -> list[str]:
    return [r.name for r in rows()]


def row(name: str) -> Row:
    try:
        return ROWS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}. Available: {', '.join(row_names())}") from None


def default_rows() -> list[Row]:
    """The rows of ``--methods default``: those their classes mark ``default``."""
    return [r for r in rows() if r.default]


def expand_rows(spec: str) -> list[str]:
    """Row names of a ``--methods`` value: ``all``, ``default`` or a comma-separated list (checked: an
    unknown name raises ValueError naming the valid ones)."""
    spec = spec.strip()
    if spec in ("all", "default"):
        return [r.name for r in (rows() if spec == "all" else default_rows())]
    names = [r.strip() for r in spec.split(",") if r.strip()]
    for name in names:
        row(name)
    return names


def base_rows() -> list[Row]:
    """The rows of the model before fine-tuning: in every table, and all that ``swaglora zero-shot`` scores."""
    return [r for r in rows() if r.before_training]


def reference_row() -> Row | None:
    """The fine-tuned point estimate: post-hoc methods are fitted at its weights, the report's paired
    differences are taken to it."""
    return next((r for r in rows() if r.reference), None)
