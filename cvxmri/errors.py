"""The one exception type the command line turns into a one-line message."""


class CvxmriError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The message must name the problem and, where there is one, the offending file or value.
    """


def describe_load_error(err: Exception) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)``: pickled objects other
    than tensors are refused (never executed); anything else is a damaged or foreign file."""
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds pickled Python objects, which are refused and were not executed"
    first = text.splitlines()[0] if text else type(err).__name__
    return first[:200]


def check_settings(
    kind: str, owner: object, rules: dict[str, tuple[bool, str]], prefix: str = ""
) -> None:
    """Raise `CvxmriError` for the first rule that does not hold, naming the setting, its
    value and what it must be: ``rules`` maps a setting's (dotted) name on ``owner`` to
    ``(holds, what it must be)``, e.g. ``{"kernel_size": (k % 2 == 1, "odd")}``. ``kind``
    names the family in the message (``"training"``, ``"simulation"``), ``prefix`` where
    ``owner`` sits in the user's configuration (``"unrolled."``)."""
    for name, (holds, must_be) in rules.items():
        if not holds:
            value = owner
            for part in name.split("."):
                value = getattr(value, part)
            raise CvxmriError(f"invalid {kind} setting {prefix}{name}={value!r}: must be {must_be}")
