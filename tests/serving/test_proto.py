"""The checked-in generated code is the ``.proto``'s (``make proto`` regenerates it), and the dependency bounds
in pyproject.toml and the Makefile's pinned generator are the versions it was generated with."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import __version__ as protobuf_version
from google.protobuf.descriptor import FieldDescriptor

from serving.proto import ranking_pb2, ranking_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "serving" / "proto" / "ranking.proto"


def declared(text: str) -> dict[str, set[tuple[str, str, int]]]:
    """Per message of a ``.proto``, its fields as (type, name, number); repeated fields as ``repeated T``,
    maps as ``map<K,V>``. Top-level messages only (the file has no nested ones)."""
    text = re.sub(r"//[^\n]*", "", text)
    found = {}
    for name, body in re.findall(r"^message (\w+) \{([^}]*)\}", text, re.M):
        fields = re.findall(r"((?:repeated )?(?:map<\s*\w+\s*,\s*\w+\s*>|\w+)) (\w+) = (\d+);", body)
        found[name] = {(re.sub(r"\s+", "", t).replace("repeated", "repeated "), n, int(k)) for t, n, k in fields}
    return found


SCALARS = {FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_DOUBLE: "double", FieldDescriptor.TYPE_FLOAT:
           "float", FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "string"}


def generated() -> dict[str, set[tuple[str, str, int]]]:
    found = {}
    for name, message in ranking_pb2.DESCRIPTOR.message_types_by_name.items():
        fields = set()
        for field in message.fields:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                key, value = (SCALARS[entry.fields_by_name[k].type] for k in ("key", "value"))
                kind = f"map<{key},{value}>"
            else:
                kind = entry.name if entry is not None else SCALARS[field.type]
                kind = f"repeated {kind}" if field.is_repeated else kind
            fields.add((kind, field.name, field.number))
        found[name] = fields
    return found


def test_the_generated_messages_are_the_proto_s() -> None:
    assert declared(PROTO.read_text()) == generated(), "serving/proto is stale: run `make proto`"


def test_the_generated_service_is_the_proto_s() -> None:
    rpcs = set(re.findall(r"rpc (\w+)\((\w+)\) returns \((\w+)\);", PROTO.read_text()))
    service = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"]
    assert {(m.name, m.input_type.name, m.output_type.name) for m in service.methods} == rpcs
    assert {name for name in dir(ranking_pb2_grpc.RankingServicer) if not name.startswith("_")} == {r[0] for r in rpcs}


def test_the_comparison_can_fail() -> None:
    edited = PROTO.read_text().replace("bool compact = 4;", "bool compact = 5;")
    assert edited != PROTO.read_text() and declared(edited) != generated()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", text).group(0).split("."))


def test_dependency_bounds_are_the_generators_versions() -> None:
    """The gencode checks the runtime at import (protobuf >= its protoc, grpcio >= its plugin); pyproject.toml
    must not allow less than that, and the Makefile's pinned grpcio-tools is what wrote it."""
    source = (ROOT / "serving" / "proto" / "ranking_pb2.py").read_text()
    gencode = re.search(r"^# Protobuf Python Version: (\S+)$", source, re.M).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"protobuf>={gencode}"' in pyproject
    assert _version(protobuf_version) >= _version(gencode)
    assert f'"grpcio>={ranking_pb2_grpc.GRPC_GENERATED_VERSION}"' in pyproject
    tools = re.search(r"^GRPC_TOOLS_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert tools == ranking_pb2_grpc.GRPC_GENERATED_VERSION
