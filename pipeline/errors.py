"""Typed errors with messages a user can act on (STYLE.md convention 4)."""


class VlpError(Exception):
    """Base of every error vlp raises on purpose; the CLI prints these without a traceback."""


class ConfigError(VlpError):
    """A config file or override is wrong: names the file and the dotted key."""


class InputError(VlpError):
    """An input (URL list, shard, run directory) cannot be used as it is."""


class StageFailed(VlpError):
    """A stage could not finish; committed shards stay and `vlp resume` continues from them."""
