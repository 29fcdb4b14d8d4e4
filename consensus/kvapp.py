"""A small key-value application for the chain: enough to test consensus end to end before
the mesh's own state machine runs on it.

Transactions: `kv.put` {"key": str, "value": bytes}, `kv.delete` {"key": str}, and
`kv.power` {"power": int}, which asks for the sender's own voting power from the next epoch
(0 leaves the set). It is a test application: anyone may make itself a validator here; the
mesh's state machine ties power to locked stake instead.
"""

from __future__ import annotations

from typing import Any

from hmnode import schema
from hmnode.env import Txn

from .messages import Transaction
from .validators import MAX_POWER

MAX_KEY = 256
MAX_VALUE = 2048
KINDS = ("kv.put", "kv.delete", "kv.power")


class KeyValueApp:
    """Keys to values in the `kv` table; validator power requests in `kv_power`."""

    def init(self, txn: Txn, genesis: Any) -> None:
        """Genesis values: app_state {"kv": {key: value}} (optional)."""
        app_state = genesis.app_state
        values = (app_state or {}).get("kv", {}) if isinstance(app_state, dict) else {}
        for key, value in sorted(values.items()):
            txn.put(schema.KV, str(key).encode(), value if isinstance(value, bytes)
                    else str(value).encode())

    def check(self, txn: Txn, tx: Transaction) -> str | None:
        """Why the transaction can never apply, or None."""
        if tx.kind not in KINDS:
            return f"unknown transaction kind {tx.kind!r}"
        body = _body(tx)
        if body is None:
            return "the body is not a map"
        if tx.kind == "kv.power":
            power = body.get("power")
            if isinstance(power, bool) or not isinstance(power, int) or not 0 <= power <= MAX_POWER:
                return f"power must be an integer in 0..{MAX_POWER}"
            return None
        key = body.get("key")
        if not isinstance(key, str) or not 0 < len(key.encode()) <= MAX_KEY:
            return f"key must be text of 1..{MAX_KEY} bytes"
        if tx.kind == "kv.put":
            value = body.get("value")
            if not isinstance(value, bytes) or len(value) > MAX_VALUE:
                return f"value must be bytes of at most {MAX_VALUE}"
        return None

    def deliver(self, txn: Txn, tx: Transaction, height: int, time_ms: int) -> str | None:
        body = _body(tx) or {}
        if tx.kind == "kv.put":
            txn.put(schema.KV, body["key"].encode(), body["value"])
        elif tx.kind == "kv.delete":
            if txn.get(schema.KV, body["key"].encode()) is None:
                return "no such key"
            txn.delete(schema.KV, body["key"].encode())
        else:
            txn.put(schema.KV_POWER, tx.sender, body["power"])
        return None

    def end_block(self, txn: Txn, height: int) -> None:
        return None

    def validators(self, txn: Txn) -> list[tuple[bytes, int]] | None:
        """The current set with every power request applied, or None when none was made."""
        requests = list(txn.items(schema.KV_POWER))
        if not requests:
            return None
        epoch_sets = list(txn.items(schema.VALIDATOR_SETS, reverse=True))
        powers = {bytes(k): int(p) for k, p in epoch_sets[0][1]} if epoch_sets else {}
        for key, power in requests:
            powers[key] = power
            txn.delete(schema.KV_POWER, key)
        return sorted(powers.items())

    def get(self, txn: Txn, key: str) -> bytes | None:
        return txn.get(schema.KV, key.encode())


def _body(tx: Transaction) -> dict | None:
    body = tx.payload
    return body if isinstance(body, dict) else None
