"""The science of Middo, in plain Python: no Dagster imports anywhere under this package.

Modules here are called by the thin Dagster assets in ``middo_pipeline.assets`` and are
tested directly.
"""
