"""Thin Dagster assets: load inputs, call ``middo_pipeline.core``, write outputs, attach metadata."""
