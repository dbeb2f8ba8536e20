"""SWAG inside a Hugging Face ``Trainer``: :class:`SWAGCallback`.

::

    swag = SWAG(peft_model, max_rank=5)
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[SWAGCallback(swag, start_epoch=2, every="epoch")])
    trainer.train()                 # snapshots are collected along the user's own run
    swag.save("posterior")          # or read it from any checkpoint-<step>/ directory

When snapshots are taken (``every``):

* ``"epoch"``: at the end of every epoch after the first ``start_epoch`` epochs (the paper's schedule);
* an integer ``N``: after every ``N``-th optimiser step once ``start_epoch`` epochs are done. ``Trainer``
  calls ``on_step_end`` once per optimiser step, after ``optimizer.step()``, so gradient accumulation
  is respected: a snapshot never sees a half-accumulated update.

Only the main process (``state.is_world_process_zero``) collects: under data parallelism every process
holds the same weights after the step. Every checkpoint ``Trainer`` writes gets the posterior
(``posterior_config.json`` + ``posterior.safetensors``, :meth:`Posterior.save`), and
``trainer.train(resume_from_checkpoint=...)`` restores it from the checkpoint it resumes from, so an
interrupted run collects exactly the snapshots of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .posterior.base import CONFIG_NAME, Posterior, load_posterior

__all__ = ["SWAGCallback"]

CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR


class SWAGCallback(TrainerCallback):
    """Collect a trajectory posterior (SWAG, or any :class:`Posterior` with ``collect``) in a ``Trainer`` run.

    Args:
        posterior: the posterior to collect into, built on the model the ``Trainer`` trains.
        start_epoch: epochs of plain training before collection starts (``--swag-start`` in the CLI).
        every: ``"epoch"`` or a positive number of optimiser steps between snapshots.
        resume_from: the checkpoint directory a resumed ``train()`` starts from, if it is not
            ``<output_dir>/checkpoint-<step>`` (where ``resume_from_checkpoint=True`` finds it).
    """

    def __init__(self, posterior: Posterior, start_epoch: float = 0, every: str | int = "epoch",
                 resume_from: str | Path | None = None) -> None:
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be 'epoch' or a positive number of optimiser steps, got {every!r}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.posterior, self.start_epoch, self.every = posterior, start_epoch, every
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.collected_at: list[int] = []  # optimiser steps of the snapshots taken in this process

    def _collecting(self, state) -> bool:
        """Past the first ``start_epoch`` epochs (``state.epoch`` is the fractional progress after this step)."""
        return state.is_world_process_zero and (state.epoch or 0) > self.start_epoch + 1e-6

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        directory = self.resume_from or Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if (directory / CONFIG_NAME).is_file():
            saved = load_posterior(directory, model=model, expected_method=self.posterior.name)
            self.posterior.load_state_dict(saved.state_dict())
        elif (state.epoch or 0) > self.start_epoch + 1e-6:
            raise ValueError(f"resuming at step {state.global_step} after collection started, but {directory} "
                             f"holds no {CONFIG_NAME}: the snapshots collected before it would be lost "
                             "(pass resume_from= the checkpoint directory)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "epoch" and state.global_step % self.every == 0 and self._collecting(state):
            self._collect(model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch" and self._collecting(state):
            self._collect(model, state)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.posterior.n_collected != 0:  # nothing to keep before collection
            self.posterior.save(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}")

    def _collect(self, model, state) -> None:
        self.posterior.collect(model)
        self.collected_at.append(state.global_step)
