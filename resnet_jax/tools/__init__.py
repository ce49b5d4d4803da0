"""Tools around the networks: weights in and out of torchvision and Keras (``convert``),
a Table-1-like summary (``summary``), throughput (``benchmark``) and training curves
(``plot``)."""
