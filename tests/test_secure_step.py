"""A synchronised step and an E=1 round with masked statistics (flwr_fedtan.secure), no Flower.

K in-process clients run the real SyncStep; every payload goes through client_encode and the
server's aggregate through server_decode, as over the wire. References: the same step with
clear aggregation, and centralised training on the concatenated batch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flwr_fedtan import aggregate_arrays, convert_batchnorm
from flwr_fedtan.reference import drive_steps
from flwr_fedtan.secure import KeyPair, Roster, client_encode, server_decode
from flwr_fedtan.errors import MissingPayloadError

from tests._models import (
    single_thread,  # noqa: F401 (autouse fixture)
    MODELS,
    build,
    centralised_step,
    disable_dropout,
    grad_vector,
    make_batches,
    make_steps,
    rel_err,
)

SIZES = [7, 16, 33, 5]
NODE_IDS = [310, 12, 77, 5001]


def keys_and_roster(nodes=NODE_IDS, seed=0):
    rng = np.random.default_rng(seed)
    keys = {n: KeyPair.from_private(rng.bytes(32)) for n in nodes}
    return keys, Roster.from_keys({n: k.public for n, k in keys.items()})


def drive_secure(steps, nodes, keys, roster, round=1, attempt=0, fail_at=None):
    """Lockstep driver whose server only ever sees masked payloads; returns the exchanges.

    ``fail_at=(exchange, node)``: that node's payload never arrives at that exchange."""
    requests = {n: step.start() for n, step in zip(nodes, steps)}
    exchange = 0
    try:
        while all(r is not None for r in requests.values()):
            point = requests[nodes[0]][0]
            where = f"{point.phase} sync point {point.index} (BatchNorm call {point.call})"
            payloads = {
                n: client_encode(payload, node_id=n, private_key=keys[n].private, roster=roster, round=round,
                                 attempt=attempt, exchange=exchange, where=where)
                for n, (_, payload) in requests.items()
                if fail_at != (exchange, n)
            }
            aggregate = server_decode(payloads, roster, where=where)
            requests = {n: steps[i].resume(aggregate) for i, n in enumerate(nodes)}
            exchange += 1
        assert all(r is None for r in requests.values())
        return exchange
    finally:
        for step in steps:
            step.close()


@pytest.mark.parametrize("name", ["resnet20", "twice-bn"])
def test_secure_step_gradients_equal_clear_within_1e_6_float32(name):
    central = disable_dropout(build(name, torch.float32))
    batches = make_batches(name, SIZES, torch.float32)
    clear_models = [convert_batchnorm(copy.deepcopy(central)) for _ in SIZES]
    secure_models = [convert_batchnorm(copy.deepcopy(central)) for _ in SIZES]
    drive_steps(make_steps(clear_models, batches))
    keys, roster = keys_and_roster()
    exchanges = drive_secure(make_steps(secure_models, batches), NODE_IDS, keys, roster)
    assert exchanges == 2 * MODELS[name][3]  # one forward and one backward exchange per BatchNorm call

    secure_grad, clear_grad = grad_vector(secure_models), grad_vector(clear_models)
    assert rel_err(secure_grad, clear_grad) <= 1e-6
    centralised_step(central, batches)
    central_grad = torch.cat([p.grad.detach().double().flatten() for p in central.parameters()])
    assert rel_err(secure_grad, central_grad) <= 1e-4  # float32 centralised vs federated, as for clear
    for secure_model, clear_model in zip(secure_models, clear_models):
        for (key, a), b in zip(secure_model.state_dict().items(), clear_model.state_dict().values()):
            assert rel_err(a, b) <= 1e-6, key


def test_secure_round_e1_equals_centralised_sgd_float64():
    central = disable_dropout(build("resnet20", torch.float64))
    batches = make_batches("resnet20", SIZES, torch.float64)
    models = [convert_batchnorm(copy.deepcopy(central)) for _ in SIZES]
    keys, roster = keys_and_roster(seed=3)
    drive_secure(make_steps(models, batches), NODE_IDS, keys, roster, round=2)
    lr, total = 0.1, sum(SIZES)
    contributions = {}
    for node, model, n in zip(NODE_IDS, models, SIZES):
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad * (total / n)
        contributions[node] = ({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, n)
    result = aggregate_arrays(contributions)

    centralised_step(central, batches)
    with torch.no_grad():
        for p in central.parameters():
            p -= lr * p.grad
    for key, value in central.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(result[key]) == int(value), key
        else:
            assert rel_err(torch.from_numpy(result[key]), value) <= 1e-10, key


def test_dropout_mid_step_then_restart_with_survivors_equals_centralised_on_their_batches():
    central = disable_dropout(build("vgg", torch.float64))
    batches = make_batches("vgg", SIZES, torch.float64)
    keys, roster = keys_and_roster(seed=5)
    models = [convert_batchnorm(copy.deepcopy(central)) for _ in SIZES]
    with pytest.raises(MissingPayloadError, match=r"backward sync point .*no payload from nodes \[77\]"):
        drive_secure(make_steps(models, batches), NODE_IDS, keys, roster, fail_at=(5, 77))

    survivors = [n for n in NODE_IDS if n != 77]
    # fresh batches for the restart (the strategy derives them from the attempt number)
    fresh = make_batches("vgg", [SIZES[NODE_IDS.index(n)] for n in survivors], torch.float64, seed=9)
    keep = {n: keys[n] for n in survivors}
    roster_1 = Roster.from_keys({n: k.public for n, k in keep.items()})
    models = [convert_batchnorm(copy.deepcopy(central)) for _ in survivors]
    drive_secure(make_steps(models, fresh), survivors, keep, roster_1, attempt=1)
    centralised_step(central, fresh)
    central_grad = torch.cat([p.grad.detach().flatten() for p in central.parameters()])
    assert rel_err(grad_vector(models), central_grad) <= 1e-10
