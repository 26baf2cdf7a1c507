"""DiffuGTS: zero-shot, open-vocabulary tumor segmentation with frozen diffusion models.

The library holds the method and its stages; it never imports kfp. Components in
``components/`` are thin adapters around it.
"""

__version__ = "0.1.0"
