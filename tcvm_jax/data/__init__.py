"""Input side: DMVR-format TFRecords, samplers, tf.data pipeline, synthetic dataset.

Nothing here imports the model; the pipeline yields dicts of NumPy arrays.
"""
