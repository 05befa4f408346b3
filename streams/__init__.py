"""What flows: event and notification contracts, topic names, bytes -> model | Rejection."""
