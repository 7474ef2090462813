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


def check_num_workers(num_workers: int) -> None:
    """DataLoader refuses a negative count only once training starts; refuse it with the data."""
    if num_workers < 0:
        raise OptionError.refused("data.num_workers", num_workers, "0 (load in the training process) or more")


# Lines of a jsonargparse union error that only say which *other* types were tried.
_GENERIC_UNION_LINES = ("Not a valid subclass", "Expected a <class", "Subclass types expect", "a class path",
                        "a dict with", "a dict without", "Given value", "Subtypes:", "Errors:")


def one_line(message: Any) -> str:
    """A (possibly multi-line) parser or validation message as one line.

    jsonargparse's "Does not validate against any of the Union subtypes" lists every type it tried,
    and nests the same block for an argument inside a class given by ``class_path`` (a callback's
    refresh policy). Only the path down to the specific reason is kept, e.g. ``Parser key
    "trainer.callbacks": Problem with given class_path 'lightning_kron.KronCallback': Parser key
    "refresh": ... Option 'evry' is not accepted``.
    """
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid input"
    return " ".join(_reason_path(lines))


_UNION = "Does not validate against any of the Union subtypes"


def _reason_path(lines: list[tuple[int, str]]) -> list[str]:
    """The headings down to the first specific reason of a union error (see :func:`one_line`);
    any other message is joined as it is."""
    parts: list[str] = []
    while lines:
        indent, text = lines[0]
        if text.startswith("Parser key") and _UNION in text:  # "Parser key ...: Does not validate ..." on one line
            head, _, rest = text.partition(_UNION)
            parts.append(head.strip())
            lines = [(indent, _UNION + rest), *lines[1:]]
            continue
        if text.startswith("Parser key") and len(lines) > 1 and lines[1][1].startswith(_UNION):
            parts.append(text)
            lines = lines[1:]
            continue
        if not text.startswith(_UNION):
            return parts + [line for _, line in lines]
        specific = [number for number, (_, line) in enumerate(lines) if number and line.startswith("- ")
                    and not any(generic in line for generic in _GENERIC_UNION_LINES)]
        if not specific:
            return parts + [line for _, line in lines]
        first = specific[0]
        child_indent, child = lines[first][0], lines[first][1][2:].strip()
        below = lines[first + 1:]
        end = next((number for number, (depth, _) in enumerate(below) if depth <= child_indent), len(below))
        if child.startswith(_UNION):  # a nested union (an argument of a class given by class_path)
            lines = [(child_indent, child), *below[:end]]
            continue
        parts.append(child)
        if not child.endswith(":"):
            return parts
        lines = below[:end]  # the nested block that explains this reason
    return parts
