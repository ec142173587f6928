"""Research code: training data, training, evaluation, classical baselines and metrics.

Nothing a worker runs imports this package (a structure test checks it): inference lives in
:mod:`fusion_engine.inference` and :mod:`fusion_engine.volume`.
"""
