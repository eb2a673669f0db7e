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
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/bin/redis-server ] || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [ ! -d tests/e2e/node/node_modules/nodemailer ]; then
    (cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error)
fi
