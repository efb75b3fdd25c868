"""Code shared by the driver and the engines: the engine protocol and its message types, the run layout,
the engine PEX names, the lockfile reader, seed derivation and the Countdown task.

Everything here must import in both the `driver` and the `engine` resolves, so it may use only the
standard library and numpy.
"""
