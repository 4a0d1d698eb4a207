"""Every tensor of a result owns its storage: torch.save works, none keeps the others alive.

The model is what users have: a network with BatchNorm (float32 weights and
running statistics, an int64 ``num_batches_tracked``), plus float16, bfloat16
and float64 extras and a bool mask. Tensors that viewed one shared buffer as
different dtypes made ``torch.save`` raise "Cannot save multiple tensors or
storages that view the same data as different types"; these tests save and
load what :func:`decode_result` returns, straight from a decoded total and
after whole in-memory rounds (the whole-model round of ``memnet`` and the
segmented round that ``Peer`` runs).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_secagg.encoding import decode_result, decode_total, encode
from lightning_secagg.schema import Schema
from tests.unit.memnet import MemNet, make_round, results
from tests.unit.test_segmented_round import make_segmented, run_checked

pytestmark = pytest.mark.timeout(60)

StateDict = dict[str, torch.Tensor]


def batchnorm_state(seed: int) -> StateDict:
    """A small conv net with BatchNorm, trained one step, plus extras of every float width."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    model.train()
    model(torch.randn(5, 1, 6, 6))  # moves the running statistics and the counter
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd["extra.half"] = torch.randn(7, generator=gen).to(torch.float16)
    sd["extra.bf16"] = torch.randn(2, 3, generator=gen).to(torch.bfloat16)
    sd["extra.double"] = torch.randn(5, generator=gen, dtype=torch.float64)
    sd["extra.mask"] = torch.rand(3, generator=gen) > 0.5
    sd["extra.scalar"] = torch.tensor(seed + 0.5, dtype=torch.float16)
    sd["extra.empty"] = torch.zeros(0, 4)
    return sd


def test_the_model_mixes_dtypes():
    sd = batchnorm_state(0)
    assert sd["1.num_batches_tracked"].dtype == torch.int64
    assert sd["1.num_batches_tracked"].item() == 1
    dtypes = {t.dtype for t in sd.values()}
    assert {torch.float32, torch.int64, torch.float16, torch.bfloat16, torch.float64} <= dtypes


def assert_owned_and_saveable(result: StateDict, schema: Schema) -> None:
    """Own storages of exactly their size, distinct, and a save/load round trip is exact."""
    assert list(result) == [s.name for s in schema.tensors]
    ptrs = set()
    for spec in schema.tensors:
        t = result[spec.name]
        assert tuple(t.shape) == spec.shape and t.is_contiguous()
        storage = t.untyped_storage()
        assert storage.nbytes() == spec.nbytes == t.numel() * t.element_size(), spec.name
        assert t.storage_offset() == 0
        if spec.nbytes:
            ptrs.add(storage.data_ptr())
    assert len(ptrs) == sum(1 for s in schema.tensors if s.nbytes)  # no two share a storage
    blob = io.BytesIO()
    torch.save(result, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=True)
    assert list(loaded) == list(result)
    for name, t in result.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name


def test_decode_result_gives_saveable_tensors():
    sds = [batchnorm_state(i) for i in range(3)]
    schema = Schema.of(sds[0])
    vectors = [encode(sd, schema, 1 / 3) for sd in sds]
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)
    buffer = decode_total(total, schema)
    result = decode_result(buffer, schema)
    assert_owned_and_saveable(result, schema)
    assert result["1.num_batches_tracked"].item() == 1
    # The buffer is free to go: the tensors hold copies, not views.
    before = {k: v.clone() for k, v in result.items()}
    buffer[:] = 0xFF
    for name, t in result.items():
        assert torch.equal(t, before[name]), name


def test_one_tensor_does_not_keep_the_buffer_alive():
    sd = batchnorm_state(1)
    schema = Schema.of(sd)
    result = decode_result(decode_total(encode(sd, schema, 1.0), schema), schema)
    small = result["1.num_batches_tracked"]
    del result
    # Its storage is its own 8 bytes, not the model's result buffer.
    assert small.untyped_storage().nbytes() == 8
    assert schema.result_nbytes > 1000


def test_a_whole_model_in_memory_round_gives_saveable_tensors():
    sds = [batchnorm_state(i) for i in range(6)]
    setup = make_round(6, state_dicts=sds, weights=[1.0, 2.0, 3.0, 1.0, 1.0, 2.0], seed=4)
    net = MemNet(setup.peers, random.Random(5), wire=True)
    net.start()
    net.run()
    outs = results(setup)
    for out in outs:
        assert_owned_and_saveable(out, setup.schema)
    for name in outs[0]:  # bitwise identical everywhere
        assert all(torch.equal(o[name], outs[0][name]) for o in outs), name


def test_a_segmented_round_gives_saveable_tensors():
    sds = [batchnorm_state(i) for i in range(6)]
    # Segments of 50 elements: tensors are cut across segments, as in real rounds.
    setup = make_segmented(6, window=2, seg=50, seed=8, state_dicts=sds)
    assert len(setup.bounds) > 3
    net = MemNet(setup.peers, random.Random(9), wire=True)  # type: ignore[arg-type]
    net.start()
    run_checked(net, setup)
    outs = []
    for pid in setup.ids:
        buffer = setup.peers[pid].result
        assert buffer is not None
        outs.append(decode_result(buffer, setup.schema))
    for out in outs:
        assert_owned_and_saveable(out, setup.schema)
    for name in outs[0]:
        assert all(torch.equal(o[name], outs[0][name]) for o in outs), name
