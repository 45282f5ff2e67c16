"""Fundus data: the synthetic generator, tfds builders, splits, the grain pipeline, augmentation.

Submodules are imported explicitly (`from drjax.data import pipeline`) so that importing one
does not pull in tfds or JAX for the others.
"""
