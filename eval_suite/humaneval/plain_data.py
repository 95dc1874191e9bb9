"""Plain data over a pipe: the only thing a sandboxed HumanEval candidate can hand back.

A value is encoded as JSON in which lists stay lists and every other container is tagged, so
decoding gives back exactly the types that went in: None, bool, int, float (NaN and infinities
included), complex, str, bytes, list, tuple, dict, set and frozenset. Nothing else can be built from a
message, so a returned object cannot carry behaviour (an ``__eq__`` that always says True, a
``__del__``, a property) into the process that judges it.

Messages are framed as a 4-byte big-endian length, then UTF-8 JSON.

The sandboxed interpreter runs this same file as source (it cannot import ``eval_suite``), so it
uses the standard library only and defines nothing at import time but functions and constants.
"""

import json
import struct

HEADER = struct.Struct(">I")


class NotPlainData(TypeError):
    """The value (or a part of it) is not one of the plain types."""


def encode(value, depth=0):
    """A JSON-able tree for ``value``; subclasses of the plain types are reduced to the base type."""
    if depth > 100:
        raise NotPlainData("nested more than 100 levels deep")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"tuple": [encode(v, depth + 1) for v in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"frozenset": [encode(v, depth + 1) for v in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [encode(v, depth + 1) for v in set.__iter__(value)]}
    raise NotPlainData(f"{type(value).__name__} is not plain data")


_TAGS = {
    "tuple": lambda items: tuple(decode(v) for v in items),
    "set": lambda items: {decode(v) for v in items},
    "frozenset": lambda items: frozenset(decode(v) for v in items),
    "dict": lambda pairs: {decode(k): decode(v) for k, v in pairs},
    "bytes": bytes.fromhex,
    "complex": lambda parts: complex(float(parts[0]), float(parts[1])),
}


def decode(tree):
    """The value ``encode`` made ``tree`` from; raises on anything ``encode`` cannot have made."""
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is list:
        return [decode(v) for v in tree]
    if type(tree) is dict and len(tree) == 1:
        (tag, payload), = tree.items()
        if tag in _TAGS:
            return _TAGS[tag](payload)
    raise NotPlainData(f"not an encoded value: {str(tree)[:80]}")


def dumps(message) -> bytes:
    """A framed message (the message is a JSON-able dict whose values were built with ``encode``)."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body
