"""COCO evaluation: COCO-format datasets, results and pycocotools metrics, and the batched, sharded
evaluation loop behind ``effdet-eval``. Imports :mod:`effdet_torch`, :mod:`converters` and :mod:`parity`."""
