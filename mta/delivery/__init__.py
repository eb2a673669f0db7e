"""Delivery: next hops (MX, routes), the delivery agent, MIME downgrade."""
