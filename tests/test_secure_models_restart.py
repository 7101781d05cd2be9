"""FedTAN(secure_models=True): a failure between masking and unmasking restarts the final
exchange alone (fresh keys, then ``remask``), and a model canary that does not cancel is
traced to its client (``blame``).

References: each survivor's own final model, read from its node's state (what it trained,
independent of any masking), averaged in the clear by
:func:`~flwr_fedtan.aggregation.aggregate_arrays`; the messages each node received (no
retraining: one ``begin`` and one attempt's aggregates); the release rule of
:mod:`flwr_fedtan.secure.releases`.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp.strategy import FedAvg

from flwr_fedtan import FedTAN, fedtan_client_app
from flwr_fedtan.aggregation import aggregate_arrays
from flwr_fedtan.client import clear_live_rounds
from flwr_fedtan.errors import KeyAgreementError, ServerMessageError
from flwr_fedtan.node import state as node_state
from flwr_fedtan.protocol import wire
from flwr_fedtan.protocol.model_release import sorted_reference
from flwr_fedtan.secure import ServerSession
from flwr_fedtan.secure.models import MaskedModel, unmask_average
from flwr_fedtan.secure.releases import ReleaseLedger, revealed_clients

from _grid import LocalGrid
from _runtime_app import to_numpy
from test_node_session import _deliver
from test_secure_models_flower import initial_arrays, make_client, relative_diff

BAD = 1007
SURVIVORS = [1000, 1014]


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path))
    clear_live_rounds()
    yield
    clear_live_rounds()


class FinalFaultGrid(LocalGrid):
    """Node ``BAD``'s first masked model (its first ``done`` reply) goes wrong as ``fault``
    says; every message pushed is kept as ``(node, phase)``."""

    def __init__(self, *args, fault, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault, self.faulted, self.pushed = fault, False, []

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed.extend((m.metadata.dst_node_id, m.content.config_records[wire.CONTROL]["phase"])
                           for m in messages)
        ids = super().push_messages(messages)
        for msg, mid in zip(messages, ids):
            reply = self._replies.get(mid)
            if (msg.metadata.dst_node_id != BAD or self.faulted or reply is None or reply.has_error()
                    or reply.content.config_records[wire.STATUS]["phase"] != wire.PHASE_DONE):
                continue
            self.faulted = True
            arrays = reply.content.array_records[wire.ARRAYS]
            masked = arrays["masked"].numpy().copy()
            if self.fault == "silent":
                self._replies.pop(mid)
            elif self.fault == "error":
                error = Message(Error(code=1, reason="RuntimeError: the node crashed"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = BAD
                self._replies[mid] = error
            elif self.fault == "malformed":
                arrays["masked"] = Array(np.ascontiguousarray(masked[:, :-1]))
            elif self.fault == "weight":
                metrics = reply.content.metric_records[wire.METRICS]
                metrics["num-examples"] = float(metrics["num-examples"]) + 1.0
            elif self.fault == "canary":
                masked[0, -1] ^= np.uint64(1)
                arrays["masked"] = Array(masked)
            elif self.fault == "masks":  # the whole vector under other masks, canary included
                noise = np.random.default_rng(3).integers(0, 2**63, size=masked.shape, dtype=np.uint64)
                arrays["masked"] = Array(masked ^ noise)
            else:
                raise ValueError(self.fault)
        return ids

    def count(self, node: int, phase: str) -> int:
        return sum(1 for n, p in self.pushed if n == node and p == phase)


def run_round(fault: str, **grid_options):
    grid = FinalFaultGrid(fedtan_client_app(make_client), 3, {}, fault=fault, **grid_options)
    strategy = FedTAN(strategy=FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2),
                      statistics="running", exchange_timeout=0.5, secure_models=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert grid.faulted
    return grid, strategy, result


def kept_models(grid: LocalGrid, nodes) -> dict:
    """Each node's own final model of round 1 and its weight, from the node's state."""
    out = {}
    for node in nodes:
        final = node_state.load(grid.contexts[node]).final
        assert final is not None and final.round == 1
        out[node] = ({k: v.numpy() for k, v in final.arrays.items()}, float(final.metrics["num-examples"]))
    return out


def assert_only_the_final_exchange_restarted(grid: FinalFaultGrid) -> None:
    aggregates = grid.count(BAD, wire.PHASE_AGGREGATE)  # the bad node saw the one attempt's aggregates
    assert aggregates >= 1
    for node in SURVIVORS:
        assert grid.count(node, wire.PHASE_BEGIN) == 1  # no retraining
        assert grid.count(node, wire.PHASE_AGGREGATE) == aggregates
        assert grid.count(node, wire.PHASE_KEYS) == 2 and grid.count(node, wire.PHASE_REMASK) == 1
    assert grid.count(BAD, wire.PHASE_REMASK) == 0


def assert_survivors_average_released(grid: FinalFaultGrid, strategy: FedTAN, result) -> None:
    kept = kept_models(grid, [*SURVIVORS, BAD])
    expected = aggregate_arrays({n: kept[n] for n in SURVIVORS})
    released = to_numpy(result.arrays)
    assert relative_diff(released, expected) <= 1e-6
    with_bad = aggregate_arrays(kept)
    assert relative_diff(released, with_bad) > 1e-4  # the dropped client's model is not in it
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1 and metrics["fedtan-dropped"] == 1
    assert list(strategy.dropped[1]) == [BAD]


@pytest.mark.parametrize("fault, separate, reason", [
    ("silent", False, "no reply within"),
    ("error", True, "error reply: RuntimeError: the node crashed"),
    ("malformed", False, "masked model rejected"),
], ids=["timeout", "error-fresh-processes", "malformed"])
def test_a_client_failing_the_final_exchange_restarts_it_alone_and_the_survivors_average_is_released(
        fault, separate, reason):
    grid, strategy, result = run_round(fault, separate_processes=separate)
    assert reason in strategy.dropped[1][BAD]
    assert_only_the_final_exchange_restarted(grid)
    assert_survivors_average_released(grid, strategy, result)
    # the first roster was never complete: nothing the server could subtract
    assert [set(r) for r in strategy.driver.releases.computable(1)] == [set(SURVIVORS)]
    assert revealed_clients(strategy.driver.releases.computable(1)) == []


def test_a_survivors_sum_that_would_difference_out_the_dropped_client_is_never_asked_for(caplog):
    """All three masked models arrived (the sum was computable), then node 1007's weight is
    rejected: the survivors' sum would be its model, so no re-mask is sent and the round
    ends without a new model."""
    with caplog.at_level(logging.WARNING):
        grid, strategy, result = run_round("weight")
    assert "synchronised with" in strategy.dropped[1][BAD]
    assert [set(r) for r in strategy.driver.releases.computable(1)] == [{*SURVIVORS, BAD}]
    assert strategy.driver.releases.revealed_by(1, SURVIVORS) == [BAD]
    assert sum(1 for _, phase in grid.pushed if phase == wire.PHASE_REMASK) == 0
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1
    assert relative_diff(to_numpy(result.arrays), to_numpy(initial_arrays())) == 0.0
    assert "the final exchange is not restarted" in caplog.text and "would reveal the model of nodes [1007]" \
        in caplog.text


@pytest.mark.parametrize("fault", ["canary", "masks"])
def test_a_model_canary_that_does_not_cancel_is_blamed_on_its_client_and_the_others_released(fault):
    grid, strategy, result = run_round(fault)
    assert "canary did not cancel" in strategy.dropped[1][BAD]
    assert "not the sum of the pair masks it revealed" in strategy.dropped[1][BAD]
    assert all(grid.count(n, wire.PHASE_BLAME) == 1 for n in [*SURVIVORS, BAD])
    assert_only_the_final_exchange_restarted(grid)
    assert_survivors_average_released(grid, strategy, result)
    releases = strategy.driver.releases
    assert [set(r) for r in releases.computable(1)] == [{*SURVIVORS, BAD}, set(SURVIVORS)]
    assert [set(s) for s in releases.spoiled(1)] == [{BAD}, set()]


def test_spoiled_terms_protect_only_the_honest_clients():
    ledger = ReleaseLedger()
    ledger.record(1, [1, 2, 3])
    assert ledger.revealed_by(1, [1, 2]) == [3]  # an honest client 3 is protected
    ledger.spoil(1, [1, 2, 3], [3])
    assert ledger.revealed_by(1, [1, 2]) == []  # 3's payload was not its model masked: its own unknown
    ledger.record(1, [1, 2])
    assert ledger.revealed_by(1, [1]) == [1, 2]  # the honest clients stay covered
    with pytest.raises(ValueError, match="no recorded sum"):
        ledger.spoil(1, [2, 3], [3])


def _keys(app, context, round_no: int) -> bytes:
    reply = _deliver(app, wire.encode_keys(round_no, 1), context)
    return reply.content.array_records[wire.SECURE]["public-key"].numpy().tobytes()


def _fresh_roster(app, grid: LocalGrid, nodes, round_no: int = 1):
    session = ServerSession()
    session.new_round(round_no)
    for node in nodes:
        session.accept_public_key(node, _keys(app, grid.contexts[node], round_no))
    return session.roster(nodes)


def test_a_node_keeps_its_model_for_a_remask_and_refuses_one_that_would_reuse_masks():
    grid = LocalGrid(fedtan_client_app(make_client), 3, {})
    FedTAN(strategy=FedAvg(fraction_evaluate=0.0, min_available_nodes=3), statistics="running",
           secure_models=True).start(grid, initial_arrays(), num_rounds=1)
    app, node = fedtan_client_app(make_client), SURVIVORS[0]
    context = grid.contexts[node]
    kept = node_state.load(context)
    assert kept.final is not None and kept.final.round == 1 and kept.final.attempt == 0
    assert kept.round_key is not None and kept.round_key.model_masked and kept.weights is not None
    old_roster = kept.round_key.roster
    with pytest.raises(KeyAgreementError, match=f"node {node}: remask of round 1 without a fresh key exchange"):
        _deliver(app, wire.encode_remask(1, 1, 1, old_roster), context)
    with pytest.raises(ServerMessageError, match="holds no finished model of that round"):
        _deliver(app, wire.encode_remask(2, 1, 1, old_roster), context)
    roster = _fresh_roster(app, grid, SURVIVORS)
    replies = {n: _deliver(app, wire.encode_remask(1, 1, 1, roster), grid.contexts[n]) for n in SURVIVORS}
    # the two re-masked models unmask to their clear average: the same models, fresh masks
    reference = sorted_reference(to_numpy(initial_arrays()))
    length = next(iter(replies.values())).content.array_records[wire.ARRAYS]["masked"].numpy().shape[1]
    payloads = {n: MaskedModel.from_arrays(n, to_numpy(r.content.array_records[wire.ARRAYS]), length)
                for n, r in replies.items()}
    average = unmask_average(payloads, roster, reference)
    assert relative_diff(average.arrays, aggregate_arrays(kept_models(grid, SURVIVORS))) <= 1e-6
    assert node_state.load(context).final.attempt == 1
    with pytest.raises(KeyAgreementError, match="without a fresh key exchange"):  # the same key again
        _deliver(app, wire.encode_remask(1, 1, 2, roster), context)
    roster = _fresh_roster(app, grid, SURVIVORS)
    with pytest.raises(ServerMessageError, match="attempt 1, but this node's model was already masked for attempt 1"):
        _deliver(app, wire.encode_remask(1, 1, 1, roster), context)
    outsider = _fresh_roster(app, grid, [SURVIVORS[1], BAD])
    with pytest.raises(KeyAgreementError, match="roster that does not include this node"):
        _deliver(app, wire.encode_remask(1, 1, 3, outsider), context)
    # a node that never finished the round holds nothing to re-mask
    with pytest.raises(ServerMessageError, match="holds no finished model"):
        fresh = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        _deliver(app, wire.encode_remask(1, 1, 1, roster), fresh)
    # the next round's key exchange ends the kept round: model and starting weights are gone
    _keys(app, context, 2)
    after = node_state.load(context)
    assert after.final is None and after.weights is None and after.round_key is not None
    with pytest.raises(ServerMessageError, match="holds no finished model"):
        _deliver(app, wire.encode_remask(1, 1, 4, roster), context)


def test_a_model_blame_reveals_only_the_canary_of_the_model_the_node_sent():
    grid = LocalGrid(fedtan_client_app(make_client), 3, {})
    FedTAN(strategy=FedAvg(fraction_evaluate=0.0, min_available_nodes=3), statistics="running",
           secure_models=True).start(grid, initial_arrays(), num_rounds=1)
    app, node = fedtan_client_app(make_client), SURVIVORS[0]
    context = grid.contexts[node]
    final = node_state.load(context).final
    with pytest.raises(ServerMessageError, match="has length"):
        _deliver(app, wire.encode_blame(1, 1, -1, final.masked_length + 1, model=True), context)
    with pytest.raises(ServerMessageError, match="which this node has not sent"):
        _deliver(app, wire.encode_blame(2, 1, -1, final.masked_length, model=True), context)
    reply = _deliver(app, wire.encode_blame(1, 1, -1, final.masked_length, model=True), context)
    status = wire.decode_reply(reply.content, node, "num-examples")
    assert sorted(status.canary_masks) == sorted([SURVIVORS[1], BAD])  # one mask per peer, nothing else
