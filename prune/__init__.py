"""ConceptPrune (Chavhan et al.): training-free concept editing by pruning "skilled" weights of the
second FFN linear (``ff.net.2``) of every UNet transformer block.

* :mod:`prune.hooks`   -- the ``ff.net.2`` layers in execution order, the activation-norm recorder and
  the per-call mask hooks;
* :mod:`prune.wanda`   -- WANDA scores, per-row top-k skilled-weight masks, union over calls, the mask
  file format and the pruned delta;
* :mod:`prune.prompts` -- calibration prompt pairs per concept family and the per-family defaults.

* :mod:`prune.jobs`    -- the three jobs (``discover`` / ``check`` / ``prune``) with typed settings; their command
  line is ``conceptprune.py`` at the repository root.
"""
