"""Bulk tagging: classify a whole photo catalogue on Ray (Ray Data), resumable, with the service's answers.

    python -m bulk SOURCE --out RESULTS [--model TAG] [--address ADDRESS]

SOURCE is a folder of images (recursive), a text/CSV file of URLs and/or paths, or a Parquet file with such a
column (`sources`). RESULTS is a Parquet (default) or CSV file with one row per input (`stages.result_schema`).
The decode/fetch/preprocess, the ONNX model and the postprocessing are the service's own, from `inference/`
(`stages`); the model comes from the BentoML store and is shipped to the workers (`model`); the Ray pipeline
and resuming are in `job` and `results`. Ray is an optional extra (`pip install .[bulk]`), not a serving
dependency.
"""
