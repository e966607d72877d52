"""experiments: studies run on the toy world (``toyworld``), each a module with ``run`` and ``main(argv)``.

The toy world is the stage (renderer, captions, data set, the model and its training, toy CLIP, judge, the
mission); these are the experiments staged on it, using only the public API of the library and of ``toyworld``:

* ``experiments.matrix``: every concept as the target in turn, every other concept measured;
* ``experiments.ffn``: a concept taught into the FFNs ("waves"), then ConceptPrune and Concept Ablation
  on it;
* ``experiments.wide``: a wider toy UNet (two transformer blocks per level);
* ``experiments.anchor_study``: cheaper anchor samplers against the paper's DDIM 200;
* ``experiments.toy_benchmark``: ``benchmark.py``'s erasure suites with the toy world's scorers.

Their measured results, dated and with the commit that produced them, are on the pages of
``docs/experiments/``.
"""
