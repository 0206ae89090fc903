"""Micro-benchmarks of single parts (``tokenslice bench micro picker|sidecar|slices``): what one part adds.

Not tests: they print numbers that depend on the machine; the commands and their output go to
``docs/picker.md`` and ``docs/sidecar.md``.
"""
