"""Benchmarks for middo-pipeline: speed against the reference's way and the hardware, and how
well the three signals find what they are meant to find.

Run ``python -m benchmarks --quick`` (minutes, CPU) or ``python -m benchmarks --full``
(longer; meant for a GPU). See ``benchmarks/README.md``. These are measurements, not tests:
nothing here is collected by pytest.
"""
