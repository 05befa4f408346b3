"""Redis state: key formats, Lua scripts, and an in-memory store with the same Protocol."""
