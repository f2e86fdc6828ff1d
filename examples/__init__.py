"""Runnable example jobs: a TOML file and the task module it names."""
