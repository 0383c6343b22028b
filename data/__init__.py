"""Installed as ``middo_pipeline.data`` (see pyproject.toml): read through middo_pipeline.packaged."""
