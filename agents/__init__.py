"""Faust agents: I/O glue only. Business decisions live in rules/, orchestration in the engine."""
