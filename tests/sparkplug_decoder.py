"""An independent Sparkplug B decoder for the tests: Google's protobuf runtime with
code generated, at test time, from the published sparkplug_b.proto (vendored in
tests/sparkplug/, with its source and licence) by the protoc that grpcio-tools
ships. It shares nothing with edged's hand-written encoder (edged.io.sparkplug_pb).
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTO_DIR = Path(__file__).parent / "sparkplug"

# Datatype codes as the comment in sparkplug_b.proto lists them.
INT64, UINT64, DOUBLE, BOOLEAN, STRING, INT32, DATETIME = 4, 8, 10, 11, 12, 3, 13


@functools.cache
def generated() -> Any:
    """The sparkplug_b_pb2 module, compiled once per test session."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="sparkplug-pb2-"))
    code = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", str(PROTO_DIR / "sparkplug_b.proto")]
    )
    assert code == 0, "protoc failed on the vendored sparkplug_b.proto"
    spec = importlib.util.spec_from_file_location("sparkplug_b_pb2", out / "sparkplug_b_pb2.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode(payload: bytes) -> Any:
    """A Payload message."""
    return generated().Payload.FromString(payload)


def metric_value(metric: Any) -> Any:
    """The value a metric (or property value) carries, None when is_null."""
    if metric.is_null:
        return None
    which = metric.WhichOneof("value")
    return None if which is None else getattr(metric, which)


def properties(metric: Any) -> dict[str, tuple[int, Any]]:
    """A metric's property set: key -> (type, value)."""
    props = metric.properties
    return {
        key: (value.type, metric_value(value))
        for key, value in zip(props.keys, props.values, strict=True)
    }


@dataclass
class Message:
    topic: str
    payload: bytes

    @property
    def kind(self) -> str:
        return self.topic.split("/")[2]

    @property
    def device(self) -> str | None:
        parts = self.topic.split("/")
        return parts[4] if len(parts) > 4 else None

    def decoded(self) -> Any:
        return decode(self.payload)


def command(metrics: list[tuple[str, int, Any]], timestamp_ms: int) -> bytes:
    """An NCMD/DCMD payload as a host application would send it."""
    pb = generated()
    payload = pb.Payload(timestamp=timestamp_ms)
    for name, datatype, value in metrics:
        metric = payload.metrics.add(name=name, datatype=datatype, timestamp=timestamp_ms)
        if datatype == BOOLEAN:
            metric.boolean_value = value
        elif datatype == DOUBLE:
            metric.double_value = value
        else:
            metric.string_value = value
    data: bytes = payload.SerializeToString()
    return data
