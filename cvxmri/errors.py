"""The one exception type the command line turns into a one-line message."""


class CvxmriError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The message must name the problem and, where there is one, the offending file or value.
    """
