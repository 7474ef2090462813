"""A shuffled training loader that a checkpoint can stop and resume mid-epoch, batch for batch.

Why: Lightning resumes an interrupted epoch by drawing the remaining batches from a fresh iterator,
which for a plain shuffling ``DataLoader`` is a new permutation: some examples are seen twice,
others not at all, and a resumed run's losses leave the uninterrupted run's at the cut. Here the
data module saves, with the checkpoint, the generator state the running epoch's order was drawn
from and how many of its batches the trainer has finished; the resumed epoch redraws the same
order and skips those batches (by index: nothing is loaded for them).

The order is ``DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=seeded)``'s
as Lightning consumes it (it stops at an epoch's last batch), batch for batch, epoch after epoch, so
runs made before this loader existed are reproduced; unlike that loader's, it does not change with
``num_workers``.

The saved state lives in the data module (``state_dict``/``load_state_dict``, which Lightning
stores in the checkpoint), not in the loader: Lightning hands a loader its saved state only if the
loader is built after the checkpoint is restored, and the recipes' ``configure_optimizers`` builds
it earlier (through ``trainer.estimated_stepping_batches``). The batches done are read from the
trainer's own progress counter, so the resume point is the batch the trainer itself restarts at:
the next one after a checkpoint taken between steps, the interrupted one after Ctrl-C in a step.
A resume point also names the data it belongs to (size, batch size, a hash of the content), and
is not applied to other data.

The order's generator is kept across the loaders a run builds and is drawn from by the batch
sampler alone: once per epoch for the plain loader's worker seed, then for the permutation. The
loader's own worker seeds come from a second generator. So a loader that Lightning rebuilds for
``reload_dataloaders_every_n_epochs`` continues the run's order instead of restarting it, and
Lightning's second iterator of a rebuilt epoch draws nothing. With ``num_workers`` the first
iterator starts the sampler at once (its workers read ahead), so a rebuilt epoch takes the
permutation after the one it abandoned: still a new one each epoch, and a resume is exact.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler


@dataclass
class ShufflePosition:
    """Shared by a data module and its training batch sampler (and any copy Lightning makes of the
    sampler, e.g. around a ``DistributedSampler``): where the running epoch's order came from, and
    a checkpoint's resume point waiting for the next epoch to start."""

    started: bool = False
    epoch_start: Optional[torch.Tensor] = None
    pending: Optional[dict] = None
    data_id: Optional[str] = None
    seed: Optional[int] = None
    #: the order's generator and the Trainer it serves (see ``ResumableTrainData._order_generator``)
    generator: Optional[torch.Generator] = None
    generator_owner: Any = None


def fingerprint(*arrays: torch.Tensor | np.ndarray) -> str:
    """A short hash of the arrays' shapes and bytes, to tell a resumed run's data from the
    checkpoint's when both have the same size. Not a security hash: SHA-1 for its speed (0.32 s
    for a CIFAR-10-sized 0.6 GB on one AMD EPYC core)."""
    digest = hashlib.sha1()
    for array in arrays:
        if isinstance(array, torch.Tensor):
            tensor = array.detach().cpu()
            # numpy has no bfloat16: its bytes are hashed as int16 (the shape and bytes still differ)
            array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        array = np.ascontiguousarray(array)
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:20]


def _draw_the_plain_loaders_worker_seed(generator: torch.Generator) -> None:
    """A plain shuffling DataLoader draws one int64 from its generator (its workers' base seed) each
    time it starts an epoch, before the sampler draws the permutation; drawing it here keeps that
    loader's order (and so the order of runs made before this loader existed)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` whose epoch can restart at a saved batch; same constructor as the base (plus
    the shared position) so Lightning can rebuild it around a distributed sampler."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool,
                 position: Optional[ShufflePosition] = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.position = position if position is not None else ShufflePosition()
        #: the seed Lightning gave the sampler it put in under DDP (the global seed): what ordered a
        #: DDP checkpoint written before resume points recorded their seed
        self._lightning_seed = getattr(sampler, "seed", None)
        if isinstance(sampler, DistributedSampler) and self.position.seed is not None:
            # the data's own seed decides the order, as it does on one process
            sampler.seed = self.position.seed

    @property
    def _generator(self) -> Optional[torch.Generator]:
        return getattr(self.sampler, "generator", None)  # a DistributedSampler orders by epoch instead

    def __iter__(self) -> Iterator[list[int]]:
        skip, resumed_mid_epoch = self._apply_pending()
        generator = self._generator
        if generator is not None and not resumed_mid_epoch:  # a restored mid-epoch state is past this draw
            _draw_the_plain_loaders_worker_seed(generator)
        self.position.started = True
        self.position.epoch_start = generator.get_state() if generator is not None else None
        # stop after the last batch without asking the sampler for more: asking would draw a second
        # permutation from the generator, so the next epoch's order would depend on whether the
        # consumer (Lightning stops at the last batch) or a worker's read-ahead (it asks) got there
        for index, batch in enumerate(itertools.islice(super().__iter__(), len(self))):
            if index >= skip:
                yield batch

    def _apply_pending(self) -> tuple[int, bool]:
        """Restore a checkpoint's generator state (once); return the batches to skip, and whether the
        state restored is a running epoch's (taken after its worker-seed draw) rather than an
        epoch boundary's."""
        pending, self.position.pending = self.position.pending, None
        if pending is None:
            return 0, False
        mismatch = _layout_mismatch(pending.get("layout"), self._layout())
        if mismatch:
            warnings.warn(f"{mismatch}: the resumed epoch takes the seed's first order, not the interrupted epoch's "
                          "remaining batches", stacklevel=2)
            return 0, False
        self._continue_the_checkpoints_seed(pending)
        generator = self._generator
        if generator is None or pending["generator"] is None:
            return pending["batches_done"], False
        generator.set_state(pending["generator"])
        return pending["batches_done"], not pending["next_epoch"]

    def _continue_the_checkpoints_seed(self, pending: dict) -> None:
        """A resumed run continues the checkpoint's order: on one process its generator state does
        that, under DDP the sampler's seed must be the checkpoint's. Another ``seed`` is said, not
        silently dropped."""
        distributed = isinstance(self.sampler, DistributedSampler)
        saved = pending.get("seed", self._lightning_seed if distributed else None)
        if saved is None:
            return
        if self.position.seed is not None and saved != self.position.seed:
            warnings.warn(f"the checkpoint's training order was shuffled with seed {saved}; the resumed run "
                          f"continues it (this run's data seed {self.position.seed} is not used)", stacklevel=3)
        if distributed:
            self.sampler.seed = saved

    def resume_point(self, batches_done: int, batches_per_epoch: Optional[float] = None) -> dict:
        """What a checkpoint must hold to restart after ``batches_done`` batches of this epoch.

        ``batches_per_epoch`` is what the trainer runs of an epoch (``limit_train_batches`` can make
        it fewer than ``len(self)``): once that many are done the epoch is over, and Lightning
        resumes at the next one, so the resume point must be the next epoch's too."""
        generator = self._generator
        epoch_length = len(self) if batches_per_epoch is None else min(len(self), batches_per_epoch)
        if batches_done >= epoch_length or not self.position.started:
            # the epoch is over (or none began): the next one draws from the generator as it is now
            state = generator.get_state() if generator is not None else None
            return {"generator": state, "batches_done": 0, "next_epoch": True, "layout": self._layout(),
                    "seed": self._seed()}
        return {"generator": self.position.epoch_start, "batches_done": batches_done, "next_epoch": False,
                "layout": self._layout(), "seed": self._seed()}

    def _seed(self) -> Optional[int]:
        """The seed the running order was drawn from (a distributed sampler's own, under DDP)."""
        return self.sampler.seed if isinstance(self.sampler, DistributedSampler) else self.position.seed

    def _layout(self) -> list:
        """Examples, batch size and (where the data module gave one) the data's identity: a resume
        point means nothing for other data or batches."""
        return [len(self.sampler), self.batch_size, self.position.data_id]


def _layout_mismatch(saved: Optional[list], now: list) -> Optional[str]:
    """Why a checkpoint's resume point does not fit this run's data, or None if it does. A data
    identity is compared only where both runs have one (checkpoints before it had none)."""
    if not saved or list(saved[:2]) != now[:2]:
        return f"the checkpoint's training data came as {_describe(saved)}, this run's as {_describe(now)}"
    saved_id = saved[2] if len(saved) > 2 else None
    if saved_id is not None and now[2] is not None and saved_id != now[2]:
        return (f"the checkpoint's training data are not this run's ({_describe(now)} in both, but another source "
                f"or content: data id {saved_id}, now {now[2]})")
    return None


def _describe(layout: Optional[list]) -> str:
    if not layout:
        return "an unknown layout"
    return f"{layout[0]} examples in batches of {layout[1]}"


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it resumes mid-epoch (Lightning checks for
    ``state_dict``/``load_state_dict`` and otherwise warns that it does not). Its state travels in
    the data module's checkpoint entry instead (see the module docstring), so these hold nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ResumableTrainData:
    """Mixin for a ``LightningDataModule``: build the training loader with :meth:`shuffled_loader`
    and a checkpoint resumes its epoch at the batch where the trainer stopped."""

    def shuffled_loader(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int,
                        data_id: Optional[str] = None) -> DataLoader:
        """``data_id`` names the data's content (e.g. :func:`fingerprint`), so that a resume on other
        data of the same size is noticed."""
        order = self._order_generator(seed)
        self._shuffle_position.data_id, self._shuffle_position.seed = data_id, seed
        batches = ResumableBatchSampler(RandomSampler(dataset, generator=order), batch_size, drop_last=True,
                                        position=self._shuffle_position)
        worker_seeds = torch.Generator().manual_seed(seed)  # not the global RNG, which seeds the model's dropout
        return ResumableLoader(dataset, batch_sampler=batches, generator=worker_seeds, num_workers=num_workers)

    def _order_generator(self, seed: int) -> torch.Generator:
        """One generator per training run (Trainer) and seed: a loader that Lightning rebuilds
        (``reload_dataloaders_every_n_epochs``) continues the run's order instead of repeating its
        first epoch's, and a new Trainer starts the seed's order afresh."""
        position, trainer = self._shuffle_position, getattr(self, "trainer", None)
        if position.generator is None or position.generator_owner is not trainer or position.seed != seed:
            position.generator, position.generator_owner = torch.Generator().manual_seed(seed), trainer
        return position.generator

    @property
    def _shuffle_position(self) -> ShufflePosition:
        if "_position" not in self.__dict__:
            self._position = ShufflePosition()
        return self._position

    def state_dict(self) -> dict[str, Any]:
        batches = self._live_batch_sampler()
        if batches is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_shuffle": batches.resume_point(done, self.trainer.num_training_batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_shuffle" in state_dict:
            self._shuffle_position.pending = dict(state_dict["train_shuffle"])

    def _live_batch_sampler(self) -> Optional[ResumableBatchSampler]:
        """The batch sampler of the loader the trainer iterates (Lightning may have rebuilt it)."""
        trainer = getattr(self, "trainer", None)
        loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        batches = getattr(loader, "batch_sampler", None)
        return batches if isinstance(batches, ResumableBatchSampler) else None
