"""Training recipes for lightning_kron: a GPT-style causal language model and an image classifier.

Both are ordinary LightningModules configured by LightningCLI YAML files in ``recipes/configs/``
and both pick their optimizer by name (``adamw``, ``soap``, ``soap_adaptive``, ``eshampoo``,
``shampoo``, ``kradagrad``) through one shared helper, :mod:`recipes.optimizers`, so a comparison
between optimizers changes nothing but that name. Models are built from ``transformers`` configs
(never downloaded) and the default data ships with Python and scikit-learn, so every recipe runs
offline on a fresh machine.
"""
