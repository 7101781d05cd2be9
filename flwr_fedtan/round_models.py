"""The models of a FedTAN round on the server: the global model going out with the round's
first exchange (:func:`begin_contents`), and the clients' returned models, checked and
weighed, aggregated by the wrapped strategy, merged with the pooled BatchNorm buffers.

No torch here. Used by :class:`~flwr_fedtan.FedTAN`'s ``configure_train`` and
``aggregate_train``; a client whose model fails a check is dropped in the round's ledger,
with the reason.
"""

from __future__ import annotations

import copy
from logging import WARNING
from typing import Any, Callable, Iterable, Optional, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .aggregation import aggregate_arrays, check_arrays, check_layout, check_magnitudes, nonfinite_culprit
from .errors import PayloadError
from .ordering import canonical_items, canonical_permutation
from .protocol.round_ledger import REASON_CHARS, TrainRound
from .protocol.exchange import unexpected

__all__ = ["CLIENT_WEIGHTS", "Contributions", "aggregate_finite", "aggregate_round", "aggregate_secure",
           "begin_contents", "brief", "canonical_replies", "check_models", "keep_shared_metrics", "secure_replies"]

CLIENT_WEIGHTS = ("synchronised", "reported")

Contributions = dict[int, tuple[dict[str, np.ndarray], float]]
"""Each client's checked model (its arrays as NumPy) and averaging weight, by node."""


def brief(text: str) -> str:
    """``text`` cut to a drop reason's length (it may quote a client's own text)."""
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "..."


def begin_contents(
    strategy: Strategy,
    messages: Iterable[Message],
    arrays: ArrayRecord,
    is_buffer: Callable[[str], bool],
    encode: Callable[[ArrayRecord, ConfigRecord], RecordDict],
) -> dict[int, RecordDict]:
    """The round's first FedTAN message for each node of the wrapped ``strategy``'s
    ``configure_train`` ``messages``: the model it sent with the global BatchNorm buffers
    of ``arrays`` put back, and its config, through ``encode``. A message that is not one
    model and at most one config, or that leaves out arrays, is refused naming the strategy."""
    buffers = {k: v for k, v in arrays.items() if is_buffer(k)}
    contents: dict[int, RecordDict] = {}
    for message in messages:
        node = message.metadata.dst_node_id
        array_records = list(message.content.array_records.values())
        config_records = list(message.content.config_records.values())
        if len(array_records) != 1 or len(config_records) > 1:
            raise ValueError(
                f"{type(strategy).__name__}.configure_train sent node {node} "
                f"{len(array_records)} ArrayRecords and {len(config_records)} ConfigRecords; FedTAN "
                "needs one ArrayRecord (the model) and at most one ConfigRecord"
            )
        sent = array_records[0]
        missing = [k for k in arrays.keys() if k not in sent and k not in buffers]
        if missing:
            raise ValueError(f"{type(strategy).__name__}.configure_train left out arrays {missing[:5]}")
        full = ArrayRecord({k: (buffers[k] if k in buffers else sent[k]) for k in arrays.keys()})
        contents[node] = encode(full, config_records[0] if config_records else ConfigRecord())
    return contents


def check_models(
    round_: TrainRound,
    replies: list[Message],
    *,
    weight_key: str,
    arrayrecord_key: str,
    is_buffer: Callable[[str], bool],
    max_growth: float,
    client_weight: str,
) -> tuple[Contributions, dict[int, Message]]:
    """The round's final models that pass the checks (keys, shapes, dtypes, NaN, negative
    running variance, magnitudes, weight), and for each the reply the wrapped strategy
    sees: its parameters (no buffers) and metrics with the checked weight. A client that
    fails is dropped in ``round_``'s ledger."""
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    contributions: Contributions = {}
    wrapped_replies: dict[int, Message] = {}
    for node, status in round_.statuses.items():
        try:
            check_layout(node, {k: v.shape for k, v in status.arrays.items()}, round_.reference)
            arrays = {k: v.numpy() for k, v in status.arrays.items()}
            check_arrays(node, arrays, status.metrics[weight_key], round_.reference)
            check_magnitudes(node, arrays, round_.reference, max_growth)
            weight = _weight(node, status.metrics[weight_key], round_, client_weight, weight_key)
            metrics = MetricRecord(dict(status.metrics))
            metrics[weight_key] = int(weight) if float(weight).is_integer() else float(weight)
            params = ArrayRecord({k: v for k, v in status.arrays.items() if not is_buffer(k)})
            content = RecordDict({arrayrecord_key: params, "metrics": metrics})
            # Flower's stubs omit the (content, metadata) form its Message accepts at runtime
            wrapped_replies[node] = Message(content=content, metadata=by_node[node].metadata)  # type: ignore[call-overload]
        except PayloadError as error:
            round_.ledger.drop(node, f"model left out of the average: {error}")
            continue
        except Exception as error:  # pylint: disable=broad-except
            round_.ledger.drop(node, f"model left out of the average: {unexpected(error)}")
            continue
        contributions[node] = (arrays, weight)
    # Canonical order (flwr_fedtan.ordering): the wrapped strategy adds the models up in an
    # order that does not depend on Flower's random node ids. Keyed by the parameters only,
    # so that the weights never depend on the BatchNorm buffers (training does not read them).
    contributions = dict(canonical_items(
        contributions, lambda c: ({k: v for k, v in c[0].items() if not is_buffer(k)}, c[1])))
    return contributions, {node: wrapped_replies[node] for node in contributions}


def canonical_replies(replies: Iterable[Message]) -> list[Message]:
    """``replies`` in canonical order (by a digest of their content, not by node id or
    arrival), for the wrapped strategy's aggregation of evaluation replies."""
    replies = list(replies)
    return [replies[i] for i in canonical_permutation([_reply_parts(reply) for reply in replies])]


def _reply_parts(message: Message) -> list:
    if message.has_error():
        return ["error", message.error.code, message.error.reason]
    parts: list = []
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            parts.append((name, {key: array.numpy() for key, array in record.items()}))
        else:
            parts.append((name, dict(record)))
    return parts


def _weight(node: int, reported: Any, round_: TrainRound, client_weight: str, weight_key: str) -> float:
    if client_weight == "reported" or not round_.saw_forward:
        return float(reported)
    synchronised = round_.synchronised.get(node, 0)
    if float(reported) != float(synchronised):
        raise PayloadError(
            node,
            f"reports '{weight_key}' = {reported} but synchronised with {synchronised} examples "
            "(its forward payloads); if your clients weigh by something else, use "
            "FedTAN(client_weight='reported')",
        )
    return float(synchronised)


def aggregate_finite(
    strategy: Strategy,
    server_round: int,
    round_: TrainRound,
    contributions: Contributions,
    wrapped_replies: dict[int, Message],
    is_buffer: Callable[[str], bool],
) -> tuple[Optional[ArrayRecord], Optional[MetricRecord], Optional[ArrayRecord]]:
    """The wrapped strategy's aggregate merged with the pooled buffers, checked finite
    before it becomes the global model. A non-finite result names the client with the
    largest values in the offending array: it is dropped (``contributions`` loses it)
    and the aggregation redone without it, the wrapped strategy's state (e.g. FedAdam's
    moments) restored first. ``(None, None, None)`` if nothing usable is left."""
    name = type(strategy).__name__
    while contributions:
        saved = _snapshot(strategy)
        try:
            replies = [wrapped_replies[n] for n in contributions]
            aggregated, metrics = strategy.aggregate_train(server_round, replies)
            if aggregated is None:
                log(WARNING, "Round %d: %s returned no arrays, global model kept", server_round, name)
                return None, None, None
            merged = _merge(name, aggregated, round_.reference, _pooled_buffers(contributions, round_.reference,
                                                                                is_buffer))
        except Exception as error:  # pylint: disable=broad-except
            _restore_snapshot(strategy, saved)
            log(WARNING, "Round %d: %s.aggregate_train failed (%s: %s), global model kept", server_round,
                name, type(error).__name__, brief(str(error)))
            return None, None, None
        bad = nonfinite_culprit({k: v.numpy() for k, v in merged.items()}, contributions)
        if bad is None:
            return aggregated, metrics, merged
        _restore_snapshot(strategy, saved)
        array, node = bad
        if node is None:
            log(WARNING, "Round %d: %s aggregated %s to NaN or Inf, global model kept", server_round, name, array)
            return None, None, None
        round_.ledger.drop(node, f"model left out of the average: with it the aggregated {array} holds "
                                 "NaN or Inf (its values there are the largest)")
        del contributions[node]
    return None, None, None


def _pooled_buffers(contributions: Contributions, reference: dict[str, np.ndarray],
                    is_buffer: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The BatchNorm buffers pooled over ``contributions``."""
    buffer_keys = [k for k in reference if is_buffer(k)]
    if not buffer_keys:
        return {}
    subset = {n: ({k: a[k] for k in buffer_keys}, w) for n, (a, w) in contributions.items()}
    return aggregate_arrays(subset, {k: reference[k] for k in buffer_keys})


def _merge(
    name: str,
    aggregated: ArrayRecord,
    reference: dict[str, np.ndarray],
    buffers: dict[str, np.ndarray],
) -> ArrayRecord:
    """The global model: the pooled ``buffers``, the rest from the wrapped strategy's
    (``name``) ``aggregated``, in the global model's dtypes."""
    merged = ArrayRecord()
    for key, ref in reference.items():
        if key in buffers:
            merged[key] = Array(buffers[key])
            continue
        if key not in aggregated:
            raise ValueError(f"{name}.aggregate_train returned no array {key!r}")
        value = np.asarray(aggregated[key].numpy())
        if value.shape != ref.shape:
            raise ValueError(f"{name}.aggregate_train returned {key!r} with shape {value.shape}, expected {ref.shape}")
        if ref.dtype.kind in "iub" and value.dtype.kind == "f":
            value = np.rint(value)
        # Server optimisers compute in float64; the global model keeps its dtypes.
        merged[key] = Array(np.ascontiguousarray(value, dtype=ref.dtype))
    return merged


def secure_replies(round_: TrainRound, replies: list[Message], *, weight_key: str, arrayrecord_key: str,
                   is_buffer: Callable[[str], bool]) -> list[Message]:
    """Secure models: what the wrapped strategy sees instead of the clients' models. For each
    of the ``K`` clients one reply holding the released average's parameters, the weight
    ``W / K`` and the clients' metrics averaged by their weights: a weighted average of them
    is the average, and client-side DP (which wants one reply per sampled client, of equal
    weights) sees the count it expects. No reply holds any one client's model."""
    average = round_.secure_average
    assert average is not None  # the driver released it before returning the replies
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    nodes = sorted(round_.statuses)
    own = {n: Message(content=RecordDict({"metrics": MetricRecord(dict(round_.statuses[n].metrics))}),  # type: ignore[call-overload]
                      metadata=by_node[n].metadata) for n in nodes}
    keep_shared_metrics(round_.server_round, own, weight_key)
    records = {n: own[n].content.metric_records["metrics"] for n in nodes}
    weights = {n: float(cast(float, records[n][weight_key])) for n in nodes}
    pooled: dict[str, Any] = {}
    for key in records[nodes[0]].keys():
        values = [np.asarray(records[n][key], dtype=np.float64) * weights[n] for n in nodes]
        mean = np.sum(values, axis=0) / average.total_weight
        pooled[key] = mean.tolist() if mean.ndim else float(mean)
    pooled[weight_key] = average.total_weight / len(nodes)
    params = ArrayRecord({k: Array(average.arrays[k]) for k in round_.reference if not is_buffer(k)})
    return [Message(content=RecordDict({arrayrecord_key: params, "metrics": MetricRecord(pooled)}),  # type: ignore[call-overload]
                    metadata=by_node[n].metadata) for n in nodes]


def aggregate_round(
    strategy: Strategy, server_round: int, round_: TrainRound, replies: list[Message], *, weight_key: str,
    arrayrecord_key: str, is_buffer: Callable[[str], bool], max_growth: float, client_weight: str,
) -> tuple[list[int], Optional[MetricRecord], Optional[ArrayRecord]]:
    """The round's clients that count, the wrapped strategy's metrics and the new global
    model (``None`` if the round has none): from the released secure average with secure
    models, else from the checked clear models (:func:`check_models`, :func:`aggregate_finite`)."""
    if round_.secure_average is not None:
        wrapped = secure_replies(round_, replies, weight_key=weight_key, arrayrecord_key=arrayrecord_key,
                                 is_buffer=is_buffer)
        merged, metrics = aggregate_secure(strategy, server_round, round_, wrapped, is_buffer)
        return sorted(round_.statuses), metrics, merged
    contributions, wrapped_replies = check_models(
        round_, replies, weight_key=weight_key, arrayrecord_key=arrayrecord_key, is_buffer=is_buffer,
        max_growth=max_growth, client_weight=client_weight,
    )
    keep_shared_metrics(server_round, wrapped_replies, weight_key)
    _, metrics, merged = aggregate_finite(strategy, server_round, round_, contributions, wrapped_replies, is_buffer)
    return list(contributions), metrics, merged


def aggregate_secure(strategy: Strategy, server_round: int, round_: TrainRound, replies: list[Message],
                     is_buffer: Callable[[str], bool]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
    """Secure models: the wrapped strategy's aggregate of ``replies`` (:func:`secure_replies`)
    merged with the released average's buffers; ``(None, None)`` (state restored, logged) if
    it fails or is not finite: no client can be named, the server holds their sum only."""
    average, name = round_.secure_average, type(strategy).__name__
    assert average is not None
    saved = _snapshot(strategy)
    try:
        aggregated, metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            log(WARNING, "Round %d: %s returned no arrays, global model kept", server_round, name)
            return None, None
        buffers = {k: v for k, v in average.arrays.items() if is_buffer(k)}
        merged = _merge(name, aggregated, round_.reference, buffers)
        if not all(np.isfinite(v.numpy()).all() for v in merged.values()):
            raise ValueError("the aggregate holds NaN or Inf")
    except Exception as error:  # pylint: disable=broad-except
        _restore_snapshot(strategy, saved)
        log(WARNING, "Round %d: %s.aggregate_train failed on the secure average (%s: %s), global model kept",
            server_round, name, type(error).__name__, brief(str(error)))
        return None, None
    return merged, metrics


def _snapshot(obj: Any) -> dict:
    """A deep copy of a strategy's data attributes (wrapped strategies included); the key
    ``None`` holds the names of all its attributes, to remove those added later."""
    saved: dict = {None: ("names", set(vars(obj)))}
    for name, value in vars(obj).items():
        if isinstance(value, Strategy):
            saved[name] = ("strategy", _snapshot(value))
        elif not callable(value):
            try:
                saved[name] = ("value", copy.deepcopy(value))
            except Exception:  # pylint: disable=broad-except  # a lock, a client handle: not state
                continue
    return saved


def _restore_snapshot(obj: Any, saved: dict) -> None:
    for name in set(vars(obj)) - saved[None][1]:
        delattr(obj, name)
    for name, (kind, value) in saved.items():
        if kind == "names":
            continue
        if kind == "strategy":
            _restore_snapshot(getattr(obj, name), value)
        else:
            setattr(obj, name, value)


def _metric_shape(value: Any) -> Optional[tuple]:
    """``("scalar",)`` or ``("list", n)`` for a finite number or list of numbers, else None."""
    def finite_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    if finite_number(value):
        return ("scalar",)
    if isinstance(value, list) and all(finite_number(v) for v in value):
        return ("list", len(value))
    return None


def keep_shared_metrics(server_round: int, replies: dict[int, Message], weight_key: str) -> None:
    """Leave in every client's metrics only the keys all clients report with finite values of
    the same shape: Flower's strategies refuse (raise on) replies whose metrics differ, so
    one client's extra, missing or non-finite metric would otherwise end the run."""
    if not replies:
        return
    records = {n: m.content.metric_records["metrics"] for n, m in replies.items()}
    shapes = [{k: _metric_shape(v) for k, v in r.items()} for r in records.values()]
    shared = {k for k, shape in shapes[0].items()
              if shape is not None and all(other.get(k) == shape for other in shapes[1:])}
    shared.add(weight_key)
    for node, record in records.items():
        left_out = sorted(k for k in record.keys() if k not in shared)
        if left_out:
            log(WARNING, "FedTAN round %d: node %s's metrics %s left out (not reported alike by every client)",
                server_round, node, brief(str(left_out)))
            for k in left_out:
                del record[k]
