"""Quality control: how well a stack is aligned, and the stacks to measure it on.

``metrics`` (similarity, TRE, exact-truth scores, Jacobians), ``truth`` (the known
misalignment of a synthetic stack), ``synth`` (misaligned stacks, reslices, drift profiles),
``artifacts`` (FIB-SEM imaging artifacts), ``evaluate`` (``make-benchmark`` and ``eval``),
``report`` (the HTML QC report), ``bench`` (``deepalign-fast bench``). Nothing in the
alignment itself imports this package.
"""
