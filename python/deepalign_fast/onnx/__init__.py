"""Running the exported networks: the onnxruntime session factory (``session``), the
slice normalisation the networks were trained with (``normalise``) and the tiling shared by
the feature and flow networks (``tiling``). onnxruntime is imported only by ``session``."""
