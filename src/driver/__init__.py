"""The ES driver: population seeds, rewards, updates and the Ray driver that runs the engines.

It runs from the driver resolve (Ray, numpy) and never imports `engine` or engine packages.
"""
