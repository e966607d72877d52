"""The shared floor every job stands on, directly above ``ldm/``.

* :mod:`runtime.cli`      -- command-line checks: one-line usage errors, exit code 2, typed flag parsers;
* :mod:`runtime.dist`     -- the process launcher (``--gpus``, torchrun ranks, barriers);
* :mod:`runtime.generate` -- batched, resumable image generation with per-image seeds (``plan.json``);
* :mod:`runtime.files`    -- atomic writes, text and prompt files, image checks, hashes;
* :mod:`runtime.delta`    -- the delta checkpoint format (only the trained tensors, CompVis keys);
* :mod:`runtime.loading`  -- base (+ delta) model loading and the cheap checkpoint checks run before any work;
* :mod:`runtime.sample`, :mod:`runtime.export` -- the jobs of ``sample.py`` and ``tools/export.py``.

Nothing here knows a method (``ablation``, ``prune``) or a benchmark (``evaluation``).
"""
