"""Datasets (``sources``, ``folder``, ``digits``, ``prepare``), the paper's augmentation
(``augment``) and deterministic input pipelines (``pipeline``, ``workers``)."""
