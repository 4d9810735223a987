"""The boot path: ROM backends (Vstart), code manifest, boot checks."""
