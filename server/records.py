"""A reply Message → the core's :class:`~fed_deq.rounds.Reply`, whatever the client put in it."""

from __future__ import annotations

from flwr.app import Message

from fed_deq.rounds import Reply
from wire.records import from_array_record


def to_reply(message: Message, partitions: dict[int, int], sent_to: dict[str, int] | None = None) -> Reply:
    """A reply Message → :class:`Reply`; malformed content becomes an empty reply that screening rejects.

    ``sent_to`` maps the ids of the messages we sent to their destination nodes: an error reply for a node
    that died comes from the SuperLink itself, so only the message it answers tells whose it is.
    """
    node_id = (sent_to or {}).get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
    partition_id = partitions.get(node_id)
    if message.has_error():
        return Reply(node_id=node_id, partition_id=partition_id, error=str(message.error.reason))
    try:
        arrays = from_array_record(message.content["arrays"])
        metrics = {k: _number(k, v) for k, v in message.content["metrics"].items()}
    except Exception as exc:  # noqa: BLE001 - a malformed payload is the client's fault, never the run's
        return Reply(node_id=node_id, partition_id=partition_id, problem=f"unreadable reply: {exc}")
    return Reply(node_id=node_id, partition_id=partition_id, arrays=arrays, metrics=metrics)


def _number(name: str, value) -> float:
    """A metric as a float; lists and text are the client's mistake (named in the rejection)."""
    if isinstance(value, (bool, list, tuple, str, bytes)):
        raise ValueError(f"metric {name!r} is not a number")
    return float(value)
