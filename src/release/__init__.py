"""Release tools: the bundle of PEX files and its manifest, shipping it to hosts and verifying it there
(the stdlib-only installer), and pre-extracting the engine PEX on a node.

They run from the driver resolve; nothing in `driver` or `engine` imports them.
"""
