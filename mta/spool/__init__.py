"""The durable, maildir-style message spool."""
