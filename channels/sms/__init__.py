"""SMS channels: Twilio-compatible (`type = "twilio"`) and generic HTTP gateways (`"sms_http"`).

Registered as `"twilio": "channels.sms:TwilioChannel"` and
`"sms_http": "channels.sms:HttpSmsChannel"`. Modules: `common` (numbers, segments,
opt-outs, the webhook listener and the send path both share), `twilio` (signatures,
the Messages API, status callbacks), `http_gateway` (configurable fields, templates).
"""

from channels.sms.common import SmsChannelBase, fit_segments, segment_count, split_segments
from channels.sms.http_gateway import HttpSmsChannel, HttpSmsConfig
from channels.sms.twilio import TwilioChannel, TwilioConfig

__all__ = [
    "HttpSmsChannel",
    "HttpSmsConfig",
    "SmsChannelBase",
    "TwilioChannel",
    "TwilioConfig",
    "fit_segments",
    "segment_count",
    "split_segments",
]
