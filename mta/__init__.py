"""mta: an outbound mail submission and transfer agent on Twisted."""

__version__ = "0.1.0"
