"""Email channel: IMAP intake (IDLE, persisted cursor), MIME normalisation, SMTP replies.

Registered as `"email": "channels.email:EmailChannel"`. Modules: `config` (the
`EmailConfig` model), `normalise` (pure MIME → fields), `cursor` (cursor and
journal on disk), `imap` (one aioimaplib session), `smtp` (build and send mail),
`channel` (the lifecycle tying them together).
"""

from channels.email.channel import EmailChannel
from channels.email.config import EmailConfig

__all__ = ["EmailChannel", "EmailConfig"]
