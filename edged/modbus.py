"""Modbus links (the I/O shell around pymodbus).

One `TcpEndpoint` per host:port holds one persistent connection, shared by
every unit id behind it; pymodbus serialises the requests on it. A failed or
malformed exchange becomes a `ReadError` value: nothing here raises into the
poller, so a bad reply can never stop the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edged.model import ReadError, ReadErrorKind
from edged.registers import MalformedResponse, ReadRequest, decode_response

log = structlog.get_logger("edged.modbus")

# pymodbus logs every timeout and reconnect at ERROR/WARNING through the stdlib;
# edged reports the same facts once, as structured read errors.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


@dataclass(frozen=True, slots=True)
class RawRead:
    """What one device's requests returned."""

    values: dict[str, int | float]
    registers: tuple[tuple[int, tuple[int, ...]], ...]
    error: ReadError | None


class Backoff:
    """Exponential reconnect delay: 0.5 s doubling to `max_s`."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.current_s = 0.0

    def failed(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.first_s)
        return self.current_s

    def succeeded(self) -> None:
        self.current_s = 0.0


class TcpEndpoint:
    """One Modbus TCP host:port: one connection, reconnected with backoff."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._backoff = Backoff()
        self._retry_at_mono = 0.0
        self._connect_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _connected_client(self) -> AsyncModbusTcpClient | ReadError:
        async with self._connect_lock:
            client = self._client
            if client is not None and client.connected:
                return client
            now_mono = asyncio.get_running_loop().time()
            if now_mono < self._retry_at_mono:
                return ReadError(
                    ReadErrorKind.CONNECTION,
                    f"{self.name} unreachable; next attempt in "
                    f"{self._retry_at_mono - now_mono:.1f}s",
                )
            if client is not None:
                client.close()
            # retries=0: a boundary read is not retried within the interval, it
            # is recorded as failed (MISSING) and the next boundary tries again.
            client = AsyncModbusTcpClient(
                self.host, port=self.port, timeout=self.timeout_s, retries=0, reconnect_delay=0
            )
            self._client = client
            try:
                ok = await client.connect()
            except Exception as exc:  # pymodbus raises a variety here
                ok = False
                log.debug("connect raised", endpoint=self.name, error=repr(exc))
            if not ok:
                delay_s = self._backoff.failed()
                self._retry_at_mono = now_mono + delay_s
                log.warning("modbus connect failed", endpoint=self.name, retry_in_s=delay_s)
                return ReadError(ReadErrorKind.CONNECTION, f"cannot connect to {self.name}")
            if self._backoff.current_s:
                log.info("modbus connected", endpoint=self.name)
            self._backoff.succeeded()
            return client

    async def read(self, unit_id: int, requests: Sequence[ReadRequest]) -> RawRead:
        """Run a device's requests in order; the first failure ends the read."""
        client = await self._connected_client()
        if isinstance(client, ReadError):
            return RawRead({}, (), client)
        values: dict[str, int | float] = {}
        registers: list[tuple[int, tuple[int, ...]]] = []
        for request in requests:
            words_or_error = await self._exchange(client, unit_id, request)
            if isinstance(words_or_error, ReadError):
                return RawRead(values, tuple(registers), words_or_error)
            registers.append((request.address, words_or_error))
            try:
                values.update(decode_response(request, words_or_error))
            except MalformedResponse as exc:
                return RawRead(
                    values, tuple(registers), ReadError(ReadErrorKind.MALFORMED, str(exc))
                )
        return RawRead(values, tuple(registers), None)

    async def _exchange(
        self, client: AsyncModbusTcpClient, unit_id: int, request: ReadRequest
    ) -> tuple[int, ...] | ReadError:
        call = (
            client.read_holding_registers
            if request.function == "holding"
            else client.read_input_registers
        )
        try:
            response: Any = await call(request.address, count=request.count, device_id=unit_id)
        except ModbusIOException as exc:
            return ReadError(ReadErrorKind.TIMEOUT, _short(exc))
        except ConnectionException as exc:
            return ReadError(ReadErrorKind.CONNECTION, _short(exc))
        except ModbusException as exc:
            return ReadError(ReadErrorKind.MALFORMED, _short(exc))
        except (TimeoutError, OSError) as exc:
            return ReadError(ReadErrorKind.CONNECTION, repr(exc))
        except Exception as exc:  # a pymodbus decoding bug must not stop the loop
            return ReadError(ReadErrorKind.MALFORMED, repr(exc))
        if response.isError():
            code = getattr(response, "exception_code", None)
            name = EXCEPTION_NAMES.get(code or -1, "unknown exception")
            return ReadError(
                ReadErrorKind.EXCEPTION, f"modbus exception {code} ({name})", exception_code=code
            )
        words = getattr(response, "registers", None)
        if not isinstance(words, list) or len(words) != request.count:
            got = len(words) if isinstance(words, list) else "no"
            return ReadError(
                ReadErrorKind.MALFORMED, f"expected {request.count} registers, got {got}"
            )
        return tuple(int(w) for w in words)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _short(exc: Exception) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.replace("Modbus Error: ", "")[:200]
