"""`edgeattn eval`: what sparsity costs in accuracy, measured on the real model.

* :mod:`.retrieval` -- needle-in-a-haystack and passkey grids (length x depth per attention mode);
* :mod:`.fidelity` -- per-layer and end-to-end agreement with dense attention as the budget moves;
* :mod:`.modes` -- the attention modes compared (dense, DHSA per chunking source, block-sparse and
  the two window baselines);
* :mod:`.grid` -- the resumable JSON report every eval writes cell by cell;
* :mod:`.inputs` -- option parsing and the checks made before anything loads;
* :mod:`.plots` -- PNG heatmaps and curves.
"""
