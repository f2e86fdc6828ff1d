"""The core's own behaviour, as ordinary plugins that answer after the job's chain."""
