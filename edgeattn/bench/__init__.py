"""`edgeattn bench`: DHSA and dense beside llama.cpp, ONNX Runtime and transformers, one row per process.

``rows`` names what can be measured, ``sweep`` runs a length x row sweep (each row in a fresh
child process, ``child``), ``peers`` drives llama.cpp, ``stages`` splits a torch prefill into
model stages, ``report`` renders the JSON as Markdown and ``plots`` draws it.
"""
