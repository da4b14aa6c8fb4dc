#!/usr/bin/env bash
# Makes a Debian machine ready to run taskmgr, idempotently. Each step says what it
# does and skips itself when already done, so a second run takes seconds.
#
#   1. TimescaleDB: built from Debian trixie's *source* package (Apache-only edition)
#      when the extension is missing; bookworm ships no TimescaleDB binary.
#   2. PostgreSQL preloads timescaledb and pg_stat_statements (the statements per task of
#      `taskmgr bench lifecycle --statements`); restart only when the setting changes.
#   3. PostgreSQL and RabbitMQ are started when down.
#   4. The database (TASKMGR_DB_NAME, default taskmgr) is created when missing.
#   5. Prometheus (Debian's `prometheus` package: the server and promtool) for the tests
#      of the alerting rules; the service the package enables is kept stopped (the tests
#      start their own Prometheus on a free port).
#   6. Chromium and its driver from Debian's packages, for the console's browser tests
#      (tests/acceptance/test_console.py): installed when missing.
#   7. A virtualenv at .venv with the project installed (re-installed only when
#      pyproject.toml changed).
#
# Needs root (apt-get, the PostgreSQL cluster). Set TASKMGR_SETUP_SKIP_SYSTEM=1 to do
# only step 7 (for example inside a container where the services are elsewhere).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=${TASKMGR_PG_MAJOR:-15}
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
DB_NAME=${TASKMGR_DB_NAME:-taskmgr}
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAtX)
BUILD_DIR=${TASKMGR_BUILD_DIR:-/var/tmp/taskmgr-timescaledb}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

pg_up() { "${PSQL[@]}" -d postgres -c 'select 1' >/dev/null 2>&1; }

start_postgres() {
  if ! pg_up; then
    say "starting PostgreSQL $PG_MAJOR"
    pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" main start || true
    for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
    pg_up || { echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
  fi
}

restart_postgres() {
  say "restarting PostgreSQL $PG_MAJOR to load its preloaded libraries"
  pg_ctlcluster --skip-systemctl-redirect "$PG_MAJOR" main restart
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { echo "PostgreSQL did not come back after the restart" >&2; exit 1; }
}

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

start_rabbitmq() {
  if ! rabbit_up; then
    say "starting RabbitMQ"
    rabbitmq-server -detached || true
    for _ in $(seq 1 120); do rabbit_up && break; sleep 0.5; done
    rabbit_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  fi
}

timescaledb_installed() {
  [ -f "$("$PG_CONFIG" --sharedir 2>/dev/null)/extension/timescaledb.control" ]
}

install_timescaledb() {
  say "TimescaleDB is missing: building it from Debian trixie's source package"
  if [ ! -f /etc/apt/sources.list.d/trixie-src.sources ]; then
    say "adding a deb-src (source only) entry for trixie"
    cat >/etc/apt/sources.list.d/trixie-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  say "installing build tools and postgresql-server-dev-$PG_MAJOR"
  apt-get install -y -qq --no-install-recommends \
    "postgresql-server-dev-$PG_MAJOR" cmake make gcc dpkg-dev libssl-dev >/dev/null
  rm -rf "$BUILD_DIR" && mkdir -p "$BUILD_DIR" && cd "$BUILD_DIR"
  apt-get source --download-only -qq timescaledb
  tar xf timescaledb_*.orig.tar.*
  src=$(find . -maxdepth 1 -type d -name 'timescaledb-*' | head -n 1)
  cd "$src"
  say "compiling TimescaleDB (Apache-only) in $BUILD_DIR/$src"
  cmake -S . -B build -DPG_CONFIG="$PG_CONFIG" -DAPACHE_ONLY=1 \
    -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DUSE_TELEMETRY=OFF \
    -DCMAKE_BUILD_TYPE=Release >/dev/null
  make -C build -j"$(nproc)" >/dev/null
  make -C build install >/dev/null
  cd "$here"
  say "TimescaleDB installed"
}

preload_timescaledb() {
  local current value lib
  current=$("${PSQL[@]}" -d postgres -c 'show shared_preload_libraries')
  value=$current
  for lib in timescaledb pg_stat_statements; do
    [[ ",${value// /}," == *",$lib,"* ]] || value=${value:+$value,}$lib
  done
  if [ "$value" != "$current" ]; then
    say "preloading $value (shared_preload_libraries)"
    # One quoted literal per library: ALTER SYSTEM would keep 'a,b' as ONE library named
    # "a,b", and the server would not start.
    local items sql=""
    IFS=',' read -ra items <<< "${value// /}"
    for lib in "${items[@]}"; do sql+="${sql:+, }'$lib'"; done
    "${PSQL[@]}" -d postgres -c "alter system set shared_preload_libraries = $sql"
    restart_postgres
  fi
}

create_database() {
  if [ -z "$("${PSQL[@]}" -d postgres -c "select 1 from pg_database where datname = '$DB_NAME'")" ]; then
    say "creating database $DB_NAME"
    "${PSQL[@]}" -d postgres -c "create database \"$DB_NAME\""
  fi
}

# RabbitMQ users with the least each needs (names are prefix-agnostic: the prefix is a
# deployment setting; P below is the prefix). Each kind of message has an exchange of
# its own (taskmgr/broker.py Topology), so the write permission on it says who may send
# it, and nobody may write to the default exchange (amq.default). RabbitMQ's rules:
# declaring needs configure; queue.bind needs write on the queue and read on the
# exchange; a queue declared with a dead-letter exchange needs write on it and read on
# the queue; publishing needs write on the exchange; consuming needs read on the queue.
#   manager:  declares the topology (the events stream P.events.stream and the recorder's
#             queue P.events.recorder with it); publishes start orders (P.start), stops
#             (P.control), dead letters (P.dlx); consumes P.progress and, as the recorder,
#             P.events.recorder. It may not publish reports.
#   runner:   declares its pool's start queue and its own control queue (P.control.<id>);
#             publishes reports (P.reports), events (P.events), dead letters; consumes
#             its start and control queues. It may not publish start orders or stops.
#   service:  an outside service: publishes to P.reports only.
#   consumer: a downstream service: declares, binds (to P.events) and reads its own
#             queues (server-named amq.gen-*, aio-pika's generated amq_<hex>, or
#             P.consumer.*), and reads (only) the events stream P.events.stream; it may
#             publish nowhere.
# Development passwords equal the user names; set TASKMGR_RABBIT_PASSWORD_<USER> to
# choose others.
rabbit_users() {
  local existing
  existing=$(rabbitmqctl -q list_users 2>/dev/null | cut -f1)
  local user conf write read
  # One line per user in scripts/rabbitmq-users: the configure, write and read patterns.
  while read -r user conf write read; do
    [[ -z "$user" || "$user" == \#* ]] && continue
    if ! grep -qx "$user" <<<"$existing"; then
      say "creating RabbitMQ user $user"
      local var="TASKMGR_RABBIT_PASSWORD_${user^^}"
      rabbitmqctl -q add_user "$user" "${!var:-$user}" >/dev/null </dev/null
    fi
    rabbitmqctl -q set_permissions -p / "$user" "$conf" "$write" "$read" >/dev/null </dev/null
  done <"$here/scripts/rabbitmq-users"
}

install_prometheus() {
  if ! command -v promtool >/dev/null || [ ! -x /usr/bin/prometheus ]; then
    say "installing Prometheus (Debian's prometheus package: the server and promtool)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  fi
  # The package enables a service on port 9090; nothing here uses it.
  if [ -d /run/systemd/system ]; then
    if systemctl is-enabled --quiet prometheus 2>/dev/null || systemctl is-active --quiet prometheus; then
      say "stopping and disabling the prometheus service"
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    say "stopping the prometheus service"
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
}

install_chromium() {
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    say "installing chromium and chromium-driver (the console's browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
}

make_venv() {
  cd "$here"
  local stamp=.venv/.taskmgr-installed want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    say "creating the virtualenv .venv"
    python3 -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing taskmgr and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[dev]"
    echo "$want" >"$stamp"
  fi
}

if [ "${TASKMGR_SETUP_SKIP_SYSTEM:-0}" != 1 ]; then
  start_postgres
  # Installing postgresql-server-dev upgrades the server package, which may stop it.
  timescaledb_installed || { install_timescaledb; start_postgres; }
  preload_timescaledb
  start_rabbitmq
  rabbit_users
  create_database
  install_prometheus
  install_chromium
fi
make_venv
say "ready: PostgreSQL+TimescaleDB on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672, .venv"
