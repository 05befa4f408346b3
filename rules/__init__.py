"""The domain, pure and synchronous: no I/O, no clock, no faust/redis/prometheus imports.

Everything here is a function of its arguments; the engine passes `now`.
"""
