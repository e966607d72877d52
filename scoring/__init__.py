"""Scorers that evaluation and the methods share: CLIP, KID/FID features (:mod:`scoring.metrics`), SSCD copy
detection (:mod:`scoring.sscd`), NudeNet (:mod:`scoring.nudity`) and image classifiers (:mod:`scoring.classifier`).

A regular package (not a namespace one), so an installed copy never merges with another copy's modules.
"""
