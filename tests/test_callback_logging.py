"""KronCallback telemetry: documented names land in CSV, TensorBoard and W&B (scalars + rich views)."""

import csv
import math
import os
import sys

import pytest
from callback_helpers import TinyRegression, fit
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_kron import AdaptiveRefresh, FixedRefresh, KronCallback

FACTORS = ["net.0.weight[L]", "net.0.weight[R]", "net.2.weight[L]", "net.2.weight[R]", "net.4.weight[L]", "net.4.weight[R]"]
PER_STEP = ["kron/refresh/count", "kron/refresh/fraction", "kron/refresh/seconds", "kron/refresh/total",
            "kron/refresh/saved_vs_fixed", "kron/refresh/deferred", "kron/refresh/tolerance",
            "kron/summary/factors", "kron/summary/staleness_mean", "kron/summary/staleness_max",
            "kron/summary/failures", "kron/summary/skipped_steps",
            "kron/distributed/rank_0/refreshes_computed", "kron/distributed/rank_0/refresh_seconds"]


def kron_rows(path) -> list[dict]:
    with open(path) as handle:
        return [row for row in csv.DictReader(handle) if row.get("kron/refresh/total")]


def test_csv_logger_gets_every_documented_metric_every_n_steps(tmp_path):
    callback = KronCallback(refresh=AdaptiveRefresh(0.03), log_every_n_steps=2, approximation_probe_max_numel=20)
    logger = CSVLogger(tmp_path, name="run")
    fit(TinyRegression(), [callback], max_steps=8, logger=logger)
    rows = kron_rows(os.path.join(logger.log_dir, "metrics.csv"))
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8]
    names = set(rows[0])
    for factor in FACTORS:
        for kind in ("staleness", "steps_since_refresh", "refreshes", "failures"):
            assert f"kron/{kind}/{factor}" in names
    assert set(PER_STEP) <= names
    assert {"kron/misscaling/net.0.weight", "kron/misscaling/net.4.weight"} <= names
    # the probe covers blocks with <= 20 entries: net.2 (4x5) and net.4 (3x4), not net.0 (5x6)
    assert {"kron/approx_error/shampoo/net.2.weight", "kron/approx_error/corrected/net.4.weight"} <= names
    assert "kron/approx_error/shampoo/net.0.weight" not in names
    last = rows[-1]
    counters = callback.scheduler.counters
    assert float(last["kron/refresh/total"]) == counters.refreshes
    assert float(last["kron/refresh/saved_vs_fixed"]) == counters.checks * 6 - counters.refreshes
    assert sum(float(row["kron/refresh/count"]) for row in rows) == counters.refreshes
    factors = {info.name: info for info in callback.optimizer.factors()}
    for factor in FACTORS:
        assert float(last[f"kron/staleness/{factor}"]) == pytest.approx(factors[factor].staleness)
        assert float(last[f"kron/refreshes/{factor}"]) == factors[factor].refreshes
    assert 0 <= float(last["kron/refresh/fraction"]) <= 1
    for row in rows:
        for name in ("kron/approx_error/shampoo/net.2.weight", "kron/misscaling/net.0.weight"):
            assert 0 <= float(row[name]) < 2 and math.isfinite(float(row[name]))


def test_tensorboard_logger_gets_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(TinyRegression(), [KronCallback(refresh=FixedRefresh(2), log_every_n_steps=3)], max_steps=6, logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"kron/refresh/total", "kron/summary/staleness_max"} <= tags
    assert [event.step for event in events.Scalars("kron/refresh/total")] == [3, 6]
    assert {"kron/staleness/net.2.weight[L]", "kron/refreshes/net.4.weight[R]"} <= tags  # names kept verbatim


def fit_with_offline_wandb(tmp_path, monkeypatch, callback, max_steps) -> list[dict]:
    """Every payload the callback and Lightning sent to the offline W&B run, in order."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="kron-test")
    calls = []
    original = logger.experiment.log
    monkeypatch.setattr(logger.experiment, "log", lambda data, *a, **k: (calls.append(dict(data)), original(data, *a, **k)))
    try:
        fit(TinyRegression(), [callback], max_steps=max_steps, logger=logger)
    finally:
        wandb.finish()
    return calls


def test_wandb_offline_gets_scalars_and_the_rich_views(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = fit_with_offline_wandb(tmp_path, monkeypatch, KronCallback(refresh=AdaptiveRefresh(0.05), log_every_n_steps=2), 6)
    scalars = [call for call in calls if "kron/refresh/total" in call]
    assert [call["trainer/global_step"] for call in scalars] == [2, 4, 6]
    assert isinstance(scalars[0]["kron/staleness/net.0.weight[L]"], float)
    histograms = [call for call in calls if "kron/views/staleness_histogram" in call]
    assert len(histograms) == 4 and isinstance(histograms[0]["kron/views/staleness_histogram"], wandb.Histogram)
    final = calls[-1]  # on_train_end: the table and heatmap over factors x logged steps
    assert isinstance(final["kron/views/staleness_heatmap"], wandb.Image)
    table = final["kron/views/staleness_table"]
    assert isinstance(table, wandb.Table) and table.columns == ["step", "factor", "staleness"]
    assert len(table.data) == 6 * 3 and {row[0] for row in table.data} == {2, 4, 6}


def test_wandb_table_is_sent_once_when_the_last_step_is_a_table_log(tmp_path, monkeypatch):
    """The 10th log carries the table; when it is also the last step, on_train_end sent the same views again."""
    from lightning_kron.lightning.callback import WANDB_TABLE_EVERY_N_LOGS
    from lightning_kron.lightning.wandb_views import TABLE

    callback = KronCallback(refresh=AdaptiveRefresh(0.05), log_every_n_steps=1)
    calls = fit_with_offline_wandb(tmp_path, monkeypatch, callback, WANDB_TABLE_EVERY_N_LOGS)
    tables = [call["trainer/global_step"] for call in calls if TABLE in call]
    assert tables == [WANDB_TABLE_EVERY_N_LOGS]
    calls = fit_with_offline_wandb(tmp_path, monkeypatch, KronCallback(log_every_n_steps=1), WANDB_TABLE_EVERY_N_LOGS + 1)
    assert [call["trainer/global_step"] for call in calls if TABLE in call] == [WANDB_TABLE_EVERY_N_LOGS, WANDB_TABLE_EVERY_N_LOGS + 1]


def test_wandb_is_not_imported_without_a_wandb_logger(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    callback = KronCallback(refresh=AdaptiveRefresh(0.05), log_every_n_steps=1)
    fit(TinyRegression(), [callback], max_steps=2, logger=CSVLogger(tmp_path))
    assert callback.history is None and callback.scheduler.counters.checks == 1


def test_wandb_views_survive_a_nan_staleness_and_keep_every_factor_under_the_row_limit():
    """numpy's histogram refuses a NaN range, which ended a W&B run whose factor overflowed; and
    W&B keeps a table's first 10,000 rows, which dropped whole factors of a GPT-2-sized model."""
    wandb = pytest.importorskip("wandb")
    from lightning_kron.lightning.wandb_views import HISTOGRAM, TABLE, TABLE_ROWS, StalenessHistory, staleness_payload

    history = StalenessHistory()
    for step in range(256):
        history.record(step, {f"w{factor}[L]": 0.01 * factor for factor in range(100)} | {"w100[L]": float("nan")})
    payload = staleness_payload(history, with_table=True)
    histogram = payload[HISTOGRAM]
    assert isinstance(histogram, wandb.Histogram) and sum(histogram.histogram) == 100  # the NaN left out
    rows = payload[TABLE].data
    assert len(rows) <= TABLE_ROWS and {row[1] for row in rows} == set(history.names)
    assert max(row[0] for row in rows) == 255  # the newest step is kept
    lone_nan = StalenessHistory()
    lone_nan.record(1, {"w[L]": float("nan")})
    assert HISTOGRAM not in staleness_payload(lone_nan, with_table=False)


def test_trainer_log_every_n_steps_zero_means_no_kron_logs(tmp_path):
    """Lightning takes 0 as "never log"; the callback divided by it on the first step."""
    logger = CSVLogger(tmp_path, name="run")
    fit(TinyRegression(), [KronCallback()], max_steps=3, logger=logger, log_every_n_steps=0)
    assert not os.path.exists(os.path.join(logger.log_dir, "metrics.csv")) or not kron_rows(os.path.join(logger.log_dir, "metrics.csv"))
