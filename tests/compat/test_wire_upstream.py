"""No shard needed: (1) this project's generated stubs (lorax_server/pb) against upstream's proto/generate.proto
(a verbatim copy in tests/compat/upstream_generate.proto): the router emulation speaks through those stubs, so a
field number or type that differs from upstream would go unnoticed by the scenario modules; (2) the launcher's
`download-weights` step (launcher/src/main.rs:1166-1260), which must exit 0 before the launcher starts any shard."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from lorax_server.pb import generate_pb2 as pb
from tests.compat.launcher import MODEL_DIR, download_env, download_weights_argv

UPSTREAM_PROTO = Path(__file__).with_name("upstream_generate.proto")

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double", FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64", FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32", FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes", FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_SFIXED32:
    "sfixed32", FieldDescriptor.TYPE_SFIXED64: "sfixed64", FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


def _blocks(text: str, keyword: str):
    """Top-level `keyword Name { ... }` blocks (brace matched)."""
    for m in re.finditer(rf"\b{keyword}\s+(\w+)\s*\{{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield m.group(1), text[m.end():i - 1]


def parse_upstream():
    text = re.sub(r"//[^\n]*", "", UPSTREAM_PROTO.read_text())
    messages, enums = {}, {}
    for name, body in _blocks(text, "enum"):
        enums[name] = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)\s*;", body)}
    for name, body in _blocks(text, "message"):
        fields = {}
        for oneof, obody in _blocks(body, "oneof"):
            for ftype, fname, num in re.findall(r"(\w+)\s+(\w+)\s*=\s*(\d+)\s*;", obody):
                fields[fname] = (int(num), "oneof:" + oneof, ftype)
            body = body.replace(obody, "")
        for label, ftype, fname, num in re.findall(r"(repeated\s+|optional\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;",
                                                   body):
            fields.setdefault(fname, (int(num), label.strip() or "singular", ftype))
        messages[name] = fields
    (service_name, sbody), = list(_blocks(text, "service"))
    rpcs = {m: (i, o) for m, i, o in re.findall(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(\w+)\s*\)", sbody)}
    package = re.search(r"package\s+([\w.]+)\s*;", text).group(1)
    return package, service_name, messages, enums, rpcs


def describe_ours():
    messages = {}
    for name, desc in pb.DESCRIPTOR.message_types_by_name.items():
        fields = {}
        for f in desc.fields:
            if f.containing_oneof is not None and not f.containing_oneof.name.startswith("_"):
                label = "oneof:" + f.containing_oneof.name
            elif f.is_repeated:
                label = "repeated"
            elif f.containing_oneof is not None:
                label = "optional"  # proto3 `optional`: a synthetic oneof named `_<field>`
            else:
                label = "singular"
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                ftype = f.message_type.name
            elif f.type == FieldDescriptor.TYPE_ENUM:
                ftype = f.enum_type.name
            else:
                ftype = _SCALARS[f.type]
            fields[f.name] = (f.number, label, ftype)
        messages[name] = fields
    enums = {name: {v.name: v.number for v in e.values} for name, e in pb.DESCRIPTOR.enum_types_by_name.items()}
    return messages, enums


def test_stubs_match_upstream_generate_proto():
    package, service_name, up_messages, up_enums, up_rpcs = parse_upstream()
    assert pb.DESCRIPTOR.package == package
    messages, enums = describe_ours()
    problems = []
    for name, fields in up_messages.items():
        ours = messages.get(name)
        if ours is None:
            problems.append(f"message {name} missing")
            continue
        for fname, (num, label, ftype) in fields.items():
            mine = ours.get(fname)
            # upstream `optional` on a message field is only presence, which every proto3 message field has
            if mine != (num, label, ftype) and not (label == "optional" and mine == (num, "singular", ftype)
                                                    and ftype in up_messages):
                problems.append(f"{name}.{fname}: upstream {(num, label, ftype)}, ours {mine}")
        for fname in set(ours) - set(fields):
            problems.append(f"{name}.{fname}: not in upstream ({ours[fname]})")
    for name, values in up_enums.items():
        if enums.get(name) != values:
            problems.append(f"enum {name}: upstream {values}, ours {enums.get(name)}")
    service = pb.DESCRIPTOR.services_by_name.get(service_name)
    assert service is not None, f"service {service_name} missing"
    ours_rpcs = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    if ours_rpcs != up_rpcs:
        problems.append(f"rpcs: upstream {up_rpcs}, ours {ours_rpcs}")
    assert not problems, "\n".join(problems)


def test_launcher_download_weights_exits_0(tmp_path):
    """launcher/src/main.rs:1166-1260: `lorax-server download-weights MODEL_ID --extension .safetensors
    --logger-level INFO --json-output --source hub --adapter-source hub` runs before any shard; the launcher stops
    unless it exits 0 (the weights are already local here)."""
    env = download_env()
    proc = subprocess.run([sys.executable, "-m", "lorax_server.cli"] + download_weights_argv(MODEL_DIR), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
