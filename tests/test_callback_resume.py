"""Checkpoint mid-run and resume: bit-identical to the uninterrupted run on CPU."""

import lightning as L
import pytest
import torch
from callback_helpers import FAST_TRAINER, TinyRegression, loader

from lightning_kron import SOAP, FixedRefresh, KronCallback
from lightning_kron.scheduling.scheduler import RefreshScheduler


def make_callback() -> KronCallback:
    # every 5 steps (optimizer steps 6, 11, 16, 21) all 6 factors are due and a budget of 2 spreads
    # them over 3 steps: the cut after step 16 leaves 4 deferred factors, which the restored
    # optimizer state holds
    return KronCallback(refresh=FixedRefresh(every=5), max_refreshes_per_step=2)


def train(module, callback, max_epochs, ckpt_path=None) -> L.Trainer:
    # cut at an epoch end: Lightning itself replays a mid-epoch cut differently (non-resumable loader)
    trainer = L.Trainer(callbacks=[callback], max_epochs=max_epochs, **FAST_TRAINER)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def test_resumed_run_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    straight_callback = make_callback()
    straight = TinyRegression(step_lr=5)
    train(straight, straight_callback, max_epochs=3)

    first = make_callback()
    interrupted = train(TinyRegression(step_lr=5), first, max_epochs=2)
    deferred_at_cut = first.scheduler.deferred_count
    path = tmp_path / "cut.ckpt"
    interrupted.save_checkpoint(path)

    resumed_callback = make_callback()
    resumed_module = TinyRegression(step_lr=5)
    resumed = train(resumed_module, resumed_callback, max_epochs=3, ckpt_path=path)

    assert deferred_at_cut == 4
    assert resumed.optimizers[0].global_step == 24 and type(resumed.optimizers[0]) is SOAP
    for a, b in zip(straight.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)
    assert resumed_callback.scheduler.counters.refreshes == straight_callback.scheduler.counters.refreshes
    assert resumed.optimizers[0].param_groups[0]["lr"] == straight.trainer.optimizers[0].param_groups[0]["lr"]


def test_callback_state_is_held_until_the_optimizer_exists():
    callback = make_callback()
    saved = {"scheduler": {"format": 1, "deferred": [6, [1, 4]], "counters": {"checks": 3, "refreshes": 7, "seconds": 0.1}}}
    callback.load_state_dict(saved)
    assert callback.scheduler is None and callback.state_dict() == saved  # nothing to apply it to yet

    optimizer = SOAP(torch.nn.Linear(3, 2, bias=False).parameters())
    scheduler = RefreshScheduler(optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    with pytest.raises(ValueError, match="state is for 6 factors, this optimizer has 2"):
        scheduler.factor_count


def test_the_first_log_after_a_resume_counts_its_window_from_the_restored_step(tmp_path):
    """Every 2 steps all 6 factors refresh, logs every 4 steps: each window holds 12 refreshes over
    4 steps x 6 factors, fraction 0.5, the resumed run's first window (steps 9-12) included (it used
    to start at step 0, reading 12 / (12 * 6))."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def trainer(max_steps, name):
        options = {**FAST_TRAINER, "logger": CSVLogger(tmp_path, name=name)}
        return L.Trainer(callbacks=[KronCallback(refresh=FixedRefresh(every=2), log_every_n_steps=4)],
                         max_steps=max_steps, **options)

    first = trainer(8, "first")
    first.fit(TinyRegression(), loader())
    path = tmp_path / "cut.ckpt"
    first.save_checkpoint(path)
    resumed = trainer(16, "resumed")
    resumed.fit(TinyRegression(), loader(), ckpt_path=path)
    with open(tmp_path / "resumed" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("kron/refresh/fraction")]
    assert [int(row["step"]) for row in rows] == [12, 16]
    assert [float(row["kron/refresh/count"]) for row in rows] == [12.0, 12.0]
    assert [float(row["kron/refresh/fraction"]) for row in rows] == [0.5, 0.5]


def test_one_callback_instance_reused_for_the_resumed_fit_resumes_its_scheduler(tmp_path):
    """A notebook resumes with the callback it trained with: Lightning restores the checkpoint's
    scheduler state after ``setup``, which used to load it into the first fit's scheduler, then
    replaced by a fresh one at ``on_fit_start`` (1 check, 6 refreshes instead of 3 and 18)."""
    reused = KronCallback(refresh=FixedRefresh(every=2))
    first = L.Trainer(callbacks=[reused], max_steps=6, **FAST_TRAINER)
    first.fit(TinyRegression(), loader())
    path = tmp_path / "six.ckpt"
    first.save_checkpoint(path)
    fresh = KronCallback(refresh=FixedRefresh(every=2))
    for callback in (fresh, reused):
        L.Trainer(callbacks=[callback], max_steps=8, **FAST_TRAINER).fit(TinyRegression(), loader(), ckpt_path=path)
    assert (reused.scheduler.counters.checks, reused.scheduler.counters.refreshes) == (3, 18)
    assert (fresh.scheduler.counters.checks, fresh.scheduler.counters.refreshes) == (3, 18)
