"""What a compiled XLA program does per step, read from its optimised HLO text.

`Compiled.cost_analysis()` counts a while loop's body once, whatever its trip count, so a step whose
24 blocks run as one `lax.scan` would report the FLOPs of a single block. This module walks the
program's call graph from ENTRY, multiplies each computation by the trip counts of the loops around
it (the count XLA:CPU/GPU annotate on the loop, else read from the loop conditions JAX's scans compile
to: `counter < N`), and sums

  * matmul FLOPs of every `dot` and `convolution` (2 x output elements x contracted size): the work
    the chip's matrix units really execute, rematerialised recomputation included;
  * the bytes of every collective by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
    collective-permute): the data buffer of the op (the gathered result, the scattered operand,
    the reduced array), with the size of its replica groups so a ring traffic model can be applied.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
    "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type text, e.g. "bf16[8,512]{1,0}" or a tuple "(f32[..], ...)"
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class CollectiveStats:
    count: int = 0
    bytes: float = 0.0  # data buffer bytes per step per device
    traffic: float = 0.0  # ring-model bytes each device sends per step


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO type text (a tuple sums its elements)."""
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(shape))


def _dims(shape: str) -> list[int]:
    match = _SHAPE.search(shape)
    return [int(d) for d in match[2].split(",") if d] if match else []


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """{computation name: instructions} of an HLO module text, and the ENTRY computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = header[2]
            computations[current] = []
            if header[1]:
                entry = current
            continue
        if line.rstrip() == "}":  # (an instruction's attributes may span lines that start with "}")
            current = None
            continue
        if current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                computations[current].append(Instruction(*match.groups()))
    return computations, entry


def _constant(inst: Instruction | None) -> int | None:
    match = re.match(r"(-?\d+)\)", inst.rest) if inst is not None and inst.opcode == "constant" else None
    return int(match[1]) if match else None


def _trip_count(condition: list[Instruction], body: list[Instruction]) -> int | None:
    """Iterations of a loop whose condition is `counter < N`, the counter starting at 0 and stepping by the
    constant the body adds to it (1 for JAX's scans; 2 where XLA's windowed einsum does two chunks per
    iteration); None when the loop has another form."""
    constants = [c for c in map(_constant, condition) if c is not None]
    compares = [i for i in condition if i.opcode == "compare"]
    if len(constants) != 1 or len(compares) != 1 or "direction=LT" not in compares[0].rest:
        return None
    step = 1
    counter = next((i for i in condition if i.opcode == "get-tuple-element"), None)
    index = re.search(r"index=(\d+)", counter.rest) if counter else None
    root = next((i for i in reversed(body) if i.opcode == "tuple"), None)
    if index and root:
        operands = re.findall(r"%([\w.\-]+)", root.rest.split(")")[0])
        by_name = {i.name: i for i in body}
        update = by_name.get(operands[int(index[1])]) if int(index[1]) < len(operands) else None
        if update is not None and update.opcode == "add":
            steps = [_constant(by_name.get(n)) for n in re.findall(r"%([\w.\-]+)", update.rest.split(")")[0])]
            step = next((c for c in steps if c), 1)
    return -(-constants[0] // step)


def multiplicities(computations: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, int], int]:
    """How many times each computation runs per execution of ENTRY, and the number of loops whose trip
    count could not be read (counted once)."""
    times: dict[str, int] = collections.defaultdict(int)
    unknown = 0

    def visit(name: str, factor: int) -> None:
        nonlocal unknown
        times[name] += factor
        for inst in computations.get(name, ()):
            for group in _CALLEES.findall(inst.rest):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee not in computations:
                        continue
                    inner = factor
                    if inst.opcode == "while" and re.search(rf"body=%?{re.escape(callee)}\b", inst.rest):
                        # CPU and GPU annotate the count (their conditions wrap the compare in a fusion).
                        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest)
                        cond = re.search(r"condition=%?([\w.\-]+)", inst.rest)
                        if known:
                            trips: int | None = int(known[1])
                        else:
                            trips = _trip_count(computations.get(cond[1], []), computations[callee]) if cond else None
                        unknown += trips is None
                        inner = factor * (trips or 1)
                    visit(callee, inner)

    visit(entry, 1)
    return dict(times), unknown


def _group_size(rest: str, num_devices: int) -> int:
    """Devices in each replica group of a collective (all of them when the groups are not stated)."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if named:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", named[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named[2])) or 1
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if iota:
        return int(iota[2])
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if listed:
        return len([d for d in listed[1].split(",") if d])
    return num_devices


def _matmul_flops(inst: Instruction, shapes: dict[str, str]) -> float:
    out = math.prod(_dims(inst.shape))
    operands = re.findall(r"%([\w.\-]+)", inst.rest.split(")")[0])
    lhs = _dims(shapes.get(operands[0], "")) if operands else []
    if not lhs:
        return 0.0
    if inst.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.rest)
        dims = [int(d) for d in contracting[1].split(",") if d] if contracting else []
        return 2.0 * out * math.prod(lhs[d] for d in dims)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.rest)
    if not labels or "f" not in labels[1]:
        return 0.0
    groups = re.search(r"feature_group_count=(\d+)", inst.rest)
    features = lhs[labels[1].index("f")] // (int(groups[1]) if groups else 1)
    spatial = [lhs[labels[1].index(str(d))] for d in range(sum(c.isdigit() for c in labels[1]))]
    return 2.0 * out * features * _window_taps(inst.rest, spatial)


def _window_taps(rest: str, spatial: list[int]) -> int:
    """Kernel positions that meet real input per output element. TPU writes batched matmuls as
    convolutions whose batch dims are windows: over a dilated input (size 38, lhs_dilate 38) or over a
    padded size-1 input (size 16, pad 15_15): one tap each. So a window dim counts at most
    ceil(size / lhs_dilate) taps, and never more than the input's extent in that dim."""
    window = re.search(r"window=\{([^}]*)\}", rest)
    sizes = re.search(r"size=([\dx]+)", window[1]) if window else None
    if not sizes:
        return 1
    size = [int(v) for v in sizes[1].split("x")]
    dilation = re.search(r"lhs_dilate=([\dx]+)", window[1])
    lhs_dilate = [int(v) for v in dilation[1].split("x")] if dilation else [1] * len(size)
    extent = spatial if len(spatial) == len(size) else [max(size)] * len(size)
    return math.prod(min(-(-s // d), e) for s, d, e in zip(size, lhs_dilate, extent))


@dataclasses.dataclass
class ProgramStats:
    matmul_flops: float
    collectives: dict[str, CollectiveStats]
    unknown_trip_counts: int


def analyse(text: str, num_devices: int) -> ProgramStats:
    """Per-device matmul FLOPs and collective bytes of one execution of a compiled SPMD program."""
    computations, entry = parse_computations(text)
    times, unknown = multiplicities(computations, entry)
    flops = 0.0
    stats = {kind: CollectiveStats() for kind in COLLECTIVES}
    for name, instructions in computations.items():
        factor = times.get(name, 0)
        if not factor:
            continue
        shapes = {inst.name: inst.shape for inst in instructions}
        for inst in instructions:
            if inst.opcode in ("dot", "convolution"):
                flops += factor * _matmul_flops(inst, shapes)
                continue
            kind = inst.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or inst.opcode.endswith("-done"):
                continue
            size = max((shape_bytes(f"{dt}[{dims}]") for dt, dims in _SHAPE.findall(inst.shape)), default=0.0)
            n = _group_size(inst.rest, num_devices)
            if kind == "reduce-scatter":
                size *= n  # the result is one shard of the reduced operand
            share = (n - 1) / n if n > 1 else 0.0
            traffic = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share) * size
            s = stats[kind]
            s.count += factor
            s.bytes += factor * size
            s.traffic += factor * traffic
    return ProgramStats(flops, stats, unknown)
