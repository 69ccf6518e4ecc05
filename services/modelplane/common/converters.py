"""Generic conversion between protobuf messages and the pydantic domain types.

Both sides share field names and enum numbers, so protobuf's JSON mapping is the bridge: a message
becomes a dict (enums as numbers, field names as in the .proto), the dict becomes a domain model,
and back. Each service's converters module builds on these two functions.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

M = TypeVar("M", bound=Message)
D = TypeVar("D", bound=BaseModel)


def from_proto(message: Message, model: type[D]) -> D:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, use_integers_for_enums=True)
    return model.model_validate(data)


def to_proto(value: BaseModel, message_type: type[M]) -> M:
    data = value.model_dump(mode="json", exclude_none=True)
    return json_format.ParseDict(data, message_type(), ignore_unknown_fields=True)
