"""The one exception type for bad recipe input (paths, names, sizes), reported as a single line.

Data modules and models raise :class:`RecipeInputError` (a ``ValueError``) for anything the user
can fix in the command or the YAML; the CLI entry points print its message as one line and exit
with status 2 instead of showing a traceback from deep inside Lightning.

>>> str(RecipeInputError("data path 'missing.txt' does not exist"))
"data path 'missing.txt' does not exist"
"""


class RecipeInputError(ValueError):
    """Bad user input to a recipe: a missing or empty path, an unknown model family or size."""
