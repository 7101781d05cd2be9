"""The app's ClientApp as Flower loads it: a light module that imports Flower only.

In deployment Flower imports this module in a fresh ``flwr-clientapp`` process for every
message; it forwards the message to the node worker (flwr_fedtan/runtime/worker.py),
which runs :data:`simulations.app.client_app.app` next to the node's live rounds. In the
simulation it calls :data:`simulations.app.client_app.app` in the actor's process.
``query.ping`` (the benchmarks' empty exchange) is answered here at once: Flower's own
floor for one exchange.
"""

from flwr.app import Context, Message, RecordDict

from flwr_fedtan.runtime import node_client_app


def ping(msg: Message, context: Context) -> Message:
    """An empty reply: the bare cost of one exchange (simulations/bench_*.py)."""
    return Message(RecordDict(), reply_to=msg)


app = node_client_app("simulations.app.client_app:app", local={"query.ping": ping})
