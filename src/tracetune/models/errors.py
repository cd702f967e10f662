"""The one error type of model loading: its message says what is wrong and what to do."""


class ModelError(RuntimeError):
    """A model that cannot be found, read or matched; the CLI prints it as one line."""
