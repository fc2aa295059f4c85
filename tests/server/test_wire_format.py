"""Our compiled generate.v1 descriptors against LoRAX's wire format (shared/LORAX_WIRE.md, upstream a7394ba)."""

import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from lorax_server.pb import generate_pb2 as pb

WIRE = Path(__file__).resolve().parents[2].parent / "shared" / "LORAX_WIRE.md"
FIELD = re.compile(r"^- (\d+): (?:(optional|repeated) )?(\w+) `(\w+)`$")
ENUM_VALUE = re.compile(r"^- (\d+): `(\w+)`$")
RPC = re.compile(r"^- rpc `(\w+)\((\w+)\) returns \((\w+)\)`$")
SCALARS = {FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes",
           FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64",
           FieldDescriptor.TYPE_FLOAT: "float"}


def parse_wire(text: str):
    messages, enums, rpcs, current = {}, {}, [], None
    for line in text.splitlines():
        if line.startswith("### enum "):
            current = enums.setdefault(line.split()[-1], {})
        elif line.startswith("### "):
            current = messages.setdefault(line.split()[-1], {})
        elif m := RPC.match(line):
            rpcs.append(m.groups())
        elif (m := FIELD.match(line)) and current is not None:
            current[int(m.group(1))] = (m.group(2) or "", m.group(3), m.group(4))
        elif (m := ENUM_VALUE.match(line)) and current is not None:
            current[int(m.group(1))] = m.group(2)
    return messages, enums, rpcs


def describe(field):
    """(label, type, name) as the wire table writes them; proto3 `optional` is a synthetic one-field oneof."""
    if field.is_repeated:
        label = "repeated"
    else:
        oneof = field.containing_oneof
        label = "optional" if oneof is not None and oneof.name == f"_{field.name}" else ""
    kind = (field.message_type.name if field.message_type else field.enum_type.name if field.enum_type
            else SCALARS[field.type])
    return label, kind, field.name


@pytest.fixture(scope="module")
def wire():
    if not WIRE.exists():
        pytest.skip(f"{WIRE} is not beside this checkout")
    return parse_wire(WIRE.read_text())


def test_every_message_field_matches(wire):
    messages, _, _ = wire
    assert len(messages) >= 40
    for name, fields in messages.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        ours = {f.number: describe(f) for f in descriptor.fields}
        assert ours == fields, name


def test_every_enum_matches(wire):
    _, enums, _ = wire
    for name, values in enums.items():
        assert {v.number: v.name for v in pb.DESCRIPTOR.enum_types_by_name[name].values} == values


def test_every_rpc_matches(wire):
    _, _, rpcs = wire
    service = pb.DESCRIPTOR.services_by_name["LoraxService"]
    assert pb.DESCRIPTOR.package == "generate.v1"
    ours = [(m.name, m.input_type.name, m.output_type.name) for m in service.methods]
    assert sorted(ours) == sorted(rpcs) and len(rpcs) == 13
