"""Why the MQTT broker would not have edged, in words a field engineer can act
on, with the config keys to look at.

aiomqtt reports a refused CONNECT as MqttConnectError carrying the broker's
CONNACK code: with paho 2 a ReasonCode for both protocol versions (an MQTT
3.1.1 refusal 4 or 5 arrives as 134 or 135), or a bare 3.1.1 code.
"""

from __future__ import annotations

from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from edged.config.schema import Mqtt

# MQTT 5 CONNACK reason codes (OASIS MQTT 5.0, 3.2.2.2) and the MQTT 3.1.1
# return codes (3.2.2.3) that mean "not these credentials".
BAD_CREDENTIALS = frozenset({134, 4})  # Bad User Name or Password
NOT_AUTHORIZED = frozenset({135, 5})  # Not authorized
BAD_AUTH_METHOD = 140
BAD_CLIENT_ID = frozenset({133, 2})  # Client Identifier not valid


def connack_code(exc: BaseException) -> int | None:
    """The broker's CONNACK refusal code, when `exc` is one."""
    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


def explain_connect_error(exc: BaseException, settings: Mqtt, broker: str) -> str | None:
    """A sentence for a refused connection (None when it is not a refusal the
    configuration can fix)."""
    code = connack_code(exc)
    if code is None:
        return None
    source = _password_source(settings)
    if code in BAD_CREDENTIALS or code == BAD_AUTH_METHOD:
        who = f"user name {settings.username!r}" if settings.username else "no user name"
        return (
            f"the broker {broker} refused the credentials ({exc}): edged sent {who} and "
            f"{source}; check mqtt.username and mqtt.password_file / mqtt.password_env, "
            "and the broker's password file"
        )
    if code in NOT_AUTHORIZED:
        if settings.username is None:
            return (
                f"the broker {broker} does not accept anonymous clients ({exc}): set "
                "mqtt.username and mqtt.password_file (or mqtt.password_env)"
            )
        return (
            f"the broker {broker} refused user {settings.username!r} ({exc}): the user name "
            f"or the password ({source}) is wrong, or the broker's ACL does not let this user "
            "connect; check mqtt.username and mqtt.password_file / mqtt.password_env"
        )
    if code in BAD_CLIENT_ID:
        return f"the broker {broker} refused the client id ({exc}); check mqtt.client_id"
    return f"the broker {broker} refused the connection ({exc}); check the mqtt settings"


def _password_source(settings: Mqtt) -> str:
    if settings.password_file is not None:
        return f"the password from {settings.password_file}"
    if settings.password_env is not None:
        return f"the password from ${settings.password_env}"
    return "no password"
