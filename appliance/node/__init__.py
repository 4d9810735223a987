"""The PServer: configuration, state directory, period clock and the trio driver."""
