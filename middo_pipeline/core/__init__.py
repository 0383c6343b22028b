"""The science of Middo, in plain Python (no Dagster: ``middo_pipeline_tests/test_layers.py``
checks it).

Modules here are called by the thin Dagster assets in ``middo_pipeline.assets`` and are
tested directly.
"""
