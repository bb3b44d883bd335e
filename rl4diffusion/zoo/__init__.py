"""The embedded world: the shapes dataset, the tiny StableDiffusionPipeline and the judge.

Everything here runs offline on a CPU. ``shapes`` draws labelled images, ``judge`` scores them
(the ``shape_alignment`` reward and the embedded metrics' feature space), ``tiny`` loads the
shipped pipeline. ``train_judge`` and ``train_tiny`` reproduce the files in ``weights/``.
"""
