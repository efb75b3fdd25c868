"""Code shared by the driver and the engines: task definitions, message types and seed derivation.

Everything here must import in both the `driver` and the `engine` resolves, so it may use only the
standard library and numpy.
"""
