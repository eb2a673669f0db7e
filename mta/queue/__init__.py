"""The queue manager and its pure retry schedule."""
