"""GPT-style causal language model recipe (GPT-2 and Llama families) on byte-level text.

The network is built from a ``transformers`` config (random init, nothing downloaded, so it works
with ``HF_HUB_OFFLINE=1``) with a 256-token byte vocabulary. Sizes go from ``tiny`` (CPU, seconds
per hundred steps) to ``124m`` (the GPT-2-small architecture: 12 layers, width 768).

Command line (LightningCLI; see ``recipes/configs/gpt_*.yaml`` and ``llama_*.yaml``)::

    kron-gpt fit --config recipes/configs/gpt_tiny.yaml --model.optimizer.name soap
    kron-gpt fit --model.optimizer.name soap     # no --config: recipes/configs/gpt_tiny.yaml
    python -m recipes.gpt fit --config recipes/configs/gpt_tiny.yaml --wandb

>>> import torch
>>> module = CausalLM(family="llama", size="tiny", context_length=16)
>>> module.network.config.vocab_size, module(torch.zeros(2, 16, dtype=torch.long)).shape
(256, torch.Size([2, 16, 256]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from recipes.errors import OptionError, RecipeInputError
from recipes.optimizers import OptimizerConfig
from recipes.recipe_module import RecipeModule

VOCAB_SIZE = 256  # raw UTF-8 bytes

Family = Literal["gpt2", "llama"]
Size = Literal["tiny", "small", "124m"]


@dataclass(frozen=True)
class TransformerShape:
    layers: int
    width: int
    heads: int


SIZES: dict[str, TransformerShape] = {
    "tiny": TransformerShape(layers=2, width=128, heads=4),
    "small": TransformerShape(layers=6, width=384, heads=6),
    "124m": TransformerShape(layers=12, width=768, heads=12),  # GPT-2 small's shape
}
FAMILIES: tuple[str, ...] = Family.__args__
MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _round_up(value: float, multiple: int) -> int:
    return int(-(-value // multiple) * multiple)


def transformer_config(family: str, size: str, context_length: int, dropout: float):
    """The ``transformers`` config of one family and size; unknown names -> RecipeInputError."""
    if family not in FAMILIES:
        raise RecipeInputError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise RecipeInputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    shape = SIZES[size]
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=VOCAB_SIZE, n_positions=context_length, n_embd=shape.width,
                          n_layer=shape.layers, n_head=shape.heads, resid_pdrop=dropout, embd_pdrop=dropout,
                          attn_pdrop=dropout, bos_token_id=None, eos_token_id=None, use_cache=False)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=context_length, hidden_size=shape.width,
                       intermediate_size=_round_up(8 * shape.width / 3, 64), num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads, attention_dropout=dropout,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)


def build_network(family: str, size: str, context_length: int, dropout: float = 0.0) -> torch.nn.Module:
    """A randomly initialised causal LM (``GPT2LMHeadModel`` or ``LlamaForCausalLM``)."""
    import transformers

    config = transformer_config(family, size, context_length, dropout)
    return getattr(transformers, MODEL_CLASSES[family])(config)


class CausalLM(RecipeModule):
    """Next-byte prediction with cross-entropy; logs ``train_loss``, ``val_loss``, ``val_perplexity``.

    Args:
        family: "gpt2" or "llama".
        size: "tiny", "small" or "124m".
        context_length: positions the model supports (the CLI links it to the data's).
        dropout: dropout everywhere (0 suits the short runs these recipes make).
        optimizer: which optimizer and schedule (see :class:`recipes.optimizers.OptimizerConfig`).
    """

    def __init__(self, family: Family = "gpt2", size: Size = "tiny", context_length: int = 128,
                 dropout: float = 0.0, optimizer: OptimizerConfig = OptimizerConfig()) -> None:
        super().__init__(optimizer)
        if context_length < 1:  # linked from the data module's option, which the user sets
            raise OptionError.refused("data.context_length", context_length, "a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise OptionError.refused("model.dropout", dropout, "a probability in [0, 1)")
        self.network = build_network(family, size, context_length, dropout)
        self.val_perplexity = Perplexity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.network(input_ids=tokens, use_cache=False).logits

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), logits, targets

    def training_step(self, batch: torch.Tensor, batch_index: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_index: int) -> None:
        loss, logits, targets = self._loss(batch)
        self.val_perplexity.update(logits.float(), targets)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_perplexity", self.val_perplexity)


def main(args=None) -> None:
    """``kron-gpt``: LightningCLI over :class:`CausalLM` and :class:`~recipes.text_data.TextDataModule`."""
    from recipes.cli import run_cli
    from recipes.text_data import TextDataModule

    run_cli(CausalLM, TextDataModule, links=[("data.context_length", "model.context_length")], args=args,
            default_config=str(Path(__file__).parent / "configs" / "gpt_tiny.yaml"))


if __name__ == "__main__":
    main()
