"""How each runtime loads and runs an artifact: one module per runtime, numpy and the standard library only.

Each module holds one runner class (load; run NCHW float32 batches to float32 logits; run on the model's
own input; its input and output tensors; intermediate tensors for per-layer error) and imports its
runtime inside its functions. No module here imports edgeres, ``targets`` or ``calibration``, so the
standalone files (``edgeres/measure/bench_runner.py``, the exported app's ``classify.py``) carry them
verbatim: ``python -m edgeres.targets.runners.assemble FILE...`` writes them in, and a test proves the copies equal.
"""

MODULES = ("onnxruntime_runner", "openvino_runner", "litert_runner", "executorch_runner")  # in the order they are assembled
