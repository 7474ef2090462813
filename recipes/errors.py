"""The exception types for bad recipe input (paths, names, sizes, option values), reported as a single line.

Data modules and models raise :class:`RecipeInputError` (a ``ValueError``) for anything the user
can fix in the command or the YAML; the CLI entry points print its message as one line and exit
with status 2 instead of showing a traceback from deep inside Lightning. :class:`OptionError` is
the kind that names one option: ``"<option>: got <value>, expected <what is accepted>"``.

>>> str(RecipeInputError("data path 'missing.txt' does not exist"))
"data path 'missing.txt' does not exist"
>>> str(OptionError.refused("optimizer.tolerance", -1.0, "a number in [0, 1]").within("model."))
'model.optimizer.tolerance: got -1.0, expected a number in [0, 1]'
>>> one_line('Parser key "model.size":\\n  Expected one of tiny, small.\\n  Got value: huge')
'Parser key "model.size": Expected one of tiny, small. Got value: huge'
"""

from __future__ import annotations

from typing import Any


class RecipeInputError(ValueError):
    """Bad user input to a recipe: a missing or empty path, an unknown model family or size."""


class OptionError(RecipeInputError):
    """A refused value of one named option (``optimizer.tolerance``, ``trainer.max_steps``, ...)."""

    def __init__(self, option: str, detail: str) -> None:
        self.option, self.detail = option, detail
        super().__init__(f"{option}: {detail}")

    @classmethod
    def refused(cls, option: str, value: Any, expected: str) -> "OptionError":
        return cls(option, f"got {value!r}, expected {expected}")

    def within(self, prefix: str) -> "OptionError":
        """The same error with the option's full path (``model.`` + ``optimizer.lr``)."""
        return OptionError(prefix + self.option, self.detail)


# Lines of a jsonargparse union error that only say which *other* types were tried.
_GENERIC_UNION_LINES = ("Not a valid subclass", "Expected a <class", "Subclass types expect", "a class path",
                        "a dict with", "a dict without", "Given value", "Subtypes:", "Errors:")


def one_line(message: Any) -> str:
    """A (possibly multi-line) parser or validation message as one line.

    jsonargparse's "Does not validate against any of the Union subtypes" lists every type it tried;
    only the specific reason (e.g. the callback's own ``method must be one of ...``) is kept.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid input"
    head, union = "", "Does not validate against any of the Union subtypes"
    if lines[0].startswith("Parser key") and len(lines) > 1 and lines[1].startswith(union):
        head, lines = lines[0] + " ", lines[1:]
    elif lines[0].startswith("Parser key") and union in lines[0]:
        head, lines = lines[0].split(union)[0], [union, *lines[1:]]
    if lines[0].startswith(union):
        reasons = [line[2:].strip() for line in lines[1:] if line.startswith("- ")
                   and not any(generic in line for generic in _GENERIC_UNION_LINES)]
        if reasons:
            return head + reasons[0]
    return head + " ".join(lines)
