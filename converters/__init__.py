"""Official checkpoint formats (TF1 TensorBundle directories, prefixes and release tarballs; Keras
``.h5``) to and from torch state dicts, through one declarative name map. Imports only
:mod:`effdet_torch`.

Facts of the official naming shared by every reader and writer live here, importable without torch
(the official-model worker imports them inside a TensorFlow process).
"""
EMA_SUFFIX = "/ExponentialMovingAverage"  # the official EMA shadow of a variable: "<name>/ExponentialMovingAverage"
OFFICIAL_CLASS_BIAS = "class_net/class-predict/bias"  # [A · num_classes]: the official class predictor's bias
