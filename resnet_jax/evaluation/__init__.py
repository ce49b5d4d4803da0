"""The paper's test protocols (center, 10-crop, multi-scale: sec. 3.4, Tables 2-4) and the
layer responses of Fig. 7."""
