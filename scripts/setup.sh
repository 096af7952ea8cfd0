#!/usr/bin/env bash
# Prepares this checkout on a fresh machine (Python 3.11 + pip, root for system packages):
# the system tools tests and the demo use, and a virtualenv in .venv with fsha installed.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_packages=()
command -v ip >/dev/null 2>&1 || need_packages+=(iproute2)
command -v arping >/dev/null 2>&1 || need_packages+=(iputils-arping)
# an independent SIP client for the network-namespace scenarios (tests/e2e)
command -v sipp >/dev/null 2>&1 || need_packages+=(sip-tester)
# the side-by-side benchmark (bench/failover_netns.py --vs-keepalived)
command -v keepalived >/dev/null 2>&1 || need_packages+=(keepalived)
# for the deployment files' tests: the OCF agent checker, an XML validator, systemd's verifier
command -v ocf-tester >/dev/null 2>&1 || need_packages+=(resource-agents)
command -v xmllint >/dev/null 2>&1 || need_packages+=(libxml2-utils)
command -v systemd-analyze >/dev/null 2>&1 || need_packages+=(systemd)
# for the limit/Redis tests (they start their own redis-server on a free loopback port)
command -v redis-server >/dev/null 2>&1 || need_packages+=(redis-server)
# hot standby profiles' egress fence ([takeover] profiles = "hot_standby", fsha.egress), and
# the packet captures of the real-FreeSWITCH scenarios and benchmarks
command -v nft >/dev/null 2>&1 || need_packages+=(nftables)
command -v tcpdump >/dev/null 2>&1 || need_packages+=(tcpdump)
# for the status page's test in a real headless browser (tests/test_webpage.py)
command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_packages+=(chromium-driver)
if [ ${#need_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need_packages[@]}" >/dev/null
    else
        echo "setup: missing ${need_packages[*]} (not root or no apt-get): tests needing them skip"
    fi
fi

# the real-FreeSWITCH test tier (tests/freeswitch): a FreeSWITCH built for this OS, when the
# shared folder that carries it is there (CI has it); its installer is idempotent and
# returns at once when /opt/freeswitch is current
fs_installer="$(pwd)/../shared/freeswitch/install.sh"
if [ -f "$fs_installer" ]; then
    if [ "$(id -u)" = 0 ]; then
        bash "$fs_installer" >/dev/null || echo "setup: FreeSWITCH install failed: tests/freeswitch skips"
    elif [ ! -x /opt/freeswitch/bin/freeswitch ]; then
        echo "setup: not root: FreeSWITCH not installed, tests/freeswitch skips"
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 \
    | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat 2>&1 \
    | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import fsha, twisted, automat' # fails loudly if the install did not work
