"""Evaluation: the paper's Concept Ablation protocol (``protocol``, ``evaluate.py``'s job) and ConceptPrune's
erasure suites (``suites``, ``benchmark``, ``benchmark.py``'s job) on one runner (``runner``: generation of
every model's images from the same rows and seeds, caching, scoring, tables), with the models a benchmark
compares (``models``), prompt-set readers (``prompt_sets``), the suites' metric rules (``scores``) and the
benchmark's settings (``settings``). The scorers themselves are in :mod:`scoring`."""
