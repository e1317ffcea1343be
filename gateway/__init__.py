"""A credit-metering, budget-enforcing reverse proxy for the Axerity chat API."""

__version__ = "0.1.0"
