"""SMTP: the submission server and (later) the outbound client."""
