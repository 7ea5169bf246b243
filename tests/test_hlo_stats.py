"""parallel/hlo_stats.py: matmul FLOPs and collective bytes read from optimised HLO, loops times their trip counts.

A stack of L square layers `h = h @ w_i` on a deviceless TPU v5p:2x2x1 (4 chips, mesh fsdp=4): weights
sharded on their input dim, activations on rows. XLA:TPU all-gathers each layer's weight before its
forward matmul and again in the backward pass (the scan does not keep the gathered copy), and sums
each weight's gradient across the 4 chips.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from chexfound_jax.parallel import hlo_stats
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.parallel import topology as topology_lib

L, ROWS, D = 4, 2048, 128  # rows >> d, so gathering weights is the cheapest plan by far
DEVICES = 4
ROWS_PER_DEVICE = ROWS // DEVICES
BF16 = 2


def _loss_scanned(ws, x):
    h, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, ws)
    return jnp.sum(jnp.square(h.astype(jnp.float32)))  # not linear in h: no matmul is dead


def _loss_unrolled(ws, x):
    h = x
    for i in range(L):
        h = h @ ws[i]
    return jnp.sum(jnp.square(h.astype(jnp.float32)))


@pytest.fixture(scope="module")
def compiled():
    topo = topology_lib.get_topology("v5p:2x2x1")
    mesh = mesh_lib.create_mesh({"fsdp": DEVICES}, topo.devices)
    w_sharding, x_sharding = NamedSharding(mesh, P(None, "fsdp", None)), NamedSharding(mesh, P("fsdp", None))
    ws = jax.ShapeDtypeStruct((L, D, D), jnp.bfloat16, sharding=w_sharding)
    x = jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16, sharding=x_sharding)

    def build(loss):
        step = jax.jit(jax.grad(loss, argnums=(0, 1)), out_shardings=(w_sharding, x_sharding))
        return step.lower(ws, x).compile()

    return {"scanned": build(_loss_scanned), "unrolled": build(_loss_unrolled)}


def _cost_flops(c) -> float:
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_scan_matmul_flops_are_counted_per_iteration(compiled):
    # Per layer: forward h @ w, backward g @ w.T (dx) and h.T @ g (dw); each 2 x rows x d x d per device.
    hand = 3 * L * 2 * ROWS_PER_DEVICE * D * D
    scanned = hlo_stats.analyse(compiled["scanned"].as_text(), DEVICES)
    unrolled = hlo_stats.analyse(compiled["unrolled"].as_text(), DEVICES)
    assert scanned.matmul_flops == hand
    assert unrolled.matmul_flops == hand
    assert scanned.unknown_trip_counts == 0 and unrolled.unknown_trip_counts == 0
    # What analyse corrects: cost_analysis counts the scan's body once (about 1/L of the unrolled count).
    assert _cost_flops(compiled["scanned"]) < _cost_flops(compiled["unrolled"]) / 2
    assert _cost_flops(compiled["unrolled"]) >= hand


def test_scan_collective_bytes(compiled):
    stats = hlo_stats.analyse(compiled["scanned"].as_text(), DEVICES)
    gather = stats.collectives["all-gather"]
    # Each layer's bf16 weight gathered whole, once forward and once backward, inside the two loops.
    assert gather.count == 2 * L
    assert gather.bytes == 2 * L * D * D * BF16
    assert gather.traffic == gather.bytes * (DEVICES - 1) / DEVICES  # ring: receive the other 3/4
    # Each weight's gradient is summed over the 4 row shards once: an all-reduce, or a reduce-scatter
    # (counted at the size of the reduced operand).
    reduced = stats.collectives["all-reduce"].bytes + stats.collectives["reduce-scatter"].bytes
    assert reduced == L * D * D * BF16
    assert stats.collectives["collective-permute"].count == 0


def test_cpu_loops_count_their_annotated_trip_counts():
    # XLA:CPU wraps the loop condition's compare in a fusion and states the count on the while instead.
    ws = jax.ShapeDtypeStruct((L, D, D), jnp.float32)
    x = jax.ShapeDtypeStruct((ROWS_PER_DEVICE, D), jnp.float32)
    text = jax.jit(jax.grad(_loss_scanned, argnums=(0, 1))).lower(ws, x).compile().as_text()
    assert '"known_trip_count":{"n":"4"}' in text
    stats = hlo_stats.analyse(text, 1)
    assert stats.matmul_flops == 3 * L * 2 * ROWS_PER_DEVICE * D * D
    assert stats.unknown_trip_counts == 0


@pytest.mark.parametrize(
    "rest, size",
    [
        ("%x), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={1}", 4),
        ("%x), replica_groups=mesh['data'=2,'fsdp'=4,'tensor'=1] {'fsdp','tensor'}, to_apply=%add", 4),
        ("%x), replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}, dimensions={0}", 8),
        ("%x), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}", 4),
        ("%x), replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true", 2),
        ("%x), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),
        ("%x), replica_groups={{0,2},{1,3}}, to_apply=%add", 2),
        ("%x), channel_id=4, replica_groups={}, to_apply=%add", 8),  # none stated: all devices
        ("%x), channel_id=4, to_apply=%add", 8),
    ],
)
def test_group_size(rest, size):
    assert hlo_stats._group_size(rest, 8) == size


@pytest.mark.parametrize(
    "shape, nbytes",
    [
        ("f32[8,512]{1,0}", 8 * 512 * 4),
        ("bf16[2,3,4]{2,1,0:T(8,128)(2,1)}", 2 * 3 * 4 * 2),
        ("pred[16]{0}", 16),
        ("s32[]", 4),
        ("(bf16[4,16]{1,0}, f32[4]{0}, pred[])", 4 * 16 * 2 + 4 * 4 + 1),
        ("(s32[], bf16[1,128,128]{2,1,0}, /*index=2*/u8[10]{0})", 4 + 128 * 128 * 2 + 10),
        ("token[]", 0),
    ],
)
def test_shape_bytes(shape, nbytes):
    assert hlo_stats.shape_bytes(shape) == nbytes


WINDOWED_LOOP = """HloModule m
%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%body (q: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %q = (s32[], f32[8,16]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %x = f32[8,16] get-tuple-element(%q), index=1
  %w = f32[16,16] constant({...})
  %d = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%j, %two)
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %d)
}
ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]) tuple(%zero, %a)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16] get-tuple-element(%loop), index=1
}
"""


def test_loop_stepping_by_two_runs_half_its_bound():
    """XLA's windowed einsum loops do two chunks per iteration: `i < 4` stepping by 2 is 2 iterations."""
    stats = hlo_stats.analyse(WINDOWED_LOOP, num_devices=1)
    assert stats.unknown_trip_counts == 0
    assert stats.matmul_flops == 2 * (2 * 8 * 16 * 16)
    one_step = hlo_stats.analyse(WINDOWED_LOOP.replace("constant(2)", "constant(1)"), num_devices=1)
    assert one_step.matmul_flops == 4 * (2 * 8 * 16 * 16)
