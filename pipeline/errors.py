"""Errors shared by every layer; a leaf module (imports nothing from the project, nor torch)."""


class ConfigError(ValueError):
    """A configuration value the user gave is not allowed (the CLI exits 2 with its message)."""
