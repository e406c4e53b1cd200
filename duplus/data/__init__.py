"""Data layer of duplus: class taxonomy, dataset registry, demo phantoms, download and preprocessing.

Submodules are imported on demand so that listing classes or datasets stays instant.
"""
