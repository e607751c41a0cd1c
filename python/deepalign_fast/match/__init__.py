"""Matching: each slice prepared once, each pair turned into correspondences.

``base`` (the :class:`MatchBackend` protocol and :class:`Correspondences`), ``blocks``
(dense block matching, the default), ``keypoints`` (SIFT and mutual-NN matching), ``learned``
(keypoints on the learned feature maps, onnxruntime), ``backends`` (the choice by name).
"""
from __future__ import annotations

from .backends import FEATURES, make_backend
from .base import Correspondences, MatchBackend, turned_start

__all__ = ["FEATURES", "Correspondences", "MatchBackend", "make_backend", "turned_start"]
