#!/usr/bin/env bash
# Make the local PostgreSQL and MariaDB ready for change data capture.
#
# Idempotent: it reads what the running servers report, writes a settings file
# only when its content differs, and restarts a server only when a setting it
# needs is not in force. A second run in a row prints "0 change(s)".
# It also starts a server it finds down.
#
# PostgreSQL: wal_level = logical, max_replication_slots and max_wal_senders
#   >= 20, a `host replication` trust line for 127.0.0.1, and a
#   scram-sha-256 line for members of the role `lcdc_password_auth` (the
#   test suite checks real wrong-password errors with such roles; every other
#   local role keeps trust).
# MariaDB: log_bin, binlog_format = ROW, binlog_row_image = FULL,
#   binlog_row_metadata = FULL, server_id = 1.
#
# Overrides: PG_VERSION (default: newest in /etc/postgresql), PG_CLUSTER
# (main), PGHOST/PGPORT (127.0.0.1/5432), MYSQL_HOST/MYSQL_PORT
# (127.0.0.1/3306), MARIADB_CNF_DIR (/etc/mysql/conf.d).
set -euo pipefail

changes=0
say() { printf 'setup: %s\n' "$*"; }
changed() { changes=$((changes + 1)); say "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# Write $2 to file $1 only if the content differs; return 0 if it wrote.
write_if_different() {
  local path=$1 content=$2
  if [[ -f $path ]] && [[ "$(cat "$path")" == "$content" ]]; then
    return 1
  fi
  [[ -w $(dirname "$path") ]] || die "cannot write $path (run as root, e.g. with sudo)"
  printf '%s\n' "$content" >"$path"
  return 0
}

wait_until() { # seconds, description, command...
  local seconds=$1 what=$2; shift 2
  for ((i = 0; i < seconds * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "$what did not answer within ${seconds}s"
}

# ---------------------------------------------------------------- PostgreSQL
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
export PGHOST PGPORT PGUSER=${PGUSER:-postgres}
PG_VERSION=${PG_VERSION:-$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)}
PG_CLUSTER=${PG_CLUSTER:-main}
[[ -n $PG_VERSION ]] || die "no PostgreSQL cluster under /etc/postgresql; install postgresql or set PG_VERSION"
pg_etc=/etc/postgresql/$PG_VERSION/$PG_CLUSTER
[[ -d $pg_etc ]] || die "$pg_etc does not exist; set PG_VERSION / PG_CLUSTER"

pg_ctl() { pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" "$@"; }
pg_ready() { pg_isready -q -h "$PGHOST" -p "$PGPORT"; }
psql_value() { psql -X -qAt -d postgres -c "$1"; }

if ! pg_ready; then
  changed "PostgreSQL $PG_VERSION/$PG_CLUSTER was down: starting it"
  pg_ctl start || true
  wait_until 60 "PostgreSQL at $PGHOST:$PGPORT" pg_ready
fi

grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf.d'" "$pg_etc/postgresql.conf" ||
  die "$pg_etc/postgresql.conf has no include_dir = 'conf.d'; add it so $pg_etc/conf.d is read"
pg_conf_file=$pg_etc/conf.d/95-loyalty-cdc.conf
pg_conf_content="# Written by loyalty-cdc docker/setup-local-databases.sh: what change data capture needs.
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20"
if write_if_different "$pg_conf_file" "$pg_conf_content"; then
  changed "wrote $pg_conf_file"
fi

hba=$(psql_value "SHOW hba_file")
hba_block="# BEGIN loyalty-cdc (docker/setup-local-databases.sh)
host    replication     all                     127.0.0.1/32    trust
host    all             +lcdc_password_auth   127.0.0.1/32    scram-sha-256
# END loyalty-cdc"
current_block=$(sed -n '/^# BEGIN loyalty-cdc/,/^# END loyalty-cdc/p' "$hba")
if [[ "$current_block" != "$hba_block" ]]; then
  [[ -w $hba ]] || die "cannot write $hba (run as root)"
  # First match wins in pg_hba.conf: our lines go on top.
  rest=$(sed '/^# BEGIN loyalty-cdc/,/^# END loyalty-cdc/d' "$hba")
  printf '%s\n%s\n' "$hba_block" "$rest" >"$hba"
  changed "added replication and password-auth lines to $hba"
  psql_value "SELECT pg_reload_conf()" >/dev/null
fi

wal_level=$(psql_value "SHOW wal_level")
slots=$(psql_value "SHOW max_replication_slots")
senders=$(psql_value "SHOW max_wal_senders")
if [[ $wal_level != logical || $slots -lt 20 || $senders -lt 20 ]]; then
  changed "restarting PostgreSQL (wal_level=$wal_level max_replication_slots=$slots max_wal_senders=$senders)"
  pg_ctl restart
  wait_until 60 "PostgreSQL at $PGHOST:$PGPORT" pg_ready
  wal_level=$(psql_value "SHOW wal_level")
  slots=$(psql_value "SHOW max_replication_slots")
  senders=$(psql_value "SHOW max_wal_senders")
  [[ $wal_level == logical && $slots -ge 20 && $senders -ge 20 ]] ||
    die "PostgreSQL still reports wal_level=$wal_level max_replication_slots=$slots max_wal_senders=$senders after restart; a later file in $pg_etc/conf.d may override $pg_conf_file"
fi

if [[ $(psql_value "SELECT count(*) FROM pg_roles WHERE rolname = 'lcdc_password_auth'") == 0 ]]; then
  psql_value "CREATE ROLE lcdc_password_auth NOLOGIN" >/dev/null
  changed "created role lcdc_password_auth (members must log in with a password)"
fi

wait_until 30 "PostgreSQL replication connections" \
  psql -X -qAt "host=$PGHOST port=$PGPORT user=$PGUSER dbname=postgres replication=database" -c "IDENTIFY_SYSTEM"
say "PostgreSQL $PG_VERSION at $PGHOST:$PGPORT: wal_level=$wal_level max_replication_slots=$slots max_wal_senders=$senders, replication connections accepted"

# ------------------------------------------------------------------- MariaDB
MYSQL_HOST=${MYSQL_HOST:-127.0.0.1}
MYSQL_PORT=${MYSQL_PORT:-3306}
MARIADB_CNF_DIR=${MARIADB_CNF_DIR:-/etc/mysql/conf.d}
my() { mariadb -uroot -h"$MYSQL_HOST" -P"$MYSQL_PORT" --protocol=tcp -N -B -e "$1"; }
my_ready() { mariadb-admin -uroot -h"$MYSQL_HOST" -P"$MYSQL_PORT" --protocol=tcp ping; }
start_mariadb() {
  install -d -o mysql -g mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_until 60 "MariaDB at $MYSQL_HOST:$MYSQL_PORT" my_ready
}

if ! my_ready >/dev/null 2>&1; then
  changed "MariaDB was down: starting it"
  start_mariadb
fi

my_cnf=/etc/mysql/my.cnf
if ! grep -Eq "^!includedir[[:space:]]+${MARIADB_CNF_DIR%/}/?[[:space:]]*$" "$my_cnf"; then
  [[ -w $my_cnf ]] || die "cannot write $my_cnf (run as root)"
  printf '\n!includedir %s/\n' "${MARIADB_CNF_DIR%/}" >>"$my_cnf"
  changed "added !includedir ${MARIADB_CNF_DIR%/}/ to $my_cnf"
fi
mkdir -p "$MARIADB_CNF_DIR"
my_conf_file=$MARIADB_CNF_DIR/90-loyalty-cdc.cnf
my_conf_content="# Written by loyalty-cdc docker/setup-local-databases.sh: what change data capture needs.
[mysqld]
log_bin = mariadb-bin
binlog_format = ROW
binlog_row_image = FULL
binlog_row_metadata = FULL
server_id = 1
# Bounded disk on a development machine; production keeps its own policy.
binlog_expire_logs_seconds = 604800"
if write_if_different "$my_conf_file" "$my_conf_content"; then
  changed "wrote $my_conf_file"
fi

my_settings() { my "SELECT CONCAT_WS(' ', IF(@@global.log_bin, 'ON', 'OFF'), @@global.binlog_format, @@global.binlog_row_image, @@global.binlog_row_metadata, @@global.server_id)"; }
wanted="ON ROW FULL FULL 1"
current=$(my_settings)
if [[ $current != "$wanted" ]]; then
  changed "restarting MariaDB (log_bin binlog_format binlog_row_image binlog_row_metadata server_id = $current)"
  mariadb-admin -uroot -h"$MYSQL_HOST" -P"$MYSQL_PORT" --protocol=tcp shutdown
  for ((i = 0; i < 240; i++)); do
    pgrep -x mariadbd >/dev/null || break
    sleep 0.25
  done
  pgrep -x mariadbd >/dev/null && die "MariaDB did not stop within 60s"
  start_mariadb
  current=$(my_settings)
  [[ $current == "$wanted" ]] ||
    die "MariaDB still reports '$current' (want '$wanted') after restart; check $my_conf_file is read (mariadbd --print-defaults)"
fi
say "MariaDB at $MYSQL_HOST:$MYSQL_PORT: log_bin=ON binlog_format=ROW binlog_row_image=FULL binlog_row_metadata=FULL server_id=1"

say "$changes change(s)"
