"""Training with the official EfficientDet recipe (targets, loss, optimizer, augmentation) and the
train-golden check against recordings of the official TF trainer.

Layering: imports :mod:`effdet_torch`, :mod:`converters` and :mod:`parity`; nothing below imports it.
"""
