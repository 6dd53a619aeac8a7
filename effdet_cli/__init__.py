"""The console scripts (convert-ckpt, effdet-parity, effdet-infer, effdet-eval, effdet-train, effdet-bench,
effdet-export) and the demo: the top layer, wiring the packages below into commands that share one
convention (:mod:`effdet_cli.common`). Nothing in the project imports this package."""
