"""Refinement after the affine solve: a per-slice map beyond one affine.

``expected_affine`` (damaged sections: a per-pixel affine field), ``elastic`` (the learned
flow: an affine plus a displacement field), ``flow`` (the flow network run by onnxruntime),
``order`` (refinements run slice after slice, in order, from several threads).
"""
