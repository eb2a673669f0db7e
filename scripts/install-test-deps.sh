#!/usr/bin/env bash
# Installs the system programs the tests use as real peers, only when missing:
# swaks (SMTP client), Node.js + npm (Nodemailer, the seed's Node client),
# ClamAV's clamd and SpamAssassin's spamd (the content-check plugins' daemons),
# HAProxy and Redis (several instances behind a balancer, sharing limits; the
# tests start private ones on loopback ports, never the system services).
# Exim (a real MTA that relays into mta with BDAT; the tests run their own
# private exim, never the system's service).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null || need+=(swaks)
command -v jq >/dev/null || need+=(jq)  # the spool recipes of docs/spool-format.md
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
[ -x /usr/sbin/spamd ] || need+=(spamd spamassassin)
new_exim=0
if [ ! -x /usr/sbin/exim4 ]; then
    need+=(exim4-daemon-light)
    new_exim=1
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # exim4's postinst starts the packaged exim on port 25; a policy-rc.d
    # that says no (where there is none already) keeps it from starting.
    made_policy=0
    if [ "$new_exim" = 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
    if [ "$made_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    if [ "$new_exim" = 1 ]; then
        # And should it have started anyway (or at the next boot): stopped
        # and disabled.  The tests' exim has its own configuration and ports.
        if [ -d /run/systemd/system ]; then
            systemctl disable --now exim4 >/dev/null 2>&1 || true
        else
            update-rc.d exim4 disable >/dev/null 2>&1 || true
            invoke-rc.d exim4 stop >/dev/null 2>&1 || true
        fi
    fi
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
    # Should one have started anyway (or at the next boot): stopped and disabled.
    for service in "${cluster[@]}"; do
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "$service" >/dev/null 2>&1 || true
        else
            update-rc.d "$service" disable >/dev/null 2>&1 || true
            invoke-rc.d "$service" stop >/dev/null 2>&1 || true
        fi
    done
fi

if [ ! -d tests/e2e/node/node_modules/nodemailer ]; then
    (cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error)
fi
