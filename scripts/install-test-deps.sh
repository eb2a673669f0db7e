#!/usr/bin/env bash
# Installs the system programs the tests use as real peers, only when missing:
# swaks (SMTP client), Node.js + npm (Nodemailer, the seed's Node client),
# ClamAV's clamd and SpamAssassin's spamd (the content-check plugins' daemons),
# HAProxy and Redis (several instances behind a balancer, sharing limits; the
# tests start private ones on loopback ports, never the system services).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null || need+=(swaks)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
[ -x /usr/sbin/spamd ] || need+=(spamd spamassassin)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# HAProxy and Redis: the tests run private ones on loopback ports; Debian
# would start the system's services on install, so they are kept from
# starting (policy-rc.d) unless the machine already has a policy.
cluster=()
[ -x /usr/sbin/haproxy ] || cluster+=(haproxy)
[ -x /usr/bin/redis-server ] || cluster+=(redis-server)
if [ ${#cluster[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to apt-get install ${cluster[*]}" >&2
        exit 1
    fi
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=/usr/sbin/policy-rc.d
    fi
    export DEBIAN_FRONTEND=noninteractive
    [ ${#need[@]} -gt 0 ] || apt-get update -q
    status=0
    apt-get install -y -q --no-install-recommends "${cluster[@]}" || status=$?
    [ -z "$policy" ] || rm -f "$policy"
    [ "$status" -eq 0 ] || exit "$status"
fi

if [ ! -d tests/e2e/node/node_modules/nodemailer ]; then
    (cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error)
fi
