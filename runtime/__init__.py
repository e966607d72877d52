"""The shared floor above ``ldm``: what every job needs and no method owns.

:mod:`runtime.cli` (command-line checks), :mod:`runtime.dist` (launcher), :mod:`runtime.generate` (batched,
resumable generation), :mod:`runtime.files` (atomic writes, prompt files), :mod:`runtime.delta` (the delta
format), :mod:`runtime.loading` (base (+ delta) loading), :mod:`runtime.resources` (where the shipped configs and
assets are), and the jobs of sample.py (:mod:`runtime.sample`) and tools/export.py (:mod:`runtime.export`).

A regular package (not a namespace one), so an installed copy never merges with another copy's modules.
"""
