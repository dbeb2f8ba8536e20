"""What SWAG collection costs during training.

Runs ``swaglora.train.fit`` (the real loop) for one SWAG-phase epoch of 25 optimiser steps on the default
protocol (cloze, LoRA all-linear on the top 2 layers, cached lower layers) three ways, interleaved:
no collector, ``SWAG.collect`` every 25 steps (the protocol's schedule: 1 snapshot per epoch here) and
every step (worst case). Overhead = time / time without collector - 1.

The end-to-end difference is far below the run-to-run noise of a shared machine, so the components are
also timed directly: a median ``collect`` call against a median optimiser step; overhead every N steps
= collect / (N x step). Both are reported; the component estimate is the precise one.

The 200 training examples are 40 distinct questions cycled five times: the lower-layer cache is keyed by
content, so it only has to be filled for 40 questions while every step still does a full-size step.
"""

from __future__ import annotations

from . import common
from swaglora.config import apply_overrides
from swaglora.posterior.swag import SWAG
from swaglora.train import fit

STEPS = 25  # optimiser steps per timed run (batch 8)


def main(quick: bool = False) -> dict:
    common.threads()
    rounds = 2
    steps = 4 if quick else STEPS
    s = common.session(quick, **common.DEFAULT_PROTOCOL)
    unique = common.examples(16 if quick else 40)
    train = (unique * (8 * steps // len(unique) + 1))[: 8 * steps]
    s.cache.fill(unique)
    swag = SWAG(s.model, max_rank=5)

    def cfg(every: str):
        return apply_overrides(s.cfg, {"train.epochs": 0, "swag.epochs": 1, "swag.every": every, "train.batch_size": 8})

    def run(collectors, every):
        return fit(s.scorer, train, [], cfg(every), collectors=collectors, cache=s.cache, progress=False).seconds

    fns = {
        "none": lambda _: run([], str(steps)),
        "every_25": lambda _: run([swag], str(steps)),  # one snapshot per `steps` steps
        "every_step": lambda _: run([swag], "1"),
    }
    fns["none"](0)  # warm-up
    times = {k: common.median(v) for k, v in common.interleave(fns, rounds).items()}
    step = times["none"] / steps

    # components: collect() against one optimiser step
    collect = common.median([common.timed(lambda: swag.collect(s.model)) for _ in range(30)])
    metrics = {
        "trainable_params_D": swag.num_params,
        "swag_max_rank": swag.max_rank,
        "steps_per_run": steps,
        **{f"fit_{k}_s": v for k, v in times.items()},
        "median_step_s": step,
        "collect_ms": collect * 1e3,
        "component_overhead_every_25": collect / (25 * step),
        "component_overhead_every_step": collect / step,
    }
    ratios = [
        common.ratio("swag overhead every 25 steps (end-to-end)", times["every_25"] / times["none"] - 1, "<= 0.02"),
        common.ratio("swag overhead every step (end-to-end)", times["every_step"] / times["none"] - 1, "<= 0.02"),
        common.ratio("swag overhead every 25 steps (components)", collect / (25 * step), "<= 0.02"),
    ]
    return common.finish("swag_overhead", quick, metrics, ratios,
                         ["end-to-end differences within a few % are run-to-run noise; see the component estimate"])


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
