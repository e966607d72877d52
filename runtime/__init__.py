"""The shared floor every job stands on, directly above ``ldm/``.

* :mod:`runtime.cli`      -- command-line checks: one-line usage errors, exit code 2, typed flag parsers;
* :mod:`runtime.dist`     -- the process launcher (``--gpus``, torchrun ranks, barriers);
* :mod:`runtime.generate` -- batched, resumable image generation with per-image seeds (``plan.json``);
* :mod:`runtime.files`    -- atomic writes, text and prompt files, image checks, hashes;
* :mod:`runtime.delta`    -- the delta checkpoint format (only the trained tensors, CompVis keys);
* :mod:`runtime.loading`  -- base (+ delta) model loading and the cheap checkpoint checks run before any work;
* :mod:`runtime.resources` -- where the shipped configs and assets are (the clone's, else the installed data package);
* :mod:`runtime.sample`, :mod:`runtime.export` -- the jobs of ``sample.py`` and ``tools/export.py``.

A regular package (not a namespace one), so an installed copy never merges with another copy's modules.
Nothing here knows a method (``ablation``, ``prune``) or a benchmark (``evaluation``).
"""
