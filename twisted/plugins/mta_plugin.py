"""twistd plugin: makes C{twistd mta} and C{python -m twisted mta} available.

Only a ServiceMaker lives here; it names L{mta.tap} without importing it, so
that scanning plugins stays cheap.  This directory has no C{__init__.py}:
it extends Twisted's own C{twisted.plugins} package.
"""

from twisted.application.service import ServiceMaker

mta = ServiceMaker(
    "mta",
    "mta.tap",
    "Outbound mail submission and transfer agent",
    "mta",
)
