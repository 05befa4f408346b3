"""memberflow: wiring of the membership engine (settings, app, engine, CLI, embedded services)."""

__version__ = "0.1.0"
