"""What a model directory's check reads of an ONNX file, parsed from the protobuf wire format.

``import onnx`` costs 0.3-0.6 s on the dev VMs (its ``ml_dtypes`` extension), a third to a half of
an app's time from process start to first token, for a check that needs the graph's input and
output names, the logits' width and each external tensor's data entries. This reads those fields
alone (``ModelProto.graph``: inputs, outputs, initializers and the tensors of node attributes, the
places ``onnx.load`` leaves external data) and skips the rest by length, never decoding weights.
A file that is not a well-formed message raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

# Field numbers of onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_NODE_ATTRIBUTE, _ATTRIBUTE_TENSOR = 5, 5
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_SHAPE, _SHAPE_DIM, _DIM_VALUE = 1, 2, 1, 2, 1, 1
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclasses.dataclass
class ExternalTensor:
    name: str
    entries: dict[str, str]  # location, offset, length, checksum


@dataclasses.dataclass
class GraphHeader:
    inputs: list[str]
    outputs: list[str]
    logits_width: int  # the first output's last dimension; 0 when symbolic or absent
    external: list[ExternalTensor]


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """``(field number, value)`` of the message in ``data[start:end]``: an int for a varint, the
    ``(start, end)`` span for a length-delimited field; fixed-width fields are skipped."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            value, position = (position, position + length), position + length
        elif wire in (1, 5):
            value, position = 0, position + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} is not one ONNX uses")
        if number == 0 or position > end:
            raise ValueError("a field runs past its message")
        yield number, value


def _spans(data: bytes, span: tuple[int, int], number: int) -> list[tuple[int, int]]:
    return [value for field, value in _fields(data, *span) if field == number and isinstance(value, tuple)]


def _text(data: bytes, span: tuple[int, int]) -> str:
    return data[span[0]:span[1]].decode("utf-8")


def _name(data: bytes, span: tuple[int, int], number: int) -> str:
    names = _spans(data, span, number)
    return _text(data, names[-1]) if names else ""


def _external(data: bytes, tensor: tuple[int, int]) -> ExternalTensor | None:
    location, name, entries = 0, "", {}
    for field, value in _fields(data, *tensor):
        if field == _TENSOR_DATA_LOCATION and isinstance(value, int):
            location = value
        elif field == _TENSOR_NAME and isinstance(value, tuple):
            name = _text(data, value)
        elif field == _TENSOR_EXTERNAL_DATA and isinstance(value, tuple):
            entries[_name(data, value, 1)] = _name(data, value, 2)
    return ExternalTensor(name, entries) if location == _EXTERNAL else None


def _last_dim(data: bytes, value_info: tuple[int, int]) -> int:
    dims = [dim for kind in _spans(data, value_info, _VALUE_TYPE) for tensor in _spans(data, kind, _TYPE_TENSOR)
            for shape in _spans(data, tensor, _TENSOR_TYPE_SHAPE) for dim in _spans(data, shape, _SHAPE_DIM)]
    if not dims:
        return 0
    values = [value for field, value in _fields(data, *dims[-1]) if field == _DIM_VALUE and isinstance(value, int)]
    return values[-1] if values else 0


def read(data: bytes) -> GraphHeader:
    """The header of a serialized ``ModelProto`` (``ValueError`` when it is not one)."""
    inputs, outputs, tensors = [], [], []
    for graph in _spans(data, (0, len(data)), _MODEL_GRAPH):
        for field, value in _fields(data, *graph):
            if not isinstance(value, tuple):
                continue
            if field == _GRAPH_INPUT:
                inputs.append(_name(data, value, _VALUE_NAME))
            elif field == _GRAPH_OUTPUT:
                outputs.append(value)
            elif field == _GRAPH_INITIALIZER:
                tensors.append(value)
            elif field == _GRAPH_NODE:
                tensors += [tensor for attribute in _spans(data, value, _NODE_ATTRIBUTE)
                            for tensor in _spans(data, attribute, _ATTRIBUTE_TENSOR)]
    external = [tensor for tensor in (_external(data, span) for span in tensors) if tensor is not None]
    return GraphHeader(inputs, [_name(data, span, _VALUE_NAME) for span in outputs],
                       _last_dim(data, outputs[0]) if outputs else 0, external)
