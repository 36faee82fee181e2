"""Body encoding shared by client and server: msgpack or JSON, chosen by content type."""
from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

MSGPACK = "application/msgpack"
JSON = "application/json"

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """The body could not be parsed or does not match the expected message; the text says why."""


def wants_msgpack(content_type: str | None) -> bool:
    return content_type is not None and "msgpack" in content_type.lower()


def encode(message: BaseModel, as_msgpack: bool) -> bytes:
    if as_msgpack:
        return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return message.model_dump_json().encode()


def decode(body: bytes, content_type: str | None, model: type[M]) -> M:
    try:
        if wants_msgpack(content_type):
            data = msgpack.unpackb(body, raw=False)
            return model.model_validate(data)
        return model.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise DecodeError(f"invalid {model.__name__}: {problems}") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        kind = "msgpack" if wants_msgpack(content_type) else "JSON"
        raise DecodeError(f"malformed {kind} body: {e}") from None

