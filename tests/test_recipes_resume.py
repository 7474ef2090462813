"""The recipes' training data resumes mid-epoch: a run cut at any step and resumed ends bit-identical
to the uninterrupted run (CPU, fp32), and the loader's order is the plain shuffling DataLoader's."""

import itertools
import json
import signal
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from recipes.gpt import CausalLM
from recipes.image_data import ImageDataModule
from recipes.optimizers import OptimizerConfig
from recipes.resumable_shuffle import ResumableTrainData, fingerprint
from recipes.splits import split_by_position
from recipes.text_data import TextDataModule
from recipes.vision import ImageClassifier

TOTAL_STEPS = 26
BATCHES_PER_EPOCH = 11  # 1437 training digits in batches of 128, the last partial batch dropped


def build(num_workers: int = 0, source=None, data_seed: int = 3) -> tuple[ImageClassifier, ImageDataModule]:
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(source=source, image_size=8, batch_size=128, seed=data_seed, num_workers=num_workers)
    model = ImageClassifier(family="vit", size="tiny", num_classes=data.num_classes, channels=data.channels,
                            image_size=8, optimizer=OptimizerConfig(name="soap", warmup_steps=2))
    return model, data


def build_gpt(cache_dir) -> tuple[CausalLM, TextDataModule]:
    L.seed_everything(0, verbose=False)
    data = TextDataModule(source=str(Path(json.__file__).parent), context_length=16, batch_size=64, cache_dir=str(cache_dir))
    model = CausalLM(family="gpt2", size="tiny", context_length=16, optimizer=OptimizerConfig(name="soap", warmup_steps=2))
    return model, data


def fit(callbacks, ckpt_path=None, num_workers: int = 0, built=None, max_steps: int = TOTAL_STEPS,
        **trainer_options) -> L.LightningModule:
    model, data = built or build(num_workers)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        **trainer_options)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def assert_same_weights(resumed: torch.nn.Module, straight: torch.nn.Module) -> None:
    assert_same_weights_dicts(resumed.state_dict(), straight.state_dict())


def assert_same_weights_dicts(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys()
    for name, got in resumed.items():
        assert torch.equal(got, straight[name]), f"{name} differs from the uninterrupted run"


class SeenBatches(L.Callback):
    """A fingerprint of every training batch (the sum of its first labels), to compare orders."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append(int(batch[1][:8].sum()))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run, with a checkpoint after every step (as ``every_n_train_steps`` writes them)."""
    folder = tmp_path_factory.mktemp("every_step")
    seen = SeenBatches()
    model = fit([seen, ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")])
    return model, seen.batches, folder


@pytest.mark.parametrize("cut", [5, BATCHES_PER_EPOCH, 16])  # mid-epoch 0, the end of epoch 0, mid-epoch 1
def test_a_scheduled_checkpoint_resumes_bit_identical(cut, straight_run):
    straight, straight_batches, folder = straight_run
    seen = SeenBatches()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable")  # Lightning's warning for a plain loader
        resumed = fit([seen], ckpt_path=folder / f"step={cut}.ckpt")
    assert seen.batches == straight_batches[cut:]
    assert_same_weights(resumed, straight)


def every_step_checkpoints(folder: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")


def test_an_epoch_shortened_by_limit_train_batches_resumes_at_the_next_epoch(tmp_path):
    """With ``limit_train_batches`` 4 an epoch ends after 4 of its 11 batches; a checkpoint there
    used to be saved as "4 batches into the epoch", and the resumed run served the finished epoch's
    batches 4..7 where the uninterrupted run starts the next epoch."""
    seen = SeenBatches()
    straight = fit([seen, every_step_checkpoints(tmp_path)], max_steps=12, limit_train_batches=4)
    for cut in (4, 8):  # the ends of epochs 0 and 1
        resumed_seen = SeenBatches()
        resumed = fit([resumed_seen], ckpt_path=tmp_path / f"step={cut}.ckpt", max_steps=12, limit_train_batches=4)
        assert resumed_seen.batches == seen.batches[cut:], f"cut at step {cut}"
        assert_same_weights(resumed, straight)


def test_a_loader_rebuilt_every_epoch_continues_the_order_and_resumes_bit_identical(straight_run, tmp_path):
    """``reload_dataloaders_every_n_epochs`` 1 rebuilds the loader each epoch; every rebuilt epoch
    used to redraw the seed's first permutation. The order is now the one loader's, epoch after
    epoch, and a run cut at an epoch's end or inside one resumes bit-identical."""
    straight, straight_batches, _ = straight_run
    seen = SeenBatches()
    fit([seen, every_step_checkpoints(tmp_path)], reload_dataloaders_every_n_epochs=1)
    assert seen.batches == straight_batches
    assert seen.batches[BATCHES_PER_EPOCH:][:4] != seen.batches[2 * BATCHES_PER_EPOCH:][:4]  # epochs 1 and 2 differ
    for cut in (BATCHES_PER_EPOCH, 16):
        resumed_seen = SeenBatches()
        resumed = fit([resumed_seen], ckpt_path=tmp_path / f"step={cut}.ckpt", reload_dataloaders_every_n_epochs=1)
        assert resumed_seen.batches == straight_batches[cut:], f"cut at step {cut}"
        assert_same_weights(resumed, straight)


def test_the_gpt_recipes_text_resumes_bit_identical(tmp_path):
    """The text data module shares the mechanism; its epoch here is longer than the run."""
    seen = SeenBatches()
    straight = fit([seen, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")],
                   built=build_gpt(tmp_path), max_steps=8)
    resumed_seen = SeenBatches()
    resumed = fit([resumed_seen], ckpt_path=tmp_path / "step=4.ckpt", built=build_gpt(tmp_path), max_steps=8)
    assert resumed_seen.batches == seen.batches[4:]
    assert_same_weights(resumed, straight)


def test_a_resume_with_another_batch_size_warns_and_shuffles_afresh(straight_run):
    _, straight_batches, folder = straight_run
    model, data = build()
    data.batch_size = 64
    seen = SeenBatches()
    with pytest.warns(UserWarning, match="1437 examples in batches of 128, this run's as 1437 examples in batches of 64"):
        fit([seen], ckpt_path=folder / "step=5.ckpt", built=(model, data))
    assert seen.batches[:3] != straight_batches[5:8]


def digits_npz(path: Path, change_one_image: bool = False) -> str:
    """The recipe's built-in digits written to an .npz (the same training set); optionally with one
    training image changed: the same size, other content."""
    images = (load_digits().images[:, None] / 16.0).astype(np.float32)
    if change_one_image:
        first_training_image = split_by_position(len(images), 0.2)[0][0]
        images[first_training_image, 0, 0, 0] += 0.5
    np.savez(path, x=images, y=load_digits().target)
    return str(path)


def test_the_same_data_from_another_source_resumes_where_it_stopped(straight_run, tmp_path):
    """The data's identity is its content, not where it came from (a moved data set resumes)."""
    _, straight_batches, folder = straight_run
    seen = SeenBatches()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resumed epoch")
        fit([seen], ckpt_path=folder / "step=5.ckpt", built=build(source=digits_npz(tmp_path / "digits.npz")), max_steps=8)
    assert seen.batches == straight_batches[5:8]


def test_other_data_of_the_same_size_warns_and_shuffles_afresh(straight_run, tmp_path):
    _, straight_batches, folder = straight_run
    changed = digits_npz(tmp_path / "changed.npz", change_one_image=True)
    seen = SeenBatches()
    with pytest.warns(UserWarning, match="training data are not this run's .*1437 examples in batches of 128 in both"):
        fit([seen], ckpt_path=folder / "step=5.ckpt", built=build(source=changed), max_steps=8)
    assert seen.batches == straight_batches[:3] != straight_batches[5:8]


def test_another_data_seed_on_resume_is_said_and_the_checkpoints_order_continues(straight_run):
    _, straight_batches, folder = straight_run
    seen = SeenBatches()
    with pytest.warns(UserWarning, match="shuffled with seed 3; the resumed run continues it .this run's data seed 4"):
        fit([seen], ckpt_path=folder / "step=5.ckpt", built=build(data_seed=4), max_steps=8)
    assert seen.batches == straight_batches[5:8]


def test_a_checkpoint_without_a_data_identity_still_resumes(straight_run, tmp_path):
    """Checkpoints written before the resume point named the data hold only its size and batches."""
    _, straight_batches, folder = straight_run
    checkpoint = torch.load(folder / "step=5.ckpt", weights_only=False)
    point = checkpoint["ImageDataModule"]["train_shuffle"]
    point["layout"] = point["layout"][:2]
    del point["seed"]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    seen = SeenBatches()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resumed epoch")
        fit([seen], ckpt_path=tmp_path / "older.ckpt", max_steps=8)
    assert seen.batches == straight_batches[5:8]


class InterruptAt(L.Callback):
    """Ctrl-C at ``step`` (the optimizer steps taken), raised from ``hook``."""

    def __init__(self, step: int, hook: str) -> None:
        self.step = step
        setattr(self, hook, self.interrupt)

    def interrupt(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("hook, batches_done, num_workers", [
    ("on_train_batch_end", 7, 0),        # between steps: the next batch is the first of the resumed run
    ("on_before_optimizer_step", 7, 0),  # inside a step: its batch is trained again
    ("on_train_batch_end", 2 * BATCHES_PER_EPOCH, 0),  # at an epoch's end
    ("on_train_batch_end", 7, 1),        # a worker reads the batch sampler ahead of the trainer: same order
    ("on_train_batch_end", 2 * BATCHES_PER_EPOCH, 1),
])
def test_ctrl_c_resumes_bit_identical(hook, batches_done, num_workers, straight_run, tmp_path):
    straight, straight_batches, _ = straight_run
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit([ModelCheckpoint(dirpath=tmp_path, save_on_exception=True, save_last=True), InterruptAt(batches_done, hook)],
                num_workers=num_workers)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    seen = SeenBatches()
    resumed = fit([seen], ckpt_path=tmp_path / "last.ckpt", num_workers=num_workers)
    assert seen.batches == straight_batches[batches_done:]
    assert_same_weights(resumed, straight)


class Shuffled(ResumableTrainData):
    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed


def test_the_order_is_the_shuffling_dataloaders_as_lightning_reads_it():
    """Lightning takes ``len(loader)`` batches an epoch and stops (it never exhausts the iterator)."""
    dataset = TensorDataset(torch.arange(53))
    plain = DataLoader(dataset, batch_size=5, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(11))
    resumable = Shuffled(dataset, 11).shuffled_loader(dataset, 5, 11, num_workers=0)
    assert len(resumable) == len(plain) == 10
    for _ in range(3):
        assert [batch[0].tolist() for batch in resumable] == [b[0].tolist() for b in itertools.islice(plain, 10)]


class SaveWeights(L.Callback):
    """Rank 0's final weights and batches to files (a ``ddp_spawn`` run trains in other processes)."""

    def __init__(self, folder, name: str) -> None:
        self.weights, self.batches = str(folder / f"{name}.pt"), folder / f"{name}.batches.json"
        self.seen = SeenBatches()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.on_train_batch_start(trainer, module, batch, batch_idx)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank == 0:
            torch.save(module.state_dict(), self.weights)
            self.batches.write_text(json.dumps(self.seen.batches))


def fit_on_two_processes(callbacks, ckpt_path=None, data_seed: int = 3) -> None:
    model, data = build(data_seed=data_seed)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)


def rank_zero_batches(data_seed: int, steps: int) -> list[int]:
    """What rank 0 of two sees if a DistributedSampler seeded with ``data_seed`` orders the data."""
    _, data = build()
    data.setup("fit")
    sampler = DistributedSampler(data.train_set, num_replicas=2, rank=0, shuffle=True, seed=data_seed)
    labels, batches = data.train_set.tensors[1], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [int(labels[order[start:start + 8]].sum()) for start in range(0, len(order) - 127, 128)]
    return batches[:steps]


def test_ddp_resumes_bit_identical_in_the_data_seeds_order(tmp_path):
    """Under DDP Lightning rebuilds the batch sampler around a DistributedSampler, which orders by
    epoch (5 batches of 128 per process and epoch here); the cut at step 3 is mid-epoch. The order
    is the data module's seed's (3), not the global seed's (0) that Lightning gives its sampler."""
    fit_on_two_processes([SaveWeights(tmp_path, "straight"),
                          ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")])
    fit_on_two_processes([SaveWeights(tmp_path, "resumed")], ckpt_path=tmp_path / "step=3.ckpt")
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert_same_weights_dicts(resumed, straight)
    seen = json.loads((tmp_path / "straight.batches.json").read_text())
    assert seen == rank_zero_batches(data_seed=3, steps=8) != rank_zero_batches(data_seed=0, steps=8)
    assert json.loads((tmp_path / "resumed.batches.json").read_text()) == seen[3:]
    # another --data.seed on resume: the checkpoint's order continues (as on one process)
    fit_on_two_processes([SaveWeights(tmp_path, "reseeded")], ckpt_path=tmp_path / "step=3.ckpt", data_seed=5)
    assert json.loads((tmp_path / "reseeded.batches.json").read_text()) == seen[3:]


def test_the_data_fingerprint_sees_content_shape_and_dtype_but_not_memory_layout():
    images = torch.arange(24.0).reshape(4, 6)
    same = fingerprint(images)
    assert fingerprint(images.t().contiguous().t()) == same == fingerprint(images.numpy())
    one_changed = images.clone()
    one_changed[3, 5] = 0.0
    for other in (one_changed, images.reshape(6, 4), images.double(), images.bfloat16()):
        assert fingerprint(other) != same
    assert fingerprint(images, torch.zeros(4)) != fingerprint(images, torch.ones(4))
