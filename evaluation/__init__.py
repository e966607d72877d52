"""Evaluation shared by ``evaluate.py`` (the Concept Ablation protocol) and ``benchmark.py`` (ConceptPrune's
erasure suites): metric code (``metrics``), the models a benchmark compares (``models``), prompt-set readers
(``prompt_sets``), scorers (``nudity``, ``classifier``, ``scores``) and the suite runner (``suites``, ``runner``,
``report``)."""
