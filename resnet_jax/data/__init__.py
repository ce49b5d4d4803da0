"""The data: datasets, the paper's augmentation and deterministic input pipelines.

* ``pipeline``: global batch ``k`` as a function of ``(seed, k)`` on any topology;
  the evaluation split in order; feeding the devices.
* ``augment``: sec. 3.4's scale augmentation, crops, flips, lighting, the mean image, and
  the test protocols' views.
* ``sources``: random-access sources of labelled images, and decoding.
* ``folder``: a folder of your own images as a dataset (``folder:/path``).
* ``prepare``: which datasets can be read, and preparing them once (mean images, indexes).
* ``workers``: the per-example work in worker processes (grain).
* ``digits``: the embedded default dataset (scikit-learn's digits as a tfds dataset).
"""
