"""KronCallback under DDP (ddp_spawn, 2 CPU processes, gloo): ranks bit-identical, equal to one
process with the same global batch, and the refresh work split between the ranks."""

import csv
import os

import lightning as L
import torch
from callback_helpers import FAST_TRAINER, TinyRegression, make_data
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

from lightning_kron import AdaptiveRefresh, KronCallback

STEPS = 6


class SavingRegression(TinyRegression):
    """Writes its final parameters and this rank's refresh work to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(eps=1e-3)  # see callback_helpers: float-tolerance comparisons need a damped eps
        self.out_dir = out_dir

    def train_dataloader(self):
        # rank r gets samples r, r + 2, ...: batch k of both ranks together is batch k of one process
        # with twice the batch size (Lightning's own distributed sampler would shuffle)
        data = make_data()
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=16 // self.trainer.world_size, sampler=sampler)

    def on_fit_end(self) -> None:
        callback = next(c for c in self.trainer.callbacks if isinstance(c, KronCallback))
        torch.save({"params": [p.detach().clone() for p in self.parameters()],
                    "computed": callback.scheduler.counters.computed_here,
                    "total": callback.scheduler.counters.refreshes},
                   os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def make_callback() -> KronCallback:
    return KronCallback(refresh=AdaptiveRefresh(tolerance=0.0), log_every_n_steps=STEPS)  # every factor, every step


def test_ddp_ranks_are_identical_match_one_process_and_split_the_refreshes(tmp_path):
    logger = CSVLogger(tmp_path, name="ddp")
    options = {key: value for key, value in FAST_TRAINER.items() if key not in ("accelerator", "devices")}
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=STEPS, callbacks=[make_callback()],
                        use_distributed_sampler=False, **{**options, "logger": logger})
    trainer.fit(SavingRegression(str(tmp_path)))  # 2 ranks x 8 = global batch 16
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    single = SavingRegression(str(tmp_path / "single"))
    os.makedirs(single.out_dir)
    L.Trainer(max_steps=STEPS, callbacks=[make_callback()], **FAST_TRAINER).fit(single)

    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # bit-identical ranks
    for a, b in zip(ranks[0]["params"], single.parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # the same training as one process with the global batch
    total = (STEPS - 1) * 6
    assert ranks[0]["total"] == ranks[1]["total"] == total
    computed = [rank["computed"] for rank in ranks]
    assert sum(computed) == total and 0 < min(computed) and max(computed) < total  # split, not duplicated

    (metrics_file,) = (tmp_path / "ddp").glob("version_*/metrics.csv")  # written by rank 0's process
    with open(metrics_file) as handle:
        row = [r for r in csv.DictReader(handle) if r.get("kron/refresh/total")][-1]
    logged = [float(row[f"kron/distributed/rank_{r}/refreshes_computed"]) for r in (0, 1)]
    assert logged == computed and float(row["kron/refresh/total"]) == total
