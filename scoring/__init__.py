"""Scorers shared by the methods and by evaluation, above ``runtime/``.

* :mod:`scoring.metrics`    -- CLIP score / accuracy, KID and FID with their feature extractors;
* :mod:`scoring.sscd`       -- SSCD copy detection (descriptors, similarities, memorization rate);
* :mod:`scoring.nudity`     -- NudeNet detections and counts;
* :mod:`scoring.classifier` -- top-1 image classifiers (ResNet-50 or a TorchScript model with its labels);
* :mod:`scoring.files`      -- the one loader of scorer files (kinds from the bytes, weights without code,
  TorchScript only from TorchScript archives, one-line errors naming flag and file).
"""
