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
