"""The metering core: pricing and windows (pure), holds, settlements, idempotency and hold expiry."""
