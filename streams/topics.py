"""Topic declarations: names come from settings; partitioning is always by customer_id."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    # Notifications and dead letters are keyed by customer too, so a consumer sees one
    # customer's messages in order.
    key: str = "customer_id"


def declared_topics(
    purchases: str, notifications: str, dead_letter: str, partitions: int
) -> tuple[TopicSpec, ...]:
    return (
        TopicSpec(purchases, partitions),
        TopicSpec(notifications, partitions),
        TopicSpec(dead_letter, partitions),
    )
